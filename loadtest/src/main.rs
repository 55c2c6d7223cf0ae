//! `warren-loadtest`: command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use warren_loadtest::edge::{self, EdgeReport, EdgeScenario};
use warren_loadtest::relay::{self, Mode, RelayScenario};
use warren_loadtest::report::with_progress;
use warren_loadtest::{idle, probe, soak, RelayReport};

/// Load harness for Warren relays and edges. Figures are counted at the clients; read them as ratios
/// against a baseline measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "warren-loadtest", version)]
struct Cli {
    /// Print the result as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pairs of nodes sending through a relay: paced (--rate) or closed loop (--window), or a
    /// sweep of paced rates until loss passes --max-loss.
    Relay(RelayArgs),
    /// Visitors hitting a URL over HTTPS (HTTP/1.1 keep-alive or HTTP/2), closed loop or paced,
    /// GET or streamed POST bodies; --baseline URLs run the same load in the same invocation and
    /// the results are printed as ratios.
    Edge(EdgeArgs),
    /// The bulk ceiling for relay comparisons: push bytes through a plain TCP forwarder started
    /// between --via and this harness's sink, e.g.
    /// `socat TCP-LISTEN:9998,fork,reuseaddr TCP:127.0.0.1:9999`.
    Tcp {
        /// The forwarder's listening address.
        #[arg(long)]
        via: std::net::SocketAddr,
        /// Port of the sink the forwarder connects to (on 127.0.0.1).
        #[arg(long)]
        sink_port: u16,
        /// Connections pushing at once.
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        /// Seconds of pushing.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Paced: timed messages per second per connection (default: bulk, as fast as it goes).
        #[arg(long)]
        rate: Option<f64>,
        /// Message size in bytes for --rate.
        #[arg(long, default_value_t = 1200)]
        size: usize,
    },
    /// WebSocket echo sessions through an edge: each upgrades one HTTPS connection and times
    /// the echo of each message.
    Ws {
        /// URL of a WebSocket echo endpoint, e.g. https://echo.funnel.example.com/ws.
        #[arg(long)]
        url: String,
        /// Dial ADDR for HOST:PORT instead of resolving it (repeatable).
        #[arg(long, value_name = "HOST:PORT:ADDR")]
        resolve: Vec<String>,
        /// CA to trust.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Concurrent sessions.
        #[arg(long, default_value_t = 16)]
        sessions: usize,
        /// Messages per session.
        #[arg(long, default_value_t = 1000)]
        messages: u64,
        /// Message size in bytes.
        #[arg(long, default_value_t = 128)]
        size: usize,
    },
    /// A bulk origin for transfer benchmarks (plain HTTP/1.1): `GET /bytes/N` answers N bytes,
    /// a request with a body is drained and answered with its size and rate.
    Origin {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:18782")]
        listen: std::net::SocketAddr,
    },
    /// Check every relay of a region map, round after round: STUN, TLS certificate and expiry,
    /// DERP login, and a packet's round trip between clients on each pair of relays of a region.
    /// Results are Prometheus gauges on --listen (`/metrics`; alert rules in
    /// deploy/prometheus/alerts.yml); with --once, one round is printed and the exit status says
    /// whether everything passed.
    Probe {
        /// Region map: a JSON file or an http(s) URL.
        #[arg(long)]
        region_map: String,
        /// CA to trust besides the system's (e.g. a dev CA).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Time between the starts of two rounds.
        #[arg(long, default_value = "15s", value_parser = duration)]
        interval: Duration,
        /// Deadline of each check.
        #[arg(long, default_value = "5s", value_parser = duration)]
        timeout: Duration,
        /// Where `/metrics`, `/healthz` and `/readyz` are served.
        #[arg(long, default_value = "127.0.0.1:9091")]
        listen: std::net::SocketAddr,
        /// Run one round, print it and exit (status 1 if a check failed).
        #[arg(long)]
        once: bool,
    },
    /// The soak's clients (scripts/soak.py runs the servers and kills them): stable pairs
    /// across a region's relays, churning clients and funnel visitors; one JSON line of
    /// figures per interval on stdout, the totals last.
    Soak(SoakArgs),
    /// Open N idle clients and report the relay's RSS per client (needs its pid).
    Idle {
        /// Relay URL.
        #[arg(long)]
        relay: String,
        /// CA to trust.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The relay's process id (RSS is read from /proc).
        #[arg(long)]
        pid: u32,
        /// Idle clients to open.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Spread connections over 127.0.0.1 .. 127.0.0.N.
        #[arg(long, default_value_t = 16)]
        source_ips: u8,
        /// WebSocket transport.
        #[arg(long)]
        websocket: bool,
    },
}

#[derive(Debug, clap::Args)]
struct RelayArgs {
    /// Relay URL.
    #[arg(long)]
    relay: String,
    /// CA to trust (e.g. the relay's dev CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Packet size in bytes.
    #[arg(long, default_value_t = 1200)]
    size: usize,
    /// Paced: packets/s per pair.
    #[arg(long, conflicts_with = "window")]
    rate: Option<f64>,
    /// Closed loop: packets in flight per pair.
    #[arg(long)]
    window: Option<u64>,
    /// Sweep: start at this rate per pair and double until loss passes --max-loss.
    #[arg(long, conflicts_with_all = ["rate", "window"])]
    sweep_from: Option<f64>,
    /// Loss threshold of the sweep, in percent.
    #[arg(long, default_value_t = 0.1)]
    max_loss: f64,
    /// After the sweep, go on offering 2x, 3x .. this many times the loss-free rate it found and
    /// report each step's goodput as a share of the best one (overload behaviour).
    #[arg(long, requires = "sweep_from")]
    overload: Option<u32>,
    /// One more pair beside the load, paced at this many packets/s, reported on its own (the
    /// latency a light client sees while the others load the relay).
    #[arg(long)]
    probe_rate: Option<f64>,
    /// Seconds of sending per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// WebSocket transport.
    #[arg(long)]
    websocket: bool,
    /// Spread connections over 127.0.0.1 .. 127.0.0.N (0: default source address).
    #[arg(long, default_value_t = 0)]
    source_ips: u8,
}

#[derive(Debug, clap::Args)]
struct SoakArgs {
    /// The region's relay URLs (repeatable), in the order clients move through them.
    #[arg(long, required = true)]
    relay: Vec<String>,
    /// CA to trust for the relays.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Stable sender/receiver pairs, each side on a different relay.
    #[arg(long, default_value_t = 20)]
    pairs: usize,
    /// Packets per second per pair.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Packet size in bytes.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Churn clients logging in (and leaving) per second.
    #[arg(long, default_value_t = 20.0)]
    churn: f64,
    /// How long a churn client stays.
    #[arg(long, default_value = "2s", value_parser = duration)]
    churn_life: Duration,
    /// Funnel URL for visitors (https://name.funnel.domain:port/path).
    #[arg(long)]
    url: Option<String>,
    /// An edge's public address for the URL's host (repeatable).
    #[arg(long)]
    edge: Vec<std::net::SocketAddr>,
    /// CA to trust for the edges.
    #[arg(long)]
    edge_ca: Option<PathBuf>,
    /// Visits per second (every fourth uploads --upload-size bytes).
    #[arg(long, default_value_t = 10.0)]
    visit_rate: f64,
    /// Upload size in bytes.
    #[arg(long, default_value_t = 65536)]
    upload_size: usize,
    /// How long to run.
    #[arg(long, default_value = "2m", value_parser = duration)]
    duration: Duration,
    /// Report interval.
    #[arg(long, default_value = "10s", value_parser = duration)]
    interval: Duration,
    /// After a client logs in again, its pair's packets count as the switch's for this long.
    #[arg(long, default_value = "1s", value_parser = duration)]
    settle: Duration,
}

#[derive(Debug, clap::Args)]
struct EdgeArgs {
    /// The URL to load, e.g. https://web.funnel.example.com/ (an edge's funnel).
    #[arg(long)]
    url: String,
    /// The same load against these URLs too (the origin directly, another proxy), one after the
    /// other, for ratios measured in one run.
    #[arg(long)]
    baseline: Vec<String>,
    /// Dial ADDR for HOST:PORT instead of resolving it, as curl's --resolve (repeatable).
    #[arg(long, value_name = "HOST:PORT:ADDR")]
    resolve: Vec<String>,
    /// CA to trust (e.g. the edge's dev CA); baselines use the same.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// HTTP/2 (ALPN h2) instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Requests in flight per HTTP/2 connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Paced: requests/s over all connections (default: closed loop, as fast as answered).
    #[arg(long)]
    rate: Option<f64>,
    /// POST a body of this many bytes (streamed); 0 sends GETs.
    #[arg(long, default_value_t = 0)]
    body_size: usize,
    /// Seconds per URL.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

#[allow(clippy::print_stdout)] // stdout is the command's output
fn print(line: &str) {
    println!("{line}");
}

fn main() -> ExitCode {
    warren_common::runtime::init_logging(false, "warn");
    let cli = Cli::parse();
    // Each connection is a file descriptor: raise the soft limit as far as the hard one allows.
    let _ = rlimit::increase_nofile_limit(1 << 20);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-loadtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Relay(a) => relay_cmd(a, cli.json).await,
        Command::Edge(a) => edge_cmd(a, cli.json).await,
        Command::Ws { url, resolve, ca, sessions, messages, size } => {
            let scenario = warren_loadtest::ws::WsScenario {
                connect_addr: resolved(&url, &resolve)?,
                url,
                ca,
                sessions,
                messages,
                size,
                timeout: Duration::from_secs(300),
            };
            let r = with_progress("ws", None, warren_loadtest::ws::run(&scenario)).await?;
            print(&if cli.json { serde_json::to_string_pretty(&r)? } else { r.to_string() });
            Ok(())
        }
        Command::Tcp { via, sink_port, pairs, seconds, rate, size } => {
            let d = Duration::from_secs_f64(seconds);
            let r = match rate {
                Some(rate) => {
                    let run = warren_loadtest::tcp::paced(via, sink_port, pairs, size, rate, d);
                    with_progress("tcp paced", Some(d), run).await?
                }
                None => {
                    with_progress("tcp (bytes)", Some(d), warren_loadtest::tcp::run(via, sink_port, pairs, d)).await?
                }
            };
            print(&if cli.json { serde_json::to_string_pretty(&r)? } else { r.to_string() });
            Ok(())
        }
        Command::Origin { listen } => Ok(warren_loadtest::origin::serve(listen).await?),
        Command::Probe { region_map, ca, interval, timeout, listen, once } => {
            let map = warren::regionmap::RegionMap::load_from(&region_map, ca.as_deref()).await?;
            let settings = probe::ProbeSettings { map, ca_file: ca, interval, timeout };
            if once {
                let round = probe::probe_once(&settings).await;
                print(&if cli.json { serde_json::to_string_pretty(&round)? } else { probe::summary(&round) });
                anyhow::ensure!(round.all_ok(), "some checks failed");
                return Ok(());
            }
            probe_cmd(settings, listen).await
        }
        Command::Soak(a) => {
            let scenario = soak::SoakScenario {
                relays: a.relay,
                ca: a.ca,
                pairs: a.pairs,
                rate: a.rate,
                size: a.size,
                churn: a.churn,
                churn_life: a.churn_life,
                visit_url: a.url,
                edges: a.edge,
                edge_ca: a.edge_ca,
                visit_rate: a.visit_rate,
                upload_size: a.upload_size,
                duration: a.duration,
                interval: a.interval,
                settle: a.settle,
            };
            let total = soak::run(scenario, |t| {
                if let Ok(line) = serde_json::to_string(t) {
                    print(&line);
                }
            })
            .await?;
            print(&serde_json::to_string(&serde_json::json!({ "total": total }))?);
            Ok(())
        }
        Command::Idle { relay, ca, pid, clients, source_ips, websocket } => {
            let r =
                with_progress("idle clients", None, idle::run(&relay, ca, pid, clients, source_ips, websocket)).await?;
            if cli.json {
                print(&serde_json::to_string_pretty(&r)?);
            } else {
                print(&format!(
                    "idle clients {}: relay RSS {} KiB -> {} KiB = {:.1} KiB per client",
                    r.clients, r.rss_before_kib, r.rss_after_kib, r.kib_per_client
                ));
            }
            Ok(())
        }
    }
}

/// Serves the prober's metrics and probes until SIGTERM or SIGINT.
async fn probe_cmd(settings: probe::ProbeSettings, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    probe::describe();
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(warren_common::runtime::serve_admin(
        listener,
        Some(handle),
        std::sync::Arc::new(|| true),
        cancel.clone(),
        tracker.clone(),
    ));
    eprintln!(
        "warren-loadtest probe: {} relays every {:?}; metrics on http://{listen}/metrics",
        probe::relay_count(&settings.map),
        settings.interval
    );
    probe::run(settings, warren_common::runtime::wait_for_signal()).await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(())
}

fn duration(s: &str) -> Result<Duration, String> {
    warren_common::config::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration such as 500ms, 15s or 2m"))
}

async fn relay_cmd(a: RelayArgs, json: bool) -> anyhow::Result<()> {
    let base = RelayScenario {
        url: a.relay,
        ca: a.ca,
        pairs: a.pairs,
        size: a.size,
        mode: Mode::Closed { window: 64 },
        duration: Duration::from_secs_f64(a.seconds),
        websocket: a.websocket,
        source_ips: a.source_ips,
        max_packets_per_pair: 0,
        probe_rate: a.probe_rate,
    };
    let mut reports: Vec<RelayReport> = Vec::new();
    if let Some(mut rate) = a.sweep_from {
        loop {
            let label = format!("relay paced {rate:.0}/s per pair");
            let scenario = RelayScenario { mode: Mode::Paced { rate }, ..base.clone() };
            let r = with_progress(&label, Some(base.duration), relay::run(&scenario)).await?;
            let over = r.loss_pct > a.max_loss;
            reports.push(r);
            if over || rate > 1e7 {
                break;
            }
            rate *= 2.0;
        }
        if let Some(times) = a.overload {
            // The loss-free rate is the last step under the threshold (or the first step).
            let free = reports.iter().rev().find(|r| r.loss_pct <= a.max_loss).unwrap_or(&reports[0]);
            let free = free.offered_pps.unwrap_or(0.0) / base.pairs as f64;
            reports.retain(|r| r.offered_pps.unwrap_or(0.0) <= free * base.pairs as f64 + 1.0);
            for m in 2..=times {
                let rate = free * f64::from(m);
                let label = format!("relay overload {m}x: {rate:.0}/s per pair");
                let scenario = RelayScenario { mode: Mode::Paced { rate }, ..base.clone() };
                reports.push(with_progress(&label, Some(base.duration), relay::run(&scenario)).await?);
            }
            if !json {
                print(&overload_table(&reports, free * base.pairs as f64));
            }
        }
    } else {
        let mode = match (a.rate, a.window) {
            (Some(rate), _) => Mode::Paced { rate },
            (None, Some(window)) => Mode::Closed { window },
            (None, None) => Mode::Closed { window: 64 },
        };
        let scenario = RelayScenario { mode, ..base };
        reports.push(with_progress("relay", Some(scenario.duration), relay::run(&scenario)).await?);
    }
    if json {
        print(&serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print(&format!("{r}\n"));
        }
    }
    Ok(())
}

/// Offered, sent and delivered packets/s per step, goodput as a share of the best step.
fn overload_table(reports: &[RelayReport], free_pps: f64) -> String {
    let peak = reports.iter().map(|r| r.delivered_pps).fold(0.0, f64::max);
    let mut out = format!(
        "overload: loss-free rate {free_pps:.0} packets/s\n{:>8} {:>12} {:>12} {:>12} {:>7} {:>9} {:>10} {:>14}\n",
        "offered", "packets/s", "sent/s", "delivered/s", "loss %", "of peak", "p99 ms", "probe p99 ms"
    );
    for r in reports {
        let offered = r.offered_pps.unwrap_or(0.0);
        out += &format!(
            "{:>7.1}x {:>12.0} {:>12.0} {:>12.0} {:>7.2} {:>8.1}% {:>10.2} {:>14}\n",
            offered / free_pps.max(1.0),
            offered,
            r.sent as f64 / r.seconds.max(1e-9),
            r.delivered_pps,
            r.loss_pct,
            100.0 * r.delivered_pps / peak.max(1e-9),
            r.latency.p99_us / 1000.0,
            r.probe.as_ref().map_or("-".to_owned(), |p| format!(
                "{:.2} ({} lost)",
                p.latency.p99_us / 1000.0,
                p.sent.saturating_sub(p.received)
            ))
        );
    }
    out
}

/// The `--resolve` address for `url`, if one matches its host and port.
fn resolved(url: &str, resolve: &[String]) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let u = warren_common::url::RelayUrl::parse(url)?;
    for r in resolve {
        let mut parts = r.splitn(3, ':');
        let (Some(host), Some(port), Some(addr)) = (parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("--resolve {r:?}: expected HOST:PORT:ADDR");
        };
        if host == u.host && port.parse::<u16>().ok() == Some(u.port) {
            let ip: std::net::IpAddr = addr.trim_matches(['[', ']']).parse()?;
            return Ok(Some(std::net::SocketAddr::new(ip, u.port)));
        }
    }
    Ok(None)
}

async fn edge_cmd(a: EdgeArgs, json: bool) -> anyhow::Result<()> {
    let mut reports: Vec<EdgeReport> = Vec::new();
    for url in std::iter::once(&a.url).chain(&a.baseline) {
        let scenario = EdgeScenario {
            url: url.clone(),
            connect_addr: resolved(url, &a.resolve)?,
            ca: a.ca.clone(),
            connections: a.connections,
            streams: a.streams,
            http2: a.http2,
            rate: a.rate,
            body_size: a.body_size,
            duration: Duration::from_secs_f64(a.seconds),
            max_requests_per_worker: 0,
        };
        let r = with_progress(&format!("edge {url}"), Some(scenario.duration), edge::run(&scenario)).await?;
        if !json {
            print(&format!("{r}\n"));
        }
        reports.push(r);
    }
    if json {
        print(&serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    if let Some((target, baselines)) = reports.split_first() {
        for b in baselines {
            if b.requests_per_second <= 0.0 || target.requests_per_second <= 0.0 {
                print(&format!("{} vs {}: no ratio (a run answered nothing)", target.url, b.url));
                continue;
            }
            print(&format!(
                "{} vs {}: req/s x{:.2}, p50 latency {:+.0} us",
                target.url,
                b.url,
                target.requests_per_second / b.requests_per_second,
                target.latency.p50_us - b.latency.p50_us
            ));
        }
    }
    Ok(())
}
