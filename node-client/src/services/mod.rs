//! What a node publishes: services, their targets, and which one answers a visitor request.
//!
//! ```text
//! visitor request (public port, path) ──▶ ServiceTable::route
//!     services on that port, longest mount first:  /api/v1  /api  /
//!     "/api" matches "/api" and "/api/…", never "/apix"
//!     strip_path = true:  /api/users -> target base + /users
//!     no mount matches -> the node answers 404 itself
//! ```
//!
//! A [`ServiceSpec`] is what the user writes (in `node.toml`, on the command line, in the
//! persisted state file); [`Target::parse`] and [`ServiceSpec::check`] turn it into something
//! that cannot be wrong later. Opening a service ([`origin`]) is the only step that touches the
//! file system or builds clients. Everything in this module is synchronous and unit-tested.

pub mod access;
pub mod files;
pub mod origin;
pub mod raw;
pub mod state;

use std::fmt;
use std::path::PathBuf;

use http::Uri;
use serde::{Deserialize, Serialize};

pub use self::access::{AccessBook, AccessSpec};

/// Public ports an edge serves HTTPS on by default.
pub const DEFAULT_PORT: u16 = 443;

/// What kind of traffic a service takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// HTTP requests on a public HTTPS port (TLS ends at the edge), routed by path.
    #[default]
    Http,
    /// Raw TCP connections to an edge port the operator offers for TCP.
    Tcp,
    /// TLS connections for the node's name on a public port, passed through by the edge
    /// unopened: TLS ends on the node (with `cert_file`/`key_file`) or at the target.
    Tls,
}

impl ServiceKind {
    fn is_http(&self) -> bool {
        *self == ServiceKind::Http
    }
}

/// One published service, as written by the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// A name to refer to it by (`warren funnel off <name>`); default `<port><path>`
    /// (`tcp:<port>`, `tls:<port>` for the raw kinds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `http` (default), `tcp` or `tls`.
    #[serde(default, skip_serializing_if = "ServiceKind::is_http")]
    pub kind: ServiceKind,
    /// Public HTTPS port on the edge.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Mount point: requests under this path go to this service.
    #[serde(default = "default_path")]
    pub path: String,
    /// Where requests go: see [`Target::parse`].
    pub target: String,
    /// Remove the mount from the path before forwarding (`/api/x` -> `/x`).
    #[serde(default = "yes")]
    pub strip_path: bool,
    /// The `Host` header the origin sees: `keep` (the public name), `origin` (the target's
    /// host:port) or an explicit name.
    #[serde(default, skip_serializing_if = "HostHeader::is_keep")]
    pub host_header: HostHeader,
    /// Extra CA (PEM) to trust for an `https://` target, besides the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `tls`: the node's certificate chain (PEM); with `key_file` the node ends TLS itself and
    /// passes the plain stream to the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// `tls`: the key of `cert_file` (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// `tcp` and `tls`: begin each connection to the target with a PROXY protocol v2 header
    /// carrying the visitor's address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
    /// `http`: who may reach it (basic auth, bearer tokens, networks, rate, forward-auth),
    /// enforced by the edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessSpec>,
}

fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_path() -> String {
    "/".into()
}
fn yes() -> bool {
    true
}

/// The `Host` header sent to the origin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostHeader {
    /// The visitor's (the public name).
    #[default]
    Keep,
    /// The target's `host[:port]`.
    Origin,
    /// This name.
    Fixed(String),
}

impl HostHeader {
    fn is_keep(&self) -> bool {
        *self == HostHeader::Keep
    }
}

impl Serialize for HostHeader {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            HostHeader::Keep => "keep",
            HostHeader::Origin => "origin",
            HostHeader::Fixed(h) => h,
        })
    }
}

impl<'de> Deserialize<'de> for HostHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "keep" => HostHeader::Keep,
            "origin" => HostHeader::Origin,
            _ if http::HeaderValue::from_str(&s).is_ok() && !s.is_empty() => HostHeader::Fixed(s),
            _ => return Err(serde::de::Error::custom(format!("host_header {s:?} is not keep, origin or a host name"))),
        })
    }
}

/// Where a service's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An HTTP(S) origin: `base` is `scheme://authority[/base path]` without a trailing slash.
    Http {
        /// Scheme and authority, e.g. `http://127.0.0.1:3000`.
        origin: Uri,
        /// Path prefix on the origin ("" for none).
        base: String,
        /// How the connection is made.
        kind: HttpKind,
    },
    /// An HTTP origin listening on a Unix socket.
    Unix {
        /// The socket.
        socket: PathBuf,
    },
    /// Files under a directory (or one file).
    Files(PathBuf),
    /// A fixed text answer.
    Text(String),
    /// A TCP address (`tcp` and `tls` services).
    Tcp(String),
}

/// How an HTTP origin is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpKind {
    /// `http://`: HTTP/1.1.
    Plain,
    /// `h2c://`: HTTP/2 without TLS (prior knowledge), e.g. a gRPC server.
    H2c,
    /// `https://`: TLS verified against the system roots (and `ca_file`); HTTP/2 when the
    /// origin offers it.
    Tls,
    /// `https+insecure://`: TLS without verifying the origin's certificate.
    TlsInsecure,
}

/// Why a service cannot be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The target is not one of the accepted forms.
    #[error("target {target:?}: {why}")]
    Target {
        /// As written.
        target: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The mount path is not a clean absolute path.
    #[error("path {path:?}: {why}")]
    Path {
        /// As written.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Port 0.
    #[error("port 0 is not a public port")]
    Port,
    /// Settings that do not go together.
    #[error("{0}")]
    Conflict(String),
    /// Two services claim the same port and path.
    #[error("{0} is published twice")]
    Duplicate(String),
    /// The name is empty or has characters that make it hard to type.
    #[error("service name {0:?}: use letters, digits, '-', '_', '/' and '.'")]
    Name(String),
    /// The target could not be opened (missing directory, unreadable CA, ...).
    #[error("{0}")]
    Open(String),
    /// The access rule is invalid.
    #[error("access: {0}")]
    Access(String),
}

impl Target {
    /// Parses the target of a `tcp` or `tls` service: `5432`, `host:port` or
    /// `tcp://host:port`.
    ///
    /// # Errors
    /// [`ServiceError::Target`].
    pub fn parse_tcp(s: &str) -> Result<Target, ServiceError> {
        let bad = |why| ServiceError::Target { target: s.to_owned(), why };
        let rest = s.strip_prefix("tcp://").unwrap_or(s);
        if let Ok(port) = rest.parse::<u16>() {
            return match port {
                0 => Err(bad("port 0")),
                p => Ok(Target::Tcp(format!("127.0.0.1:{p}"))),
            };
        }
        let bracketed = rest.starts_with('[') && rest.contains("]:");
        if looks_like_host_port(rest) || bracketed {
            return Ok(Target::Tcp(rest.to_owned()));
        }
        Err(bad("a tcp or tls service needs a port, host:port or tcp://host:port"))
    }

    /// Parses a target:
    ///
    /// | written                          | target                              |
    /// |----------------------------------|-------------------------------------|
    /// | `3000`                           | `http://127.0.0.1:3000`             |
    /// | `localhost:3000`, `10.0.0.5:80`  | `http://` that host and port        |
    /// | `http://host:port[/base]`        | HTTP/1.1 origin                     |
    /// | `h2c://host:port[/base]`         | HTTP/2 origin without TLS           |
    /// | `https://host[:port][/base]`     | TLS origin, verified                |
    /// | `https+insecure://…`             | TLS origin, not verified            |
    /// | `unix:/run/app.sock`             | HTTP origin on a Unix socket        |
    /// | `/srv/site`, `./public`, `file:…`| static files                        |
    /// | `text:Hello`                     | that text                           |
    ///
    /// # Errors
    /// [`ServiceError::Target`] naming what is wrong.
    pub fn parse(s: &str) -> Result<Target, ServiceError> {
        let bad = |why| ServiceError::Target { target: s.to_owned(), why };
        if let Some(text) = s.strip_prefix("text:") {
            return Ok(Target::Text(text.to_owned()));
        }
        if let Some(socket) = s.strip_prefix("unix:") {
            let socket = PathBuf::from(socket);
            if !socket.is_absolute() {
                return Err(bad("a unix socket target needs an absolute path (unix:/run/app.sock)"));
            }
            return Ok(Target::Unix { socket });
        }
        if let Some(path) = s.strip_prefix("file:") {
            return files_target(path).ok_or_else(|| bad("empty file path"));
        }
        if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") || s == "." {
            return files_target(s).ok_or_else(|| bad("empty file path"));
        }
        if let Ok(port) = s.parse::<u16>() {
            if port == 0 {
                return Err(bad("port 0"));
            }
            return Ok(http_target(format!("http://127.0.0.1:{port}").parse().map_err(|_| bad("port"))?, ""));
        }
        let (kind, rest) = match s.split_once("://") {
            Some(("http", rest)) => (HttpKind::Plain, rest),
            Some(("h2c", rest)) => (HttpKind::H2c, rest),
            Some(("https", rest)) => (HttpKind::Tls, rest),
            Some(("https+insecure", rest)) => (HttpKind::TlsInsecure, rest),
            Some(_) => return Err(bad("unknown scheme: use http, https, https+insecure, h2c, unix, file or text")),
            None if looks_like_host_port(s) => (HttpKind::Plain, s),
            None => return Err(bad("not a port, host:port, URL, unix:, file path or text:")),
        };
        let (authority, base) = rest.split_once('/').map_or((rest, ""), |(a, b)| (a, b));
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("the URL needs a host (and no user info)"));
        }
        if base.contains(['?', '#']) {
            return Err(bad("a target's base path cannot have a query or fragment"));
        }
        let scheme = if matches!(kind, HttpKind::Tls | HttpKind::TlsInsecure) { "https" } else { "http" };
        let origin: Uri = format!("{scheme}://{authority}").parse().map_err(|_| bad("invalid host or port"))?;
        let base = base.trim_end_matches('/');
        let base = if base.is_empty() { String::new() } else { format!("/{base}") };
        Ok(Target::Http { origin, base, kind })
    }
}

fn http_target(origin: Uri, base: &str) -> Target {
    Target::Http { origin, base: base.to_owned(), kind: HttpKind::Plain }
}

fn files_target(path: &str) -> Option<Target> {
    (!path.is_empty()).then(|| Target::Files(PathBuf::from(path)))
}

/// `name:port` with a plausible host name and a numeric port.
fn looks_like_host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    port.parse::<u16>().is_ok_and(|p| p != 0)
        && !host.is_empty()
        && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Http { origin, base, kind } => {
                let authority = origin.authority().map_or("", |a| a.as_str());
                let scheme = match kind {
                    HttpKind::Plain => "http",
                    HttpKind::H2c => "h2c",
                    HttpKind::Tls => "https",
                    HttpKind::TlsInsecure => "https+insecure",
                };
                write!(f, "{scheme}://{authority}{base}")
            }
            Target::Unix { socket } => write!(f, "unix:{}", socket.display()),
            Target::Files(p) => write!(f, "files {}", p.display()),
            Target::Text(t) => write!(f, "text {:?}", truncate(t, 40)),
            Target::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// A clean mount path: starts with `/`, no empty, `.` or `..` segments, no query, no trailing
/// slash except the root.
///
/// # Errors
/// [`ServiceError::Path`].
pub fn clean_mount(path: &str) -> Result<String, ServiceError> {
    let bad = |why| ServiceError::Path { path: path.to_owned(), why };
    if !path.starts_with('/') {
        return Err(bad("a mount path starts with '/'"));
    }
    if path.contains(['?', '#', '%', '\\']) || path.chars().any(char::is_control) {
        return Err(bad("a mount path has no query, fragment, escapes or control characters"));
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".into());
    }
    if trimmed.split('/').skip(1).any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err(bad("a mount path has no empty, '.' or '..' segments"));
    }
    Ok(trimmed.to_owned())
}

impl ServiceSpec {
    /// An HTTP service of `target` on `port` at `/`.
    pub fn new(port: u16, target: impl Into<String>) -> ServiceSpec {
        ServiceSpec {
            name: None,
            kind: ServiceKind::Http,
            cert_file: None,
            key_file: None,
            proxy_protocol: false,
            port,
            path: "/".into(),
            target: target.into(),
            strip_path: true,
            host_header: HostHeader::Keep,
            ca_file: None,
            access: None,
        }
    }

    /// This service at `path`.
    #[must_use]
    pub fn at(mut self, path: &str) -> ServiceSpec {
        self.path = path.into();
        self
    }

    /// A raw `tcp` or `tls` service of `target` on `port`.
    pub fn raw(kind: ServiceKind, port: u16, target: impl Into<String>) -> ServiceSpec {
        ServiceSpec { kind, ..ServiceSpec::new(port, target) }
    }

    /// The name it is referred to by: the given one, or `<port><path>` (`443/`, `443/api`),
    /// `tcp:<port>`, `tls:<port>`.
    pub fn id(&self) -> String {
        self.name.clone().unwrap_or_else(|| match self.kind {
            ServiceKind::Http => format!("{}{}", self.port, self.path),
            ServiceKind::Tcp => format!("tcp:{}", self.port),
            ServiceKind::Tls => format!("tls:{}", self.port),
        })
    }

    /// Checks everything that can be checked without I/O, and returns the parsed target and
    /// the clean mount path.
    ///
    /// # Errors
    /// [`ServiceError`] naming what is wrong.
    pub fn check(&self) -> Result<(Target, String), ServiceError> {
        if self.port == 0 {
            return Err(ServiceError::Port);
        }
        if let Some(name) = &self.name {
            let ok = |c: char| c.is_ascii_alphanumeric() || "-_/.".contains(c);
            if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
                return Err(ServiceError::Name(name.clone()));
            }
        }
        if let Some(access) = &self.access {
            if !self.kind.is_http() {
                return Err(ServiceError::Conflict(
                    "access rules are for http services: the edge passes tcp and tls connections through unopened"
                        .into(),
                ));
            }
            access.check()?;
        }
        if self.kind.is_http() {
            if self.cert_file.is_some() || self.key_file.is_some() || self.proxy_protocol {
                return Err(ServiceError::Conflict(
                    "cert_file, key_file and proxy_protocol belong to tcp and tls services".into(),
                ));
            }
            return Ok((Target::parse(&self.target)?, clean_mount(&self.path)?));
        }
        if self.path != "/" {
            return Err(ServiceError::Conflict("a tcp or tls service takes the whole port: no path".into()));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ServiceError::Conflict("cert_file and key_file go together".into()));
        }
        if self.kind == ServiceKind::Tcp && self.cert_file.is_some() {
            return Err(ServiceError::Conflict("cert_file is for tls services".into()));
        }
        Ok((Target::parse_tcp(&self.target)?, "/".into()))
    }

    /// The same service with its mount path cleaned (`/api/` -> `/api`), or why not.
    ///
    /// # Errors
    /// As [`ServiceSpec::check`].
    pub fn normalized(mut self) -> Result<ServiceSpec, ServiceError> {
        self.path = self.check()?.1;
        Ok(self)
    }
}

/// Where a request path goes under `mount`: `Some(rest)` with `rest` the path the origin sees
/// (starting with `/`), or `None` if the mount does not cover the path. `path_and_query`
/// begins with `/`; the query is kept.
pub fn under_mount(mount: &str, path_and_query: &str, strip: bool) -> Option<String> {
    let (path, query) = path_and_query.split_once('?').map_or((path_and_query, None), |(p, q)| (p, Some(q)));
    // The edges pick the access rule with the same test.
    if !warren_tunnel_proto::mount_covers(mount, path) {
        return None;
    }
    let rest = if strip && mount != "/" { &path[mount.len()..] } else { path };
    let rest = if rest.is_empty() { "/" } else { rest };
    Some(match query {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    })
}

/// Checks a set of services together: each valid, no port and path published twice, no name
/// used twice.
///
/// # Errors
/// The first problem, with the service's id.
pub fn check_all(specs: &[ServiceSpec]) -> Result<(), (String, ServiceError)> {
    let mut seen = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    for s in specs {
        let (_, mount) = s.check().map_err(|e| (s.id(), e))?;
        // HTTP and TLS passthrough share the public ports: one kind per port. TCP ports are
        // the edge's others.
        let key = match s.kind {
            ServiceKind::Tcp => (1, s.port, String::new()),
            _ => (0, s.port, mount.clone()),
        };
        if !seen.insert(key) {
            return Err((s.id(), ServiceError::Duplicate(format!("port {} path {mount}", s.port))));
        }
        let clash =
            |other: &ServiceSpec| other.kind != ServiceKind::Tcp && other.kind != s.kind && other.port == s.port;
        if s.kind != ServiceKind::Tcp && specs.iter().any(clash) {
            return Err((
                s.id(),
                ServiceError::Conflict(format!("port {} cannot carry both HTTP services and TLS passthrough", s.port)),
            ));
        }
        if !names.insert(s.id()) {
            return Err((s.id(), ServiceError::Duplicate(format!("the name {}", s.id()))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_in_every_form() {
        let http = |t: &str| match Target::parse(t) {
            Ok(Target::Http { origin, base, kind }) => (origin.to_string(), base, kind),
            other => panic!("{t}: {other:?}"),
        };
        assert_eq!(http("8080"), ("http://127.0.0.1:8080/".into(), String::new(), HttpKind::Plain));
        assert_eq!(http("10.0.0.5:80").0, "http://10.0.0.5:80/");
        assert_eq!(http("localhost:3000").0, "http://localhost:3000/");
        assert_eq!(http("http://localhost:3000/"), ("http://localhost:3000/".into(), String::new(), HttpKind::Plain));
        assert_eq!(http("http://h:1/app/v1/").1, "/app/v1");
        assert_eq!(http("https://example.com").2, HttpKind::Tls);
        assert_eq!(http("https+insecure://10.0.0.1:8443").0, "https://10.0.0.1:8443/");
        assert_eq!(http("h2c://127.0.0.1:50051").2, HttpKind::H2c);
        assert_eq!(Target::parse("unix:/run/a.sock"), Ok(Target::Unix { socket: "/run/a.sock".into() }));
        assert_eq!(Target::parse("/srv/site"), Ok(Target::Files("/srv/site".into())));
        assert_eq!(Target::parse("./public"), Ok(Target::Files("./public".into())));
        assert_eq!(Target::parse("file:site"), Ok(Target::Files("site".into())));
        assert_eq!(Target::parse("text:hi there"), Ok(Target::Text("hi there".into())));
        for bad in ["ftp://x", "not a target", "unix:relative.sock", "0", "http://", "http://u@h:1", "http://h/?q", ""]
        {
            assert!(Target::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Target::parse("https+insecure://h:1/b").map(|t| t.to_string()), Ok("https+insecure://h:1/b".into()));
    }

    #[test]
    fn mounts_are_clean_and_match_whole_segments() {
        assert_eq!(clean_mount("/").as_deref(), Ok("/"));
        assert_eq!(clean_mount("/api/").as_deref(), Ok("/api"));
        for bad in ["api", "/a//b", "/a/../b", "/a/./b", "/a?x", "/%2e%2e", "/a\\b"] {
            assert!(clean_mount(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(under_mount("/api", "/api", true).as_deref(), Some("/"));
        assert_eq!(under_mount("/api", "/api/users?x=1", true).as_deref(), Some("/users?x=1"));
        assert_eq!(under_mount("/api", "/api/users", false).as_deref(), Some("/api/users"));
        assert_eq!(under_mount("/api", "/apix", true), None);
        assert_eq!(under_mount("/api", "/", true), None);
        assert_eq!(under_mount("/", "/anything?q", true).as_deref(), Some("/anything?q"));
    }

    #[test]
    fn a_set_of_services_is_checked_together() {
        let a = ServiceSpec::new(443, "3000");
        let b = ServiceSpec::new(443, "4000").at("/api");
        assert_eq!(check_all(&[a.clone(), b.clone()]), Ok(()));
        let err = check_all(&[a.clone(), b, ServiceSpec::new(443, "5000").at("/api/")]).expect_err("duplicate");
        assert_eq!(err.0, "443/api/");
        assert!(matches!(err.1, ServiceError::Duplicate(_)), "{err:?}");
        let named = ServiceSpec { name: Some("bad name".into()), ..a.clone() };
        assert!(matches!(check_all(&[named]), Err((_, ServiceError::Name(_)))));
        assert_eq!(ServiceSpec { port: 0, ..a }.check(), Err(ServiceError::Port));
    }

    #[test]
    fn raw_services_take_a_whole_port() {
        let tcp = ServiceSpec::raw(ServiceKind::Tcp, 20001, "6379");
        assert_eq!(tcp.check().map(|t| t.0), Ok(Target::Tcp("127.0.0.1:6379".into())));
        assert_eq!(tcp.id(), "tcp:20001");
        assert_eq!(Target::parse_tcp("tcp://db:5432"), Ok(Target::Tcp("db:5432".into())));
        assert_eq!(Target::parse_tcp("[::1]:22"), Ok(Target::Tcp("[::1]:22".into())));
        assert!(Target::parse_tcp("http://x:1").is_err());
        let tls = ServiceSpec::raw(ServiceKind::Tls, 443, "8443");
        let http = ServiceSpec::new(443, "3000").at("/api");
        assert!(matches!(check_all(&[tls.clone(), http]), Err((_, ServiceError::Conflict(_)))));
        assert_eq!(check_all(&[tls.clone(), tcp.clone(), ServiceSpec::raw(ServiceKind::Tcp, 443, "22")]), Ok(()));
        assert!(matches!(check_all(&[tcp.clone(), tcp.clone()]), Err((_, ServiceError::Duplicate(_)))));
        let half = ServiceSpec { cert_file: Some("c.pem".into()), ..tls.clone() };
        assert!(matches!(half.check(), Err(ServiceError::Conflict(_))));
        assert!(matches!(ServiceSpec { path: "/x".into(), ..tcp.clone() }.check(), Err(ServiceError::Conflict(_))));
        let proxied_http = ServiceSpec { proxy_protocol: true, ..ServiceSpec::new(443, "1") };
        assert!(matches!(proxied_http.check(), Err(ServiceError::Conflict(_))));
    }

    #[test]
    fn specs_read_from_toml_with_defaults() {
        #[derive(Deserialize)]
        struct F {
            service: Vec<ServiceSpec>,
        }
        let f: F = toml::from_str(
            "[[service]]\ntarget = \"3000\"\n[[service]]\nport = 8443\npath = \"/ws\"\ntarget = \"http://h:1\"\nstrip_path = false\nhost_header = \"origin\"\n",
        )
        .expect("parse");
        assert_eq!(f.service[0], ServiceSpec::new(443, "3000"));
        assert_eq!(f.service[1].host_header, HostHeader::Origin);
        assert!(!f.service[1].strip_path);
        let bad: Result<F, _> = toml::from_str("[[service]]\ntarget = \"3000\"\ntypo = 1\n");
        assert!(bad.is_err());
    }
}
