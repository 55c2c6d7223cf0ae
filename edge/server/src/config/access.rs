//! `[access]` checked: the edge-wide floors and the forward-auth endpoints.

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use warren_common::cidr::Cidr;
use warren_common::config::{cidrs, ConfigDuration, ConfigError};

use super::defaults;
use super::file::{AccessFile, ForwardAuthFile};

/// What every funnel on this edge gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessConfig {
    /// HTTP services without basic auth, bearer tokens or forward-auth answer 403.
    pub require_auth: bool,
    /// Visitor networks refused everywhere.
    pub deny: Vec<Cidr>,
    /// The forward-auth endpoints, by name.
    pub forward_auth: Vec<ForwardAuthConfig>,
}

/// One forward-auth endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuthConfig {
    /// The name services refer to it by.
    pub name: String,
    /// Where it is asked.
    pub url: EndpointUrl,
    /// Longest wait for the answer.
    pub timeout: Duration,
    /// How long an answer is reused (zero: not at all).
    pub cache: Duration,
    /// Answer headers copied into the request to the node.
    pub copy_headers: Vec<HeaderName>,
    /// Extra CA for an https:// endpoint.
    pub ca_file: Option<PathBuf>,
}

/// An `http[s]://host[:port]/path?query` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    /// https.
    pub tls: bool,
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query.
    pub path: String,
}

impl EndpointUrl {
    /// The `Host` header value.
    pub fn authority(&self) -> String {
        match self.host.contains(':') {
            true => format!("[{}]:{}", self.host, self.port),
            false => format!("{}:{}", self.host, self.port),
        }
    }

    fn parse(field: &'static str, s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::invalid(field, format!("{s:?} {why}"));
        let uri: http::Uri = s.parse().map_err(|_| bad("is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("must start with http:// or https://")),
        };
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not carry credentials"));
        }
        let host = authority.host().trim_matches(['[', ']']).to_owned();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(EndpointUrl { tls, host, port, path })
    }
}

impl TryFrom<AccessFile> for AccessConfig {
    type Error = ConfigError;

    fn try_from(f: AccessFile) -> Result<Self, ConfigError> {
        let deny = cidrs("access.deny", &f.deny)?;
        let mut forward_auth: Vec<ForwardAuthConfig> = Vec::new();
        for fa in f.forward_auth {
            let fa = forward_auth_config(fa)?;
            if forward_auth.iter().any(|o| o.name == fa.name) {
                return Err(ConfigError::invalid("access.forward_auth.name", format!("{:?} is used twice", fa.name)));
            }
            forward_auth.push(fa);
        }
        Ok(AccessConfig { require_auth: f.require_auth.unwrap_or(false), deny, forward_auth })
    }
}

fn forward_auth_config(f: ForwardAuthFile) -> Result<ForwardAuthConfig, ConfigError> {
    let name_ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if f.name.is_empty() || f.name.len() > 64 || !f.name.chars().all(name_ok) {
        return Err(ConfigError::invalid(
            "access.forward_auth.name",
            format!("{:?}: letters, digits, - and _", f.name),
        ));
    }
    let timeout = ConfigDuration::or(f.timeout, defaults::FORWARD_AUTH_TIMEOUT);
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        return Err(ConfigError::invalid("access.forward_auth.timeout", "between 1ms and 60s"));
    }
    let copy_headers = f
        .copy_headers
        .iter()
        .map(|h| {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                ConfigError::invalid("access.forward_auth.copy_headers", format!("{h:?} is not a header name"))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(ForwardAuthConfig {
        url: EndpointUrl::parse("access.forward_auth.url", &f.url)?,
        name: f.name,
        timeout,
        cache: ConfigDuration::or(f.cache, defaults::FORWARD_AUTH_CACHE),
        copy_headers,
        ca_file: f.ca_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn parse(text: &str) -> Result<AccessConfig, ConfigError> {
        AccessConfig::try_from(FileConfig::parse(text)?.access)
    }

    #[test]
    fn floors_and_endpoints_are_read() {
        let c = parse(
            "[access]\nrequire_auth = true\ndeny = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n\
             [[access.forward_auth]]\nname = \"sso\"\nurl = \"http://127.0.0.1:9091/verify?x=1\"\n\
             copy_headers = [\"Remote-User\"]\ncache = \"0s\"\n",
        )
        .expect("valid");
        assert!(c.require_auth);
        assert_eq!(c.deny.len(), 2);
        let fa = &c.forward_auth[0];
        assert_eq!(
            fa.url,
            EndpointUrl { tls: false, host: "127.0.0.1".into(), port: 9091, path: "/verify?x=1".into() }
        );
        assert_eq!(fa.url.authority(), "127.0.0.1:9091");
        assert_eq!(fa.copy_headers[0].as_str(), "remote-user");
        assert_eq!((fa.timeout, fa.cache), (defaults::FORWARD_AUTH_TIMEOUT, Duration::ZERO));
        let off = parse("").expect("valid");
        assert!(!off.require_auth && off.deny.is_empty() && off.forward_auth.is_empty());
    }

    #[test]
    fn bad_access_settings_name_their_key() {
        let fa = |extra: &str| format!("[[access.forward_auth]]\nname = \"a\"\nurl = \"http://h/\"\n{extra}");
        for (text, key) in [
            ("[access]\ndeny = [\"10.1.0.0/8\"]\n".to_owned(), "access.deny"),
            ("[[access.forward_auth]]\nname = \"a b\"\nurl = \"http://h/\"\n".to_owned(), "access.forward_auth.name"),
            ("[[access.forward_auth]]\nname = \"a\"\nurl = \"ftp://h/\"\n".to_owned(), "access.forward_auth.url"),
            ("[[access.forward_auth]]\nname = \"a\"\nurl = \"http://u:p@h/\"\n".to_owned(), "access.forward_auth.url"),
            (fa("timeout = \"0s\"\n"), "access.forward_auth.timeout"),
            (fa("copy_headers = [\"bad header\"]\n"), "access.forward_auth.copy_headers"),
            (fa("") + &fa(""), "access.forward_auth.name"),
        ] {
            let e = parse(&text).expect_err(&text).to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
