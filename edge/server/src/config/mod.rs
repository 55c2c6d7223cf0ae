//! Edge configuration: TOML file schema, CLI overrides, and the checked runtime [`Config`].

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

pub use warren_common::acme::AcmeSettings;
use warren_common::config::{nonzero, socket_addr, ConfigDuration};
pub use warren_common::config::{AdminFile, ConfigError, Rate, SharedKey};

pub use self::access::{AccessConfig, EndpointUrl, ForwardAuthConfig};
pub use self::file::*;

mod access;
mod file;

/// Defaults, in one place.
pub mod defaults {
    use std::time::Duration;

    /// Public HTTPS ports, as Funnel offers them.
    pub const PUBLIC_LISTEN: [&str; 3] = ["0.0.0.0:443", "0.0.0.0:8443", "0.0.0.0:10000"];
    /// QUIC tunnel listener (UDP).
    pub const TUNNEL_LISTEN: &str = "0.0.0.0:7443";
    /// Admin listener: metrics and health.
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9190";
    /// Certificates and keys.
    pub const STATE_DIR: &str = "/var/lib/warren-edge";
    /// Public names are `<node>.<funnel domain>`.
    pub const FUNNEL_DOMAIN: &str = "funnel.localhost";
    /// Time for the node to answer a request with its response head.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Silence after which a node tunnel is closed as dead.
    pub const TUNNEL_DEAD_AFTER: Duration = Duration::from_secs(30);
    /// Time to open a stream to a node.
    pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
    /// Requests in flight per tunnel.
    pub const MAX_STREAMS_PER_TUNNEL: u32 = 1024;
    /// Drain time on shutdown.
    pub const GRACE_PERIOD: Duration = Duration::from_secs(10);
    /// Visitor connections accepted per second, all sources together ...
    pub const ACCEPT_RATE: u32 = 10_000;
    /// ... with this burst.
    pub const ACCEPT_BURST: u32 = 20_000;
    /// Open visitor connections per source IP.
    pub const MAX_CONNS_PER_IP: u32 = 512;
    /// Node tunnel handshakes per second, all sources together ...
    pub const TUNNEL_ACCEPT_RATE: u32 = 100;
    /// ... with this burst.
    pub const TUNNEL_ACCEPT_BURST: u32 = 200;
    /// How long a route entry lives unless refreshed (refreshed every third of it).
    pub const ROUTE_TTL: Duration = Duration::from_secs(15);
    /// How long a route lookup is reused.
    pub const ROUTE_CACHE_TTL: Duration = Duration::from_secs(2);
    /// Shortest cluster key.
    pub const CLUSTER_KEY_MIN_LEN: usize = super::SharedKey::MIN_LEN;
    /// Environment variable holding the cluster key.
    pub const CLUSTER_KEY_ENV: &str = "WARREN_EDGE_CLUSTER_KEY";
    /// Longest wait for a forward-auth answer.
    pub const FORWARD_AUTH_TIMEOUT: Duration = Duration::from_secs(2);
    /// How long a forward-auth answer is reused.
    pub const FORWARD_AUTH_CACHE: Duration = Duration::from_secs(10);
    /// Longest remaining validity of a signed node token.
    pub const TOKEN_MAX_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
    /// How often the revocation list is read.
    pub const REVOCATION_CHECK: Duration = Duration::from_secs(2);
    /// How often custom domains' proofs are checked again.
    pub const DOMAIN_RECHECK: Duration = Duration::from_secs(60);
}

/// The cluster's shared key.
pub type ClusterKey = SharedKey;

/// Checked cluster settings.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Redis URL (may hold a password: never printed).
    pub redis_url: String,
    /// This edge's tunnel address as siblings dial it.
    pub advertise: SocketAddr,
    /// Shared key.
    pub key: ClusterKey,
    /// Extra CA for siblings.
    pub ca_file: Option<PathBuf>,
    /// Route entry lifetime.
    pub route_ttl: Duration,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis_url", &crate::store::redact_url(&self.redis_url))
            .field("advertise", &self.advertise)
            .field("key", &self.key)
            .field("ca_file", &self.ca_file)
            .field("route_ttl", &self.route_ttl)
            .finish()
    }
}

fn cluster_settings(c: ClusterFile) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(redis_url) = c.redis_url else {
        if c.advertise.is_some() || c.key_file.is_some() {
            return Err(ConfigError::invalid("cluster.redis_url", "required for a cluster"));
        }
        return Ok(None);
    };
    if !(redis_url.starts_with("redis://") || redis_url.starts_with("rediss://")) {
        return Err(ConfigError::invalid("cluster.redis_url", "must be a redis:// URL"));
    }
    let advertise = socket_addr(
        "cluster.advertise",
        c.advertise.as_deref().ok_or_else(|| ConfigError::invalid("cluster.advertise", "required for a cluster"))?,
    )?;
    if advertise.ip().is_unspecified() {
        return Err(ConfigError::invalid("cluster.advertise", "must be an address siblings can dial, not 0.0.0.0"));
    }
    let key = match (c.key, &c.key_file) {
        (Some(k), _) => k,
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "cluster.key_file",
                "not read yet (FileConfig::read_secret_files reads it)",
            ))
        }
        (None, None) => {
            return Err(ConfigError::invalid(
                "cluster.key_file",
                format!("a cluster needs its key: set cluster.key_file or {}", defaults::CLUSTER_KEY_ENV),
            ))
        }
    };
    let key = ClusterKey::parse("cluster.key", "cluster key", &key)?;
    let route_ttl = ConfigDuration::or(c.route_ttl, defaults::ROUTE_TTL);
    if route_ttl < Duration::from_secs(1) {
        return Err(ConfigError::invalid("cluster.route_ttl", "must be at least 1s"));
    }
    Ok(Some(ClusterConfig { redis_url, advertise, key, ca_file: c.ca_file, route_ttl }))
}

/// TLS mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Certificates from an ACME CA.
    Acme(AcmeSettings),
    /// A local CA issues a wildcard certificate; its certificate is `<state_dir>/dev-ca.pem`.
    Dev,
    /// Certificate and key from files.
    Manual {
        /// PEM chain.
        cert_file: PathBuf,
        /// PEM key.
        key_file: PathBuf,
    },
}

/// A token and the names it allows.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    secret: String,
    /// Allowed node names; `"*"` for any.
    pub names: Vec<String>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token").field("secret", &"<redacted>").field("names", &self.names).finish()
    }
}

impl Token {
    /// Whether `presented` is this token (compared in constant time) and allows `name`.
    pub fn allows(&self, presented: &str, name: &str) -> bool {
        let a = self.secret.as_bytes();
        let b = presented.as_bytes();
        let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        same && self.names.iter().any(|n| n == "*" || n == name)
    }
}

/// The checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Lower-case funnel domain.
    pub funnel_domain: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Tunnel TLS name.
    pub hostname: String,
    /// Public listeners.
    pub public_listen: Vec<SocketAddr>,
    /// Tunnel listener.
    pub tunnel_listen: SocketAddr,
    /// Whether nodes may tunnel over TCP+TLS on the public ports.
    pub tunnel_tcp: bool,
    /// Silence after which a node tunnel is closed as dead.
    pub tunnel_dead_after: Duration,
    /// TLS.
    pub tls: TlsMode,
    /// Node tokens.
    pub tokens: Vec<Token>,
    /// Admin listener.
    pub admin_listen: Option<SocketAddr>,
    /// Response head deadline.
    pub response_timeout: Duration,
    /// Longest a visitor may take no byte of a response.
    pub stalled_reader: Duration,
    /// Requests in flight per tunnel.
    pub max_streams_per_tunnel: u32,
    /// Requests per funnel name, if limited.
    pub host_rate: Option<Rate>,
    /// Visitor connections accepted.
    pub accept_rate: Rate,
    /// Open visitor connections per source IP.
    pub max_conns_per_ip: NonZeroU32,
    /// Tunnel handshakes accepted.
    pub tunnel_accept_rate: Rate,
    /// Drain time.
    pub grace_period: Duration,
    /// Cluster settings, when several edges share state.
    pub cluster: Option<ClusterConfig>,
    /// Raw TCP services.
    pub tcp: TcpConfig,
    /// Access floors and forward-auth endpoints.
    pub access: AccessConfig,
    /// Signed node tokens, when keys are configured.
    pub credentials: Option<CredentialsConfig>,
    /// Custom domains.
    pub domains: DomainsConfig,
}

/// Custom domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainsConfig {
    /// Whether nodes may ask for them.
    pub enabled: bool,
    /// The DNS server asked; `None`: the system's.
    pub resolver: Option<SocketAddr>,
    /// How often proofs are checked again.
    pub recheck: Duration,
}

impl DomainsConfig {
    fn from_file(f: &DomainsFile) -> Result<Self, ConfigError> {
        let resolver = f.resolver.as_deref().map(|r| socket_addr("domains.resolver", r)).transpose()?;
        let recheck = match ConfigDuration::or(f.recheck, defaults::DOMAIN_RECHECK) {
            d if d < Duration::from_millis(100) => {
                return Err(ConfigError::invalid("domains.recheck", "at least 100ms"))
            }
            d => d,
        };
        Ok(DomainsConfig { enabled: f.enabled.unwrap_or(true), resolver, recheck })
    }
}

/// Which signed node tokens are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialsConfig {
    /// Trusted Ed25519 public keys.
    pub public_keys: Vec<[u8; 32]>,
    /// Longest remaining validity accepted.
    pub max_lifetime: Duration,
    /// How often the revocation list is read.
    pub revocation_check: Duration,
}

impl CredentialsConfig {
    fn from_file(f: CredentialsFile) -> Result<Option<Self>, ConfigError> {
        if f.public_keys.is_empty() {
            return Ok(None);
        }
        let public_keys = f
            .public_keys
            .iter()
            .map(|k| {
                crate::credentials::parse_public_key(k).map_err(|e| ConfigError::invalid("credentials.public_keys", e))
            })
            .collect::<Result<_, _>>()?;
        let max_lifetime = ConfigDuration::or(f.max_lifetime, defaults::TOKEN_MAX_LIFETIME);
        let revocation_check = match ConfigDuration::or(f.revocation_check, defaults::REVOCATION_CHECK) {
            d if d < Duration::from_millis(100) || d > Duration::from_secs(60) => {
                return Err(ConfigError::invalid("credentials.revocation_check", "between 100ms and 60s"))
            }
            d => d,
        };
        Ok(Some(CredentialsConfig { public_keys, max_lifetime, revocation_check }))
    }
}

/// Where raw TCP services may be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// Inclusive port ranges nodes may ask for.
    pub ranges: Vec<(u16, u16)>,
    /// Address the listeners bind.
    pub listen_ip: std::net::IpAddr,
}

impl TcpConfig {
    /// Whether a node may publish a TCP service on `port`.
    pub fn allows(&self, port: u16) -> bool {
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&port))
    }

    fn from_file(f: &file::TcpFile) -> Result<TcpConfig, ConfigError> {
        let mut ranges = Vec::new();
        for r in &f.ports {
            let bad = || ConfigError::invalid("tcp.ports", format!("{r:?} is not a port or a range like 20000-20099"));
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b) = (a.trim().parse::<u16>().map_err(|_| bad())?, b.trim().parse::<u16>().map_err(|_| bad())?);
            if a == 0 || b < a {
                return Err(bad());
            }
            ranges.push((a, b));
        }
        let listen_ip = match &f.listen_ip {
            Some(ip) => {
                ip.parse().map_err(|_| ConfigError::invalid("tcp.listen_ip", format!("{ip:?} is not an IP")))?
            }
            None => std::net::IpAddr::from([0, 0, 0, 0]),
        };
        Ok(TcpConfig { ranges, listen_ip })
    }
}

/// Whether `name` is a valid DNS label (a node name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl TryFrom<FileConfig> for Config {
    type Error = ConfigError;

    fn try_from(f: FileConfig) -> Result<Self, ConfigError> {
        let funnel_domain = f
            .funnel_domain
            .unwrap_or_else(|| defaults::FUNNEL_DOMAIN.into())
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if funnel_domain.is_empty() || !funnel_domain.split('.').all(valid_name) {
            return Err(ConfigError::invalid("funnel_domain", format!("{funnel_domain:?} is not a domain name")));
        }
        let public_listen = match f.public_listen {
            Some(v) => v.iter().map(|s| socket_addr("public_listen", s)).collect::<Result<Vec<_>, _>>()?,
            None => defaults::PUBLIC_LISTEN
                .iter()
                .map(|s| socket_addr("public_listen", s))
                .collect::<Result<Vec<_>, _>>()?,
        };
        if public_listen.is_empty() {
            return Err(ConfigError::invalid("public_listen", "needs at least one address"));
        }
        let tls = match f.tls.mode.unwrap_or(TlsModeName::Dev) {
            TlsModeName::Dev => TlsMode::Dev,
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
            TlsModeName::Acme => TlsMode::Acme(AcmeSettings::from_file(f.acme)?),
        };
        let mut tokens = Vec::new();
        for t in f.tokens {
            if t.token.len() < 8 && t.token != "dev" {
                return Err(ConfigError::invalid("tokens.token", "tokens must have at least 8 characters"));
            }
            if let Some(bad) = t.names.iter().find(|n| *n != "*" && !valid_name(n)) {
                return Err(ConfigError::invalid("tokens.names", format!("{bad:?} is not a valid node name")));
            }
            tokens.push(Token { secret: t.token, names: t.names });
        }
        let admin_listen = match f.admin.enabled.unwrap_or(true) {
            true => Some(socket_addr("admin.listen", f.admin.listen.as_deref().unwrap_or(defaults::ADMIN_LISTEN))?),
            false => None,
        };
        let tcp = TcpConfig::from_file(&f.tcp)?;
        let access = AccessConfig::try_from(f.access)?;
        let credentials = CredentialsConfig::from_file(f.credentials)?;
        let domains = DomainsConfig::from_file(&f.domains)?;
        Ok(Config {
            domains,
            credentials,
            tcp,
            access,
            hostname: f.hostname.unwrap_or_else(|| "localhost".into()),
            funnel_domain,
            state_dir: f.state_dir.unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
            public_listen,
            tunnel_listen: socket_addr("tunnel_listen", f.tunnel_listen.as_deref().unwrap_or(defaults::TUNNEL_LISTEN))?,
            tunnel_tcp: f.tunnel_tcp.unwrap_or(true),
            tunnel_dead_after: match ConfigDuration::or(f.tunnel_dead_after, defaults::TUNNEL_DEAD_AFTER) {
                d if d < Duration::from_secs(1) || d > Duration::from_secs(600) => {
                    return Err(ConfigError::invalid("tunnel_dead_after", "between 1s and 600s"))
                }
                d => d,
            },
            tls,
            tokens,
            admin_listen,
            response_timeout: ConfigDuration::or(f.limits.response_timeout, defaults::RESPONSE_TIMEOUT),
            stalled_reader: match ConfigDuration::or(f.limits.stalled_reader, warren_tunnel::STALLED_READER) {
                d if d < Duration::from_millis(100) => {
                    return Err(ConfigError::invalid("limits.stalled_reader", "at least 100ms"))
                }
                d => d,
            },
            max_streams_per_tunnel: match f.limits.max_streams_per_tunnel.unwrap_or(defaults::MAX_STREAMS_PER_TUNNEL) {
                n @ 1..=MAX_STREAMS_LIMIT => n,
                n => {
                    return Err(ConfigError::invalid(
                        "limits.max_streams_per_tunnel",
                        format!("{n} is not between 1 and {MAX_STREAMS_LIMIT}"),
                    ))
                }
            },
            host_rate: match f.limits.requests_per_second_per_host.unwrap_or(0) {
                0 => None,
                r => Some(Rate::new(
                    ("limits.requests_per_second_per_host", r),
                    ("limits.burst_per_host", f.limits.burst_per_host.unwrap_or(r)),
                )?),
            },
            accept_rate: Rate::new(
                ("limits.accept_rate", f.limits.accept_rate.unwrap_or(defaults::ACCEPT_RATE)),
                ("limits.accept_burst", f.limits.accept_burst.unwrap_or(defaults::ACCEPT_BURST)),
            )?,
            max_conns_per_ip: nonzero(
                "limits.max_conns_per_ip",
                f.limits.max_conns_per_ip.unwrap_or(defaults::MAX_CONNS_PER_IP),
            )?,
            tunnel_accept_rate: Rate::new(
                ("limits.tunnel_accept_rate", f.limits.tunnel_accept_rate.unwrap_or(defaults::TUNNEL_ACCEPT_RATE)),
                ("limits.tunnel_accept_burst", f.limits.tunnel_accept_burst.unwrap_or(defaults::TUNNEL_ACCEPT_BURST)),
            )?,
            grace_period: ConfigDuration::or(f.shutdown.grace_period, defaults::GRACE_PERIOD),
            cluster: cluster_settings(f.cluster)?,
        })
    }
}

impl Config {
    /// The public URL of `name` on `port`.
    pub fn public_url(&self, name: &str, port: u16) -> String {
        match port {
            443 => format!("https://{name}.{}/", self.funnel_domain),
            p => format!("https://{name}.{}:{p}/", self.funnel_domain),
        }
    }
}

/// The most requests one tunnel may carry at once.
const MAX_STREAMS_LIMIT: u32 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_ports_are_ranges_and_bad_ones_are_named() {
        let parse = |t: &str| FileConfig::parse(t).and_then(Config::try_from);
        let c = parse("[tcp]\nports = [\"5432\", \"20000-20009\"]\nlisten_ip = \"127.0.0.1\"\n").expect("valid");
        assert!(c.tcp.allows(5432) && c.tcp.allows(20000) && c.tcp.allows(20009));
        assert!(!c.tcp.allows(20010) && !c.tcp.allows(443));
        assert!(!parse("").expect("valid").tcp.allows(5432), "no TCP ports unless configured");
        for bad in ["ports = [\"0\"]", "ports = [\"9-1\"]", "ports = [\"x\"]", "listen_ip = \"nope\""] {
            let e = parse(&format!("[tcp]\n{bad}\n")).expect_err(bad).to_string();
            assert!(e.contains("tcp."), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_and_validation() {
        let c = Config::try_from(FileConfig::parse("").expect("parses")).expect("valid");
        assert_eq!(c.public_listen.len(), 3);
        assert_eq!(c.public_url("node1", 443), "https://node1.funnel.localhost/");
        assert_eq!(c.public_url("node1", 8443), "https://node1.funnel.localhost:8443/");
        let bad = |t: &str| Config::try_from(FileConfig::parse(t).expect("parses"));
        assert!(bad("funnel_domain = \"bad domain\"").is_err());
        assert!(bad("[[tokens]]\ntoken = \"short\"\nnames = [\"*\"]").is_err());
        assert!(bad("[[tokens]]\ntoken = \"longenough\"\nnames = [\"Bad_Name\"]").is_err());
        assert!(bad("[tls]\nmode = \"manual\"").is_err());
        assert!(bad("[tls]\nmode = \"acme\"").is_err(), "directory required");
        assert!(
            bad("[tls]\nmode = \"acme\"\n[acme]\ndirectory = \"https://ca/dir\"\nchallenge = \"dns-01\"").is_err(),
            "hook required"
        );
        assert!(bad("[tls]\nmode = \"acme\"\n[acme]\ndirectory = \"https://ca/dir\"\nwildcard = true").is_err());
        assert!(
            bad("[tls]\nmode = \"acme\"\n[acme]\ndirectory = \"https://ca/dir\"\nchallenge = \"tls-alpn-01\"").is_ok()
        );
        assert!(FileConfig::parse("nope = 1").is_err());
    }

    #[test]
    fn tokens_check_secret_and_name_and_never_print() {
        let c = Config::try_from(
            FileConfig::parse("[[tokens]]\ntoken = \"s3cret-token\"\nnames = [\"web\"]").expect("parses"),
        )
        .expect("valid");
        let t = &c.tokens[0];
        assert!(t.allows("s3cret-token", "web"));
        assert!(!t.allows("s3cret-token", "other"));
        assert!(!t.allows("s3cret-toke", "web"));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn cluster_settings_are_checked_and_secrets_never_print() {
        let parse = |t: &str, key: Option<&str>| {
            let mut f = FileConfig::parse(t).expect("parses");
            f.cluster.key = key.map(str::to_owned);
            Config::try_from(f)
        };
        let base = "[cluster]\nredis_url = \"redis://:pw-secret@127.0.0.1:6379/0\"\nadvertise = \"10.0.0.5:7443\"";
        let c = parse(base, Some("0123456789abcdef-key")).expect("valid");
        let cl = c.cluster.as_ref().expect("cluster");
        assert_eq!(cl.route_ttl, defaults::ROUTE_TTL);
        assert!(cl.key.matches("0123456789abcdef-key") && !cl.key.matches("0123456789abcdef-keY"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw-secret") && !shown.contains("0123456789abcdef"), "{shown}");
        assert!(parse(base, None).is_err(), "key required");
        assert!(parse(base, Some("short")).is_err(), "key too short");
        assert!(parse("[cluster]\nadvertise = \"10.0.0.5:7443\"", Some("0123456789abcdef")).is_err());
        let unspecified = base.replace("10.0.0.5", "0.0.0.0");
        assert!(parse(&unspecified, Some("0123456789abcdef")).is_err());
        assert!(parse(&base.replace("redis://", "http://"), Some("0123456789abcdef")).is_err());
        assert!(parse("", None).expect("valid").cluster.is_none());
    }

    #[test]
    fn modes_are_parsed_and_stream_limits_refused_not_clamped() {
        assert!(matches!(FileConfig::parse("[tls]\nmode = \"letsencrypt\""), Err(ConfigError::Parse { .. })));
        assert!(matches!(FileConfig::parse("[acme]\nchallenge = \"http01\""), Err(ConfigError::Parse { .. })));
        let acme =
            "[tls]\nmode = \"acme\"\n[acme]\ndirectory = \"https://ca.example/dir\"\nchallenge = \"tls-alpn-01\"";
        let c = Config::try_from(FileConfig::parse(acme).expect("parses")).expect("valid");
        assert!(matches!(c.tls, TlsMode::Acme(AcmeSettings { challenge: Challenge::TlsAlpn01, .. })));
        let streams = |n: u32| {
            Config::try_from(FileConfig::parse(&format!("[limits]\nmax_streams_per_tunnel = {n}")).expect("parses"))
        };
        for n in [0, (1 << 20) + 1] {
            let refused = streams(n);
            assert!(matches!(refused, Err(ConfigError::Invalid { field: "limits.max_streams_per_tunnel", .. })), "{n}");
        }
        assert_eq!(streams(1 << 20).expect("valid").max_streams_per_tunnel, 1 << 20);
    }

    #[test]
    fn names() {
        for ok in ["a", "node-1", "x9"] {
            assert!(valid_name(ok));
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
