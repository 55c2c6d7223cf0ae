//! The bulk-throughput ceiling: bytes pushed through a plain TCP forwarder (e.g. socat) that
//! the operator starts between `via` and this harness's own sink on `sink_port`.
//!
//! ```text
//! harness --pairs--> via (socat TCP-LISTEN:via,fork TCP:127.0.0.1:sink_port) --> harness sink
//! ```
//!
//! Each pair pushes 64 KiB writes for `duration`; the sink counts what arrives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
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
}

impl std::fmt::Display for TcpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tcp forwarder | {} pairs | {:.1} s | {:.1} MB/s ({} bytes)",
            self.pairs, self.seconds, self.mbps, self.received_bytes
        )
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
    let mut senders = Vec::new();
    for _ in 0..pairs {
        let tcp = TcpStream::connect(via).await?;
        tcp.set_nodelay(true)?;
        senders.push(tcp);
    }
    // Let the forwarder connect to the sink before timing starts.
    tokio::time::sleep(Duration::from_millis(100)).await;
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
    Ok(TcpReport { pairs, seconds, received_bytes, mbps: received_bytes as f64 / seconds / 1e6 })
}
