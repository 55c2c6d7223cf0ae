//! Forward-auth: the edge asks an operator's endpoint about each request and lets the answer
//! decide, as Caddy's `forward_auth` and Traefik's ForwardAuth do.
//!
//! ```text
//! edge -> endpoint  GET <url>  the visitor's headers (hop-by-hop and X-Forwarded-* removed)
//!                   + X-Forwarded-Method, -Proto (https), -Host, -Uri, -For (the socket's address)
//! endpoint -> edge  2xx: allowed; `copy_headers` of the answer go on to the node
//!                   other status: refused; the answer (status, headers, body) goes to the visitor
//!                   no answer within `timeout`, a broken answer, a body over 64 KiB: refused (503)
//! ```
//!
//! Answers are reused for `cache` when the same request comes again (same method, host, URI,
//! visitor address and headers); failures are never cached.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};
use warren_common::limits::LogLimiter;
use warren_tunnel::is_hop_by_hop;
use warren_tunnel_proto::{Header, RequestHead};

use super::{Reason, Refusal};
use crate::config::ForwardAuthConfig;

/// Largest answer body passed to a visitor.
const MAX_ANSWER: usize = 64 << 10;
/// Answers remembered at most.
const CACHE_MAX: u64 = 10_000;

/// What an endpoint answered.
#[derive(Debug)]
enum Answer {
    /// 2xx, with the headers to copy.
    Allow(Vec<Header>),
    /// Any other status, passed to the visitor.
    Deny { status: StatusCode, headers: Vec<(HeaderName, HeaderValue)>, body: Bytes },
}

/// Why an endpoint gave no answer.
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("invalid TLS server name")]
    ServerName,
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("answer body over {MAX_ANSWER} bytes or broken")]
    Body,
    #[error("timed out")]
    Timeout,
}

impl AskError {
    fn kind(&self) -> &'static str {
        match self {
            AskError::Connect(_) => "connect",
            AskError::Tls(_) | AskError::ServerName => "tls",
            AskError::Request(_) | AskError::Http(_) => "http",
            AskError::Body => "answer",
            AskError::Timeout => "timeout",
        }
    }
}

/// One configured endpoint.
#[derive(Debug)]
pub(crate) struct ForwardAuth {
    cfg: ForwardAuthConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    cache: Option<moka::future::Cache<[u8; 32], Arc<Answer>>>,
    logs: LogLimiter,
}

impl ForwardAuth {
    /// # Errors
    /// The endpoint's CA file is unusable.
    pub(crate) fn new(cfg: ForwardAuthConfig) -> Result<Self, warren_common::tls::TlsError> {
        let tls = match cfg.url.tls {
            true => Some(warren_common::tls::client_config(cfg.ca_file.as_deref())?),
            false => None,
        };
        let cache = (!cfg.cache.is_zero())
            .then(|| moka::future::Cache::builder().max_capacity(CACHE_MAX).time_to_live(cfg.cache).build());
        Ok(ForwardAuth { cfg, tls, cache, logs: LogLimiter::new(std::time::Duration::from_secs(10)) })
    }

    /// The name services refer to it by.
    pub(crate) fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Asks (or remembers) about a request: on success the headers to add and the ones to
    /// remove from the visitor's request first.
    ///
    /// # Errors
    /// The endpoint's refusal, or [`Reason::ForwardUnavailable`] when it gave no answer.
    pub(super) async fn decide(
        &self,
        head: &RequestHead,
        ip: IpAddr,
        host: &str,
    ) -> Result<(Vec<Header>, Vec<HeaderName>), Refusal> {
        let sent = self.headers(head, ip, host);
        let key = cache_key(&sent);
        let cached = match &self.cache {
            Some(c) => c.get(&key).await,
            None => None,
        };
        let answer = match cached {
            Some(a) => a,
            None => match tokio::time::timeout(self.cfg.timeout, self.ask(&sent)).await {
                Ok(Ok(a)) => {
                    let a = Arc::new(a);
                    if let Some(c) = &self.cache {
                        c.insert(key, a.clone()).await;
                    }
                    a
                }
                Ok(Err(e)) => return Err(self.failed(&e)),
                Err(_) => return Err(self.failed(&AskError::Timeout)),
            },
        };
        match &*answer {
            Answer::Allow(add) => Ok((add.clone(), self.cfg.copy_headers.clone())),
            Answer::Deny { status, headers, body } => {
                debug!(endpoint = %self.cfg.name, %status, "forward-auth refused a request");
                let mut r = Refusal::new(Reason::ForwardDenied);
                r.status = *status;
                r.headers = headers.clone();
                r.body = Some(body.clone());
                Err(r)
            }
        }
    }

    fn failed(&self, e: &AskError) -> Refusal {
        if let Some(skipped) = self.logs.allow() {
            warn!(endpoint = %self.cfg.name, error = %e, kind = e.kind(), skipped, "forward-auth gave no answer; refusing");
        }
        Refusal::new(Reason::ForwardUnavailable)
    }

    /// The headers sent to the endpoint.
    fn headers(&self, head: &RequestHead, ip: IpAddr, host: &str) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = head
            .headers
            .iter()
            .filter(|(n, _)| {
                let n = n.to_ascii_lowercase();
                !(is_hop_by_hop(&n, false)
                    || n == "host"
                    || n == "content-length"
                    || n == "forwarded"
                    || n.starts_with("x-forwarded-"))
            })
            .cloned()
            .collect();
        out.push(("x-forwarded-method".into(), head.method.clone().into_bytes()));
        out.push(("x-forwarded-proto".into(), b"https".to_vec()));
        out.push(("x-forwarded-host".into(), host.as_bytes().to_vec()));
        out.push(("x-forwarded-uri".into(), head.uri.clone().into_bytes()));
        out.push(("x-forwarded-for".into(), ip.to_canonical().to_string().into_bytes()));
        out
    }

    async fn ask(&self, sent: &[(String, Vec<u8>)]) -> Result<Answer, AskError> {
        let url = &self.cfg.url;
        let mut req = http::Request::get(&url.path).header(http::header::HOST, url.authority());
        for (n, v) in sent {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_bytes(v)) {
                req = req.header(n, v);
            }
        }
        let req = req.body(Empty::<Bytes>::new())?;
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await.map_err(AskError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let resp = match &self.tls {
            Some(cfg) => {
                let name =
                    rustls_pki_types::ServerName::try_from(url.host.clone()).map_err(|_| AskError::ServerName)?;
                let tls =
                    tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp).await.map_err(AskError::Tls)?;
                warren_common::http1::request(TokioIo::new(tls), req).await?
            }
            None => warren_common::http1::request(TokioIo::new(tcp), req).await?,
        };
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_ANSWER).collect().await.map_err(|_| AskError::Body)?.to_bytes();
        if parts.status.is_success() {
            let copied = self
                .cfg
                .copy_headers
                .iter()
                .flat_map(|n| {
                    parts.headers.get_all(n).iter().map(move |v| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                })
                .collect();
            return Ok(Answer::Allow(copied));
        }
        let headers = parts
            .headers
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n.as_str(), false) && *n != http::header::CONTENT_LENGTH)
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        Ok(Answer::Deny { status: parts.status, headers, body })
    }
}

/// A digest of everything the endpoint is told, so a cached answer is one to the same question.
fn cache_key(sent: &[(String, Vec<u8>)]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (n, v) in sent {
        ctx.update(&(n.len() as u64).to_be_bytes());
        ctx.update(n.as_bytes());
        ctx.update(&(v.len() as u64).to_be_bytes());
        ctx.update(v);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
