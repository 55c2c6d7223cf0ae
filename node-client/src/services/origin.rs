//! Opened services: each target ready to answer (an HTTP client with its TLS settings, a Unix
//! socket client, a file root, a text), and the table that picks one per request.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use warren_tunnel_proto::AccessRule;

use super::files::{self, Files};
use super::raw::Raw;
use super::{under_mount, AccessBook, HostHeader, HttpKind, ServiceError, ServiceKind, ServiceSpec, Target};

/// Request and response bodies on the node.
pub type Body = BoxBody<Bytes, io::Error>;

type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;
type UnixClient = Client<UnixConnector, Body>;

/// Idle origin connections are kept this long for reuse.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// A service ready to answer requests.
#[derive(Debug)]
pub struct Service {
    /// As the user wrote it.
    pub spec: ServiceSpec,
    /// The clean mount path.
    pub mount: String,
    /// The parsed target.
    pub target: Target,
    origin: Origin,
    requests: AtomicU64,
}

#[derive(Debug)]
enum Origin {
    Http { client: HttpClient, origin: Uri, base: String },
    Unix(UnixClient),
    Files(Files),
    Text(Bytes),
    Raw(Raw),
}

/// Why an origin did not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    /// The request could not be rewritten for the origin.
    #[error("bad request for the origin: {0}")]
    Request(#[from] http::Error),
    /// Connecting or talking to the origin failed.
    #[error("{0}")]
    Unreachable(#[from] hyper_util::client::legacy::Error),
}

impl Service {
    /// Opens `spec`: checks it, reads its CA file or directory, builds its client.
    ///
    /// # Errors
    /// [`ServiceError`] saying what is wrong with this service.
    pub fn open(spec: &ServiceSpec) -> Result<Service, ServiceError> {
        let (target, mount) = spec.check()?;
        let origin = match &target {
            Target::Http { origin, base, kind } => {
                Origin::Http { client: http_client(*kind, spec)?, origin: origin.clone(), base: base.clone() }
            }
            Target::Unix { socket } => {
                let client = Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(POOL_IDLE)
                    .build(UnixConnector(Arc::new(socket.clone())));
                Origin::Unix(client)
            }
            Target::Files(path) => Origin::Files(Files::open(path)?),
            Target::Text(t) => Origin::Text(Bytes::from(t.clone())),
            Target::Tcp(addr) => Origin::Raw(Raw::open(addr, spec)?),
        };
        Ok(Service { spec: spec.clone(), mount, target, origin, requests: AtomicU64::new(0) })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Answers `req`, whose URI is the path (and query) under this service's mount; `public`
    /// is the path the visitor asked for.
    ///
    /// # Errors
    /// [`OriginError`] when the origin cannot be reached; the caller answers 502.
    pub async fn serve(&self, mut req: Request<Body>, public: &str) -> Result<Response<Body>, OriginError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let rest = req.uri().path_and_query().map_or("/", PathAndQuery::as_str).to_owned();
        match &self.origin {
            Origin::Http { client, origin, base } => {
                let authority = origin.authority().cloned();
                *req.uri_mut() = origin_uri(origin.scheme().cloned(), authority.clone(), base, &rest)?;
                self.set_host(&mut req, authority.as_ref().map(Authority::as_str));
                Ok(client.request(req).await?.map(|b| b.map_err(io::Error::other).boxed()))
            }
            Origin::Unix(client) => {
                let authority = Authority::from_static("localhost");
                *req.uri_mut() = origin_uri(Some(Scheme::HTTP), Some(authority), "", &rest)?;
                self.set_host(&mut req, Some("localhost"));
                Ok(client.request(req).await?.map(|b| b.map_err(io::Error::other).boxed()))
            }
            Origin::Files(f) => Ok(f.serve(req.method(), &rest, public, req.headers()).await),
            Origin::Text(t) => {
                let mut r = Response::new(Full::new(t.clone()).map_err(|never| match never {}).boxed());
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
                Ok(r)
            }
            Origin::Raw(_) => Ok(no_mount()),
        }
    }

    /// The raw side of a `tcp` or `tls` service.
    pub fn raw(&self) -> Option<&Raw> {
        match &self.origin {
            Origin::Raw(r) => Some(r),
            _ => None,
        }
    }

    /// Counts a connection as a request.
    pub(crate) fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn set_host(&self, req: &mut Request<Body>, origin: Option<&str>) {
        let host = match &self.spec.host_header {
            HostHeader::Keep => return,
            HostHeader::Origin => origin,
            HostHeader::Fixed(h) => Some(h.as_str()),
        };
        if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
}

fn origin_uri(
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    base: &str,
    rest: &str,
) -> Result<Uri, http::Error> {
    let mut b = Uri::builder();
    if let Some(s) = scheme {
        b = b.scheme(s);
    }
    if let Some(a) = authority {
        b = b.authority(a);
    }
    b.path_and_query(format!("{base}{rest}")).build()
}

fn http_client(kind: HttpKind, spec: &ServiceSpec) -> Result<HttpClient, ServiceError> {
    let tls = match kind {
        HttpKind::TlsInsecure => {
            let provider = warren_common::tls::provider();
            let verifier = Arc::new(AnyCertificate(provider.clone()));
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| ServiceError::Open(format!("TLS: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
        _ => {
            let cfg = warren_common::tls::client_config(spec.ca_file.as_deref())
                .map_err(|e| ServiceError::Open(format!("ca_file: {e}")))?;
            let mut cfg = (*cfg).clone();
            cfg.alpn_protocols.clear(); // offered below: h2 and http/1.1
            cfg
        }
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let mut builder = Client::builder(TokioExecutor::new());
    builder.pool_idle_timeout(POOL_IDLE);
    if kind == HttpKind::H2c {
        builder.http2_only(true);
    }
    Ok(builder.build(connector))
}

/// Accepts any certificate (for `https+insecure://`), still checking the handshake signature.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects every request to one Unix socket.
#[derive(Debug, Clone)]
struct UnixConnector(Arc<PathBuf>);

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            tokio::net::UnixStream::connect(&*path)
                .await
                .map(TokioIo::new)
                .map_err(|e| io::Error::new(e.kind(), format!("unix socket {}: {e}", path.display())))
        })
    }
}

/// The services a node publishes, opened, and the one lookup per request.
#[derive(Debug, Default)]
pub struct ServiceTable {
    /// Sorted by port, then longest mount first.
    services: Vec<Arc<Service>>,
    /// The access rules of the HTTP services, for the edges.
    access: AccessBook,
}

/// A service that could not be opened: its id and why.
pub type Broken = (String, ServiceError);

impl ServiceTable {
    /// Opens every spec; one that fails is left out and reported, the others are served.
    pub fn open(specs: &[ServiceSpec]) -> (ServiceTable, Vec<Broken>) {
        let mut services = Vec::new();
        let mut broken = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for spec in specs {
            match Service::open(spec) {
                Ok(s) if !seen.insert((s.spec.kind == ServiceKind::Tcp, s.spec.port, s.mount.clone())) => {
                    broken.push((spec.id(), ServiceError::Duplicate(format!("port {} path {}", s.spec.port, s.mount))));
                }
                Ok(s) => services.push(Arc::new(s)),
                Err(e) => broken.push((spec.id(), e)),
            }
        }
        services.sort_by(|a, b| a.spec.port.cmp(&b.spec.port).then(b.mount.len().cmp(&a.mount.len())));
        let access = AccessBook::next(&AccessBook::default(), access_rules(&services));
        (ServiceTable { services, access }, broken)
    }

    /// This table's rules as the next generation after `old`'s (the same one when nothing
    /// changed).
    #[must_use]
    pub fn after(mut self, old: &ServiceTable) -> ServiceTable {
        self.access = AccessBook::next(&old.access, std::mem::take(&mut self.access.rules));
        self
    }

    /// The access rules for the edges.
    pub fn access(&self) -> &AccessBook {
        &self.access
    }

    /// Keeps the request counts of services that are in both tables (same id, target and
    /// mount), so a reload does not reset them.
    pub fn carry_counts_from(&self, old: &ServiceTable) {
        for s in &self.services {
            if let Some(o) = old.services.iter().find(|o| o.spec == s.spec) {
                s.requests.store(o.requests(), Ordering::Relaxed);
            }
        }
    }

    /// The service for a request on `port` to `path_and_query`, and the path it forwards.
    pub fn route(&self, port: u16, path_and_query: &str) -> Option<(Arc<Service>, String)> {
        self.services
            .iter()
            .filter(|s| s.spec.port == port && s.spec.kind == ServiceKind::Http)
            .find_map(|s| under_mount(&s.mount, path_and_query, s.spec.strip_path).map(|rest| (s.clone(), rest)))
    }

    /// The `kind` service on `port`, for a connection.
    pub fn route_conn(&self, kind: ServiceKind, port: u16) -> Option<Arc<Service>> {
        self.services.iter().find(|s| s.spec.kind == kind && s.spec.port == port).cloned()
    }

    /// The public HTTPS ports with at least one HTTP service, ascending.
    pub fn ports(&self) -> Vec<u16> {
        self.ports_of(ServiceKind::Http)
    }

    /// The ports of the `kind` services, ascending.
    pub fn ports_of(&self, kind: ServiceKind) -> Vec<u16> {
        let mut ports: Vec<u16> = self.services.iter().filter(|s| s.spec.kind == kind).map(|s| s.spec.port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Every service, by port then longest mount.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// No service at all.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// One rule per HTTP service, open where the service has none.
fn access_rules(services: &[Arc<Service>]) -> Vec<AccessRule> {
    services
        .iter()
        .filter(|s| s.spec.kind == ServiceKind::Http)
        .map(|s| match &s.spec.access {
            Some(a) => a.rule(s.spec.port, &s.mount),
            None => AccessRule { port: s.spec.port, path: s.mount.clone(), ..AccessRule::default() },
        })
        .collect()
}

/// The answer for a request no mount matches.
pub(crate) fn no_mount() -> Response<Body> {
    files::text(StatusCode::NOT_FOUND, "Nothing is published at this path.\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_mount_on_the_port_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let specs = [
            ServiceSpec::new(443, "text:root"),
            ServiceSpec::new(443, "text:api").at("/api"),
            ServiceSpec::new(443, "text:v1").at("/api/v1/"),
            ServiceSpec { strip_path: false, ..ServiceSpec::new(8443, "text:keep").at("/ws") },
            ServiceSpec::new(443, dir.path().join("missing").display().to_string()).at("/files"),
            ServiceSpec::new(443, "text:again").at("/api"),
        ];
        let (table, broken) = ServiceTable::open(&specs);
        assert_eq!(table.ports(), [443, 8443]);
        let ids: Vec<&str> = broken.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["443/files", "443/api"], "{broken:?}");
        assert!(broken[0].1.to_string().contains("missing"), "{}", broken[0].1);
        let route = |port, p: &str| table.route(port, p).map(|(s, rest)| (s.spec.target.clone(), rest));
        assert_eq!(route(443, "/"), Some(("text:root".into(), "/".into())));
        assert_eq!(route(443, "/apix"), Some(("text:root".into(), "/apix".into())));
        assert_eq!(route(443, "/api/users?a=1"), Some(("text:api".into(), "/users?a=1".into())));
        assert_eq!(route(443, "/api/v1/x"), Some(("text:v1".into(), "/x".into())));
        assert_eq!(route(8443, "/ws/chat"), Some(("text:keep".into(), "/ws/chat".into())));
        assert_eq!(route(8443, "/other"), None);
        assert_eq!(route(10000, "/"), None);
        // The files mount that failed to open is not served; "/" answers in its place.
        assert_eq!(route(443, "/files/a").map(|r| r.0), Some("text:root".into()));
    }
}
