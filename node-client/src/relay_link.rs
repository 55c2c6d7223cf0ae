//! The link to the home relay: dials the relay the core chose, keeps it up with jittered
//! exponential backoff, carries packets both ways, and reports Restarting and failures so the
//! core can move home. A new home (a sibling in the same region, or another region) is
//! dialled at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_common::limits::Backoff;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{Frame, PublicKey, SecretKey};

use crate::core::HomeTarget;

/// Delay between attempts to reach the home relay: 100 ms doubling to 10 s, jittered.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// What the relay task reports.
#[derive(Debug)]
pub(crate) enum RelayEvent {
    Connected,
    /// The relay said it is restarting, or the connection failed.
    Lost(u32, String),
    Packet(PublicKey, Bytes),
}

pub(crate) struct RelayTask {
    pub(crate) secret: SecretKey,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) proxy: crate::net::ProxyChoice,
    pub(crate) home: watch::Receiver<Option<HomeTarget>>,
    pub(crate) events: mpsc::Sender<RelayEvent>,
    pub(crate) out: mpsc::Receiver<(PublicKey, Bytes)>,
    pub(crate) cancel: CancellationToken,
}

impl RelayTask {
    /// Connects to the home relay, through the proxy when one is set for its host.
    async fn connect(&self, target: &HomeTarget) -> Result<DerpClient, warren_relay_client::ClientError> {
        let url = warren_common::url::RelayUrl::parse(&target.url)?;
        let proxy = self.proxy.for_host(&url.host)?;
        let opts =
            ConnectOptions { ca_file: self.ca_file.clone(), connect_addr: target.addr, proxy, ..Default::default() };
        DerpClient::connect_url(&url, &self.secret, &opts).await
    }

    pub(crate) async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let target = self.home.borrow_and_update().clone();
            let Some(target) = target else {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    r = self.home.changed() => if r.is_err() { return },
                }
                continue;
            };
            let connected = tokio::select! {
                _ = self.cancel.cancelled() => return,
                c = self.connect(&target) => c,
            };
            let wait = match connected {
                Ok(mut client) => {
                    info!(region = target.region_id, url = %target.url, "home relay connected");
                    let _ = client.send(&Frame::NotePreferred { preferred: true }).await;
                    let _ = self.events.send(RelayEvent::Connected).await;
                    let (wait, healthy) = self.serve(&mut client, &target).await;
                    failures = if healthy { 0 } else { failures + 1 };
                    if self.cancel.is_cancelled() {
                        return;
                    }
                    wait
                }
                Err(e) => {
                    warn!(region = target.region_id, url = %target.url, error = %e, "home relay connection failed");
                    failures += 1;
                    None
                }
            };
            let _ = self.events.send(RelayEvent::Lost(target.region_id, target.url.clone())).await;
            let delay = wait.unwrap_or_else(|| BACKOFF.delay(failures));
            // A new home (a sibling in the same region, or another region) is dialled at once.
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                _ = self.home.changed() => {}
            }
        }
    }

    /// Serves one connection. Returns how long to wait before reconnecting (when the relay
    /// said so) and whether the connection was healthy for a while.
    async fn serve(&mut self, client: &mut DerpClient, target: &HomeTarget) -> (Option<Duration>, bool) {
        let started = Instant::now();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return (None, true),
                changed = self.home.changed() => {
                    if changed.is_err() || self.home.borrow().as_ref() != Some(target) {
                        info!(region = target.region_id, "moving home relay");
                        return (Some(Duration::ZERO), true);
                    }
                }
                Some((dst, data)) = self.out.recv() => {
                    let mut frame = Frame::SendPacket { dst, packet: data };
                    let mut batch = 0;
                    loop {
                        if client.queue(&frame).is_err() {
                            break;
                        }
                        batch += 1;
                        match self.out.try_recv() {
                            Ok((dst, data)) if batch < 64 => frame = Frame::SendPacket { dst, packet: data },
                            Ok((dst, data)) => {
                                // Keep the packet for the next batch.
                                let _ = client.flush().await;
                                frame = Frame::SendPacket { dst, packet: data };
                                batch = 0;
                            }
                            Err(_) => break,
                        }
                    }
                    if client.flush().await.is_err() {
                        return (None, started.elapsed() > Duration::from_secs(10));
                    }
                }
                frame = client.recv() => match frame {
                    Ok(Frame::RecvPacket { src, packet }) => {
                        let _ = self.events.send(RelayEvent::Packet(src, packet)).await;
                    }
                    Ok(Frame::Ping(d)) => {
                        let _ = client.send(&Frame::Pong(d)).await;
                    }
                    Ok(Frame::Restarting { reconnect_in_ms, .. }) => {
                        info!(region = target.region_id, reconnect_in_ms, "home relay is restarting");
                        return (Some(Duration::from_millis(u64::from(reconnect_in_ms))), true);
                    }
                    Ok(Frame::Health { problem }) if !problem.is_empty() => warn!(region = target.region_id, %problem, "relay health"),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(region = target.region_id, error = %e, "home relay connection lost");
                        return (None, started.elapsed() > Duration::from_secs(10));
                    }
                },
            }
        }
    }
}
