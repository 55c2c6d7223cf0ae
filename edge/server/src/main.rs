//! `warren-edge`: command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing::info;
use warren_common::runtime::{init_logging, wait_for_signal};
use warren_edge::config::{Config, FileConfig, TlsModeName, TokenFile};
use warren_edge::Edge;

mod cli;

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Warren edge (Funnel): serves https://<node>.<funnel domain> for nodes that tunnel to it
/// over QUIC, or over TCP+TLS on the public ports where UDP is blocked.
///
/// Settings come from the TOML file given with --config; flags override the file.
#[derive(Debug, Parser)]
#[command(name = "warren-edge", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (see deploy/edge.example.toml).
    #[arg(short, long, env = "WARREN_EDGE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Validate the configuration and exit without binding any port.
    #[arg(long)]
    check_config: bool,
    /// Development mode: TLS from a local CA, public HTTPS on 127.0.0.1:10000, tunnel on UDP
    /// 127.0.0.1:7443, admin on 127.0.0.1:9190, funnel domain funnel.localhost, state in
    /// ./.warren-dev/edge, and the token "dev" accepted for any name unless tokens are set.
    #[arg(long)]
    dev: bool,
    /// Funnel domain: public names are <node>.<domain>.
    #[arg(long)]
    funnel_domain: Option<String>,
    /// Public HTTPS listen address (repeatable).
    #[arg(long)]
    public_listen: Vec<String>,
    /// QUIC tunnel listen address (UDP).
    #[arg(long)]
    tunnel_listen: Option<String>,
    /// Admin listen address.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Directory for certificates and the dev CA.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Redis URL of the cluster's shared store (overrides `[cluster] redis_url`); it may hold
    /// a password, so prefer the environment variable.
    #[arg(long, env = "WARREN_EDGE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Address siblings reach this edge's tunnel at (overrides `[cluster] advertise`).
    #[arg(long)]
    advertise: Option<String>,
    /// The cluster key shared by the edges (prefer the environment variable: flags show in
    /// `ps`).
    #[arg(long, env = "WARREN_EDGE_CLUSTER_KEY", hide_env_values = true)]
    cluster_key: Option<String>,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Signed node tokens: make a signing key, issue, revoke and list tokens.
    #[command(subcommand)]
    Token(cli::token::TokenCommand),
}

impl Cli {
    fn apply(&self, mut f: FileConfig) -> FileConfig {
        if self.dev {
            f.tls.mode.get_or_insert(TlsModeName::Dev);
            f.public_listen.get_or_insert_with(|| vec!["127.0.0.1:10000".into()]);
            f.tunnel_listen.get_or_insert_with(|| "127.0.0.1:7443".into());
            f.admin.listen.get_or_insert_with(|| "127.0.0.1:9190".into());
            f.state_dir.get_or_insert_with(|| PathBuf::from(".warren-dev/edge"));
            if f.tokens.is_empty() {
                f.tokens.push(TokenFile { token: "dev".into(), names: vec!["*".into()] });
            }
        }
        if let Some(d) = &self.funnel_domain {
            f.funnel_domain = Some(d.clone());
        }
        if !self.public_listen.is_empty() {
            f.public_listen = Some(self.public_listen.clone());
        }
        if let Some(t) = &self.tunnel_listen {
            f.tunnel_listen = Some(t.clone());
        }
        if let Some(a) = &self.admin_listen {
            f.admin.listen = Some(a.clone());
        }
        if let Some(s) = &self.state_dir {
            f.state_dir = Some(s.clone());
        }
        if let Some(u) = &self.redis_url {
            f.cluster.redis_url = Some(u.clone());
        }
        if let Some(a) = &self.advertise {
            f.cluster.advertise = Some(a.clone());
        }
        f.cluster.key.clone_from(&self.cluster_key);
        f
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format == "json", "info");
    let file = match &cli.config {
        Some(p) => FileConfig::load(p),
        None => Ok(FileConfig::default()),
    };
    let config = match file.and_then(|f| cli.apply(f).read_secret_files()).and_then(Config::try_from) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-edge: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Token(cmd)) = cli.command {
        return match cli::token::run(cmd, &config, cli.config.is_some()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("warren-edge: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if config.tokens.is_empty() {
        eprintln!("warren-edge: warning: no [[tokens]] configured; no node can register");
    }
    if cli.check_config {
        eprintln!("warren-edge: configuration is valid");
        return ExitCode::SUCCESS;
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let prometheus = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("edge_request_duration_seconds".into()),
                &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            )
            .context("metric buckets")?
            .install_recorder()
            .context("installing the metrics recorder")?;
        warren_edge::metrics::describe();
        let edge = Edge::spawn(config, Some(prometheus)).await?;
        wait_for_signal().await;
        info!("shutdown requested; draining (send the signal again to stop at once)");
        tokio::select! {
            _ = edge.shutdown() => {}
            _ = wait_for_signal() => info!("second signal: stopping now"),
        }
        Ok(())
    })
}
