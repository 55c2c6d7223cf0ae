//! Who may log in: every key (`open`), the keys of an allow-list file (re-read when it
//! changes), or whatever an HTTP callout answers.
//!
//! The callout follows the shape of Tailscale's `verify-client-url`: the relay POSTs
//! `{"NodePublic": "nodekey:<hex>", "Source": "<ip>"}` and expects `{"Allow": true|false}`
//! within `callout_timeout`. Answers are cached per key (moka) for `cache_ttl`; a failed
//! callout admits or refuses according to `fail_open` and is not cached. Mesh siblings are
//! admitted by the mesh key alone and never reach this module.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_common::url::RelayUrl;
use warren_relay_proto::PublicKey;

use crate::config::AdmissionConfig;

/// Largest callout answer read.
const MAX_ANSWER: usize = 16 << 10;
/// How often the allow-list file's modification time is checked.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The outcome of an admission check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow,
    /// Refused, with the reason told to the client.
    Deny(&'static str),
}

/// Outcome label for `relay_admission_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionResult {
    /// Admitted.
    Allowed,
    /// Refused by the list or the callout.
    Denied,
    /// The callout failed; `fail_open` decided.
    CalloutError,
}

impl AdmissionResult {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            AdmissionResult::Allowed => "allowed",
            AdmissionResult::Denied => "denied",
            AdmissionResult::CalloutError => "callout_error",
        }
    }
}

/// Why an allow-list file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("allow-list {path}: {reason}")]
pub struct AllowListError {
    path: PathBuf,
    reason: String,
}

/// The admission policy of a running relay.
#[derive(Debug)]
pub(crate) enum Admission {
    Open,
    AllowList { path: PathBuf, keys: Arc<RwLock<HashSet<PublicKey>>> },
    Callout(Callout),
}

#[derive(Debug)]
pub(crate) struct Callout {
    url: RelayUrl,
    ca_file: Option<PathBuf>,
    timeout: Duration,
    fail_open: bool,
    cache: moka::future::Cache<PublicKey, bool>,
}

impl Admission {
    /// Builds the policy; an allow-list is read now, so a bad file stops the start.
    ///
    /// # Errors
    /// [`AllowListError`] if the allow-list cannot be read or parsed.
    pub(crate) fn new(cfg: &AdmissionConfig) -> Result<Self, AllowListError> {
        Ok(match cfg {
            AdmissionConfig::Open => Admission::Open,
            AdmissionConfig::AllowList { file } => {
                let keys = read_allow_list(file)?;
                info!(file = %file.display(), keys = keys.len(), "admission: allow-list");
                Admission::AllowList { path: file.clone(), keys: Arc::new(RwLock::new(keys)) }
            }
            AdmissionConfig::Callout { url, ca_file, timeout, cache_ttl, fail_open } => {
                info!(%url, fail_open, "admission: callout");
                Admission::Callout(Callout {
                    url: url.clone(),
                    ca_file: ca_file.clone(),
                    timeout: *timeout,
                    fail_open: *fail_open,
                    cache: moka::future::Cache::builder().max_capacity(1 << 20).time_to_live(*cache_ttl).build(),
                })
            }
        })
    }

    /// Re-reads the allow-list whenever its modification time changes, until `cancel`.
    pub(crate) async fn watch(&self, cancel: CancellationToken) {
        let Admission::AllowList { path, keys } = self else { return };
        let mut seen = modified(path);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let now = modified(path);
            if now == seen {
                continue;
            }
            seen = now;
            match read_allow_list(path) {
                Ok(new) => {
                    info!(file = %path.display(), keys = new.len(), "allow-list reloaded");
                    *keys.write().unwrap_or_else(|e| e.into_inner()) = new;
                }
                Err(e) => warn!(error = %e, "allow-list not reloaded; keeping the previous one"),
            }
        }
    }

    /// Decides about `key` connecting from `source`.
    pub(crate) async fn check(&self, key: &PublicKey, source: IpAddr) -> (Verdict, AdmissionResult) {
        match self {
            Admission::Open => (Verdict::Allow, AdmissionResult::Allowed),
            Admission::AllowList { keys, .. } => {
                if keys.read().unwrap_or_else(|e| e.into_inner()).contains(key) {
                    (Verdict::Allow, AdmissionResult::Allowed)
                } else {
                    (Verdict::Deny("key not on the relay's allow-list"), AdmissionResult::Denied)
                }
            }
            Admission::Callout(c) => c.check(key, source).await,
        }
    }
}

impl Callout {
    async fn check(&self, key: &PublicKey, source: IpAddr) -> (Verdict, AdmissionResult) {
        if let Some(allow) = self.cache.get(key).await {
            return verdict(allow);
        }
        match tokio::time::timeout(self.timeout, self.ask(key, source)).await {
            Ok(Ok(allow)) => {
                self.cache.insert(*key, allow).await;
                verdict(allow)
            }
            Ok(Err(e)) => self.failed(&e),
            Err(_) => self.failed(&CalloutError::Timeout),
        }
    }

    fn failed(&self, e: &CalloutError) -> (Verdict, AdmissionResult) {
        warn!(url = %self.url.host, error = %e, kind = e.kind(), fail_open = self.fail_open, "admission callout failed");
        let v = if self.fail_open { Verdict::Allow } else { Verdict::Deny("admission check unavailable") };
        (v, AdmissionResult::CalloutError)
    }

    async fn ask(&self, key: &PublicKey, source: IpAddr) -> Result<bool, CalloutError> {
        #[derive(Deserialize)]
        struct Answer {
            #[serde(rename = "Allow")]
            allow: bool,
        }
        let body = serde_json::json!({"NodePublic": key.to_string(), "Source": source.to_string()}).to_string();
        let req = http::Request::post(&self.url.path)
            .header(http::header::HOST, self.url.authority())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(CalloutError::Connect)?;
        let resp = if self.url.tls {
            let cfg = warren_common::tls::client_config(self.ca_file.as_deref())?;
            let name = rustls_pki_types::ServerName::try_from(self.url.host.clone())
                .map_err(|_| CalloutError::ServerName(self.url.host.clone()))?;
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(CalloutError::Tls)?;
            warren_common::http1::request(TokioIo::new(tls), req).await?
        } else {
            warren_common::http1::request(TokioIo::new(tcp), req).await?
        };
        if !resp.status().is_success() {
            return Err(CalloutError::Status(resp.status()));
        }
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER).collect().await.map_err(CalloutError::Body)?.to_bytes();
        let answer: Answer = serde_json::from_slice(&bytes)?;
        Ok(answer.allow)
    }
}

/// Why an admission callout gave no answer (the login is then refused, or admitted with
/// `fail_open`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CalloutError {
    /// The callout endpoint could not be reached.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The CA file for an https callout is unusable.
    #[error(transparent)]
    TlsSetup(#[from] warren_common::tls::TlsError),
    /// The URL's host is not a valid TLS name.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// The TLS handshake failed (e.g. an untrusted certificate).
    #[error("tls: {0}")]
    Tls(std::io::Error),
    /// The request could not be built.
    #[error("request: {0}")]
    Request(#[from] http::Error),
    /// HTTP failed on the connection.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The endpoint answered with an error status.
    #[error("answered HTTP {0}")]
    Status(http::StatusCode),
    /// The answer body failed or was over the limit.
    #[error("answer body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// The answer is not the expected JSON.
    #[error("bad answer: {0}")]
    Answer(#[from] serde_json::Error),
    /// No answer within the callout timeout.
    #[error("timed out")]
    Timeout,
}

impl CalloutError {
    /// A short stable name for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            CalloutError::Connect(_) => "connect",
            CalloutError::TlsSetup(_) | CalloutError::ServerName(_) | CalloutError::Tls(_) => "tls",
            CalloutError::Request(_) | CalloutError::Http(_) => "http",
            CalloutError::Status(_) => "status",
            CalloutError::Body(_) | CalloutError::Answer(_) => "answer",
            CalloutError::Timeout => "timeout",
        }
    }
}

fn verdict(allow: bool) -> (Verdict, AdmissionResult) {
    if allow {
        (Verdict::Allow, AdmissionResult::Allowed)
    } else {
        (Verdict::Deny("refused by the relay's admission check"), AdmissionResult::Denied)
    }
}

/// A file's modification time, `None` when it cannot be read.
pub(crate) fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads one key per line (`nodekey:<hex>` or bare hex); `#` starts a comment.
fn read_allow_list(path: &Path) -> Result<HashSet<PublicKey>, AllowListError> {
    let err = |reason: String| AllowListError { path: path.to_path_buf(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse_allow_list(&text).map_err(err)
}

fn parse_allow_list(text: &str) -> Result<HashSet<PublicKey>, String> {
    let mut keys = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let key = PublicKey::from_hex(line).map_err(|_| format!("line {}: not a node key", n + 1))?;
        keys.insert(key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_lines() {
        let k = PublicKey::from_bytes([7; 32]);
        let text = format!("# region keys\n\n{k}   # laptop\n{}\n", PublicKey::from_bytes([8; 32]).to_hex());
        let keys = parse_allow_list(&text).expect("parses");
        assert!(keys.contains(&k) && keys.len() == 2);
        assert_eq!(parse_allow_list("nodekey:zz").err().as_deref(), Some("line 1: not a node key"));
    }
}
