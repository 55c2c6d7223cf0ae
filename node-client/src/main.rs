//! `warren`: the node client command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use rand_core::OsRng;
use serde_json::json;
use warren::funnel::FunnelConfig;
use warren::node::{Node, NodeConfig};
use warren::regionmap::RegionMap;
use warren_common::runtime::{init_logging, wait_for_signal};
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{Frame, PeerGoneReason, SecretKey, Transport};

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
        /// The peer's public key (64 hex digits).
        peer: String,
        /// How many pings.
        #[arg(short, long, default_value_t = 3)]
        count: u32,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Send a text packet to a peer.
    Send {
        /// The peer's public key (64 hex digits).
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
    /// Publish a local service through the edge: `warren funnel 8080`, `warren funnel
    /// http://127.0.0.1:3000`, `warren funnel status`, `warren funnel off`.
    Funnel {
        /// A local port or http:// URL to publish, or `status`, or `off`.
        target: String,
        /// Public HTTPS port: 443, 8443 or 10000.
        #[arg(long, default_value_t = 443)]
        https_port: u16,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Print this node's public key (creating the key file if needed).
    Key {
        /// Key file.
        #[arg(long, default_value = DEFAULT_KEY_FILE)]
        key_file: PathBuf,
    },
    /// Check a relay end to end: two fresh keys log in, ping the relay, exchange packets
    /// through it, and measure round-trip time and one-way throughput.
    RelayCheck(RelayCheckArgs),
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

const DEFAULT_KEY_FILE: &str = ".warren/node.key";
const DEFAULT_CONTROL: &str = ".warren/warren.sock";

#[derive(Debug, clap::Args)]
struct ControlArgs {
    /// The running node's control socket.
    #[arg(long, env = "WARREN_CONTROL", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Region map listing the relays: a JSON file or an http(s):// URL.
    #[arg(long)]
    region_map: String,
    /// PEM file of a CA to trust for relays (e.g. a relay's dev CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Node key file (created 0600 on first start).
    #[arg(long, default_value = DEFAULT_KEY_FILE)]
    key_file: PathBuf,
    /// UDP address for direct paths and STUN.
    #[arg(long, default_value = "0.0.0.0:0")]
    udp: std::net::SocketAddr,
    /// Seconds between STUN rounds.
    #[arg(long, default_value_t = 20)]
    stun_interval: u64,
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
    /// Token the edge's operator issued for this node's name.
    #[arg(long, env = "WARREN_FUNNEL_TOKEN", hide_env_values = true)]
    funnel_token: Option<String>,
    /// Node name for funnel URLs (`<name>.<funnel domain>`); default: the host name.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
}

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
    let result = rt.block_on(async {
        match cli.command {
            Command::RelayCheck(args) => relay_check(args).await,
            Command::Up(args) => up(args).await,
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
            Command::Funnel { target, https_port, control: c } => match target.as_str() {
                "status" => control(&c, json!({"cmd": "funnel_status"})).await,
                "off" => control(&c, json!({"cmd": "funnel_off"})).await,
                _ => control(&c, json!({"cmd": "funnel", "target": target, "port": https_port})).await,
            },
            Command::Key { key_file } => {
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

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let secret = warren_common::keyfile::load_or_create(&args.key_file)?;
    let map = RegionMap::load_from(&args.region_map, args.ca.as_deref()).await?;
    let mut cfg = NodeConfig::new(secret, map);
    cfg.ca_file = args.ca;
    cfg.udp_bind = args.udp;
    cfg.stun_interval = Duration::from_secs(args.stun_interval.max(1));
    cfg.relay_only = args.relay_only;
    let funnel_settings = match (args.edge.is_empty(), args.funnel_token) {
        (false, Some(token)) => Some(FunnelConfig {
            edges: args.edge,
            edge_name: args.edge_name,
            ca_file: args.edge_ca.or_else(|| cfg.ca_file.clone()),
            token,
            name: args.name.unwrap_or_else(default_name),
            target: String::new(),
            ports: vec![443],
        }),
        (false, None) => bail!("--edge needs --funnel-token (or WARREN_FUNNEL_TOKEN)"),
        _ => None,
    };
    let node = std::sync::Arc::new(Node::start(cfg).await?);
    report(&format!("node {} up; control socket {}", node.public_key().to_hex(), args.control.control.display()));
    let cancel = tokio_util::sync::CancellationToken::new();
    let daemon = std::sync::Arc::new(warren::control::Daemon::new(node.clone(), funnel_settings));
    let ctl = tokio::spawn({
        let (daemon, cancel, path) = (daemon.clone(), cancel.clone(), args.control.control.clone());
        async move { warren::control::serve(daemon, &path, cancel).await }
    });
    wait_for_signal().await;
    cancel.cancel();
    ctl.await.context("control task")?.context("control socket")?;
    // The funnel's requests get a moment to finish; then the node's tasks end.
    daemon.shutdown(Duration::from_secs(5)).await;
    if tokio::time::timeout(Duration::from_secs(5), node.shutdown()).await.is_err() {
        tracing::warn!("the node's tasks did not end within 5 s");
    }
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
