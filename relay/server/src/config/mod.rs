//! Relay configuration: the TOML file schema, CLI overrides, and the typed runtime [`Config`].
//!
//! The file is read into [`FileConfig`] (unknown keys are errors), command-line flags are laid
//! over it, and [`Config::try_from`] checks everything once ("parse, don't validate").

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

pub use warren_common::acme::AcmeSettings;
use warren_common::cidr::Cidr;
use warren_common::config::{cidrs, nonzero, socket_addr, ConfigDuration};
pub use warren_common::config::{parse_duration, AdminFile, ConfigError, Rate, SharedKey};
use warren_common::url::RelayUrl;

pub use self::file::*;

mod file;

/// Defaults, in one place.
pub mod defaults {
    use std::time::Duration;

    /// DERP over HTTPS.
    pub const LISTEN: &str = "0.0.0.0:443";
    /// Loopback-only plain HTTP for development.
    pub const DEV_LISTEN: &str = "127.0.0.1:3340";
    /// STUN.
    pub const STUN_LISTEN: &str = "0.0.0.0:3478";
    /// Prometheus metrics and health, never on the public port.
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
    /// Where the server key and dev CA live.
    pub const STATE_DIR: &str = "/var/lib/warren-relay";
    /// Per-client queue of packets awaiting write (it allocates only while in use) ...
    pub const SEND_QUEUE_DEPTH: usize = 512;
    /// ... and of their bytes, so that large packets cannot pin much memory per slow reader.
    pub const SEND_QUEUE_BYTES: usize = 1 << 20;
    /// Time from TCP accept to a completed DERP login.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Time one batched write to a client may take before it is considered stuck.
    pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Interval between KeepAlive frames.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
    /// Drain time on shutdown.
    pub const GRACE_PERIOD: Duration = Duration::from_secs(10);
    /// Told to clients in Restarting: reconnect after this long.
    pub const RESTART_RECONNECT_IN: Duration = Duration::from_millis(500);
    /// Told to clients in Restarting: keep trying this long.
    pub const RESTART_TRY_FOR: Duration = Duration::from_secs(60);
    /// STUN Binding requests per second per source IP. A carrier-grade NAT puts hundreds to
    /// thousands of subscribers behind one address; a node asks each relay about once per
    /// 20 s (a Tailscale client up to 3 times per 20-26 s), so 200/s serves about 4 000 Warren
    /// nodes (1 300 Tailscale clients) behind one address. Toward a spoofed victim it sends at
    /// most 200 x 80 bytes (a 52-byte answer with its headers): 16 kB/s.
    pub const STUN_RATE: u32 = 200;
    /// STUN burst per source IP: three seconds' worth, for the nodes of one address that wake
    /// together after an outage.
    pub const STUN_BURST: u32 = 600;
    /// How often a mesh DNS name is resolved again.
    pub const MESH_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
    /// Shortest mesh key accepted.
    pub const MESH_KEY_MIN_LEN: usize = super::SharedKey::MIN_LEN;
    /// New connections accepted per second (all sources together) ...
    pub const ACCEPT_RATE: u32 = 10_000;
    /// ... with this burst (a region's clients reconnecting after a restart).
    pub const ACCEPT_BURST: u32 = 20_000;
    /// Open connections per source IP (many nodes can share one NAT address).
    pub const MAX_CONNS_PER_IP: u32 = 4096;
    /// Smallest per-client burst when a client rate is set: room for the largest frame.
    pub const MIN_CLIENT_BURST: u64 = 128 << 10;
    /// Deadline of one admission callout.
    pub const CALLOUT_TIMEOUT: Duration = Duration::from_secs(2);
    /// How long a callout's answer is reused for the same key.
    pub const CALLOUT_CACHE_TTL: Duration = Duration::from_secs(60);
    /// TCP keep-alive idle time on client sockets (derper's: long, to spare phones' batteries;
    /// DERP KeepAlive frames run more often).
    pub const TCP_KEEPALIVE: Duration = Duration::from_secs(600);
    /// TCP_USER_TIMEOUT on client sockets (derper's: short, so hung connections go quickly).
    pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);
}

/// How the DERP listener does TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Certificate and key from files.
    Manual {
        /// PEM chain.
        cert_file: PathBuf,
        /// PEM key.
        key_file: PathBuf,
    },
    /// A local CA under the state dir signs a certificate for the hostname and localhost; the
    /// CA certificate is written to `<state_dir>/dev-ca.pem` for clients to trust.
    Dev,
    /// No TLS. Only allowed on loopback addresses.
    Plain,
    /// A certificate for `hostname` from an ACME CA, cached under `<state_dir>/acme` and
    /// renewed at two thirds of its lifetime.
    Acme(AcmeSettings),
}

/// STUN listener settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunConfig {
    /// UDP address.
    pub listen: SocketAddr,
    /// Requests per source IP.
    pub rate: Rate,
}

/// The region's shared mesh key.
pub type MeshKey = SharedKey;

/// Where a relay finds its siblings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// The shared key siblings present at login.
    pub key: MeshKey,
    /// Sibling URLs.
    pub peers: Vec<RelayUrl>,
    /// A DNS name and port resolved to sibling addresses.
    pub dns: Option<(String, u16)>,
    /// TLS name of siblings found through `dns`.
    pub tls_name: String,
    /// Extra CA to trust for siblings.
    pub ca_file: Option<PathBuf>,
    /// Re-resolve period of `dns`.
    pub resolve_interval: Duration,
}

/// Who may log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionConfig {
    /// Everyone.
    Open,
    /// The keys listed in a file.
    AllowList {
        /// The file.
        file: PathBuf,
    },
    /// Whatever an HTTP endpoint answers.
    Callout {
        /// The endpoint.
        url: RelayUrl,
        /// Extra CA for https.
        ca_file: Option<PathBuf>,
        /// Deadline.
        timeout: Duration,
        /// Answer reuse.
        cache_ttl: Duration,
        /// Admit when the callout fails.
        fail_open: bool,
    },
}

/// A per-client send budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRate {
    /// Bytes per second.
    pub bytes_per_second: u64,
    /// Burst in bytes.
    pub burst_bytes: u64,
}

/// The checked runtime configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// DERP/HTTP(S) listener.
    pub listen: SocketAddr,
    /// State directory.
    pub state_dir: PathBuf,
    /// Server key file.
    pub key_file: PathBuf,
    /// Public host name.
    pub hostname: String,
    /// TLS mode.
    pub tls: TlsMode,
    /// STUN, if enabled.
    pub stun: Option<StunConfig>,
    /// Admin listener, if enabled.
    pub admin_listen: Option<SocketAddr>,
    /// Per-client packet queue depth.
    pub send_queue_depth: NonZeroUsize,
    /// Per-client queued payload bytes.
    pub send_queue_bytes: NonZeroUsize,
    /// Accept-to-login deadline.
    pub handshake_timeout: Duration,
    /// Deadline of one batched write.
    pub write_timeout: Duration,
    /// KeepAlive interval.
    pub keepalive_interval: Duration,
    /// Drain time on shutdown.
    pub grace_period: Duration,
    /// Restarting: reconnect in.
    pub restart_reconnect_in: Duration,
    /// Restarting: try for.
    pub restart_try_for: Duration,
    /// Region mesh, when a mesh key is set.
    pub mesh: Option<MeshConfig>,
    /// New connections accepted.
    pub accept_rate: Rate,
    /// Open connections per source IP.
    pub max_conns_per_ip: NonZeroU32,
    /// Per-client send budget, if any.
    pub client_rate: Option<ClientRate>,
    /// Who may log in.
    pub admission: AdmissionConfig,
    /// TCP keep-alive idle time on client sockets; `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// TCP_USER_TIMEOUT on client sockets; `None`: the kernel's default.
    pub tcp_user_timeout: Option<Duration>,
    /// Load balancers whose connections start with a PROXY protocol header.
    pub proxy_trusted: Vec<Cidr>,
}

impl TryFrom<FileConfig> for Config {
    type Error = ConfigError;

    fn try_from(f: FileConfig) -> Result<Self, ConfigError> {
        let tls = match f.tls.mode.unwrap_or(TlsModeName::Dev) {
            TlsModeName::Manual => TlsMode::Manual {
                cert_file: f
                    .tls
                    .cert_file
                    .ok_or_else(|| ConfigError::invalid("tls.cert_file", "required when tls.mode = \"manual\""))?,
                key_file: f
                    .tls
                    .key_file
                    .ok_or_else(|| ConfigError::invalid("tls.key_file", "required when tls.mode = \"manual\""))?,
            },
            TlsModeName::Dev => TlsMode::Dev,
            TlsModeName::Plain => TlsMode::Plain,
            TlsModeName::Acme => {
                let settings = AcmeSettings::from_file(f.acme)?;
                if settings.wildcard {
                    return Err(ConfigError::invalid("acme.wildcard", "a relay's certificate names its hostname only"));
                }
                match f.hostname.as_deref() {
                    None | Some("localhost") => {
                        return Err(ConfigError::invalid(
                            "hostname",
                            "tls.mode = \"acme\" needs the relay's public DNS name",
                        ))
                    }
                    Some(_) => TlsMode::Acme(settings),
                }
            }
        };
        let default_listen = if tls == TlsMode::Plain { defaults::DEV_LISTEN } else { defaults::LISTEN };
        let listen = socket_addr("listen", f.listen.as_deref().unwrap_or(default_listen))?;
        if tls == TlsMode::Plain && !listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "listen",
                format!("{listen} is not loopback; tls.mode = \"plain\" only binds loopback"),
            ));
        }
        let state_dir = f.state_dir.unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR));
        let key_file = f.key_file.unwrap_or_else(|| state_dir.join("relay.key"));
        let stun = if f.stun.enabled.unwrap_or(true) {
            Some(StunConfig {
                listen: socket_addr("stun.listen", f.stun.listen.as_deref().unwrap_or(defaults::STUN_LISTEN))?,
                rate: Rate::new(
                    ("stun.rate_per_second", f.stun.rate_per_second.unwrap_or(defaults::STUN_RATE)),
                    ("stun.burst", f.stun.burst.unwrap_or(defaults::STUN_BURST)),
                )?,
            })
        } else {
            None
        };
        let admin_listen = if f.admin.enabled.unwrap_or(true) {
            Some(socket_addr("admin.listen", f.admin.listen.as_deref().unwrap_or(defaults::ADMIN_LISTEN))?)
        } else {
            None
        };
        let hostname = f.hostname.unwrap_or_else(|| "localhost".into());
        let mesh = mesh_config(f.mesh, &hostname)?;
        let admission = admission_config(f.admission)?;
        let client_rate = match f.limits.client_bytes_per_second.unwrap_or(0) {
            0 => None,
            rate => Some(ClientRate {
                bytes_per_second: rate,
                burst_bytes: match f.limits.client_burst_bytes {
                    None => rate.max(defaults::MIN_CLIENT_BURST),
                    Some(b) if b < defaults::MIN_CLIENT_BURST => {
                        return Err(ConfigError::invalid(
                            "limits.client_burst_bytes",
                            format!("{b} is less than the smallest burst, {} bytes", defaults::MIN_CLIENT_BURST),
                        ))
                    }
                    Some(b) => b,
                },
            }),
        };
        let depth = f.limits.send_queue_depth.unwrap_or(defaults::SEND_QUEUE_DEPTH);
        let send_queue_depth = NonZeroUsize::new(depth)
            .filter(|d| d.get() <= 1 << 16)
            .ok_or_else(|| ConfigError::invalid("limits.send_queue_depth", "must be between 1 and 65536"))?;
        Ok(Config {
            listen,
            state_dir,
            key_file,
            hostname,
            tls,
            stun,
            admin_listen,
            send_queue_depth,
            send_queue_bytes: NonZeroUsize::new(f.limits.send_queue_bytes.unwrap_or(defaults::SEND_QUEUE_BYTES))
                .filter(|b| b.get() >= 64 << 10)
                .ok_or_else(|| ConfigError::invalid("limits.send_queue_bytes", "must be at least 65536"))?,
            handshake_timeout: ConfigDuration::or(f.limits.handshake_timeout, defaults::HANDSHAKE_TIMEOUT),
            write_timeout: ConfigDuration::or(f.limits.write_timeout, defaults::WRITE_TIMEOUT),
            keepalive_interval: ConfigDuration::or(f.limits.keepalive_interval, defaults::KEEPALIVE_INTERVAL),
            grace_period: ConfigDuration::or(f.shutdown.grace_period, defaults::GRACE_PERIOD),
            restart_reconnect_in: ConfigDuration::or(f.shutdown.reconnect_in, defaults::RESTART_RECONNECT_IN),
            restart_try_for: ConfigDuration::or(f.shutdown.try_for, defaults::RESTART_TRY_FOR),
            mesh,
            accept_rate: Rate::new(
                ("limits.accept_rate", f.limits.accept_rate.unwrap_or(defaults::ACCEPT_RATE)),
                ("limits.accept_burst", f.limits.accept_burst.unwrap_or(defaults::ACCEPT_BURST)),
            )?,
            max_conns_per_ip: nonzero(
                "limits.max_conns_per_ip",
                f.limits.max_conns_per_ip.unwrap_or(defaults::MAX_CONNS_PER_IP),
            )?,
            client_rate,
            admission,
            tcp_keepalive: Some(ConfigDuration::or(f.limits.tcp_keepalive, defaults::TCP_KEEPALIVE))
                .filter(|d| !d.is_zero()),
            tcp_user_timeout: Some(ConfigDuration::or(f.limits.tcp_user_timeout, defaults::TCP_USER_TIMEOUT))
                .filter(|d| !d.is_zero()),
            proxy_trusted: cidrs("proxy_protocol.trusted", &f.proxy_protocol.trusted)?,
        })
    }
}

fn admission_config(f: AdmissionFile) -> Result<AdmissionConfig, ConfigError> {
    match f.mode.unwrap_or(AdmissionMode::Open) {
        AdmissionMode::Open => Ok(AdmissionConfig::Open),
        AdmissionMode::AllowList => Ok(AdmissionConfig::AllowList {
            file: f.allow_list_file.ok_or_else(|| {
                ConfigError::invalid("admission.allow_list_file", "required when admission.mode = \"allow_list\"")
            })?,
        }),
        AdmissionMode::Callout => {
            let url = f.callout_url.ok_or_else(|| {
                ConfigError::invalid("admission.callout_url", "required when admission.mode = \"callout\"")
            })?;
            let url =
                RelayUrl::parse(&url).map_err(|e| ConfigError::invalid("admission.callout_url", e.to_string()))?;
            Ok(AdmissionConfig::Callout {
                url,
                ca_file: f.callout_ca_file,
                timeout: ConfigDuration::or(f.callout_timeout, defaults::CALLOUT_TIMEOUT),
                cache_ttl: ConfigDuration::or(f.cache_ttl, defaults::CALLOUT_CACHE_TTL),
                fail_open: f.fail_open.unwrap_or(false),
            })
        }
    }
}

fn mesh_config(f: MeshFile, hostname: &str) -> Result<Option<MeshConfig>, ConfigError> {
    let key = match (f.key, &f.key_file) {
        (Some(k), _) => Some(MeshKey::parse("mesh.key", "mesh key", &k)?),
        (None, Some(_)) => {
            return Err(ConfigError::invalid("mesh.key_file", "not read yet (FileConfig::read_secret_files reads it)"));
        }
        (None, None) => None,
    };
    let Some(key) = key else {
        if !f.peers.is_empty() || f.dns.is_some() {
            return Err(ConfigError::invalid(
                "mesh.key_file",
                "mesh peers need a mesh key (key_file or WARREN_MESH_KEY)",
            ));
        }
        return Ok(None);
    };
    let peers = f
        .peers
        .iter()
        .map(|p| RelayUrl::parse(p).map_err(|e| ConfigError::invalid("mesh.peers", format!("{p:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let dns = match f.dns.as_deref() {
        None => None,
        Some(d) => {
            let (host, port) = d
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .filter(|(h, _)| !h.is_empty())
                .ok_or_else(|| ConfigError::invalid("mesh.dns", format!("{d:?} is not host:port")))?;
            Some((host.to_owned(), port))
        }
    };
    Ok(Some(MeshConfig {
        key,
        peers,
        dns,
        tls_name: f.tls_name.unwrap_or_else(|| hostname.to_owned()),
        ca_file: f.ca_file,
        resolve_interval: ConfigDuration::or(f.resolve_interval, defaults::MESH_RESOLVE_INTERVAL),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::try_from(FileConfig::parse("").expect("parses")).expect("valid");
        assert_eq!(c.listen, "0.0.0.0:443".parse().expect("addr"));
        assert_eq!(c.tls, TlsMode::Dev);
        assert_eq!(c.key_file, PathBuf::from("/var/lib/warren-relay/relay.key"));
        assert_eq!(c.keepalive_interval, Duration::from_secs(60));
        assert!(c.stun.is_some());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(matches!(FileConfig::parse("lisen = \"x\""), Err(ConfigError::Parse { .. })));
        assert!(matches!(FileConfig::parse("[tls]\nmod = \"dev\""), Err(ConfigError::Parse { .. })));
        let bad = |t: &str| Config::try_from(FileConfig::parse(t).expect("parses"));
        assert!(matches!(bad("listen = \"nope\""), Err(ConfigError::Invalid { field: "listen", .. })));
        assert!(bad("[tls]\nmode = \"plain\"\n").is_ok());
        assert!(matches!(
            bad("listen = \"0.0.0.0:80\"\n[tls]\nmode = \"plain\""),
            Err(ConfigError::Invalid { field: "listen", .. })
        ));
        assert!(matches!(bad("[tls]\nmode = \"manual\""), Err(ConfigError::Invalid { field: "tls.cert_file", .. })));
        assert!(matches!(bad("[limits]\nsend_queue_depth = 0"), Err(ConfigError::Invalid { .. })));
        assert!(matches!(
            FileConfig::parse("[limits]\nhandshake_timeout = \"10 parsecs\""),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(bad("[stun]\nburst = 0"), Err(ConfigError::Invalid { field: "stun.burst", .. })));
        assert!(matches!(
            bad("[proxy_protocol]\ntrusted = [\"10.0.0.0/33\"]"),
            Err(ConfigError::Invalid { field: "proxy_protocol.trusted", .. })
        ));
    }

    #[test]
    fn tcp_socket_options_default_to_derpers_and_zero_turns_them_off() {
        let c = Config::try_from(FileConfig::parse("").expect("parses")).expect("valid");
        assert_eq!(
            (c.tcp_keepalive, c.tcp_user_timeout),
            (Some(defaults::TCP_KEEPALIVE), Some(defaults::TCP_USER_TIMEOUT))
        );
        assert!(c.proxy_trusted.is_empty());
        let t = "[limits]\ntcp_keepalive = \"0s\"\ntcp_user_timeout = \"0s\"\n[proxy_protocol]\ntrusted = [\"10.0.0.0/8\", \"::1\"]";
        let c = Config::try_from(FileConfig::parse(t).expect("parses")).expect("valid");
        assert_eq!((c.tcp_keepalive, c.tcp_user_timeout), (None, None));
        assert!(Cidr::any_contains(&c.proxy_trusted, "10.1.2.3".parse().expect("ip")));
        assert!(!Cidr::any_contains(&c.proxy_trusted, "192.0.2.1".parse().expect("ip")));
    }

    #[test]
    fn mesh_needs_a_key_and_never_prints_it() {
        let parse = |t: &str, key: Option<&str>| {
            let mut f = FileConfig::parse(t).expect("parses");
            f.mesh.key = key.map(str::to_owned);
            Config::try_from(f)
        };
        assert!(parse("", None).expect("valid").mesh.is_none());
        assert!(matches!(
            parse("[mesh]\npeers = [\"https://b:443\"]", None),
            Err(ConfigError::Invalid { field: "mesh.key_file", .. })
        ));
        assert!(matches!(parse("", Some("short")), Err(ConfigError::Invalid { field: "mesh.key", .. })));
        let secret = "0123456789abcdef-region-key";
        let c = parse("[mesh]\npeers = [\"https://b:443\"]\ndns = \"peers.svc:8443\"", Some(secret)).expect("valid");
        let mesh = c.mesh.as_ref().expect("mesh on");
        assert_eq!(mesh.dns, Some(("peers.svc".into(), 8443)));
        assert_eq!(mesh.tls_name, "localhost");
        assert!(mesh.key.matches(secret) && !mesh.key.matches("0123456789abcdef-region-kex"));
        assert!(!format!("{c:?}").contains(secret), "Debug must not show the mesh key");
        assert!(matches!(
            parse("[mesh]\npeers = [\"ftp://b\"]", Some(secret)),
            Err(ConfigError::Invalid { field: "mesh.peers", .. })
        ));
        assert!(matches!(
            parse("[mesh]\ndns = \"nope\"", Some(secret)),
            Err(ConfigError::Invalid { field: "mesh.dns", .. })
        ));
    }

    #[test]
    fn modes_are_parsed_and_a_small_burst_is_refused_not_raised() {
        assert!(matches!(FileConfig::parse("[tls]\nmode = \"tls\""), Err(ConfigError::Parse { .. })));
        assert!(matches!(FileConfig::parse("[admission]\nmode = \"allowlist\""), Err(ConfigError::Parse { .. })));
        let f = FileConfig::parse("[admission]\nmode = \"callout\"\ncallout_url = \"https://auth.example:8443/check\"");
        let c = Config::try_from(f.expect("parses")).expect("valid");
        let AdmissionConfig::Callout { url, .. } = c.admission else { panic!("callout") };
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("auth.example", 8443, "/check"));
        let burst = |b: &str| {
            let t = format!("[limits]\nclient_bytes_per_second = 1000\n{b}");
            Config::try_from(FileConfig::parse(&t).expect("parses"))
        };
        let small = burst("client_burst_bytes = 1000");
        assert!(matches!(small, Err(ConfigError::Invalid { field: "limits.client_burst_bytes", .. })));
        let default = burst("").expect("valid").client_rate.expect("limited");
        assert_eq!(default.burst_bytes, defaults::MIN_CLIENT_BURST, "unset: at least the smallest burst");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("99999999999999999999h"), None);
    }
}
