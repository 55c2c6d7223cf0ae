//! Relay scenarios: pairs of simulated nodes, one sending to the other through the relay.
//!
//! Payload: `send time (u64 ns since the run started) | sequence (u64) | padding`.
//! - **paced** (open loop): each sender offers `rate` packets/s regardless of deliveries;
//! - **closed** loop: each sender keeps at most `window` packets in flight (sent, not yet
//!   received by its partner).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use rand_core::{OsRng, RngCore};
use tokio::sync::Notify;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{Frame, SecretKey, Transport};

use crate::report::{histogram, Latency, Probe, RelayReport, PROGRESS};

/// How senders pace themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Open loop at this many packets/s per pair.
    Paced {
        /// Packets per second per pair.
        rate: f64,
    },
    /// Closed loop with this many packets in flight per pair.
    Closed {
        /// In-flight packets per pair.
        window: u64,
    },
}

/// One relay scenario.
#[derive(Debug, Clone)]
pub struct RelayScenario {
    /// Relay URL.
    pub url: String,
    /// Extra CA (the relay's dev CA).
    pub ca: Option<PathBuf>,
    /// Sender/receiver pairs.
    pub pairs: usize,
    /// Packet size (at least 16).
    pub size: usize,
    /// Pacing.
    pub mode: Mode,
    /// Sending time.
    pub duration: Duration,
    /// Use WebSocket instead of the DERP upgrade.
    pub websocket: bool,
    /// Spread client connections over 127.0.0.1 .. 127.0.0.N (0 = OS default source).
    pub source_ips: u8,
    /// Stop after this many packets per pair even before `duration` (0 = no limit).
    pub max_packets_per_pair: u64,
    /// One more pair, paced at this many packets/s and reported on its own: what a light
    /// client sees while the others load the relay.
    pub probe_rate: Option<f64>,
}

impl RelayScenario {
    fn opts(&self, i: usize) -> ConnectOptions {
        let bind_ip = (self.source_ips > 0)
            .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(self.source_ips)) as u8)));
        ConnectOptions {
            transport: if self.websocket { Transport::WebSocket } else { Transport::Derp },
            ca_file: self.ca.clone(),
            timeout: Duration::from_secs(30),
            bind_ip,
            ..Default::default()
        }
    }
}

struct PairState {
    received: AtomicU64,
    progress: Notify,
}

/// Runs a scenario and reports what the clients saw.
///
/// # Errors
/// A client could not log in.
pub async fn run(s: &RelayScenario) -> anyhow::Result<RelayReport> {
    anyhow::ensure!(s.size >= 16 && s.size <= warren_relay_proto::MAX_PACKET_SIZE, "size must be 16..=65536");
    anyhow::ensure!(s.pairs > 0, "at least one pair");
    let mut senders = Vec::with_capacity(s.pairs);
    let mut receivers = Vec::with_capacity(s.pairs);
    for i in 0..s.pairs {
        let a = DerpClient::connect(&s.url, &SecretKey::generate(&mut OsRng), &s.opts(2 * i)).await?;
        let b = DerpClient::connect(&s.url, &SecretKey::generate(&mut OsRng), &s.opts(2 * i + 1)).await?;
        senders.push(a);
        receivers.push(b);
    }
    let probe = match s.probe_rate {
        Some(_) => Some((
            DerpClient::connect(&s.url, &SecretKey::generate(&mut OsRng), &s.opts(2 * s.pairs)).await?,
            DerpClient::connect(&s.url, &SecretKey::generate(&mut OsRng), &s.opts(2 * s.pairs + 1)).await?,
        )),
        None => None,
    };
    let t0 = Instant::now();
    let deadline = t0 + s.duration;
    let probe = probe.map(|(a, b)| {
        let state = Arc::new(PairState { received: AtomicU64::new(0), progress: Notify::new() });
        let rate = s.probe_rate.unwrap_or(1.0);
        let paced = RelayScenario { mode: Mode::Paced { rate }, ..s.clone() };
        let dst = b.public_key();
        (tokio::spawn(send(a, dst, paced, t0, deadline, state.clone())), tokio::spawn(receive(b, t0, state)))
    });
    let mut recv_tasks = Vec::new();
    let mut send_tasks = Vec::new();
    for (a, b) in senders.into_iter().zip(receivers) {
        let state = Arc::new(PairState { received: AtomicU64::new(0), progress: Notify::new() });
        let dst = b.public_key();
        recv_tasks.push(tokio::spawn(receive(b, t0, state.clone())));
        send_tasks.push(tokio::spawn(send(a, dst, s.clone(), t0, deadline, state)));
    }
    let (mut sent, mut skipped) = (0, 0);
    for t in send_tasks {
        let (s, k) = t.await??;
        sent += s;
        skipped += k;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut hist = histogram();
    let mut received = 0;
    for t in recv_tasks {
        let (n, h) = t.await?;
        received += n;
        hist.add(&h).map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
    }
    let lost = sent.saturating_sub(received);
    let probe = match probe {
        Some((send, recv)) => {
            let (sent, _) = send.await??;
            let (received, hist) = recv.await?;
            Some(Probe { sent, received, latency: Latency::from_ns(&hist) })
        }
        None => None,
    };
    Ok(RelayReport {
        mode: match s.mode {
            Mode::Paced { .. } => "paced".into(),
            Mode::Closed { .. } => "closed".into(),
        },
        pairs: s.pairs,
        size: s.size,
        offered_pps: match s.mode {
            Mode::Paced { rate } => Some(rate * s.pairs as f64),
            Mode::Closed { .. } => None,
        },
        seconds,
        sent,
        skipped,
        received,
        lost,
        loss_pct: if sent == 0 { 0.0 } else { 100.0 * lost as f64 / sent as f64 },
        delivered_pps: received as f64 / seconds,
        delivered_mbps: received as f64 * s.size as f64 / seconds / 1e6,
        latency: Latency::from_ns(&hist),
        probe,
    })
}

/// Receives until 1 s passes without a packet after the senders are done (or forever idle).
async fn receive(mut b: DerpClient, t0: Instant, state: Arc<PairState>) -> (u64, Histogram<u64>) {
    let mut hist = histogram();
    let mut n = 0u64;
    loop {
        let Ok(Ok((_, data))) = tokio::time::timeout(Duration::from_secs(1), b.recv_packet()).await else {
            break;
        };
        if data.len() >= 16 {
            let sent_ns = u64::from_be_bytes(data[..8].try_into().unwrap_or_default());
            let now_ns = t0.elapsed().as_nanos() as u64;
            let _ = hist.record(now_ns.saturating_sub(sent_ns).max(1_000));
        }
        n += 1;
        state.received.store(n, Ordering::Release);
        state.progress.notify_one();
        if n % 256 == 0 {
            PROGRESS.done(256);
        }
    }
    PROGRESS.done(n % 256);
    (n, hist)
}

fn packet(t0: Instant, seq: u64, size: usize, padding: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    b.put_u64(t0.elapsed().as_nanos() as u64);
    b.put_u64(seq);
    b.put_slice(&padding[..size - 16]);
    b.freeze()
}

async fn send(
    mut a: DerpClient,
    dst: warren_relay_proto::PublicKey,
    s: RelayScenario,
    t0: Instant,
    deadline: Instant,
    state: Arc<PairState>,
) -> anyhow::Result<(u64, u64)> {
    let mut padding = vec![0u8; s.size];
    OsRng.fill_bytes(&mut padding);
    let limit = if s.max_packets_per_pair == 0 { u64::MAX } else { s.max_packets_per_pair };
    let (mut seq, mut skipped) = (0u64, 0u64);
    match s.mode {
        Mode::Paced { rate } => {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let start = Instant::now();
            // A sender whose connection pushes back keeps at most this many packets waiting
            // (10 ms of its rate) and gives up the rest, as a node's bounded send queue does;
            // an unbounded backlog would only measure the harness's memory.
            let backlog = ((rate / 100.0) as u64).max(64);
            let mut offered = 0u64;
            while Instant::now() < deadline && offered < limit {
                tick.tick().await;
                // Credit-based pacing: send what the rate allows up to now, in one batch.
                let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(limit);
                let mut batch = due.saturating_sub(offered);
                offered = offered.max(due);
                if batch > backlog {
                    skipped += batch - backlog;
                    batch = backlog;
                }
                PROGRESS.sent(batch);
                for _ in 0..batch {
                    a.queue(&Frame::SendPacket { dst, packet: packet(t0, seq, s.size, &padding) })?;
                    seq += 1;
                }
                a.flush().await?;
            }
        }
        Mode::Closed { window } => {
            while Instant::now() < deadline && seq < limit {
                let in_flight = seq - state.received.load(Ordering::Acquire);
                if in_flight >= window {
                    // Woken by the receiver; the timeout bounds a lost wake-up or lost packets.
                    let _ = tokio::time::timeout(Duration::from_millis(50), state.progress.notified()).await;
                    if seq - state.received.load(Ordering::Acquire) >= window {
                        continue;
                    }
                }
                let room = (window - (seq - state.received.load(Ordering::Acquire).min(seq))).min(limit - seq);
                PROGRESS.sent(room);
                for _ in 0..room {
                    a.queue(&Frame::SendPacket { dst, packet: packet(t0, seq, s.size, &padding) })?;
                    seq += 1;
                }
                a.flush().await?;
            }
        }
    }
    // Keep the sender connected until its packets had time to arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(a);
    Ok((seq, skipped))
}
