//! A relay link: the connection to the home relay, or to a relay of another region where peers
//! are homed. It dials the relay the core chose, keeps it up with jittered exponential backoff,
//! carries frames both ways, and reports Restarting and failures so the core can move on. A new
//! target (a sibling in the same region, or another region for the home) is dialled at once.
//! Only the home link tells its relay it is preferred.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_common::limits::Backoff;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{Frame, PeerGoneReason, PublicKey, SecretKey};

use crate::core::{HomeTarget, Link};

/// Delay between attempts to reach the home relay: 100 ms doubling to 10 s, jittered.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// What a relay link reports, tagged with the link.
#[derive(Debug)]
pub(crate) struct RelayEvent {
    pub(crate) link: Link,
    /// Which task of that link (a region link closed and opened again is a new one).
    pub(crate) epoch: u64,
    pub(crate) kind: RelayEventKind,
}

#[derive(Debug)]
pub(crate) enum RelayEventKind {
    Connected,
    /// The relay said it is restarting, or the connection failed.
    Lost(String),
    Packet(PublicKey, Bytes),
    /// PeerGone: the key left, or (NotHere) was never here.
    Gone(PublicKey, PeerGoneReason),
    /// The answer to a FindPeer.
    Presence(PublicKey, bool),
}

pub(crate) struct RelayTask {
    pub(crate) link: Link,
    pub(crate) epoch: u64,
    pub(crate) secret: SecretKey,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) proxy: crate::net::ProxyChoice,
    pub(crate) home: watch::Receiver<Option<HomeTarget>>,
    pub(crate) events: mpsc::Sender<RelayEvent>,
    /// SendPacket and FindPeer frames to send.
    pub(crate) out: mpsc::Receiver<Frame>,
    pub(crate) cancel: CancellationToken,
}

impl RelayTask {
    async fn report(&self, kind: RelayEventKind) {
        let _ = self.events.send(RelayEvent { link: self.link, epoch: self.epoch, kind }).await;
    }

    fn name(&self) -> &'static str {
        match self.link {
            Link::Home => "home relay",
            Link::Region(_) => "region link",
        }
    }

    /// Connects to the relay, through the proxy when one is set for its host.
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
                    info!(region = target.region_id, url = %target.url, "{} connected", self.name());
                    if self.link == Link::Home {
                        let _ = client.send(&Frame::NotePreferred { preferred: true }).await;
                    }
                    self.report(RelayEventKind::Connected).await;
                    let (wait, healthy) = self.serve(&mut client, &target).await;
                    failures = if healthy { 0 } else { failures + 1 };
                    if self.cancel.is_cancelled() {
                        return;
                    }
                    wait
                }
                Err(e) => {
                    warn!(region = target.region_id, url = %target.url, error = %e, "{} connection failed", self.name());
                    failures += 1;
                    None
                }
            };
            self.report(RelayEventKind::Lost(target.url.clone())).await;
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
                        info!(region = target.region_id, "moving {}", self.name());
                        return (Some(Duration::ZERO), true);
                    }
                }
                Some(mut frame) = self.out.recv() => {
                    let mut batch = 0;
                    loop {
                        if client.queue(&frame).is_err() {
                            break;
                        }
                        batch += 1;
                        match self.out.try_recv() {
                            Ok(next) if batch < 64 => frame = next,
                            Ok(next) => {
                                // Keep the frame for the next batch.
                                let _ = client.flush().await;
                                frame = next;
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
                    Ok(Frame::RecvPacket { src, packet }) => self.report(RelayEventKind::Packet(src, packet)).await,
                    Ok(Frame::PeerGone { peer, reason }) => self.report(RelayEventKind::Gone(peer, reason)).await,
                    Ok(Frame::PeerPresence { peer, present }) => self.report(RelayEventKind::Presence(peer, present)).await,
                    Ok(Frame::Ping(d)) => {
                        let _ = client.send(&Frame::Pong(d)).await;
                    }
                    Ok(Frame::Restarting { reconnect_in_ms, .. }) => {
                        info!(region = target.region_id, reconnect_in_ms, "{} is restarting", self.name());
                        return (Some(Duration::from_millis(u64::from(reconnect_in_ms))), true);
                    }
                    Ok(Frame::Health { problem }) if !problem.is_empty() => warn!(region = target.region_id, %problem, "relay health"),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(region = target.region_id, error = %e, "{} connection lost", self.name());
                        return (None, started.elapsed() > Duration::from_secs(10));
                    }
                },
            }
        }
    }
}
