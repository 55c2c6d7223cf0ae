//! The relay's TOML schema: what a file may say, before it is checked and turned into a
//! [`super::Config`].

use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use warren_common::acme::{AcmeFile, Challenge};
use warren_common::config::{load_toml, parse_toml, read_secret_file, AdminFile, ConfigDuration, ConfigError};

/// The TOML file as written by an operator. Every key is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address of the DERP/HTTPS listener.
    pub listen: Option<String>,
    /// Directory for the server key and dev CA.
    pub state_dir: Option<PathBuf>,
    /// Server key file (default `<state_dir>/relay.key`).
    pub key_file: Option<PathBuf>,
    /// Host name this relay is reached at (for the dev certificate and logs).
    pub hostname: Option<String>,
    /// TLS settings.
    #[serde(default)]
    pub tls: TlsFile,
    /// ACME settings, for `tls.mode = "acme"`.
    #[serde(default)]
    pub acme: AcmeFile,
    /// STUN settings.
    #[serde(default)]
    pub stun: StunFile,
    /// Admin listener settings.
    #[serde(default)]
    pub admin: AdminFile,
    /// Limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: ShutdownFile,
    /// Region mesh.
    #[serde(default)]
    pub mesh: MeshFile,
    /// Who may log in.
    #[serde(default)]
    pub admission: AdmissionFile,
    /// Load balancers that put a PROXY protocol header before each connection.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolFile,
}

/// `[proxy_protocol]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolFile {
    /// Networks of the load balancers, e.g. `["10.0.0.0/8"]`. A connection from one of them
    /// must start with a PROXY v1 or v2 header, whose client address then stands for the
    /// connection's (per-IP limits, admission `Source`, logs); every other connection is taken
    /// as it is. Empty (the default): no header is read from anyone.
    #[serde(default)]
    pub trusted: Vec<String>,
}

/// `admission.mode`: who may log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdmissionMode {
    /// Everyone (the default).
    Open,
    /// The keys listed in `allow_list_file`.
    AllowList,
    /// Whatever `callout_url` answers.
    Callout,
}

/// `tls.mode`: where the DERP port's certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsModeName {
    /// `cert_file` and `key_file`.
    Manual,
    /// A certificate for `hostname` from an ACME CA (`[acme]`).
    Acme,
    /// A local development CA (the default).
    Dev,
    /// No TLS, loopback only.
    Plain,
}

/// `[admission]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionFile {
    /// `open` (default), `allow_list` or `callout`.
    pub mode: Option<AdmissionMode>,
    /// For `allow_list`: one node key per line; re-read when it changes.
    pub allow_list_file: Option<PathBuf>,
    /// For `callout`: the URL POSTed `{"NodePublic", "Source"}`, answering `{"Allow": bool}`.
    pub callout_url: Option<String>,
    /// Extra CA (PEM) to trust for an https callout.
    pub callout_ca_file: Option<PathBuf>,
    /// Deadline of one callout, e.g. "2s".
    pub callout_timeout: Option<ConfigDuration>,
    /// How long an answer is reused for the same key, e.g. "60s".
    pub cache_ttl: Option<ConfigDuration>,
    /// Admit when the callout fails (default false: refuse).
    pub fail_open: Option<bool>,
}

/// `[mesh]`: the relays of one region forward to each other's clients.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshFile {
    /// File holding the region's shared mesh key (one line).
    pub key_file: Option<PathBuf>,
    /// The mesh key itself; never read from the file, only from `WARREN_MESH_KEY` or a flag.
    #[serde(skip)]
    pub key: Option<String>,
    /// Sibling relays, e.g. `["https://relay-b.example.net:443"]`. This relay may be listed too:
    /// a link that reaches this relay's own key is dropped.
    #[serde(default)]
    pub peers: Vec<String>,
    /// A DNS name and port whose addresses are all siblings (a Kubernetes headless service),
    /// e.g. `"warren-relay-peers.warren.svc.cluster.local:443"`; resolved periodically.
    pub dns: Option<String>,
    /// TLS name expected from siblings found through `dns` (default: `hostname`).
    pub tls_name: Option<String>,
    /// Extra CA certificate (PEM) to trust for siblings, e.g. a shared development CA.
    pub ca_file: Option<PathBuf>,
    /// How often `dns` is resolved again, e.g. "30s".
    pub resolve_interval: Option<ConfigDuration>,
}

/// `[tls]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// `manual` (cert_file + key_file), `acme` (see `[acme]`), `dev` (local CA) or `plain` (no
    /// TLS, loopback only).
    pub mode: Option<TlsModeName>,
    /// PEM certificate chain for `manual`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `manual`.
    pub key_file: Option<PathBuf>,
}

/// `[stun]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StunFile {
    /// Whether to serve STUN (default true).
    pub enabled: Option<bool>,
    /// UDP address.
    pub listen: Option<String>,
    /// Requests per second per source IP.
    pub rate_per_second: Option<u32>,
    /// Burst per source IP.
    pub burst: Option<u32>,
}

/// `[limits]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Packets queued per client before drops.
    pub send_queue_depth: Option<usize>,
    /// Payload bytes queued per client before drops.
    pub send_queue_bytes: Option<usize>,
    /// e.g. "10s".
    pub handshake_timeout: Option<ConfigDuration>,
    /// e.g. "5s".
    pub write_timeout: Option<ConfigDuration>,
    /// e.g. "60s".
    pub keepalive_interval: Option<ConfigDuration>,
    /// New connections per second, all sources together.
    pub accept_rate: Option<u32>,
    /// Burst of new connections.
    pub accept_burst: Option<u32>,
    /// Open connections per source IP.
    pub max_conns_per_ip: Option<u32>,
    /// Bytes per second each client may send (0 or absent: unlimited); told to clients in
    /// ServerInfo and enforced by reading more slowly.
    pub client_bytes_per_second: Option<u64>,
    /// Burst of the per-client budget (default: one second's worth, at least 128 KiB).
    pub client_burst_bytes: Option<u64>,
    /// Idle time before TCP keep-alive probes start on a client connection, e.g. "10m"
    /// ("0s": no TCP keep-alive; DERP's own KeepAlive frames still flow).
    pub tcp_keepalive: Option<ConfigDuration>,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the kernel closes
    /// the connection, e.g. "15s" ("0s": the kernel's default, many minutes).
    pub tcp_user_timeout: Option<ConfigDuration>,
}

/// `[shutdown]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    /// How long to keep serving connected clients after SIGTERM, e.g. "10s".
    pub grace_period: Option<ConfigDuration>,
    /// Told to clients: reconnect after, e.g. "500ms".
    pub reconnect_in: Option<ConfigDuration>,
    /// Told to clients: keep trying for, e.g. "60s".
    pub try_for: Option<ConfigDuration>,
}

impl FileConfig {
    /// Reads and parses a TOML file.
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

    /// Reads the secrets the file points at (`mesh.key_file`, unless a key was given
    /// directly), so that the conversion into a [`super::Config`] does no I/O. `main` calls
    /// this after laying the command line over the file.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key whose file is unreadable or too large.
    pub fn read_secret_files(mut self) -> Result<Self, ConfigError> {
        if let (None, Some(path)) = (&self.mesh.key, &self.mesh.key_file) {
            self.mesh.key = Some(read_secret_file("mesh.key_file", path)?);
        }
        Ok(self)
    }
}
