//! Certificates from an ACME CA (RFC 8555) with instant-acme, for the edge and the relay.
//!
//! Per name the owner calls [`Acme::ensure`], which orders a certificate unless a fresh one is
//! cached, proves control with the configured challenge, saves the result in the
//! [`CertCache`] and installs it in the [`CertStore`] at once. [`Acme::renew_loop`] renews at
//! two thirds of a certificate's lifetime; an issuance lock in the cache makes sure one order
//! runs per name when several servers share it. Challenges:
//!
//! - `http-01`: [`Acme::serve_http01`] answers `/.well-known/acme-challenge/<token>` (and
//!   redirects everything else to HTTPS);
//! - `tls-alpn-01`: the owner's TLS listener resolves certificates through the [`CertStore`]
//!   and offers ALPN `acme-tls/1` ([`ACME_TLS_ALPN`]), so validation connections get the
//!   challenge certificate for the name;
//! - `dns-01`: a hook program publishes the TXT record: `HOOK set|clear <fqdn> <value>`.

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use metrics::{Counter, Gauge};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::certs::CertStore;
pub use crate::certs::ACME_TLS_ALPN;
use crate::config::{socket_addr, ConfigDuration, ConfigError};
use crate::der;

/// `[acme]` of a configuration file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeFile {
    /// Directory URL of the CA.
    pub directory: Option<String>,
    /// Contact URIs, e.g. "mailto:ops@example.com".
    #[serde(default)]
    pub contact: Vec<String>,
    /// Extra root CA (PEM) to trust for the ACME server's HTTPS.
    pub ca_file: Option<PathBuf>,
    /// "http-01" (default), "tls-alpn-01" or "dns-01".
    pub challenge: Option<Challenge>,
    /// Where HTTP-01 answers are served (default 0.0.0.0:80).
    pub http01_listen: Option<String>,
    /// Program publishing DNS-01 TXT records: `HOOK set|clear <fqdn> <value>`.
    pub dns01_hook: Option<PathBuf>,
    /// With dns-01: one wildcard certificate instead of one per name (the edge's funnel
    /// domain).
    pub wildcard: Option<bool>,
    /// How often certificates are checked for renewal, e.g. "1h".
    pub renew_check_interval: Option<ConfigDuration>,
}

/// ACME challenge type (`acme.challenge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Challenge {
    /// HTTP-01 on the HTTP listener.
    #[serde(rename = "http-01")]
    Http01,
    /// TLS-ALPN-01 on the TLS listeners.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// DNS-01 through the hook.
    #[serde(rename = "dns-01")]
    Dns01,
}

/// Checked ACME settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// Directory URL.
    pub directory: String,
    /// Contacts.
    pub contact: Vec<String>,
    /// Extra root for the ACME server.
    pub ca_file: Option<PathBuf>,
    /// Challenge type.
    pub challenge: Challenge,
    /// HTTP-01 listener.
    pub http01_listen: SocketAddr,
    /// DNS-01 hook.
    pub dns01_hook: Option<PathBuf>,
    /// One wildcard certificate.
    pub wildcard: bool,
    /// Renewal check interval.
    pub renew_check_interval: Duration,
}

impl AcmeSettings {
    /// Checks `[acme]` (required when `tls.mode = "acme"`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key at fault.
    pub fn from_file(a: AcmeFile) -> Result<Self, ConfigError> {
        let directory =
            a.directory.ok_or_else(|| ConfigError::invalid("acme.directory", "required when tls.mode = \"acme\""))?;
        if !directory.starts_with("https://") {
            return Err(ConfigError::invalid("acme.directory", "must be an https:// URL"));
        }
        let challenge = a.challenge.unwrap_or(Challenge::Http01);
        let wildcard = a.wildcard.unwrap_or(false);
        if challenge == Challenge::Dns01 && a.dns01_hook.is_none() {
            return Err(ConfigError::invalid("acme.dns01_hook", "required for dns-01"));
        }
        if wildcard && challenge != Challenge::Dns01 {
            return Err(ConfigError::invalid("acme.wildcard", "wildcard certificates need the dns-01 challenge"));
        }
        Ok(AcmeSettings {
            directory,
            contact: a.contact,
            ca_file: a.ca_file,
            challenge,
            http01_listen: socket_addr("acme.http01_listen", a.http01_listen.as_deref().unwrap_or("0.0.0.0:80"))?,
            dns01_hook: a.dns01_hook,
            wildcard,
            renew_check_interval: ConfigDuration::or(a.renew_check_interval, Duration::from_secs(3600)),
        })
    }
}

/// A certificate as stored: PEM chain and PEM private key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredCert {
    /// The name it was issued for (may be `*.domain`).
    pub name: String,
    /// PEM chain.
    pub chain_pem: String,
    /// PEM key.
    pub key_pem: String,
}

impl std::fmt::Debug for StoredCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCert").field("name", &self.name).field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// What a [`CertCache`] call returns.
pub type CacheFuture<'a, T> = Pin<Box<dyn Future<Output = std::io::Result<T>> + Send + 'a>>;

/// Where issued certificates and issuance locks live: a directory ([`FileCertCache`]) for one
/// server, or a store several servers share.
pub trait CertCache: Send + Sync + std::fmt::Debug {
    /// Every stored certificate.
    fn load_all(&self) -> CacheFuture<'_, Vec<StoredCert>>;
    /// Saves (or replaces) a certificate.
    fn save<'a>(&'a self, cert: &'a StoredCert) -> CacheFuture<'a, ()>;
    /// Takes the issuance lock of `name` for `ttl`; false if someone else holds it.
    fn try_lock<'a>(&'a self, name: &'a str, ttl: Duration) -> CacheFuture<'a, bool>;
    /// Releases the issuance lock of `name` if this cache still holds it.
    fn unlock<'a>(&'a self, name: &'a str) -> CacheFuture<'a, ()>;
}

/// Certificates as files `<dir>/<name>.crt` and `.key` (mode 0600); locks as `<dir>/<name>.lock`.
#[derive(Debug)]
pub struct FileCertCache {
    dir: PathBuf,
}

impl FileCertCache {
    /// A cache in `dir` (created if missing).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(FileCertCache { dir: dir.to_path_buf() })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str, ext: &str) -> PathBuf {
        // `*` is not a good file-name character: wildcards are stored as `_wildcard_.domain`.
        self.dir.join(format!("{}.{ext}", name.replace('*', "_wildcard_")))
    }

    fn load_all_now(&self) -> std::io::Result<Vec<StoredCert>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("crt") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
            let key = path.with_extension("key");
            if let (Ok(chain_pem), Ok(key_pem)) = (fs::read_to_string(&path), fs::read_to_string(&key)) {
                out.push(StoredCert { name: stem.replace("_wildcard_", "*"), chain_pem, key_pem });
            }
        }
        Ok(out)
    }

    fn save_now(&self, cert: &StoredCert) -> std::io::Result<()> {
        // Key first, both via rename, so a reader never pairs a new chain with an old key.
        for (ext, data, mode) in [("key", &cert.key_pem, 0o600), ("crt", &cert.chain_pem, 0o644)] {
            let final_path = self.file(&cert.name, ext);
            let tmp = final_path.with_extension(format!("{ext}.tmp"));
            let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
            f.write_all(data.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &final_path)?;
        }
        Ok(())
    }

    fn try_lock_now(&self, name: &str, ttl: Duration) -> bool {
        let path = self.file(name, "lock");
        let stale = fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() > ttl);
        if stale {
            let _ = fs::remove_file(&path);
        }
        fs::OpenOptions::new().write(true).create_new(true).open(&path).is_ok()
    }
}

/// The files are small and local: read and written in place.
impl CertCache for FileCertCache {
    fn load_all(&self) -> CacheFuture<'_, Vec<StoredCert>> {
        Box::pin(std::future::ready(self.load_all_now()))
    }

    fn save<'a>(&'a self, cert: &'a StoredCert) -> CacheFuture<'a, ()> {
        Box::pin(std::future::ready(self.save_now(cert)))
    }

    fn try_lock<'a>(&'a self, name: &'a str, ttl: Duration) -> CacheFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(self.try_lock_now(name, ttl))))
    }

    fn unlock<'a>(&'a self, name: &'a str) -> CacheFuture<'a, ()> {
        let _ = fs::remove_file(self.file(name, "lock"));
        Box::pin(std::future::ready(Ok(())))
    }
}

/// How long an issuance lock is held at most.
const LOCK_TTL: Duration = Duration::from_secs(300);

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// The ACME server or client library failed.
    #[error("acme: {0}")]
    Acme(#[from] instant_acme::Error),
    /// The order ended in an unexpected state.
    #[error("order ended {0}")]
    Order(String),
    /// Storage failed.
    #[error("store: {0}")]
    Store(#[from] std::io::Error),
    /// The issued certificate or key is unusable, or a challenge could not be set up.
    #[error("{0}")]
    Other(String),
}

/// The ACME manager of one server.
pub struct Acme {
    settings: AcmeSettings,
    account: OnceCell<Account>,
    store: Arc<dyn CertCache>,
    certs: Arc<CertStore>,
    http01: RwLock<HashMap<String, String>>,
    not_after: RwLock<HashMap<String, (i64, i64)>>,
    orders_ok: Counter,
    orders_failed: Counter,
    expiry: Gauge,
    state_dir: PathBuf,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").field("settings", &self.settings).field("store", &self.store).finish_non_exhaustive()
    }
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Acme {
    /// A manager storing certificates in `store` and installing them in `certs`, keeping its
    /// account in `state_dir` and counting in `<metrics>_acme_orders_total{result}` and
    /// `<metrics>_cert_expiry_seconds` (e.g. `edge`, `relay`). Call [`Acme::reload`] to
    /// install the certificates already in the store.
    pub fn new(
        settings: AcmeSettings,
        store: Arc<dyn CertCache>,
        certs: Arc<CertStore>,
        state_dir: PathBuf,
        metrics: &str,
    ) -> Arc<Self> {
        Arc::new(Acme {
            settings,
            account: OnceCell::new(),
            store,
            certs,
            http01: RwLock::new(HashMap::new()),
            not_after: RwLock::new(HashMap::new()),
            orders_ok: metrics::counter!(format!("{metrics}_acme_orders_total"), "result" => "ok"),
            orders_failed: metrics::counter!(format!("{metrics}_acme_orders_total"), "result" => "error"),
            expiry: metrics::gauge!(format!("{metrics}_cert_expiry_seconds")),
            state_dir,
        })
    }

    /// Installs every certificate in the store (also picks up ones another server issued).
    pub async fn reload(&self) {
        let all = match self.store.load_all().await {
            Ok(all) => all,
            Err(e) => return warn!(error = %e, "cannot read the certificate store"),
        };
        for c in all {
            if let Err(e) = self.install(&c) {
                warn!(name = %c.name, error = %e, "stored certificate unusable");
            }
        }
    }

    fn install(&self, c: &StoredCert) -> Result<(), AcmeError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| AcmeError::Other("invalid PEM chain".into()))?;
        let leaf = chain.first().ok_or_else(|| AcmeError::Other("empty chain".into()))?;
        let validity = der::validity(leaf).ok_or_else(|| AcmeError::Other("unreadable validity".into()))?;
        let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
            .map_err(|_| AcmeError::Other("invalid PEM key".into()))?;
        self.certs.insert(std::slice::from_ref(&c.name), chain, key).map_err(|e| AcmeError::Other(e.to_string()))?;
        let mut na = self.not_after.write().unwrap_or_else(|e| e.into_inner());
        na.insert(c.name.clone(), validity);
        let soonest = na.values().map(|(_, after)| *after).min().unwrap_or(0);
        self.expiry.set((soonest - now_unix()) as f64);
        Ok(())
    }

    /// How often the owner should check its certificates for renewal.
    pub fn renew_check_interval(&self) -> Duration {
        self.settings.renew_check_interval
    }

    /// Whether `name` has a certificate that does not need renewing yet.
    pub fn is_fresh(&self, name: &str) -> bool {
        let na = self.not_after.read().unwrap_or_else(|e| e.into_inner());
        na.get(name).is_some_and(|(before, after)| now_unix() < before + (after - before) * 2 / 3)
    }

    /// The HTTP-01 key authorization for `token`, if a challenge is pending.
    pub fn http01_answer(&self, token: &str) -> Option<String> {
        self.http01.read().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }

    /// Makes sure `name` has a fresh certificate, ordering one if needed.
    ///
    /// # Errors
    /// [`AcmeError`] if the order fails (counted in `edge_acme_orders_total{result="error"}`).
    pub async fn ensure(&self, name: &str) -> Result<(), AcmeError> {
        if self.is_fresh(name) {
            return Ok(());
        }
        // Another server sharing the store may have issued it already, or be ordering it now:
        // then wait for it to appear there, and take over if that server lets go without it.
        let deadline = tokio::time::Instant::now() + LOCK_TTL;
        let mut waiting = false;
        loop {
            self.reload().await;
            if self.is_fresh(name) {
                return Ok(());
            }
            if self.store.try_lock(name, LOCK_TTL).await? {
                break;
            }
            if !waiting {
                info!(%name, "another server is ordering this certificate; waiting for it in the store");
                waiting = true;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AcmeError::Other(format!("no certificate for {name} while another server held the lock")));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let result = self.order(name).await;
        if let Err(e) = self.store.unlock(name).await {
            warn!(%name, error = %e, "cannot release the issuance lock; it expires on its own");
        }
        match &result {
            Ok(()) => {
                self.orders_ok.increment(1);
                info!(%name, "certificate issued");
            }
            Err(e) => {
                self.orders_failed.increment(1);
                warn!(%name, error = %e, "certificate order failed");
            }
        }
        result
    }

    async fn account(&self) -> Result<&Account, AcmeError> {
        self.account
            .get_or_try_init(|| async {
                let path = self.state_dir.join("acme-account.json");
                let builder = match &self.settings.ca_file {
                    Some(ca) => Account::builder_with_root(ca)?,
                    None => Account::builder()?,
                };
                if let Ok(saved) = std::fs::read(&path) {
                    if let Ok(creds) = serde_json::from_slice(&saved) {
                        return Ok(builder.from_credentials(creds).await?);
                    }
                }
                let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
                let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
                let (account, creds) = builder.create(&new, self.settings.directory.clone(), None).await?;
                if let Ok(json) = serde_json::to_vec(&creds) {
                    self.store_private(&path, &json)?;
                }
                Ok(account)
            })
            .await
    }

    fn store_private(&self, path: &std::path::Path, data: &[u8]) -> Result<(), AcmeError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        f.write_all(data)?;
        Ok(())
    }

    async fn order(&self, name: &str) -> Result<(), AcmeError> {
        let account = self.account().await?;
        let ids = [Identifier::Dns(name.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let mut cleanup: Vec<Cleanup> = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            if authz.status == AuthorizationStatus::Valid {
                continue; // reused from an earlier order
            }
            let kind = match self.settings.challenge {
                Challenge::Http01 => ChallengeType::Http01,
                Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                Challenge::Dns01 => ChallengeType::Dns01,
            };
            let missing = format!("the CA offers no {kind:?} challenge");
            let mut challenge = authz.challenge(kind).ok_or(AcmeError::Other(missing))?;
            let key_auth = challenge.key_authorization();
            match self.settings.challenge {
                Challenge::Http01 => {
                    let token = challenge.token.clone();
                    self.http01
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(token.clone(), key_auth.as_str().to_owned());
                    cleanup.push(Cleanup::Http01(token));
                }
                Challenge::TlsAlpn01 => {
                    let (chain, key) = alpn_challenge_cert(name, key_auth.digest().as_ref())?;
                    self.certs.insert_alpn_challenge(name, chain, key).map_err(|e| AcmeError::Other(e.to_string()))?;
                    cleanup.push(Cleanup::Alpn(name.to_owned()));
                }
                Challenge::Dns01 => {
                    let fqdn = format!("_acme-challenge.{}", name.trim_start_matches("*."));
                    let value = key_auth.dns_value();
                    self.dns_hook("set", &fqdn, &value).await?;
                    cleanup.push(Cleanup::Dns(fqdn, value));
                }
            }
            challenge.set_ready().await?;
        }
        let retry = RetryPolicy::new().initial_delay(Duration::from_millis(250)).timeout(Duration::from_secs(90));
        let status = order.poll_ready(&retry).await;
        for c in cleanup {
            match c {
                Cleanup::Http01(t) => {
                    self.http01.write().unwrap_or_else(|e| e.into_inner()).remove(&t);
                }
                Cleanup::Alpn(n) => self.certs.remove_alpn_challenge(&n),
                Cleanup::Dns(fqdn, value) => {
                    let _ = self.dns_hook("clear", &fqdn, &value).await;
                }
            }
        }
        let status = status?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(format!("{status:?}")));
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retry).await?;
        let stored = StoredCert { name: name.to_owned(), chain_pem, key_pem };
        self.store.save(&stored).await?;
        self.install(&stored)
    }

    async fn dns_hook(&self, action: &str, fqdn: &str, value: &str) -> Result<(), AcmeError> {
        let hook =
            self.settings.dns01_hook.as_ref().ok_or_else(|| AcmeError::Other("dns-01 needs acme.dns01_hook".into()))?;
        let status = tokio::process::Command::new(hook)
            .args([action, fqdn, value])
            .status()
            .await
            .map_err(|e| AcmeError::Other(format!("dns01 hook {}: {e}", hook.display())))?;
        if !status.success() {
            return Err(AcmeError::Other(format!("dns01 hook {} {action} exited with {status}", hook.display())));
        }
        Ok(())
    }

    /// Re-checks every certificate now and then, renewing at two thirds of its lifetime.
    pub async fn renew_loop(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.renew_check_interval) => {}
            }
            self.reload().await;
            let due: Vec<String> = {
                let na = self.not_after.read().unwrap_or_else(|e| e.into_inner());
                na.keys().filter(|n| !self.is_fresh(n)).cloned().collect()
            };
            for name in due {
                let _ = self.ensure(&name).await;
            }
        }
    }

    /// Serves HTTP-01 answers (and redirects everything else to HTTPS) until `cancel`.
    pub async fn serve_http01(self: Arc<Self>, listener: TcpListener, cancel: CancellationToken) {
        let conns = tokio_util::task::TaskTracker::new();
        loop {
            let tcp = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((t, _)) => t,
                    Err(_) => continue,
                },
            };
            let (acme, cancel) = (self.clone(), cancel.clone());
            conns.spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    std::future::ready(Ok::<_, std::convert::Infallible>(acme.http01_response(&req)))
                });
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
                tokio::select! {
                    _ = conn => {}
                    () = cancel.cancelled() => {}
                }
            });
        }
        conns.close();
        conns.wait().await;
    }

    fn http01_response(&self, req: &http::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::new()));
        if let Some(token) = req.uri().path().strip_prefix("/.well-known/acme-challenge/") {
            match self.http01_answer(token) {
                Some(answer) => *r.body_mut() = Full::new(Bytes::from(answer)),
                None => *r.status_mut() = StatusCode::NOT_FOUND,
            }
            return r;
        }
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        match http::HeaderValue::from_str(&format!("https://{host}{}", req.uri().path())) {
            Ok(loc) if !host.is_empty() => {
                *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
                r.headers_mut().insert(header::LOCATION, loc);
            }
            _ => *r.status_mut() = StatusCode::BAD_REQUEST,
        }
        r
    }
}

enum Cleanup {
    Http01(String),
    Alpn(String),
    Dns(String, String),
}

/// The self-signed certificate carrying the acmeIdentifier extension (RFC 8737).
fn alpn_challenge_cert(
    name: &str,
    digest: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), AcmeError> {
    let err = |e: rcgen::Error| AcmeError::Other(format!("challenge certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(err)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| AcmeError::Other(e.to_string()))?;
    Ok((vec![cert.der().clone()], key))
}
