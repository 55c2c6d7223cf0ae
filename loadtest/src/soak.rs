//! The soak's clients: what a region and an edge cluster carry for a long time while parts of
//! them die. `scripts/soak.py` starts the servers, kills and drains them, and reads what this
//! prints: one JSON line per interval.
//!
//! - **Stable pairs**: a sender and a receiver on different relays of one region (packets cross
//!   the mesh), paced, numbered packets. A client whose connection fails moves to the next relay
//!   of the list, as a node does. Packets are judged once 3 s old: delivered, or lost. A packet
//!   sent while either side of its pair was switching relays (from [`SWITCH_MARGIN`] before the
//!   failure was noticed to `settle` after the new login) is judged apart, as the switch's own
//!   loss; every other lost packet is a defect.
//! - **Churn**: clients that log in to a random relay, send a few packets to stable receivers
//!   and leave, at a set rate.
//! - **Visitors**: requests to a funnel URL through one edge after the other (GETs, every
//!   fourth an upload, every fourth a WebSocket session echoing three messages). A visitor that cannot connect to one edge tries the next, as a browser
//!   does with a name's addresses; a request that fails after its connection was made is a
//!   failure, reported with the edge and the time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use warren_common::url::RelayUrl;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{Frame, PublicKey, SecretKey};

use crate::dial::dial;
use crate::report::{histogram, lock, Latency};

/// Packets are judged once this old.
const JUDGE_AFTER_MS: u32 = 3000;
/// A switch window starts this long before its failure was noticed.
pub const SWITCH_MARGIN: Duration = Duration::from_millis(1000);
/// Packets each churn client sends.
const CHURN_PACKETS: usize = 3;
/// Tags of the packets' first byte.
const STABLE: u8 = b'S';
const CHURN: u8 = b'C';

/// One soak run's clients.
#[derive(Debug, Clone)]
pub struct SoakScenario {
    /// The region's relays, in the order clients move through them.
    pub relays: Vec<String>,
    /// CA to trust for the relays.
    pub ca: Option<PathBuf>,
    /// Stable pairs.
    pub pairs: usize,
    /// Packets per second per pair.
    pub rate: f64,
    /// Packet size (at least 32).
    pub size: usize,
    /// Churn clients started per second.
    pub churn: f64,
    /// How long a churn client stays.
    pub churn_life: Duration,
    /// Funnel URL visitors request (`https://name.funnel.domain:port/path`).
    pub visit_url: Option<String>,
    /// The edges' public addresses for the URL's host.
    pub edges: Vec<SocketAddr>,
    /// CA to trust for the edges.
    pub edge_ca: Option<PathBuf>,
    /// Visits per second.
    pub visit_rate: f64,
    /// Size of every fourth visit's upload.
    pub upload_size: usize,
    /// How long to run.
    pub duration: Duration,
    /// Report interval.
    pub interval: Duration,
    /// After a client's new login, packets of its pair are judged apart this long (the mesh
    /// learning where it went).
    pub settle: Duration,
}

/// What one interval saw (packets judged in it, which were sent about 3 s earlier).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tick {
    /// Seconds since the start.
    pub t: f64,
    /// Stable pairs with both sides logged in now.
    pub pairs_up: usize,
    /// Stable packets sent in the interval.
    pub sent: u64,
    /// Stable packets judged, outside switch windows: delivered and lost.
    pub delivered: u64,
    /// Lost outside any switch window: defects.
    pub lost: u64,
    /// The first few of those: pair, sequence number, send time, where each side was.
    pub lost_samples: Vec<String>,
    /// Judged inside a switch window: delivered and lost.
    pub switch_delivered: u64,
    /// Lost inside a switch window.
    pub switch_lost: u64,
    /// Packets received more than once.
    pub duplicates: u64,
    /// Stable clients that moved to another relay.
    pub switches: u64,
    /// The longest time a stable client took to log in again, in ms.
    pub switch_ms_max: f64,
    /// Stable packets' latency.
    pub latency: Latency,
    /// Churn clients logged in, and those that could not.
    pub churn_logins: u64,
    /// Churn logins that failed.
    pub churn_failed: u64,
    /// Churn packets sent and received.
    pub churn_sent: u64,
    /// Churn packets received.
    pub churn_received: u64,
    /// Visits answered 200.
    pub visits_ok: u64,
    /// WebSocket sessions whose three echoes came back intact.
    pub websockets_ok: u64,
    /// Visits that found an edge refusing connections and went to the next.
    pub visits_failover: u64,
    /// Visits that failed: `"<edge> <reason>"` each.
    pub visit_failures: Vec<String>,
}

/// One pair's ledger.
#[derive(Debug, Default)]
struct Ledger {
    /// Send time (ms since the start) by sequence number.
    sent_ms: Vec<u32>,
    /// Copies received by sequence number.
    got: Vec<u8>,
    /// Switch windows (ms since the start) and whose (side); the end is `u32::MAX` while that
    /// side is away.
    windows: Vec<(u32, u32, usize)>,
    /// Relays each side logged in to: (ms since the start, side, relay index).
    moves: Vec<(u32, usize, usize)>,
    /// Sequence numbers judged so far.
    judged: usize,
}

impl Ledger {
    fn in_window(&self, at: u32) -> bool {
        self.windows.iter().any(|(a, b, _)| (*a..=*b).contains(&at))
    }
}

struct Pair {
    id: u32,
    ledger: Mutex<Ledger>,
    /// The receiver's key (churn clients send to it).
    receiver: PublicKey,
    up: [std::sync::atomic::AtomicBool; 2],
}

/// Counters the tasks bump and the reporter takes.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    switches: AtomicU64,
    switch_us_max: AtomicU64,
    churn_logins: AtomicU64,
    churn_failed: AtomicU64,
    churn_sent: AtomicU64,
    churn_received: AtomicU64,
    visits_ok: AtomicU64,
    websockets_ok: AtomicU64,
    visits_failover: AtomicU64,
    visit_failures: Mutex<Vec<String>>,
    latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

struct Soak {
    s: SoakScenario,
    t0: Instant,
    deadline: Instant,
    pairs: Vec<Arc<Pair>>,
    c: Counters,
}

impl Soak {
    fn ms(&self) -> u32 {
        u32::try_from(self.t0.elapsed().as_millis()).unwrap_or(u32::MAX)
    }

    fn opts(&self) -> ConnectOptions {
        ConnectOptions { ca_file: self.s.ca.clone(), timeout: Duration::from_secs(5), ..Default::default() }
    }

    /// Logs `secret` in to relay `idx`, or the next ones in turn, until one takes it (or the
    /// run is over). Returns the client and the relay it is on.
    async fn login(&self, secret: &SecretKey, mut idx: usize) -> Option<(DerpClient, usize)> {
        loop {
            if Instant::now() >= self.deadline {
                return None;
            }
            if let Ok(c) = DerpClient::connect(&self.s.relays[idx], secret, &self.opts()).await {
                return Some((c, idx));
            }
            idx = (idx + 1) % self.s.relays.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A stable client lost its relay at `lost`: its pair's window opens.
    fn switch_started(&self, pair: &Pair, side: usize, lost: Instant) {
        pair.up[side].store(false, Ordering::Release);
        let from = lost.saturating_duration_since(self.t0).saturating_sub(SWITCH_MARGIN);
        let from = u32::try_from(from.as_millis()).unwrap_or(u32::MAX);
        lock(&pair.ledger).windows.push((from, u32::MAX, side));
    }

    /// It logged in again: the window closes `settle` from now.
    /// Notes where a side of `pair` logged in.
    fn logged_in(&self, pair: &Pair, side: usize, relay: usize) {
        pair.up[side].store(true, Ordering::Release);
        lock(&pair.ledger).moves.push((self.ms(), side, relay));
    }

    fn switch_done(&self, pair: &Pair, side: usize, lost: Instant) {
        let end = self.ms().saturating_add(u32::try_from(self.s.settle.as_millis()).unwrap_or(0));
        if let Some(w) = lock(&pair.ledger).windows.iter_mut().rev().find(|w| w.1 == u32::MAX && w.2 == side) {
            w.1 = end;
        }
        self.c.switches.fetch_add(1, Ordering::Relaxed);
        let took = u64::try_from(lost.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.c.switch_us_max.fetch_max(took, Ordering::Relaxed);
    }

    /// A stable client lost its relay (or was told it is draining): it logs in to the next one.
    async fn switch(&self, pair: &Pair, side: usize, secret: &SecretKey, idx: usize) -> Option<(DerpClient, usize)> {
        let lost = Instant::now();
        self.switch_started(pair, side, lost);
        let next = self.login(secret, (idx + 1) % self.s.relays.len()).await?;
        self.logged_in(pair, side, next.1);
        self.switch_done(pair, side, lost);
        Some(next)
    }

    /// Paced numbered packets to the pair's receiver; it reads too, to move when its relay
    /// drains, as a node does.
    async fn sender(self: Arc<Self>, pair: Arc<Pair>, secret: SecretKey, relay: usize) {
        let Some((mut client, mut idx)) = self.login(&secret, relay).await else { return };
        self.logged_in(&pair, 0, idx);
        // The first packet waits for the receiver's login to reach every relay of the mesh.
        while !pair.up[1].load(Ordering::Acquire) {
            if Instant::now() >= self.deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(self.s.settle).await;
        let every = Duration::from_secs_f64(1.0 / self.s.rate);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut padding = vec![0u8; self.s.size];
        OsRng.fill_bytes(&mut padding);
        while Instant::now() < self.deadline {
            let moved = tokio::select! {
                _ = tick.tick() => {
                    let packet = self.numbered(&pair, &padding);
                    client.send_packet(pair.receiver, &packet).await.is_err()
                }
                frame = client.recv() => match frame {
                    Ok(Frame::Restarting { .. }) | Err(_) => true,
                    Ok(Frame::Ping(d)) => client.send(&Frame::Pong(d)).await.is_err(),
                    Ok(_) => false,
                },
            };
            if moved {
                let Some(next) = self.switch(&pair, 0, &secret, idx).await else { return };
                (client, idx) = next;
            }
        }
    }

    /// The pair's next packet, entered in its ledger.
    fn numbered(&self, pair: &Pair, padding: &[u8]) -> Bytes {
        let seq = {
            let mut l = lock(&pair.ledger);
            l.sent_ms.push(self.ms());
            l.got.push(0);
            l.sent_ms.len() as u64 - 1
        };
        let mut b = BytesMut::with_capacity(self.s.size);
        b.put_u8(STABLE);
        b.put_u32(pair.id);
        b.put_u64(seq);
        b.put_u64(self.t0.elapsed().as_nanos() as u64);
        b.put_slice(&padding[..self.s.size - b.len()]);
        self.c.sent.fetch_add(1, Ordering::Relaxed);
        b.freeze()
    }

    async fn receiver(self: Arc<Self>, pair: Arc<Pair>, secret: SecretKey, relay: usize) {
        let Some((mut client, mut idx)) = self.login(&secret, relay).await else { return };
        self.logged_in(&pair, 1, idx);
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(4);
            let moved = match tokio::time::timeout(left, client.recv()).await {
                Err(_) => return,
                Ok(Ok(Frame::RecvPacket { packet, .. })) => {
                    self.received(&packet);
                    false
                }
                Ok(Ok(Frame::Ping(d))) => client.send(&Frame::Pong(d)).await.is_err(),
                // A draining relay: go now, as a node does.
                Ok(Ok(Frame::Restarting { .. }) | Err(_)) => true,
                Ok(Ok(_)) => false,
            };
            if moved {
                let Some(next) = self.switch(&pair, 1, &secret, idx).await else { return };
                (client, idx) = next;
            }
        }
    }

    fn received(&self, packet: &[u8]) {
        match packet.first() {
            Some(&STABLE) if packet.len() >= 21 => {
                let id = u32::from_be_bytes(packet[1..5].try_into().unwrap_or_default()) as usize;
                let seq = u64::from_be_bytes(packet[5..13].try_into().unwrap_or_default()) as usize;
                let sent_ns = u64::from_be_bytes(packet[13..21].try_into().unwrap_or_default());
                let Some(pair) = self.pairs.get(id) else { return };
                if let Some(n) = lock(&pair.ledger).got.get_mut(seq) {
                    *n = n.saturating_add(1);
                }
                let ns = (self.t0.elapsed().as_nanos() as u64).saturating_sub(sent_ns).max(1000);
                if let Some(h) = lock(&self.c.latency).as_mut() {
                    let _ = h.record(ns);
                }
            }
            Some(&CHURN) => {
                self.c.churn_received.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    async fn churner(self: Arc<Self>) {
        if self.s.churn <= 0.0 {
            return;
        }
        // Churn sends to the stable receivers: it starts once they are logged in everywhere.
        while !self.pairs.iter().all(|p| p.up[1].load(Ordering::Acquire)) {
            if Instant::now() >= self.deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(self.s.settle).await;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / self.s.churn));
        let mut n = 0usize;
        while Instant::now() < self.deadline {
            tick.tick().await;
            n += 1;
            let me = self.clone();
            tokio::spawn(async move {
                let relay = &me.s.relays[n % me.s.relays.len()];
                let secret = SecretKey::generate(&mut OsRng);
                let Ok(mut c) = DerpClient::connect(relay, &secret, &me.opts()).await else {
                    me.c.churn_failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                me.c.churn_logins.fetch_add(1, Ordering::Relaxed);
                for k in 0..CHURN_PACKETS {
                    let to = me.pairs[(n + k) % me.pairs.len()].receiver;
                    if c.send_packet(to, &[CHURN; 32]).await.is_ok() {
                        me.c.churn_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(me.s.churn_life).await;
                let _ = c.close().await;
            });
        }
    }

    async fn visitors(self: Arc<Self>) -> anyhow::Result<()> {
        let Some(url) = &self.s.visit_url else { return Ok(()) };
        anyhow::ensure!(!self.s.edges.is_empty(), "visitors need --edge addresses");
        let url = RelayUrl::parse(url).map_err(|e| anyhow::anyhow!("{url}: {e:?}"))?;
        let tls = tokio_rustls::TlsConnector::from(warren_common::tls::client_config(self.s.edge_ca.as_deref())?);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / self.s.visit_rate.max(0.1)));
        let upload = Bytes::from(vec![b'u'; self.s.upload_size]);
        let mut n = 0usize;
        while Instant::now() < self.deadline {
            tick.tick().await;
            n += 1;
            let (me, url, tls, upload) = (self.clone(), url.clone(), tls.clone(), upload.clone());
            tokio::spawn(async move {
                let body = (n % 4 == 0).then_some(upload);
                me.visit(&url, &tls, n, body).await;
            });
        }
        Ok(())
    }

    /// One visit: the `n`th edge first, the others if it refuses connections. Every fourth
    /// visit uploads, every fourth (offset by two) is a WebSocket session of three echoes.
    async fn visit(&self, url: &RelayUrl, tls: &tokio_rustls::TlsConnector, n: usize, body: Option<Bytes>) {
        let edges = self.s.edges.len();
        let websocket = n % 4 == 2;
        for k in 0..edges {
            let e = (n + k) % edges;
            let addr = self.s.edges[e];
            let outcome = if websocket {
                crate::ws::echo_session(url, addr, tls, 3, 64).await.map(|()| 200)
            } else {
                match dial(url, Some(addr), Some(tls)).await {
                    Ok(io) => request(io, url, body.clone()).await,
                    Err(why) => Err(why),
                }
            };
            match outcome {
                Err("connect") => {
                    self.c.visits_failover.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Ok(200) => {
                    let ok = if websocket { &self.c.websockets_ok } else { &self.c.visits_ok };
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(status) => self.visit_failed(e, &format!("status {status}")),
                Err(why) => self.visit_failed(e, why),
            }
            return;
        }
        self.visit_failed(n % edges, "every edge refused the connection");
    }

    fn visit_failed(&self, edge: usize, why: &str) {
        let t = self.t0.elapsed().as_secs_f64();
        lock(&self.c.visit_failures).push(format!("edge {edge} at {t:.1} s: {why}"));
    }

    /// The interval's figures; packets sent at least [`JUDGE_AFTER_MS`] ago are judged.
    fn tick(&self) -> Tick {
        let now = self.ms();
        let mut t = Tick { t: f64::from(now) / 1e3, ..Tick::default() };
        for p in &self.pairs {
            if p.up.iter().all(|u| u.load(Ordering::Acquire)) {
                t.pairs_up += 1;
            }
            let mut l = lock(&p.ledger);
            while l.judged < l.sent_ms.len() && l.sent_ms[l.judged].saturating_add(JUDGE_AFTER_MS) <= now {
                let seq = l.judged;
                let (at, got) = (l.sent_ms[seq], l.got[seq]);
                let windowed = l.in_window(at);
                match (windowed, got) {
                    (false, 0) => {
                        t.lost += 1;
                        if t.lost_samples.len() < 10 {
                            t.lost_samples.push(format!(
                                "pair {} seq {seq} sent at {:.3} s; logins (ms, side, relay) {:?}; windows {:?}",
                                p.id,
                                f64::from(at) / 1e3,
                                l.moves,
                                l.windows
                            ));
                        }
                    }
                    (false, _) => t.delivered += 1,
                    (true, 0) => t.switch_lost += 1,
                    (true, _) => t.switch_delivered += 1,
                }
                if got > 1 {
                    t.duplicates += 1;
                }
                l.judged += 1;
            }
        }
        let c = &self.c;
        t.sent = c.sent.swap(0, Ordering::Relaxed);
        t.switches = c.switches.swap(0, Ordering::Relaxed);
        t.switch_ms_max = c.switch_us_max.swap(0, Ordering::Relaxed) as f64 / 1e3;
        t.churn_logins = c.churn_logins.swap(0, Ordering::Relaxed);
        t.churn_failed = c.churn_failed.swap(0, Ordering::Relaxed);
        t.churn_sent = c.churn_sent.swap(0, Ordering::Relaxed);
        t.churn_received = c.churn_received.swap(0, Ordering::Relaxed);
        t.visits_ok = c.visits_ok.swap(0, Ordering::Relaxed);
        t.websockets_ok = c.websockets_ok.swap(0, Ordering::Relaxed);
        t.visits_failover = c.visits_failover.swap(0, Ordering::Relaxed);
        t.visit_failures = std::mem::take(&mut *lock(&c.visit_failures));
        let h = lock(&c.latency).replace(histogram());
        t.latency = h.map(|h| Latency::from_ns(&h)).unwrap_or_default();
        t
    }
}

/// One HTTP/1.1 request on a fresh connection, body read to the end.
async fn request(io: Box<dyn crate::dial::Io>, url: &RelayUrl, body: Option<Bytes>) -> Result<u16, &'static str> {
    let method = if body.is_some() { "POST" } else { "GET" };
    let req = http::Request::builder()
        .method(method)
        .uri(&url.path)
        .header("host", url.authority())
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|_| "request")?;
    let attempt = async {
        let resp = warren_common::http1::request(TokioIo::new(io), req).await.map_err(|_| "request failed")?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.map_err(|_| "response body cut")?;
        Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.map_err(|_| "timed out")?
}

/// Runs the soak's clients for the scenario's duration, calling `report` with each interval's
/// figures; returns the whole run's totals.
///
/// # Errors
/// A first login failed everywhere, or the visitors' URL or CA is unusable.
pub async fn run(s: SoakScenario, mut report: impl FnMut(&Tick)) -> anyhow::Result<Tick> {
    anyhow::ensure!(!s.relays.is_empty(), "at least one relay");
    anyhow::ensure!(s.size >= 32 && s.size <= warren_relay_proto::MAX_PACKET_SIZE, "size must be 32..=65536");
    anyhow::ensure!(s.pairs > 0 && s.rate > 0.0, "at least one pair, sending");
    let t0 = Instant::now();
    let relays = s.relays.len();
    let secrets: Vec<(SecretKey, SecretKey)> =
        (0..s.pairs).map(|_| (SecretKey::generate(&mut OsRng), SecretKey::generate(&mut OsRng))).collect();
    let pairs: Vec<Arc<Pair>> = secrets
        .iter()
        .enumerate()
        .map(|(i, (_, b))| {
            Arc::new(Pair { id: i as u32, ledger: Mutex::default(), receiver: b.public_key(), up: Default::default() })
        })
        .collect();
    let soak = Arc::new(Soak {
        deadline: t0 + s.duration,
        t0,
        pairs,
        c: Counters { latency: Mutex::new(Some(histogram())), ..Counters::default() },
        s,
    });
    let mut tasks = Vec::new();
    for (i, (a, b)) in secrets.into_iter().enumerate() {
        let pair = soak.pairs[i].clone();
        tasks.push(tokio::spawn(soak.clone().receiver(pair.clone(), b, (i + 1) % relays)));
        tasks.push(tokio::spawn(soak.clone().sender(pair, a, i % relays)));
    }
    tokio::spawn(soak.clone().churner());
    let visitors = tokio::spawn(soak.clone().visitors());
    let mut total = Tick::default();
    let mut interval = tokio::time::interval(soak.s.interval);
    interval.tick().await;
    let end = soak.deadline + Duration::from_millis(u64::from(JUDGE_AFTER_MS) + 1000);
    while Instant::now() < end {
        interval.tick().await;
        let t = soak.tick();
        report(&t);
        add(&mut total, &t);
    }
    for t in tasks {
        t.abort();
    }
    if let Ok(Err(e)) = visitors.await {
        return Err(e);
    }
    total.t = t0.elapsed().as_secs_f64();
    Ok(total)
}

fn add(total: &mut Tick, t: &Tick) {
    total.pairs_up = t.pairs_up;
    total.sent += t.sent;
    total.delivered += t.delivered;
    total.lost += t.lost;
    total.lost_samples.extend(t.lost_samples.iter().cloned());
    total.switch_delivered += t.switch_delivered;
    total.switch_lost += t.switch_lost;
    total.duplicates += t.duplicates;
    total.switches += t.switches;
    total.switch_ms_max = total.switch_ms_max.max(t.switch_ms_max);
    total.churn_logins += t.churn_logins;
    total.churn_failed += t.churn_failed;
    total.churn_sent += t.churn_sent;
    total.churn_received += t.churn_received;
    total.visits_ok += t.visits_ok;
    total.websockets_ok += t.websockets_ok;
    total.visits_failover += t.visits_failover;
    total.visit_failures.extend(t.visit_failures.iter().cloned());
}
