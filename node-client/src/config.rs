//! `node.toml`: what `warren up --config` reads. Every key is optional on its own; command-line
//! flags override the file. `deploy/node.example.toml` documents each key.
//!
//! Relative paths in the file (region map, CA files, key, control socket, token file, file
//! targets) are taken relative to the directory of the file itself, so a node directory can be
//! moved whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use warren_common::config::{load_toml, read_secret_file, AdminFile, ConfigDuration, ConfigError};

use crate::net::{ProxyChoice, TransportMode, TransportSettings};
use crate::services::{check_all, ServiceSpec};

/// Defaults of the node's settings.
pub mod defaults {
    use std::time::Duration;

    /// Key file, relative to the working directory.
    pub const KEY_FILE: &str = ".warren/node.key";
    /// Control socket, relative to the working directory.
    pub const CONTROL: &str = ".warren/warren.sock";
    /// UDP address for direct paths and STUN.
    pub const UDP: &str = "0.0.0.0:0";
    /// Between STUN rounds.
    pub const STUN_INTERVAL: Duration = Duration::from_secs(20);
    /// The admin listener, when `[admin] enabled = true` names no address.
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9092";
}

/// The file as written.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Region map: a JSON file or an `http(s)://` URL.
    pub region_map: Option<String>,
    /// PEM file of a CA to trust for relays.
    pub ca_file: Option<PathBuf>,
    /// Node key file (created 0600 on first start).
    pub key_file: Option<PathBuf>,
    /// The control socket of the running node.
    pub control: Option<PathBuf>,
    /// UDP address for direct paths and STUN.
    pub udp: Option<String>,
    /// Between STUN rounds, e.g. "20s".
    pub stun_interval: Option<ConfigDuration>,
    /// Never go direct.
    pub relay_only: Option<bool>,
    /// Peers whose home region is known ahead, `"KEY@REGION"` (a region id or code of the map);
    /// a peer's own word replaces the hint.
    #[serde(default)]
    pub peers: Vec<String>,
    /// A link to another region's relay unused for this long is closed, e.g. "60s".
    pub link_idle: Option<ConfigDuration>,
    /// HTTP proxy for the relay and the edges' TCP tunnels, `http://[user:password@]host:port`;
    /// `"none"` ignores `HTTPS_PROXY`/`ALL_PROXY`; absent: those variables decide.
    pub proxy: Option<String>,
    /// Funnel settings.
    #[serde(default)]
    pub funnel: FunnelFile,
    /// The node's admin listener (`/metrics`, `/readyz`); off unless enabled.
    #[serde(default)]
    pub admin: AdminFile,
    /// Services published through the funnel.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceSpec>,
}

/// `[funnel]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelFile {
    /// Edge tunnel addresses (`host:port`, UDP).
    #[serde(default)]
    pub edges: Vec<String>,
    /// PEM file of a CA to trust for the edges (default: `ca_file`).
    pub edge_ca: Option<PathBuf>,
    /// TLS name of the edges, if it differs from the host in `edges`.
    pub edge_name: Option<String>,
    /// The token the edge's operator issued (prefer `token_file`).
    pub token: Option<String>,
    /// A file holding the token.
    pub token_file: Option<PathBuf>,
    /// Node name for funnel URLs (`<name>.<funnel domain>`); default: the host name.
    pub name: Option<String>,
    /// `auto` (QUIC, else TCP+TLS, back to QUIC when it works), `quic` or `tcp`.
    pub transport: Option<TransportMode>,
    /// The edges' public port, where they take TCP tunnels (default 443).
    pub tcp_port: Option<u16>,
    /// Silence after which an edge counts as dead, e.g. "4s".
    pub dead_after: Option<ConfigDuration>,
    /// How long QUIC may take to connect before `auto` tries TCP, e.g. "3s".
    pub quic_fallback_after: Option<ConfigDuration>,
    /// Between tries of QUIC while `auto` runs on TCP, e.g. "10s".
    pub quic_retry: Option<ConfigDuration>,
    /// Custom domains (`app.example.com`) to be reached at too, once their DNS proves them.
    #[serde(default)]
    pub domains: Vec<String>,
}

impl FunnelFile {
    /// The transport settings, `proxy` being the file's (or the flag's) proxy setting.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn transport(&self, proxy: Option<&str>) -> Result<TransportSettings, ConfigError> {
        let d = TransportSettings::default();
        let within = |key: &'static str, v: Option<ConfigDuration>, default: Duration, min: Duration, max: Duration| {
            let v = ConfigDuration::or(v, default);
            if v < min || v > max {
                return Err(ConfigError::invalid(key, format!("between {min:?} and {max:?}")));
            }
            Ok(v)
        };
        let second = Duration::from_secs(1);
        Ok(TransportSettings {
            mode: self.transport.unwrap_or(d.mode),
            tcp_port: match self.tcp_port.unwrap_or(d.tcp_port) {
                0 => return Err(ConfigError::invalid("funnel.tcp_port", "a port from 1 to 65535")),
                p => p,
            },
            proxy: ProxyChoice::parse(proxy).map_err(|e| ConfigError::invalid("proxy", e.to_string()))?,
            dead_after: within("funnel.dead_after", self.dead_after, d.dead_after, second, Duration::from_secs(600))?,
            quic_fallback_after: within(
                "funnel.quic_fallback_after",
                self.quic_fallback_after,
                d.quic_fallback_after,
                Duration::from_millis(200),
                Duration::from_secs(60),
            )?,
            quic_retry: within("funnel.quic_retry", self.quic_retry, d.quic_retry, second, Duration::from_secs(3600))?,
        })
    }
}

/// The admin listener's address, when enabled.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `admin.listen`.
pub fn admin_listen(admin: &AdminFile) -> Result<Option<SocketAddr>, ConfigError> {
    if admin.enabled != Some(true) {
        return Ok(None);
    }
    let addr = admin.listen.as_deref().unwrap_or(defaults::ADMIN_LISTEN);
    warren_common::config::socket_addr("admin.listen", addr).map(Some)
}

impl NodeFile {
    /// Reads `path`, resolving its relative paths against the file's directory.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or the key.
    pub fn load(path: &Path) -> Result<NodeFile, ConfigError> {
        let mut f: NodeFile = load_toml(path)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        f.resolve(base);
        Ok(f)
    }

    fn resolve(&mut self, base: &Path) {
        let join = |p: &mut Option<PathBuf>| {
            if let Some(v) = p.as_mut().filter(|v| v.is_relative()) {
                *v = base.join(&*v);
            }
        };
        join(&mut self.ca_file);
        join(&mut self.key_file);
        join(&mut self.control);
        join(&mut self.funnel.edge_ca);
        join(&mut self.funnel.token_file);
        if let Some(m) = self.region_map.as_mut().filter(|m| !m.contains("://") && Path::new(m.as_str()).is_relative())
        {
            *m = base.join(m.as_str()).display().to_string();
        }
        for s in &mut self.services {
            join(&mut s.ca_file);
            s.target = resolve_file_target(&s.target, base);
        }
    }

    /// Checks what can be checked without the network or other files: values and the services
    /// together. [`NodeFile::token`] reads the token file.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key (services by their id).
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(udp) = &self.udp {
            warren_common::config::socket_addr("udp", udp)?;
        }
        if self.stun_interval.is_some_and(|d| d.0 < Duration::from_secs(1)) {
            return Err(ConfigError::invalid("stun_interval", "at least 1s"));
        }
        for p in &self.peers {
            if crate::node::split_peer(p).is_err() {
                return Err(ConfigError::invalid("peers", format!("{p:?}: want 64 hex digits, optionally @REGION")));
            }
        }
        if self.link_idle.is_some_and(|d| d.0 < Duration::from_secs(1)) {
            return Err(ConfigError::invalid("link_idle", "at least 1s"));
        }
        admin_listen(&self.admin)?;
        self.funnel.transport(self.proxy.as_deref())?;
        if self.funnel.token.is_some() && self.funnel.token_file.is_some() {
            return Err(ConfigError::invalid("funnel.token", "give token or token_file, not both"));
        }
        check_all(&self.services).map_err(|(id, e)| ConfigError::invalid("service", format!("{id}: {e}")))?;
        if !self.services.is_empty() && self.funnel.edges.is_empty() {
            return Err(ConfigError::invalid("funnel.edges", "services are configured but no edge to publish them on"));
        }
        Ok(())
    }

    /// The funnel token, read from `token_file` when given.
    ///
    /// # Errors
    /// [`ConfigError`] naming `funnel.token_file`.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        match (&self.funnel.token, &self.funnel.token_file) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(f)) => {
                let token = read_secret_file("funnel.token_file", f)?.trim().to_owned();
                if token.is_empty() {
                    return Err(ConfigError::invalid("funnel.token_file", format!("{} is empty", f.display())));
                }
                Ok(Some(token))
            }
            (None, None) => Ok(None),
        }
    }
}

/// A file target (`./site`, `file:site`) made absolute against `base`; other targets as they
/// are.
fn resolve_file_target(target: &str, base: &Path) -> String {
    let path = target.strip_prefix("file:").unwrap_or(target);
    let is_file_target =
        target.starts_with("file:") || path.starts_with("./") || path.starts_with("../") || path == ".";
    if is_file_target && Path::new(path).is_relative() {
        return base.join(path).display().to_string();
    }
    target.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeFile, ConfigError> {
        let mut f: NodeFile = warren_common::config::parse_toml(text)?;
        f.resolve(Path::new("/etc/warren"));
        f.check()?;
        f.token()?;
        Ok(f)
    }

    #[test]
    fn a_full_file_reads_and_relative_paths_follow_the_file() {
        let f = parse(
            "region_map = \"regions.json\"\nkey_file = \"node.key\"\n[funnel]\nedges = [\"edge:7443\"]\ntoken = \"t\"\n\
             [[service]]\ntarget = \"./site\"\n[[service]]\npath = \"/api\"\ntarget = \"3000\"\n",
        )
        .expect("valid");
        assert_eq!(f.region_map.as_deref(), Some("/etc/warren/regions.json"));
        assert_eq!(f.key_file.as_deref(), Some(Path::new("/etc/warren/node.key")));
        assert_eq!(f.services[0].target, "/etc/warren/./site");
        assert_eq!(f.services[1].target, "3000");
        assert_eq!(f.token().expect("token").as_deref(), Some("t"));
        let hinted =
            parse(&format!("peers = [\"{}@fra\", \"{}\"]\nlink_idle = \"2m\"\n", "ab".repeat(32), "cd".repeat(32)))
                .expect("valid peers");
        assert_eq!((hinted.peers.len(), hinted.link_idle.map(|d| d.0)), (2, Some(Duration::from_secs(120))));
        let url = parse("region_map = \"https://x/regions.json\"\n").expect("valid");
        assert_eq!(url.region_map.as_deref(), Some("https://x/regions.json"));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("typo = 1\n", "typo"),
            ("udp = \"nope\"\n", "udp"),
            ("stun_interval = \"10ms\"\n", "stun_interval"),
            ("[admin]\nenabled = true\nlisten = \"x\"\n", "admin.listen"),
            ("[funnel]\ntoken = \"a\"\ntoken_file = \"b\"\n", "funnel.token"),
            ("[funnel]\ntoken_file = \"/nonexistent/token\"\n", "funnel.token_file"),
            ("[funnel]\nedges = [\"e:1\"]\n[[service]]\ntarget = \"ftp://x\"\n", "443/"),
            (
                "[funnel]\nedges = [\"e:1\"]\n[[service]]\ntarget = \"1\"\n[[service]]\ntarget = \"2\"\n",
                "published twice",
            ),
            ("[[service]]\ntarget = \"1\"\n", "funnel.edges"),
            ("proxy = \"socks5://p:1\"\n", "proxy"),
            ("[funnel]\ntransport = \"udp\"\n", "transport"),
            ("[funnel]\ntcp_port = 0\n", "funnel.tcp_port"),
            ("[funnel]\ndead_after = \"100ms\"\n", "funnel.dead_after"),
            ("[funnel]\nquic_retry = \"2h\"\n", "funnel.quic_retry"),
            ("peers = [\"abc@fra\"]\n", "peers"),
            ("link_idle = \"10ms\"\n", "link_idle"),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }
}
