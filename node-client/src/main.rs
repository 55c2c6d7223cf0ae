//! `warren`: the node client command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use rand_core::OsRng;
use serde_json::json;
use warren::config::{defaults, NodeFile};
use warren::funnel::FunnelConfig;
use warren::node::{Node, NodeConfig};
use warren::regionmap::RegionMap;
use warren_common::config::{ConfigDuration, ConfigError};
use warren_common::runtime::{init_logging, wait_for_signal};
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{Frame, PeerGoneReason, SecretKey, Transport};

mod cli;

/// Warren node client.
#[derive(Debug, Parser)]
#[command(name = "warren", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node: pick a home relay, discover endpoints, keep direct paths to peers.
    Up(UpArgs),
    /// Show the running node's home relay, endpoints and each peer's path.
    Status(ControlArgs),
    /// Ping a peer over its current path.
    Ping {
        /// The peer's public key (64 hex digits), optionally `@REGION` (id or code) where it is
        /// homed.
        peer: String,
        /// How many pings.
        #[arg(short, long, default_value_t = 3)]
        count: u32,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Send a text packet to a peer.
    Send {
        /// The peer's public key (64 hex digits), optionally `@REGION` (id or code) where it is
        /// homed.
        peer: String,
        /// The text to send.
        data: String,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Wait for the next packet from any peer and print it.
    Recv {
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Publish a local service through the edge, like `tailscale funnel`: `warren funnel 3000`
    /// (in the foreground until Ctrl-C), `--bg` to keep it, `status`, `off`, `reset`, `log`.
    Funnel(cli::funnel::FunnelArgs),
    /// Print this node's public key (creating the key file if needed).
    Key {
        /// Key file [default: .warren/node.key].
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Check a relay end to end: two fresh keys log in, ping the relay, exchange packets
    /// through it, and measure round-trip time and one-way throughput.
    RelayCheck(RelayCheckArgs),
    /// Hash a password for basic auth on a funnel (`--auth basic:USER:HASH`, node.toml
    /// `access.basic`): reads the password from the first line of stdin, prints a bcrypt hash.
    HashPassword {
        /// bcrypt cost: each step doubles the work of every check (edges accept at most 14).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=14))]
        cost: u32,
    },
}

#[derive(Debug, clap::Args)]
struct RelayCheckArgs {
    /// Relay URL, e.g. https://localhost:8443 or http://127.0.0.1:3340.
    #[arg(long)]
    relay: String,
    /// PEM file of a CA to trust (e.g. the relay's dev CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Use the WebSocket transport instead of the DERP upgrade.
    #[arg(long)]
    websocket: bool,
    /// Ask for Derp-Fast-Start (no 101 response).
    #[arg(long, conflicts_with = "websocket")]
    fast_start: bool,
    /// Round trips to time.
    #[arg(long, default_value_t = 200)]
    round_trips: u32,
    /// Packets to send for the throughput run (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    packets: u32,
    /// Packet size in bytes for the throughput run.
    #[arg(long, default_value_t = 1200)]
    size: usize,
}

#[derive(Debug, clap::Args)]
struct ControlArgs {
    /// The running node's control socket.
    #[arg(long, env = "WARREN_CONTROL", default_value = defaults::CONTROL)]
    control: PathBuf,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Node config file (node.toml); flags given here override its keys.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Check the config file and flags, then exit (0 valid, 64 invalid) without starting.
    #[arg(long)]
    check_config: bool,
    /// Region map listing the relays: a JSON file or an http(s):// URL.
    #[arg(long)]
    region_map: Option<String>,
    /// PEM file of a CA to trust for relays (e.g. a relay's dev CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Node key file (created 0600 on first start) [default: .warren/node.key].
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// UDP address for direct paths and STUN [default: 0.0.0.0:0].
    #[arg(long)]
    udp: Option<std::net::SocketAddr>,
    /// Seconds between STUN rounds [default: 20].
    #[arg(long)]
    stun_interval: Option<u64>,
    /// Never go direct: every packet to a peer goes through the home relay.
    #[arg(long)]
    relay_only: bool,
    /// Edge tunnel address (host:port, UDP) for `warren funnel`; repeat it to keep a tunnel to
    /// each edge of a cluster.
    #[arg(long)]
    edge: Vec<String>,
    /// PEM file of a CA to trust for the edge (default: --ca).
    #[arg(long)]
    edge_ca: Option<PathBuf>,
    /// TLS name of the edge, if it differs from the host in --edge.
    #[arg(long)]
    edge_name: Option<String>,
    /// Tunnel transport to the edges: auto (QUIC, else TCP+TLS on the edge's public port,
    /// back to QUIC when it works), quic or tcp [default: auto].
    #[arg(long, value_enum)]
    transport: Option<warren::net::TransportMode>,
    /// The edges' public port, where they take TCP tunnels [default: 443].
    #[arg(long)]
    edge_tcp_port: Option<u16>,
    /// HTTP proxy for the relay and the edges' TCP tunnels (http://[user:password@]host:port;
    /// "none" ignores HTTPS_PROXY and ALL_PROXY) [default: from HTTPS_PROXY, ALL_PROXY].
    #[arg(long)]
    proxy: Option<String>,
    /// Token the edge's operator issued for this node's name.
    #[arg(long, env = "WARREN_FUNNEL_TOKEN", hide_env_values = true)]
    funnel_token: Option<String>,
    /// Node name for funnel URLs (`<name>.<funnel domain>`); default: the host name.
    #[arg(long)]
    name: Option<String>,
    /// A custom domain to be reached at too (repeatable; overrides `[funnel] domains`): the
    /// edge serves it once `_warren.<domain>` holds the TXT value `warren funnel status` shows,
    /// or the domain is a CNAME of `<name>.<funnel domain>`.
    #[arg(long)]
    domain: Vec<String>,
    /// The control socket [default: .warren/warren.sock].
    #[arg(long, env = "WARREN_CONTROL")]
    control: Option<PathBuf>,
}

/// Exit code for an invalid configuration (EX_CONFIG would be 78; 64 is EX_USAGE, as the
/// servers use).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs what it does; one-shot commands only warnings.
    let default_level = if matches!(cli.command, Command::Up(_)) { "info" } else { "warn" };
    init_logging(false, default_level);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A bad config file or flag exits with EXIT_CONFIG before anything starts.
    let settings = match &cli.command {
        Command::Up(args) => match Settings::read(args) {
            Ok(_) if args.check_config => {
                report("config is valid");
                return ExitCode::SUCCESS;
            }
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("warren: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        _ => None,
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::RelayCheck(args) => relay_check(args).await,
            Command::Up(_) => up(settings.context("settings are read for `up` before the runtime")?).await,
            Command::Status(c) => control(&c, json!({"cmd": "status"})).await,
            Command::Ping { peer, count, control: c } => {
                control(&c, json!({"cmd": "ping", "peer": peer, "count": count})).await
            }
            Command::Send { peer, data, control: c } => {
                control(&c, json!({"cmd": "send", "peer": peer, "data": data})).await
            }
            Command::Recv { timeout_ms, control: c } => {
                control(&c, json!({"cmd": "recv", "timeout_ms": timeout_ms})).await
            }
            Command::Funnel(args) => cli::funnel::run(args).await,
            Command::HashPassword { cost } => {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).context("cannot read the password from stdin")?;
                let password = line.strip_suffix('\n').unwrap_or(&line);
                let password = password.strip_suffix('\r').unwrap_or(password);
                anyhow::ensure!(!password.is_empty(), "no password on stdin");
                report(&bcrypt::hash(password, cost)?);
                Ok(())
            }
            Command::Key { key_file } => {
                let key_file = key_file.unwrap_or_else(|| defaults::KEY_FILE.into());
                let key = warren_common::keyfile::load_or_create(&key_file)?;
                report(&key.public_key().to_hex());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints one line of the command's report on stdout.
#[allow(clippy::print_stdout)] // stdout is the command's output
fn report(line: &str) {
    println!("{line}");
}

/// `warren up`'s settings: the config file's, overridden by flags.
#[derive(Debug)]
struct Settings {
    region_map: String,
    ca: Option<PathBuf>,
    key_file: PathBuf,
    udp: std::net::SocketAddr,
    stun_interval: Duration,
    relay_only: bool,
    peers: Vec<String>,
    link_idle: Option<Duration>,
    control: PathBuf,
    funnel: Option<FunnelConfig>,
    /// The proxy setting (for the relay here; the funnel has its own copy).
    proxy: warren::net::ProxyChoice,
    admin: Option<std::net::SocketAddr>,
}

impl Settings {
    fn read(args: &UpArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(p) => NodeFile::load(p)?,
            None => NodeFile::default(),
        };
        file.check()?;
        let region_map = args
            .region_map
            .clone()
            .or(file.region_map.clone())
            .ok_or_else(|| ConfigError::invalid("region_map", "required (in the config file or --region-map)"))?;
        let udp = match (args.udp, &file.udp) {
            (Some(a), _) => a,
            (None, Some(s)) => warren_common::config::socket_addr("udp", s)?,
            (None, None) => warren_common::config::socket_addr("udp", defaults::UDP)?,
        };
        let stun_interval = match args.stun_interval {
            Some(s) => Duration::from_secs(s.max(1)),
            None => ConfigDuration::or(file.stun_interval, defaults::STUN_INTERVAL),
        };
        let ca = args.ca.clone().or(file.ca_file.clone());
        let mut funnel_file = file.funnel.clone();
        funnel_file.transport = args.transport.or(funnel_file.transport);
        funnel_file.tcp_port = args.edge_tcp_port.or(funnel_file.tcp_port);
        let transport = funnel_file.transport(args.proxy.as_deref().or(file.proxy.as_deref()))?;
        let edges = if args.edge.is_empty() { file.funnel.edges.clone() } else { args.edge.clone() };
        let token = match &args.funnel_token {
            Some(t) => Some(t.clone()),
            None => file.token()?,
        };
        let funnel =
            match (edges.is_empty(), token) {
                (true, _) => None,
                (false, None) => return Err(ConfigError::invalid(
                    "funnel.token",
                    "an edge needs a token (--funnel-token, WARREN_FUNNEL_TOKEN, funnel.token or funnel.token_file)",
                )),
                (false, Some(token)) => Some(FunnelConfig {
                    edges,
                    edge_name: args.edge_name.clone().or(file.funnel.edge_name.clone()),
                    ca_file: args.edge_ca.clone().or(file.funnel.edge_ca.clone()).or_else(|| ca.clone()),
                    token,
                    name: args.name.clone().or(file.funnel.name.clone()).unwrap_or_else(default_name),
                    services: file.services.clone(),
                    transport: transport.clone(),
                    domains: if args.domain.is_empty() { file.funnel.domains.clone() } else { args.domain.clone() },
                }),
            };
        Ok(Settings {
            region_map,
            ca,
            key_file: args.key_file.clone().or(file.key_file.clone()).unwrap_or_else(|| defaults::KEY_FILE.into()),
            udp,
            stun_interval,
            relay_only: args.relay_only || file.relay_only.unwrap_or(false),
            peers: file.peers.clone(),
            link_idle: file.link_idle.map(|d| d.0),
            control: args.control.clone().or(file.control.clone()).unwrap_or_else(|| defaults::CONTROL.into()),
            funnel,
            proxy: transport.proxy,
            admin: warren::config::admin_listen(&file.admin)?,
        })
    }
}

async fn up(settings: Settings) -> anyhow::Result<()> {
    let secret = warren_common::keyfile::load_or_create(&settings.key_file)?;
    let map = RegionMap::load_from(&settings.region_map, settings.ca.as_deref()).await?;
    let mut cfg = NodeConfig::new(secret, map);
    cfg.ca_file = settings.ca.clone();
    cfg.udp_bind = settings.udp;
    cfg.stun_interval = settings.stun_interval;
    cfg.relay_only = settings.relay_only;
    cfg.proxy = settings.proxy.clone();
    if let Some(idle) = settings.link_idle {
        cfg.link_idle = idle;
    }
    for p in &settings.peers {
        if let (key, Some(region)) = warren::node::parse_peer(p, &cfg.region_map)? {
            cfg.peer_hints.push((key, region));
        }
    }
    let node = std::sync::Arc::new(Node::start(cfg).await?);
    report(&format!("node {} up; control socket {}", node.public_key().to_hex(), settings.control.display()));
    let cancel = tokio_util::sync::CancellationToken::new();
    let state_file = warren::services::state::path_for(&settings.key_file);
    let daemon = warren::control::Daemon::new(node.clone(), settings.funnel, Some(state_file))?;
    let daemon = std::sync::Arc::new(daemon);
    let ctl = tokio::spawn({
        let (daemon, cancel, path) = (daemon.clone(), cancel.clone(), settings.control.clone());
        async move { warren::control::serve(daemon, &path, cancel).await }
    });
    let admin = tokio_util::task::TaskTracker::new();
    if let Some(addr) = settings.admin {
        serve_admin(addr, &daemon, &cancel, &admin).await?;
    }
    wait_for_signal().await;
    cancel.cancel();
    ctl.await.context("control task")?.context("control socket")?;
    admin.close();
    admin.wait().await;
    // The funnel's requests get a moment to finish; then the node's tasks end.
    daemon.shutdown(Duration::from_secs(5)).await;
    if tokio::time::timeout(Duration::from_secs(5), node.shutdown()).await.is_err() {
        tracing::warn!("the node's tasks did not end within 5 s");
    }
    Ok(())
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`; ready while the home relay is
/// connected and, when services are published, the funnel is registered on an edge. The
/// gauges and the readiness are refreshed every second.
async fn serve_admin(
    addr: std::net::SocketAddr,
    daemon: &std::sync::Arc<warren::control::Daemon>,
    cancel: &tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> anyhow::Result<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    warren::metrics::describe();
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("admin listener {addr}"))?;
    tracing::info!(admin = %listener.local_addr()?, "admin: /metrics, /healthz, /readyz");
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    tasks.spawn({
        let (daemon, cancel, ready) = (daemon.clone(), cancel.clone(), ready.clone());
        async move {
            loop {
                let relay = match daemon.node.status().await {
                    Ok(s) => {
                        warren::metrics::node_gauges(&s);
                        s.relay_connected
                    }
                    Err(_) => false,
                };
                let funnel = daemon.funnel().map(warren::funnel::Funnel::status);
                if let Some(f) = &funnel {
                    let connected: Vec<_> = f.edges.iter().filter(|e| e.connected).collect();
                    let tcp = connected.iter().filter(|e| e.transport.as_deref() == Some("tcp")).count();
                    let rtts = f.edges.iter().enumerate().filter_map(|(i, e)| e.rtt_ms.map(|r| (i, r)));
                    warren::metrics::funnel_gauges(connected.len(), tcp, f.services.len(), rtts);
                }
                let published = funnel.is_none_or(|f| f.services.is_empty() || f.connected);
                ready.store(relay && published, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    });
    let ready_fn = std::sync::Arc::new(move || ready.load(std::sync::atomic::Ordering::Relaxed));
    tasks.spawn(warren_common::runtime::serve_admin(
        listener,
        Some(prometheus),
        ready_fn,
        cancel.clone(),
        tasks.clone(),
    ));
    Ok(())
}

/// The machine's host name as a DNS label, or "node".
fn default_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label: String = raw
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let label = label.trim_matches('-').to_owned();
    if label.is_empty() {
        "node".into()
    } else {
        label
    }
}

/// Sends one control request and prints the answer (pretty JSON); fails on `"ok": false`.
async fn control(args: &ControlArgs, req: serde_json::Value) -> anyhow::Result<()> {
    let answer = warren::control::request(&args.control, &req)
        .await
        .with_context(|| format!("cannot reach the node at {} (is `warren up` running?)", args.control.display()))?;
    report(&serde_json::to_string_pretty(&answer)?);
    if answer.get("ok") != Some(&serde_json::Value::Bool(true)) {
        bail!("{}", answer.get("error").and_then(|e| e.as_str()).unwrap_or("request failed"));
    }
    Ok(())
}

async fn relay_check(args: RelayCheckArgs) -> anyhow::Result<()> {
    if args.size == 0 || args.size > warren_relay_proto::MAX_PACKET_SIZE {
        bail!("--size must be between 1 and {}", warren_relay_proto::MAX_PACKET_SIZE);
    }
    let opts = ConnectOptions {
        transport: if args.websocket { Transport::WebSocket } else { Transport::Derp },
        fast_start: args.fast_start,
        ca_file: args.ca.clone(),
        ..Default::default()
    };
    let (ka, kb) = (SecretKey::generate(&mut OsRng), SecretKey::generate(&mut OsRng));
    let mut a = DerpClient::connect(&args.relay, &ka, &opts).await.context("client A login")?;
    let mut b = DerpClient::connect(&args.relay, &kb, &opts).await.context("client B login")?;
    report(&format!("relay {} key {} transport {}", args.relay, a.server_key(), opts.transport.name()));
    report(&format!("client A {} and client B {} logged in", a.public_key().short(), b.public_key().short()));

    let t = Instant::now();
    a.send(&Frame::Ping(*b"warren!!")).await?;
    loop {
        match timeout(a.recv()).await? {
            Frame::Pong(d) if &d == b"warren!!" => break,
            _ => {}
        }
    }
    report(&format!("ping -> pong from relay in {:.1?}", t.elapsed()));

    let absent = SecretKey::generate(&mut OsRng).public_key();
    a.send_packet(absent, b"anyone there?").await?;
    loop {
        match timeout(a.recv()).await? {
            Frame::PeerGone { peer, reason: PeerGoneReason::NotHere } if peer == absent => break,
            _ => {}
        }
    }
    report("packet to an absent key -> PeerGone(not here)");

    let rtts = round_trips(&mut a, &mut b, args.round_trips).await?;
    if !rtts.is_empty() {
        let pct = |p: f64| rtts[((rtts.len() - 1) as f64 * p) as usize];
        report(&format!(
            "A -> B -> A echo through the relay: {} round trips, p50 {:.0?} p90 {:.0?} p99 {:.0?} max {:.0?}",
            rtts.len(),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            rtts[rtts.len() - 1]
        ));
    }
    if args.packets > 0 {
        throughput(a, b, args.packets, args.size).await?;
    }
    Ok(())
}

async fn timeout<T>(
    f: impl std::future::Future<Output = Result<T, warren_relay_client::ClientError>>,
) -> anyhow::Result<T> {
    Ok(tokio::time::timeout(Duration::from_secs(5), f).await.context("no answer from the relay within 5s")??)
}

async fn round_trips(a: &mut DerpClient, b: &mut DerpClient, n: u32) -> anyhow::Result<Vec<Duration>> {
    let (akey, bkey) = (a.public_key(), b.public_key());
    let mut rtts = Vec::with_capacity(n as usize);
    for i in 0..n {
        let payload = i.to_be_bytes();
        let t = Instant::now();
        a.send_packet(bkey, &payload).await?;
        let (src, got) = timeout(b.recv_packet()).await?;
        if src != akey || got[..] != payload {
            bail!("B received a packet that A did not send");
        }
        b.send_packet(akey, &got).await?;
        let (src, back) = timeout(a.recv_packet()).await?;
        if src != bkey || back[..] != payload {
            bail!("A received a packet that B did not echo");
        }
        rtts.push(t.elapsed());
    }
    rtts.sort();
    Ok(rtts)
}

/// Packets in flight in the throughput run; below the relay's default queue depth (128), so a
/// healthy relay drops nothing.
const WINDOW: u32 = 96;
/// B acknowledges every this many packets.
const ACK_EVERY: u32 = 16;

/// Closed-loop one-way throughput: A keeps at most [`WINDOW`] packets unacknowledged; B
/// acknowledges every [`ACK_EVERY`] packets through the relay.
async fn throughput(mut a: DerpClient, mut b: DerpClient, n: u32, size: usize) -> anyhow::Result<()> {
    let (akey, bkey) = (a.public_key(), b.public_key());
    let receiver = tokio::spawn(async move {
        let mut got = 0u32;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(2), b.recv_packet()).await {
                Ok(Ok(_)) => got += 1,
                _ => break,
            }
            if (got % ACK_EVERY == 0 || got == n) && b.send_packet(akey, &got.to_be_bytes()).await.is_err() {
                break;
            }
        }
        got
    });
    let payload = bytes::Bytes::from(vec![0xa5; size]);
    let start = Instant::now();
    let (mut sent, mut acked) = (0u32, 0u32);
    while acked < n {
        while sent < n && sent - acked < WINDOW {
            a.queue(&Frame::SendPacket { dst: bkey, packet: payload.clone() })?;
            sent += 1;
        }
        a.flush().await?;
        let Ok(Ok((_, ack))) = tokio::time::timeout(Duration::from_secs(2), a.recv_packet()).await else {
            break;
        };
        if let Ok(v) = <[u8; 4]>::try_from(&ack[..]) {
            acked = acked.max(u32::from_be_bytes(v));
        }
    }
    let elapsed = start.elapsed().max(Duration::from_micros(1));
    let got = receiver.await.context("receiver task")?;
    report(&format!(
        "throughput A -> B (closed loop, window {WINDOW}): {got}/{n} x {size} B delivered in {elapsed:.2?}: {:.0} packets/s, {:.1} MB/s",
        f64::from(got) / elapsed.as_secs_f64(),
        f64::from(got) * size as f64 / elapsed.as_secs_f64() / 1e6
    ));
    if got < n {
        bail!("{} of {n} packets were not delivered", n - got);
    }
    Ok(())
}
