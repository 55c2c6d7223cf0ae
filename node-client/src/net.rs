//! How the node reaches the outside: which tunnel transport it uses to its edges, and whether
//! an HTTP proxy stands between it and its relay and edges.

use std::time::Duration;

use serde::Deserialize;
use warren_common::proxy::{Proxy, ProxyError};

/// Which transport the tunnels to the edges use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC first; TCP+TLS when QUIC cannot connect, moving back to QUIC once it can.
    #[default]
    Auto,
    /// QUIC only (UDP).
    Quic,
    /// TCP+TLS only (through the proxy, when one is set).
    Tcp,
}

/// Where the proxy setting comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProxyChoice {
    /// `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` from the environment.
    #[default]
    FromEnv,
    /// No proxy, whatever the environment says.
    Direct,
    /// This proxy, for every TCP connection to a relay or an edge.
    Via(Proxy),
}

impl ProxyChoice {
    /// `None`: from the environment; `"none"` or `""`: direct; otherwise a proxy URL.
    ///
    /// # Errors
    /// [`ProxyError::Url`] for a URL that is not a usable proxy.
    pub fn parse(setting: Option<&str>) -> Result<ProxyChoice, ProxyError> {
        match setting.map(str::trim) {
            None => Ok(ProxyChoice::FromEnv),
            Some("" | "none") => Ok(ProxyChoice::Direct),
            Some(url) => Proxy::parse(url).map(ProxyChoice::Via),
        }
    }

    /// The proxy to use for a TCP connection to `host`.
    ///
    /// # Errors
    /// [`ProxyError::Url`] when the environment names an unusable proxy.
    pub fn for_host(&self, host: &str) -> Result<Option<Proxy>, ProxyError> {
        match self {
            ProxyChoice::FromEnv => Proxy::from_env(host),
            ProxyChoice::Direct => Ok(None),
            ProxyChoice::Via(p) => Ok(Some(p.clone())),
        }
    }
}

/// Defaults of the tunnel's transport settings.
pub mod defaults {
    use std::time::Duration;

    /// Silence after which an edge counts as dead.
    pub const DEAD_AFTER: Duration = Duration::from_secs(4);
    /// How long QUIC may take to connect before `auto` tries TCP.
    pub const QUIC_FALLBACK_AFTER: Duration = Duration::from_secs(3);
    /// Between tries of QUIC while on TCP in `auto`.
    pub const QUIC_RETRY: Duration = Duration::from_secs(10);
    /// The edges' public port, where they take TCP tunnels.
    pub const TCP_PORT: u16 = 443;
}

/// The tunnel's transport settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSettings {
    /// Which transport.
    pub mode: TransportMode,
    /// The edges' public port for TCP tunnels.
    pub tcp_port: u16,
    /// The HTTP proxy for TCP tunnels (and the relay).
    pub proxy: ProxyChoice,
    /// Silence after which an edge counts as dead.
    pub dead_after: Duration,
    /// How long QUIC may take to connect before `auto` tries TCP.
    pub quic_fallback_after: Duration,
    /// Between tries of QUIC while on TCP in `auto`.
    pub quic_retry: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            mode: TransportMode::Auto,
            tcp_port: defaults::TCP_PORT,
            proxy: ProxyChoice::FromEnv,
            dead_after: defaults::DEAD_AFTER,
            quic_fallback_after: defaults::QUIC_FALLBACK_AFTER,
            quic_retry: defaults::QUIC_RETRY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_settings_parse() {
        assert_eq!(ProxyChoice::parse(None).expect("env"), ProxyChoice::FromEnv);
        assert_eq!(ProxyChoice::parse(Some("none")).expect("direct"), ProxyChoice::Direct);
        assert_eq!(ProxyChoice::parse(Some("")).expect("direct"), ProxyChoice::Direct);
        let via = ProxyChoice::parse(Some("http://proxy:8080")).expect("url");
        assert_eq!(via.for_host("edge").expect("ok").map(|p| p.to_string()).as_deref(), Some("http://proxy:8080"));
        assert!(ProxyChoice::parse(Some("socks5://proxy:1080")).is_err());
        assert_eq!(ProxyChoice::Direct.for_host("edge").expect("ok"), None);
    }
}
