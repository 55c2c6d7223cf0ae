//! The small URL subset relays are addressed by: `http[s]://host[:port][/path]`.

use std::fmt;

/// A parsed relay URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayUrl {
    /// Whether TLS is used.
    pub tls: bool,
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Request path, `/derp` unless given.
    pub path: String,
}

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay URL {0:?}: expected http[s]://host[:port][/path]")]
pub struct UrlError(pub String);

impl RelayUrl {
    /// Parses `http[s]://host[:port][/path]`.
    ///
    /// # Errors
    /// [`UrlError`] for other schemes, an empty host or a bad port.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let err = || UrlError(s.to_owned());
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(err());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(err)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| err())?,
                None if after.is_empty() => default_port,
                None => return Err(err()),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| err())?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err(err());
        }
        let path = if path.is_empty() || path == "/" { "/derp".to_owned() } else { path.to_owned() };
        Ok(RelayUrl { tls, host: host.to_owned(), port, path })
    }

    /// `host:port` for the Host header (IPv6 bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", if self.tls { "https" } else { "http" }, self.authority(), self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let u = RelayUrl::parse("https://relay.example.com").expect("ok");
        assert_eq!((u.tls, u.host.as_str(), u.port, u.path.as_str()), (true, "relay.example.com", 443, "/derp"));
        let u = RelayUrl::parse("http://127.0.0.1:3340/derp").expect("ok");
        assert_eq!((u.tls, u.port), (false, 3340));
        let u = RelayUrl::parse("https://[::1]:8443").expect("ok");
        assert_eq!((u.host.as_str(), u.port, u.authority()), ("::1", 8443, "[::1]:8443".to_owned()));
        for bad in ["ftp://x", "https://", "https://h:notaport", "https://[::1", "relay:443"] {
            assert!(RelayUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
