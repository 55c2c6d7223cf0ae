//! The STUN listener: answers Binding requests, rate-limited per source IP.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use warren_relay_proto::stun::{binding_response, StunError};

use crate::config::StunConfig;
use crate::metrics::StunResult;
use crate::state::Shared;
use warren_common::limits::TokenBucket;

/// Source IPs tracked before idle entries are swept.
const MAX_TRACKED_SOURCES: usize = 100_000;

/// Per-source-IP token buckets.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, TokenBucket>,
}

impl RateLimiter {
    pub(crate) fn new(rate_per_second: f64, burst: f64) -> Self {
        RateLimiter { rate: rate_per_second, burst, buckets: HashMap::new() }
    }

    /// New limits for every source from `now` on (a reload).
    pub(crate) fn set_rate(&mut self, rate_per_second: f64, burst: f64, now: Instant) {
        (self.rate, self.burst) = (rate_per_second, burst);
        for bucket in self.buckets.values_mut() {
            bucket.set_rate(rate_per_second, burst, now);
        }
    }

    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= MAX_TRACKED_SOURCES && !self.buckets.contains_key(&ip) {
            self.sweep(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.entry(ip).or_insert_with(|| TokenBucket::new(rate, burst, now)).try_take(now, 1.0)
    }

    /// Forgets sources whose bucket has refilled (they are indistinguishable from new ones).
    fn sweep(&mut self, now: Instant) {
        self.buckets.retain(|_, bucket| !bucket.is_full(now));
        if self.buckets.len() >= MAX_TRACKED_SOURCES {
            // Still full of active sources: start over rather than grow without bound.
            self.buckets.clear();
        }
    }
}

/// Largest read: with UDP GRO (which quinn-udp turns on where the kernel has it) the kernel may
/// hand over several same-sized datagrams from one source in one buffer.
const RECV_BUF: usize = 64 << 10;

/// Serves STUN on `socket` until `cancel` fires, at the per-source rate of the configuration in
/// force (a reload changes it for every source at once).
///
/// Each reply leaves from the address its request was sent to (IP_PKTINFO, through
/// quinn-udp): on a host with several addresses and a wildcard bind, the kernel would
/// otherwise pick the source by route, and a client's NAT drops an answer from an address it
/// never sent to.
pub(crate) async fn serve(
    socket: UdpSocket,
    state: quinn_udp::UdpSocketState,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut live = shared.live.subscribe();
    let mut limiter = RateLimiter::new(0.0, 0.0);
    live.mark_changed();
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let mut meta = [quinn_udp::RecvMeta::default()];
        let received = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.async_io(Interest::READABLE, || {
                state.recv((&socket).into(), &mut [IoSliceMut::new(&mut buf)], &mut meta)
            }) => r,
        };
        // ICMP-induced errors on UDP sockets are per-datagram; keep serving.
        let Ok(_) = received else { continue };
        if live.has_changed().unwrap_or(false) {
            if let Some(StunConfig { rate, .. }) = &live.borrow_and_update().stun {
                limiter.set_rate(f64::from(rate.per_second.get()), f64::from(rate.burst.get()), Instant::now());
            }
        }
        let meta = meta[0];
        let stride = meta.stride.max(1);
        for datagram in buf[..meta.len.min(RECV_BUF)].chunks(stride) {
            let Some(reply) = answer(&mut limiter, &shared, datagram, meta.addr) else { continue };
            let transmit = quinn_udp::Transmit {
                destination: meta.addr,
                ecn: None,
                contents: &reply,
                segment_size: None,
                src_ip: meta.dst_ip,
            };
            let sent = socket.async_io(Interest::WRITABLE, || state.send((&socket).into(), &transmit)).await;
            if let Err(e) = sent {
                warn!(error = %e, "STUN reply failed");
            }
        }
    }
}

/// The reply to one datagram from `from`, counted; `None` when it gets none.
fn answer(limiter: &mut RateLimiter, shared: &Shared, datagram: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    if !limiter.allow(from.ip(), Instant::now()) {
        shared.metrics.stun(StunResult::RateLimited);
        return None;
    }
    match binding_response(datagram, from) {
        Ok(resp) => {
            shared.metrics.stun(StunResult::Ok);
            Some(resp)
        }
        Err(StunError::NotBindingRequest) => {
            shared.metrics.stun(StunResult::NotBinding);
            None
        }
        Err(_) => {
            shared.metrics.stun(StunResult::Malformed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let mut l = RateLimiter::new(10.0, 3.0);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow(ip, t0)));
        assert!(!l.allow(ip, t0));
        assert!(l.allow(other, t0), "limits are per source");
        assert!(l.allow(ip, t0 + Duration::from_millis(100)), "refills at the rate");
        assert!(!l.allow(ip, t0 + Duration::from_millis(100)));
    }
}
