//! `warren-relay`: command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;
use tracing::warn;
use warren_common::runtime::{init_logging, wait_for_signal};
use warren_relay::config::{Config, ConfigError, FileConfig, TlsModeName};
use warren_relay::reload::count_reload;
use warren_relay::Server;

/// Exit code for an invalid configuration (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

/// Warren relay: forwards end-to-end encrypted packets between mesh nodes (DERP v2) and
/// answers STUN.
///
/// Settings come from the TOML file given with --config; flags override the file. SIGHUP reads
/// them again and applies limits, rates, admission, mesh peers and manual certificates without
/// dropping a connection (listen addresses, keys and the TLS mode need a restart); the
/// certificate files are also reloaded when they change. SIGTERM or SIGINT drains and stops.
#[derive(Debug, Parser)]
#[command(name = "warren-relay", version)]
struct Cli {
    /// TOML configuration file (see deploy/relay.example.toml).
    #[arg(short, long, env = "WARREN_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit without binding any port.
    #[arg(long)]
    check_config: bool,
    /// Development mode: TLS from a local CA, loopback ports 8443 (DERP), 3478 (STUN),
    /// 9090 (admin), state in ./.warren-dev/relay unless set otherwise.
    #[arg(long)]
    dev: bool,
    /// With --dev: plain HTTP instead of TLS (loopback only).
    #[arg(long, requires = "dev")]
    plain: bool,
    /// DERP/HTTPS listen address, e.g. 0.0.0.0:443.
    #[arg(long)]
    listen: Option<String>,
    /// Directory for the server key and dev CA.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Server key file (created 0600 on first start).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Public host name of this relay.
    #[arg(long)]
    hostname: Option<String>,
    /// TLS certificate chain (PEM); selects manual TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// STUN listen address, e.g. 0.0.0.0:3478.
    #[arg(long)]
    stun_listen: Option<String>,
    /// Do not serve STUN.
    #[arg(long)]
    no_stun: bool,
    /// Admin (metrics, health) listen address.
    #[arg(long)]
    admin_listen: Option<String>,
    /// The region's mesh key (prefer the environment variable to the flag: flags show in `ps`).
    #[arg(long, env = "WARREN_MESH_KEY", hide_env_values = true)]
    mesh_key: Option<String>,
    /// File holding the region's mesh key.
    #[arg(long)]
    mesh_key_file: Option<PathBuf>,
    /// A sibling relay of this region, e.g. https://relay-b.example.net:443 (repeatable; adds to
    /// the file's `[mesh] peers`).
    #[arg(long = "mesh-peer")]
    mesh_peers: Vec<String>,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

impl Cli {
    /// Reads the file (when given), lays the flags over it and checks the result.
    fn load(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Config::try_from(self.apply(file).read_secret_files()?)
    }

    /// Lays the flags over the file's settings.
    fn apply(&self, mut f: FileConfig) -> FileConfig {
        if self.dev {
            f.tls.mode = Some(if self.plain { TlsModeName::Plain } else { TlsModeName::Dev });
            f.listen.get_or_insert_with(|| "127.0.0.1:8443".into());
            f.stun.listen.get_or_insert_with(|| "127.0.0.1:3478".into());
            f.admin.listen.get_or_insert_with(|| "127.0.0.1:9090".into());
            f.state_dir.get_or_insert_with(|| PathBuf::from(".warren-dev/relay"));
        }
        let set = |slot: &mut Option<String>, v: &Option<String>| {
            if let Some(v) = v {
                *slot = Some(v.clone());
            }
        };
        set(&mut f.listen, &self.listen);
        set(&mut f.hostname, &self.hostname);
        set(&mut f.stun.listen, &self.stun_listen);
        set(&mut f.admin.listen, &self.admin_listen);
        if let Some(d) = &self.state_dir {
            f.state_dir = Some(d.clone());
        }
        if let Some(k) = &self.key_file {
            f.key_file = Some(k.clone());
        }
        if let (Some(c), Some(k)) = (&self.tls_cert, &self.tls_key) {
            f.tls.mode = Some(TlsModeName::Manual);
            f.tls.cert_file = Some(c.clone());
            f.tls.key_file = Some(k.clone());
        }
        if self.no_stun {
            f.stun.enabled = Some(false);
        }
        if let Some(k) = &self.mesh_key {
            f.mesh.key = Some(k.clone());
        }
        if let Some(k) = &self.mesh_key_file {
            f.mesh.key_file = Some(k.clone());
        }
        f.mesh.peers.extend(self.mesh_peers.iter().cloned());
        f
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format == "json", "info");
    let config = match cli.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        eprintln!("warren-relay: configuration is valid");
        return ExitCode::SUCCESS;
    }
    match run(&cli, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli, config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let prometheus = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("relay_queue_delay_seconds".into()),
                &[0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025, 0.1, 0.5],
            )
            .context("metric buckets")?
            .install_recorder()
            .context("installing the metrics recorder")?;
        warren_relay::metrics::describe();
        let server = Server::spawn(config, Some(prometheus)).await?;
        let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let stop = wait_for_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = hangup.recv() => reload(cli, &server),
            }
        }
        info!("shutdown requested; draining (send the signal again to stop at once)");
        tokio::select! {
            _ = server.shutdown() => {}
            _ = wait_for_signal() => info!("second signal: stopping now"),
        }
        Ok(())
    })
}

/// SIGHUP: reads the configuration again and applies it; a configuration that does not parse
/// or check, or whose certificate or allow-list cannot be used, changes nothing.
fn reload(cli: &Cli, server: &Server) {
    info!(config = ?cli.config, "SIGHUP: reloading the configuration");
    let next = match cli.load() {
        Ok(next) => next,
        Err(e) => {
            count_reload("invalid");
            warn!(error = %e, "new configuration is invalid; keeping the one in force");
            return;
        }
    };
    match server.reload(next) {
        Ok(_) => count_reload("ok"),
        Err(e) => {
            count_reload("failed");
            warn!(error = %e, "new configuration not applied; keeping the one in force");
        }
    }
}
