//! Idle clients: how much memory a relay spends per connected client that sends nothing.

use std::path::PathBuf;
use std::time::Duration;

use rand_core::OsRng;
use serde::Serialize;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{SecretKey, Transport};

/// The outcome of the idle scenario.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Clients that logged in and stayed.
    pub clients: usize,
    /// Relay RSS before, KiB.
    pub rss_before_kib: u64,
    /// Relay RSS with all clients connected, KiB.
    pub rss_after_kib: u64,
    /// (after - before) / clients, KiB.
    pub kib_per_client: f64,
}

/// Resident set size of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Opens `clients` idle connections to the relay at `url` (process `pid`), spread over
/// `source_ips` loopback addresses, and measures the relay's RSS growth.
///
/// # Errors
/// A login failed or the relay's /proc entry is unreadable.
pub async fn run(
    url: &str,
    ca: Option<PathBuf>,
    pid: u32,
    clients: usize,
    source_ips: u8,
    websocket: bool,
) -> anyhow::Result<IdleReport> {
    let before = rss_kib(pid).ok_or_else(|| anyhow::anyhow!("cannot read /proc/{pid}/status"))?;
    let mut held = Vec::with_capacity(clients);
    for i in 0..clients {
        let bind_ip = (source_ips > 0)
            .then(|| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(source_ips)) as u8)));
        let opts = ConnectOptions {
            transport: if websocket { Transport::WebSocket } else { Transport::Derp },
            ca_file: ca.clone(),
            bind_ip,
            timeout: Duration::from_secs(30),
            ..Default::default()
        };
        held.push(DerpClient::connect(url, &SecretKey::generate(&mut OsRng), &opts).await?);
        crate::report::PROGRESS.done(1);
    }
    // Let the relay settle (allocator, lazily grown buffers).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid).ok_or_else(|| anyhow::anyhow!("cannot read /proc/{pid}/status"))?;
    drop(held);
    Ok(IdleReport {
        clients,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_client: after.saturating_sub(before) as f64 / clients.max(1) as f64,
    })
}
