//! The bulk-throughput ceiling: bytes pushed through a plain TCP forwarder (e.g. socat) that
//! the operator starts between `via` and this harness's own sink on `sink_port`.
//!
//! ```text
//! harness --pairs--> via (socat TCP-LISTEN:via,fork TCP:127.0.0.1:sink_port) --> harness sink
//! ```
//!
//! Bulk: each pair pushes 64 KiB writes for `duration`; the sink counts what arrives.
//! Paced: each pair sends `size`-byte messages at `rate` per second (the relay scenario's
//! pacing: what is due every millisecond, in one write), each stamped with its send time; the
//! sink times every message into an HDR histogram. Through a plain forwarder this is the floor
//! of what the harness and the kernel add, so a relay's own added latency is its figure minus
//! this one at the same offered load.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::report::{histogram, Latency};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The outcome of a forwarder run.
#[derive(Debug, Clone, Serialize)]
pub struct TcpReport {
    /// Connections pushing at once.
    pub pairs: usize,
    /// Seconds spent pushing.
    pub seconds: f64,
    /// Bytes that reached the sink.
    pub received_bytes: u64,
    /// Megabytes (10^6) per second at the sink.
    pub mbps: f64,
    /// Paced runs: messages per second offered over all pairs.
    pub offered_pps: Option<f64>,
    /// Paced runs: messages that reached the sink, per second.
    pub delivered_pps: Option<f64>,
    /// Paced runs: one-way latency of each message.
    pub latency: Option<Latency>,
}

impl std::fmt::Display for TcpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tcp forwarder | {} pairs | {:.1} s | {:.1} MB/s ({} bytes)",
            self.pairs, self.seconds, self.mbps, self.received_bytes
        )?;
        if let (Some(offered), Some(delivered), Some(l)) = (self.offered_pps, self.delivered_pps, self.latency) {
            write!(
                f,
                "\n  offered {offered:.0} msg/s, delivered {delivered:.0} msg/s\n  latency us   p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
            )?;
        }
        Ok(())
    }
}

/// Pushes bytes through the forwarder at `via` into a sink on `sink_port`.
///
/// # Errors
/// If the sink cannot listen or the forwarder cannot be reached.
pub async fn run(via: SocketAddr, sink_port: u16, pairs: usize, duration: Duration) -> anyhow::Result<TcpReport> {
    let sink = TcpListener::bind(("127.0.0.1", sink_port)).await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let accept = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = sink.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    crate::report::PROGRESS.done(n as u64);
                }
            });
        }
    });
    let senders = connect_senders(via, pairs).await?;
    let start = Instant::now();
    let base = received.load(Ordering::Relaxed);
    let mut tasks = Vec::new();
    for mut tcp in senders {
        tasks.push(tokio::spawn(async move {
            let chunk = vec![b'x'; 64 << 10];
            while start.elapsed() < duration {
                if tcp.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let received_bytes = received.load(Ordering::Relaxed) - base;
    accept.abort();
    Ok(TcpReport {
        pairs,
        seconds,
        received_bytes,
        mbps: received_bytes as f64 / seconds / 1e6,
        offered_pps: None,
        delivered_pps: None,
        latency: None,
    })
}

/// Opens `pairs` sending connections to `via`, then lets the forwarder connect each to the sink
/// before any timing starts.
async fn connect_senders(via: SocketAddr, pairs: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut senders = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let tcp = TcpStream::connect(via).await?;
        tcp.set_nodelay(true)?;
        senders.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(senders)
}

/// Paced, timed messages through the forwarder at `via` into a sink on `sink_port`.
///
/// # Errors
/// If the sink cannot listen, the forwarder cannot be reached, or `size` is under 16 bytes.
pub async fn paced(
    via: SocketAddr,
    sink_port: u16,
    pairs: usize,
    size: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<TcpReport> {
    anyhow::ensure!(size >= 16, "size must be at least 16 bytes");
    let sink = TcpListener::bind(("127.0.0.1", sink_port)).await?;
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let accept = tokio::spawn(async move {
        while let Ok((tcp, _)) = sink.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut tcp = tokio::io::BufReader::with_capacity(256 << 10, tcp);
                let mut msg = vec![0u8; size];
                let mut hist = histogram();
                let mut n = 0u64;
                while tcp.read_exact(&mut msg).await.is_ok() {
                    let sent_ns = u64::from_be_bytes(msg[..8].try_into().unwrap_or_default());
                    let now_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let _ = hist.record(now_ns.saturating_sub(sent_ns).max(1_000));
                    n += 1;
                    crate::report::PROGRESS.done(1);
                }
                let _ = tx.send((n, hist));
            });
        }
    });
    let senders = connect_senders(via, pairs).await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut tcp in senders {
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut seq, mut batch) = (0u64, Vec::new());
            while start.elapsed() < duration {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                batch.clear();
                while seq < due {
                    let stamp = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    batch.extend_from_slice(&stamp.to_be_bytes());
                    batch.extend_from_slice(&seq.to_be_bytes());
                    batch.resize(batch.len() + size - 16, 0x5a);
                    seq += 1;
                }
                crate::report::PROGRESS.sent(batch.len() as u64 / size as u64);
                if tcp.write_all(&batch).await.is_err() {
                    break;
                }
            }
            // Closing the sending side ends the sink's reader once everything arrived.
            let _ = tcp.shutdown().await;
            seq
        }));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap_or(0);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut hist = histogram();
    let mut received = 0u64;
    for _ in 0..pairs {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some((n, h))) => {
                received += n;
                hist.add(&h).map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
            }
            _ => break,
        }
    }
    accept.abort();
    anyhow::ensure!(received <= sent, "the sink counted more than was sent");
    Ok(TcpReport {
        pairs,
        seconds,
        received_bytes: received * size as u64,
        mbps: (received * size as u64) as f64 / seconds / 1e6,
        offered_pps: Some(rate * pairs as f64),
        delivered_pps: Some(received as f64 / seconds),
        latency: Some(Latency::from_ns(&hist)),
    })
}
