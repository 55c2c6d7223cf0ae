//! The prober: checks every relay of a region map, round after round, and exports what it saw as
//! Prometheus metrics, in the manner of Tailscale's derpprobe.
//!
//! One round, every `interval`:
//!
//! 1. per relay, at once: a STUN Binding request (answer and time), a TLS handshake on the DERP
//!    port (the certificate must verify; its expiry is read), and two DERP logins;
//! 2. per region, for each pair of its relays (a relay with itself included): a packet from a
//!    client on the first to a client on the second and back, resent every 200 ms until it
//!    arrives, so a mesh link that is just coming up is not reported as down. A relay that did
//!    not log in marks its pairs down without trying them.
//!
//! Every check has `timeout`; a round takes at most about three of them, so keep the interval
//! above that. Metrics (gauges, labelled by region code and relay name from the map):
//! `warren_probe_up{region,relay,check}` (1/0 for `stun`, `tls`, `derp`),
//! `warren_probe_seconds{region,relay,check}` (time of the last successful check),
//! `warren_probe_cert_expiry_seconds{region,relay}` (seconds until the certificate expires),
//! `warren_probe_mesh_up{region,from,to}` and `warren_probe_mesh_rtt_seconds{region,from,to}`,
//! `warren_probe_round_seconds` and `warren_probe_last_round_timestamp_seconds`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand_core::{OsRng, RngCore};
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tracing::{info, warn};
use warren::regionmap::{RegionMap, RelayNode};
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::stun::{binding_request, parse_binding_response};
use warren_relay_proto::{PublicKey, SecretKey};

/// How often an unanswered round-trip packet is sent again.
const RESEND_EVERY: Duration = Duration::from_millis(200);

/// What to probe and how often.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// The relays.
    pub map: RegionMap,
    /// Extra CA to trust (e.g. a dev CA).
    pub ca_file: Option<PathBuf>,
    /// Time between the starts of two rounds.
    pub interval: Duration,
    /// Deadline of each check.
    pub timeout: Duration,
}

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Whether it passed.
    pub ok: bool,
    /// How long it took.
    pub seconds: f64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Check {
    fn from<T>(started: Instant, r: &Result<T, String>) -> Check {
        Check { ok: r.is_ok(), seconds: started.elapsed().as_secs_f64(), error: r.as_ref().err().cloned() }
    }
}

/// One relay's checks.
#[derive(Debug, Clone, Serialize)]
pub struct RelayResult {
    /// Region code (or id).
    pub region: String,
    /// Relay name (or host name).
    pub relay: String,
    /// STUN, unless the map disables it for this relay.
    pub stun: Option<Check>,
    /// TLS handshake with a verified certificate.
    pub tls: Check,
    /// DERP login.
    pub derp: Check,
    /// Seconds until the certificate expires.
    pub cert_expiry_seconds: Option<f64>,
}

/// One pair's round trip.
#[derive(Debug, Clone, Serialize)]
pub struct PairResult {
    /// Region code.
    pub region: String,
    /// Where the first packet was sent.
    pub from: String,
    /// Where it was received and answered.
    pub to: String,
    /// The round trip.
    pub check: Check,
}

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// Per relay.
    pub relays: Vec<RelayResult>,
    /// Per pair of relays of one region.
    pub pairs: Vec<PairResult>,
    /// How long the round took.
    pub seconds: f64,
}

impl Round {
    /// Whether every check passed.
    pub fn all_ok(&self) -> bool {
        self.relays.iter().all(|r| r.tls.ok && r.derp.ok && r.stun.as_ref().is_none_or(|s| s.ok))
            && self.pairs.iter().all(|p| p.check.ok)
    }
}

/// A relay of the map, with the labels it is reported under.
#[derive(Debug, Clone)]
struct Target {
    region: String,
    name: String,
    node: RelayNode,
}

/// How many relays a round checks.
pub fn relay_count(map: &RegionMap) -> usize {
    targets(map).len()
}

/// One line per relay and per pair, for people.
pub fn summary(round: &Round) -> String {
    let show = |c: &Check| match &c.error {
        None => format!("ok {:.1} ms", c.seconds * 1e3),
        Some(e) => format!("FAIL ({e})"),
    };
    let mut out = String::new();
    for r in &round.relays {
        let stun = r.stun.as_ref().map_or_else(|| "off".to_owned(), show);
        let expiry = r
            .cert_expiry_seconds
            .map_or_else(String::new, |s| format!(", certificate expires in {:.1} days", s / 86_400.0));
        out +=
            &format!("{}/{}: stun {stun}, tls {}, derp {}{expiry}\n", r.region, r.relay, show(&r.tls), show(&r.derp));
    }
    for p in &round.pairs {
        out += &format!("{}: {} -> {} -> {}: {}\n", p.region, p.from, p.to, p.from, show(&p.check));
    }
    out += &format!("round took {:.1} ms", round.seconds * 1e3);
    out
}

fn targets(map: &RegionMap) -> Vec<Target> {
    let mut out = Vec::new();
    for region in map.regions() {
        let code =
            if region.region_code.is_empty() { region.region_id.to_string() } else { region.region_code.clone() };
        for node in RegionMap::derp_nodes(region) {
            let name = if node.name.is_empty() { node.host_name.clone() } else { node.name.clone() };
            out.push(Target { region: code.clone(), name, node: node.clone() });
        }
    }
    out
}

/// Runs rounds until `stop` resolves, exporting each one's results.
pub async fn run(settings: ProbeSettings, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: HashMap<String, bool> = HashMap::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let round = tokio::select! {
            _ = &mut stop => return,
            r = probe_once(&settings) => r,
        };
        export(&round);
        log_changes(&round, &mut last);
    }
}

/// Probes every relay and pair once.
pub async fn probe_once(settings: &ProbeSettings) -> Round {
    let started = Instant::now();
    let mut checks = JoinSet::new();
    for (i, target) in targets(&settings.map).into_iter().enumerate() {
        let settings = settings.clone();
        checks.spawn(async move { (i, check_relay(target, &settings).await) });
    }
    let mut done: Vec<(usize, RelayResult, Option<Clients>)> = Vec::new();
    while let Some(joined) = checks.join_next().await {
        if let Ok((i, (result, clients))) = joined {
            done.push((i, result, clients));
        }
    }
    done.sort_by_key(|(i, _, _)| *i);
    let mut pairs = Vec::new();
    let mut clients: Vec<(String, String, Option<Clients>)> = Vec::new();
    let mut relays = Vec::new();
    for (_, result, c) in done {
        clients.push((result.region.clone(), result.relay.clone(), c));
        relays.push(result);
    }
    for i in 0..clients.len() {
        for j in i..clients.len() {
            if clients[i].0 != clients[j].0 {
                continue;
            }
            let (region, from, to) = (clients[i].0.clone(), clients[i].1.clone(), clients[j].1.clone());
            let check = round_trip_between(&mut clients, i, j, settings.timeout).await;
            pairs.push(PairResult { region, from, to, check });
        }
    }
    for (_, _, c) in clients {
        if let Some(c) = c {
            let _ = c.first.close().await;
            let _ = c.second.close().await;
        }
    }
    Round { relays, pairs, seconds: started.elapsed().as_secs_f64() }
}

/// Two clients logged in to one relay.
struct Clients {
    first: DerpClient,
    second: DerpClient,
}

async fn check_relay(target: Target, settings: &ProbeSettings) -> (RelayResult, Option<Clients>) {
    let addr = target.node.derp_addr();
    let url = target.node.url();
    let stun = match target.node.stun_port() {
        Some(port) => {
            let started = Instant::now();
            let r = tokio::time::timeout(settings.timeout, stun(&target.node, port))
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            Some(Check::from(started, &r))
        }
        None => None,
    };
    let started = Instant::now();
    let expiry = tokio::time::timeout(settings.timeout, cert_expiry(&target.node, settings.ca_file.as_deref()))
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    let tls = Check::from(started, &expiry);
    let opts = ConnectOptions {
        ca_file: settings.ca_file.clone(),
        connect_addr: addr,
        timeout: settings.timeout,
        ..Default::default()
    };
    let started = Instant::now();
    let login = async {
        let first = DerpClient::connect(&url, &SecretKey::generate(&mut OsRng), &opts).await?;
        let second = DerpClient::connect(&url, &SecretKey::generate(&mut OsRng), &opts).await?;
        Ok::<_, warren_relay_client::ClientError>(Clients { first, second })
    };
    let login = login.await.map_err(|e| e.to_string());
    let derp = Check::from(started, &login);
    let result =
        RelayResult { region: target.region, relay: target.name, stun, tls, derp, cert_expiry_seconds: expiry.ok() };
    (result, login.ok())
}

/// Sends one Binding request and waits for its answer.
async fn stun(node: &RelayNode, port: u16) -> Result<(), String> {
    let ip = match node.ipv4.or(node.ipv6) {
        Some(ip) => ip,
        None => tokio::net::lookup_host((node.host_name.as_str(), port))
            .await
            .map_err(|e| format!("resolve: {e}"))?
            .next()
            .ok_or("resolve: no address")?
            .ip(),
    };
    let to = SocketAddr::new(ip, port);
    let bind: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| "bind")?;
    let socket = UdpSocket::bind(bind).await.map_err(|e| format!("bind: {e}"))?;
    let mut id = [0u8; 12];
    OsRng.fill_bytes(&mut id);
    let req = binding_request(id).map_err(|e| e.to_string())?;
    // Connected: only the relay's answers arrive, and a closed port fails at once (ICMP).
    socket.connect(to).await.map_err(|e| format!("connect: {e}"))?;
    socket.send(&req).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 1500];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| format!("receive: {e}"))?;
        if let Ok((got, _mapped)) = parse_binding_response(&buf[..n]) {
            if got == id {
                return Ok(());
            }
        }
    }
}

/// Seconds until the DERP port's certificate expires (the handshake must verify).
async fn cert_expiry(node: &RelayNode, ca_file: Option<&std::path::Path>) -> Result<f64, String> {
    let tcp = match node.derp_addr() {
        Some(a) => tokio::net::TcpStream::connect(a).await,
        None => tokio::net::TcpStream::connect((node.host_name.as_str(), node.derp_port())).await,
    }
    .map_err(|e| format!("connect: {e}"))?;
    let config = warren_common::tls::client_config(ca_file).map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(node.host_name.clone()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("tls: {e}"))?;
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no certificate")?;
    let (_, not_after) = warren_common::der::validity(leaf).ok_or("unreadable certificate validity")?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(not_after as f64 - now as f64)
}

/// The round trip from relay `i`'s first client to relay `j`'s (its second client when
/// `i == j`) and back.
async fn round_trip_between(
    clients: &mut [(String, String, Option<Clients>)],
    i: usize,
    j: usize,
    timeout: Duration,
) -> Check {
    let started = Instant::now();
    let down = |k: usize| Err(format!("{} did not log in", clients[k].1));
    let result = if clients[i].2.is_none() {
        down(i)
    } else if clients[j].2.is_none() {
        down(j)
    } else if i == j {
        let c = clients[i].2.as_mut().expect("checked");
        round_trip(&mut c.first, &mut c.second, timeout).await
    } else {
        let (low, high) = clients.split_at_mut(j);
        let a = &mut low[i].2.as_mut().expect("checked").first;
        let b = &mut high[0].2.as_mut().expect("checked").first;
        round_trip(a, b, timeout).await
    };
    match result {
        Ok(rtt) => Check { ok: true, seconds: rtt.as_secs_f64(), error: None },
        Err(e) => Check { ok: false, seconds: started.elapsed().as_secs_f64(), error: Some(e) },
    }
}

/// `a` sends a random packet to `b`, `b` sends it back: the time of each leg counted from its
/// last sending, added.
async fn round_trip(a: &mut DerpClient, b: &mut DerpClient, timeout: Duration) -> Result<Duration, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut nonce = [0u8; 16];
    OsRng.fill_bytes(&mut nonce);
    let (ka, kb) = (a.public_key(), b.public_key());
    let there = deliver(a, b, ka, kb, &nonce, deadline).await.map_err(|e| format!("there: {e}"))?;
    let back = deliver(b, a, kb, ka, &nonce, deadline).await.map_err(|e| format!("back: {e}"))?;
    Ok(there + back)
}

/// Sends `body` from `from` to `to` every [`RESEND_EVERY`] until `to` receives it; returns the
/// time from the last sending.
async fn deliver(
    from: &mut DerpClient,
    to: &mut DerpClient,
    from_key: PublicKey,
    to_key: PublicKey,
    body: &[u8],
    deadline: tokio::time::Instant,
) -> Result<Duration, String> {
    loop {
        if tokio::time::Instant::now() >= deadline {
            return Err("timed out".into());
        }
        let sent = Instant::now();
        from.send_packet(to_key, body).await.map_err(|e| e.to_string())?;
        let until = deadline.min(tokio::time::Instant::now() + RESEND_EVERY);
        let arrived = tokio::time::timeout_at(until, async {
            loop {
                let (src, got) = to.recv_packet().await?;
                if src == from_key && got[..] == *body {
                    return Ok::<_, warren_relay_client::ClientError>(());
                }
            }
        })
        .await;
        match arrived {
            Ok(Ok(())) => return Ok(sent.elapsed()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => continue,
        }
    }
}

fn export(round: &Round) {
    for r in &round.relays {
        let mut checks = vec![("tls", &r.tls), ("derp", &r.derp)];
        if let Some(s) = &r.stun {
            checks.push(("stun", s));
        }
        for (name, c) in checks {
            let labels = [("region", r.region.clone()), ("relay", r.relay.clone()), ("check", name.to_owned())];
            metrics::gauge!("warren_probe_up", &labels).set(if c.ok { 1.0 } else { 0.0 });
            if c.ok {
                metrics::gauge!("warren_probe_seconds", &labels).set(c.seconds);
            }
        }
        if let Some(expiry) = r.cert_expiry_seconds {
            let labels = [("region", r.region.clone()), ("relay", r.relay.clone())];
            metrics::gauge!("warren_probe_cert_expiry_seconds", &labels).set(expiry);
        }
    }
    for p in &round.pairs {
        let labels = [("region", p.region.clone()), ("from", p.from.clone()), ("to", p.to.clone())];
        metrics::gauge!("warren_probe_mesh_up", &labels).set(if p.check.ok { 1.0 } else { 0.0 });
        if p.check.ok {
            metrics::gauge!("warren_probe_mesh_rtt_seconds", &labels).set(p.check.seconds);
        }
    }
    metrics::gauge!("warren_probe_round_seconds").set(round.seconds);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("warren_probe_last_round_timestamp_seconds").set(now);
    metrics::counter!("warren_probe_rounds_total").increment(1);
}

/// Describes the prober's metrics to the recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_gauge!("warren_probe_up", "Whether the last check of a relay passed (check: stun, tls, derp)");
    describe_gauge!("warren_probe_seconds", Unit::Seconds, "Time the last successful check took");
    describe_gauge!("warren_probe_cert_expiry_seconds", Unit::Seconds, "Seconds until the relay's certificate expires");
    describe_gauge!(
        "warren_probe_mesh_up",
        "Whether a packet went from a client on one relay to a client on another and back"
    );
    describe_gauge!(
        "warren_probe_mesh_rtt_seconds",
        Unit::Seconds,
        "Round trip between clients on two relays of a region"
    );
    describe_gauge!("warren_probe_round_seconds", Unit::Seconds, "Time the last probe round took");
    describe_gauge!("warren_probe_last_round_timestamp_seconds", Unit::Seconds, "When the last probe round ended");
    describe_counter!("warren_probe_rounds_total", "Probe rounds run");
}

/// Logs each check that changed state since the last round (and every failure of the first).
fn log_changes(round: &Round, last: &mut HashMap<String, bool>) {
    let mut seen = |what: String, c: &Check| {
        let before = last.insert(what.clone(), c.ok);
        match (before, c.ok) {
            (Some(true) | None, false) => {
                warn!(check = %what, error = c.error.as_deref().unwrap_or(""), "probe failing")
            }
            (Some(false), true) => info!(check = %what, "probe passing again"),
            _ => {}
        }
    };
    for r in &round.relays {
        let at = format!("{}/{}", r.region, r.relay);
        seen(format!("{at} tls"), &r.tls);
        seen(format!("{at} derp"), &r.derp);
        if let Some(s) = &r.stun {
            seen(format!("{at} stun"), s);
        }
    }
    for p in &round.pairs {
        seen(format!("{}/{} -> {}", p.region, p.from, p.to), &p.check);
    }
}
