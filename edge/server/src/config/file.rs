//! The edge's TOML schema: what a file may say, before it is checked and turned into a
//! [`super::Config`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use warren_common::acme::{AcmeFile, Challenge};
use warren_common::config::{load_toml, parse_toml, read_secret_file, AdminFile, ConfigDuration, ConfigError};

/// The TOML file. Every key is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Public names are `<node>.<funnel_domain>`.
    pub funnel_domain: Option<String>,
    /// Directory for certificates and the dev CA.
    pub state_dir: Option<PathBuf>,
    /// The edge's own host name (the tunnel's TLS name).
    pub hostname: Option<String>,
    /// Public HTTPS listeners.
    pub public_listen: Option<Vec<String>>,
    /// QUIC tunnel listener (UDP).
    pub tunnel_listen: Option<String>,
    /// Take node tunnels over TCP+TLS on the public ports too (ALPN `warren-tunnel-tcp/1`),
    /// for nodes whose network blocks UDP. Default true.
    pub tunnel_tcp: Option<bool>,
    /// A node tunnel silent this long is closed as dead, e.g. "30s" (nodes may ask for less:
    /// on QUIC the shorter idle timeout of the two ends applies).
    pub tunnel_dead_after: Option<ConfigDuration>,
    /// TLS.
    #[serde(default)]
    pub tls: TlsFile,
    /// Tokens nodes authenticate with.
    #[serde(default)]
    pub tokens: Vec<TokenFile>,
    /// Admin listener.
    #[serde(default)]
    pub admin: AdminFile,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Shutdown.
    #[serde(default)]
    pub shutdown: ShutdownFile,
    /// ACME, for `tls.mode = "acme"`.
    #[serde(default)]
    pub acme: AcmeFile,
    /// Several edges sharing state.
    #[serde(default)]
    pub cluster: ClusterFile,
    /// Raw TCP services.
    #[serde(default)]
    pub tcp: TcpFile,
    /// Access floors for every funnel, and the forward-auth endpoints nodes may name.
    #[serde(default)]
    pub access: AccessFile,
    /// Signed node tokens (`warren-edge token issue`), beside the static `[[tokens]]`.
    #[serde(default)]
    pub credentials: CredentialsFile,
    /// Custom domains nodes may ask for.
    #[serde(default)]
    pub domains: DomainsFile,
}

/// `[domains]`: custom domains (`app.example.com`) served for a node once its DNS proves it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainsFile {
    /// Take custom domains at all (they also need `tls.mode = "acme"`). Default true.
    pub enabled: Option<bool>,
    /// The DNS server asked for the proofs, `ip:port` (default: the first nameserver of
    /// /etc/resolv.conf).
    pub resolver: Option<String>,
    /// How often every domain's proof is checked again, e.g. "60s" (default).
    pub recheck: Option<ConfigDuration>,
}

/// `[credentials]`: node tokens signed by the operator's key, accepted by every edge that
/// trusts the key, revoked through the store.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    /// Ed25519 public keys (base64url, as `warren-edge token keygen` prints them) whose
    /// tokens are accepted; several while a key is rotated. Empty (the default): none.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// Longest a token may still be valid when presented, e.g. "90d" (default "365d").
    pub max_lifetime: Option<ConfigDuration>,
    /// How often the revocation list is read from the store, e.g. "2s" (default).
    pub revocation_check: Option<ConfigDuration>,
}

/// `[access]`: what every funnel on this edge gets, whatever its node asks for.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessFile {
    /// Every HTTP service must protect itself (basic auth, bearer tokens or forward-auth);
    /// the others answer 403. Default false.
    pub require_auth: Option<bool>,
    /// Visitor networks refused on every funnel (CIDR), before anything else.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Forward-auth endpoints a node's service can name (`warren funnel --auth forward:NAME`).
    #[serde(default)]
    pub forward_auth: Vec<ForwardAuthFile>,
}

/// `[[access.forward_auth]]`: an endpoint that decides on each request from its headers, as
/// Caddy's `forward_auth` and Traefik's ForwardAuth do.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthFile {
    /// The name services refer to it by.
    pub name: String,
    /// `http[s]://host[:port]/path`: asked with a GET carrying the visitor's headers and
    /// `X-Forwarded-Method/-Proto/-Host/-Uri/-For`; a 2xx answer lets the request through,
    /// any other is sent to the visitor as it is (a login redirect, a 401).
    pub url: String,
    /// Longest wait for the answer, e.g. "2s" (default); no answer in time refuses (503).
    pub timeout: Option<ConfigDuration>,
    /// How long an answer is reused for the same request headers, e.g. "10s" (default); "0s"
    /// asks every time.
    pub cache: Option<ConfigDuration>,
    /// Headers of a 2xx answer copied into the request to the node (e.g. `remote-user`); the
    /// visitor's own values of these headers are always removed.
    #[serde(default)]
    pub copy_headers: Vec<String>,
    /// Extra CA (PEM) to trust for an https:// endpoint.
    pub ca_file: Option<PathBuf>,
}

/// `[tcp]`: edge ports nodes may publish raw TCP services on (`warren funnel --tcp`), each
/// held by one node at a time and listened on only while it is.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpFile {
    /// Ports and ranges, e.g. `["5432", "20000-20099"]`; empty (the default): no TCP services.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Address the TCP listeners bind, default `0.0.0.0`.
    pub listen_ip: Option<String>,
}

/// `[cluster]`: edges behind one DNS name share certificates, locks and routes in Redis, and
/// forward a visitor to the edge that holds the node's tunnel.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// `redis://[:password@]host:port/db`. Absent: a single edge with its file store.
    pub redis_url: Option<String>,
    /// Address siblings reach this edge's tunnel endpoint at (UDP), e.g. "10.0.0.5:7443".
    pub advertise: Option<String>,
    /// File holding the cluster key shared by the edges (one line). The key may also come
    /// from `WARREN_EDGE_CLUSTER_KEY`.
    pub key_file: Option<PathBuf>,
    /// The key itself; never read from the file, only from the environment or a flag.
    #[serde(skip)]
    pub key: Option<String>,
    /// Extra CA (PEM) to trust for siblings' tunnel certificates (e.g. a shared dev CA).
    pub ca_file: Option<PathBuf>,
    /// Route entry lifetime, e.g. "15s".
    pub route_ttl: Option<ConfigDuration>,
}

/// `[tls]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// `dev` (local CA), `manual` (a wildcard certificate from files) or `acme`.
    pub mode: Option<TlsModeName>,
    /// PEM chain for `manual` (should cover `*.<funnel_domain>` and `hostname`).
    pub cert_file: Option<PathBuf>,
    /// PEM key for `manual`.
    pub key_file: Option<PathBuf>,
}

/// `[[tokens]]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// The secret a node presents.
    pub token: String,
    /// Node names it may register; `"*"` allows any.
    pub names: Vec<String>,
}

impl fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFile").field("token", &"<redacted>").field("names", &self.names).finish()
    }
}

/// `[limits]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// e.g. "60s".
    pub response_timeout: Option<ConfigDuration>,
    /// A visitor that takes no byte of a response for this long loses it, e.g. "30s": what it
    /// left unread stops holding the node's tunnel window.
    pub stalled_reader: Option<ConfigDuration>,
    /// Requests in flight per tunnel.
    pub max_streams_per_tunnel: Option<u32>,
    /// Visitor requests per second per funnel name (0 or absent: unlimited); over it, 429.
    pub requests_per_second_per_host: Option<u32>,
    /// Burst of that rate (default: one second's worth).
    pub burst_per_host: Option<u32>,
    /// Visitor connections accepted per second, all sources together.
    pub accept_rate: Option<u32>,
    /// Burst of visitor connections.
    pub accept_burst: Option<u32>,
    /// Open visitor connections per source IP.
    pub max_conns_per_ip: Option<u32>,
    /// Node tunnel handshakes per second, all sources together.
    pub tunnel_accept_rate: Option<u32>,
    /// Burst of tunnel handshakes.
    pub tunnel_accept_burst: Option<u32>,
}

/// `[shutdown]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    /// e.g. "10s".
    pub grace_period: Option<ConfigDuration>,
}

impl FileConfig {
    /// Reads and parses a file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// [`ConfigError::Parse`].
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        parse_toml(text)
    }

    /// Reads the secrets the file points at (`cluster.key_file`, unless a key was given
    /// directly), so that the conversion into a [`super::Config`] does no I/O. `main` calls
    /// this after laying the command line over the file.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key whose file is unreadable or too large.
    pub fn read_secret_files(mut self) -> Result<Self, ConfigError> {
        if let (None, Some(path)) = (&self.cluster.key, &self.cluster.key_file) {
            self.cluster.key = Some(read_secret_file("cluster.key_file", path)?);
        }
        Ok(self)
    }
}

/// `tls.mode`: where the public certificates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsModeName {
    /// A local development CA (the default).
    Dev,
    /// A wildcard certificate from files.
    Manual,
    /// ACME, per name or a DNS-01 wildcard.
    Acme,
}
