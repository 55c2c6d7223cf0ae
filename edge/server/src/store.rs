//! Shared edge state behind one trait: certificates, issuance locks, the route table, and the
//! signed node tokens issued and revoked.
//!
//! The [`FileStore`] (a directory) is the embedded default for a single edge; the
//! [`RedisStore`] serves a cluster of edges behind one DNS name.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand_core::{OsRng, RngCore};

use warren_common::acme::FileCertCache;

use crate::credentials::Claims;

pub use warren_common::acme::{CertCache, StoredCert};

/// What a [`Store`] call returns.
pub type StoreFuture<'a, T> = warren_common::acme::CacheFuture<'a, T>;

/// Where certificates, issuance locks and routes live.
///
/// A route says "the edge `peer` holds a tunnel of node `name`"; entries expire unless the
/// edge refreshes them, so a dead edge's routes vanish on their own.
pub trait Store: CertCache {
    /// Announces (or refreshes) that `peer` holds tunnels of `names`, for `ttl`.
    fn advertise<'a>(&'a self, peer: &'a str, names: &'a [String], ttl: Duration) -> StoreFuture<'a, ()>;
    /// Withdraws `peer`'s routes for `names`.
    fn withdraw<'a>(&'a self, peer: &'a str, names: &'a [String]) -> StoreFuture<'a, ()>;
    /// The peers holding a tunnel of `name` whose entries have not expired.
    fn routes<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Vec<String>>;
    /// Records a signed token issued (for `warren-edge token list`).
    fn record_token<'a>(&'a self, claims: &'a Claims) -> StoreFuture<'a, ()>;
    /// Every token recorded.
    fn tokens(&self) -> StoreFuture<'_, Vec<Claims>>;
    /// Revokes token `id` until `until` (its expiry: later it is refused anyway).
    fn revoke<'a>(&'a self, id: &'a str, until: SystemTime) -> StoreFuture<'a, ()>;
    /// The ids revoked whose `until` has not passed.
    fn revoked(&self) -> StoreFuture<'_, Vec<String>>;
}

/// Revoked ids whose `until` (unix ms) is still ahead of `now`.
fn still_revoked(entries: HashMap<String, u64>, now: SystemTime) -> Vec<String> {
    let now = unix_ms(now);
    entries.into_iter().filter(|(_, until)| *until > now).map(|(id, _)| id).collect()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Certificates and locks as files ([`FileCertCache`]: `<name>.crt`, `.key`, `.lock`), and
/// the token records as JSON maps, in one directory.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    certs: FileCertCache,
}

impl FileStore {
    /// A store in `dir` (created if missing).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        Ok(FileStore { dir: dir.to_path_buf(), certs: FileCertCache::new(dir)? })
    }
}

impl FileStore {
    fn read_map<T: serde::de::DeserializeOwned>(&self, file: &str) -> std::io::Result<HashMap<String, T>> {
        match fs::read(self.dir.join(file)) {
            Ok(b) => serde_json::from_slice(&b).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
            Err(e) => Err(e),
        }
    }

    /// Changes a JSON map file of this store, replacing it whole (via rename).
    fn update_map<T>(&self, file: &str, f: impl FnOnce(&mut HashMap<String, T>)) -> std::io::Result<()>
    where
        T: serde::de::DeserializeOwned + serde::Serialize,
    {
        let mut map = self.read_map(file)?;
        f(&mut map);
        let path = self.dir.join(file);
        let tmp = path.with_extension("json.tmp");
        let mut out = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        out.write_all(&serde_json::to_vec_pretty(&map).map_err(std::io::Error::other)?)?;
        out.sync_all()?;
        fs::rename(&tmp, &path)
    }
}

impl CertCache for FileStore {
    fn load_all(&self) -> StoreFuture<'_, Vec<StoredCert>> {
        self.certs.load_all()
    }

    fn save<'a>(&'a self, cert: &'a StoredCert) -> StoreFuture<'a, ()> {
        self.certs.save(cert)
    }

    fn try_lock<'a>(&'a self, name: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        self.certs.try_lock(name, ttl)
    }

    fn unlock<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        self.certs.unlock(name)
    }
}

/// The file store serves one edge: its certificate files are small and local, so they are
/// read and written in place; it keeps no routes (a single edge forwards to nobody).
impl Store for FileStore {
    fn advertise<'a>(&'a self, _peer: &'a str, _names: &'a [String], _ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn withdraw<'a>(&'a self, _peer: &'a str, _names: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn routes<'a>(&'a self, _name: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }

    fn record_token<'a>(&'a self, claims: &'a Claims) -> StoreFuture<'a, ()> {
        let r = self.update_map(TOKENS_FILE, |m| {
            m.insert(claims.id.clone(), claims.clone());
        });
        Box::pin(std::future::ready(r))
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<Claims>> {
        Box::pin(std::future::ready(self.read_map(TOKENS_FILE).map(|m| m.into_values().collect())))
    }

    fn revoke<'a>(&'a self, id: &'a str, until: SystemTime) -> StoreFuture<'a, ()> {
        let r = self.update_map(REVOKED_FILE, |m| {
            let now = unix_ms(SystemTime::now());
            m.retain(|_, until| *until > now);
            m.insert(id.to_owned(), unix_ms(until));
        });
        Box::pin(std::future::ready(r))
    }

    fn revoked(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(std::future::ready(self.read_map(REVOKED_FILE).map(|m| still_revoked(m, SystemTime::now()))))
    }
}

/// The file store's record of issued tokens: id -> claims.
const TOKENS_FILE: &str = "tokens.json";
/// The file store's revocation list: id -> until (unix ms).
const REVOKED_FILE: &str = "revoked.json";

/// Key prefix of everything the edges keep in Redis.
const PREFIX: &str = "warren:edge";

/// Deletes a lock only if it still holds this edge's token (another edge may own it now).
const UNLOCK_SCRIPT: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// Shared state in a Redis server, for a cluster of edges.
///
/// ```text
/// warren:edge:certs            set of certificate names
/// warren:edge:cert:<name>      hash { chain, key }
/// warren:edge:lock:<name>      issuance lock: a random token, SET NX PX
/// warren:edge:route:<name>     sorted set: member = peer, score = expiry (unix ms)
/// warren:edge:tokens           hash: token id -> claims (JSON), the tokens issued
/// warren:edge:revoked          sorted set: member = token id, score = until (unix ms)
/// ```
/// Route expiry is each edge's wall clock; edges are expected to run NTP. The connection
/// reconnects on its own; every command has a deadline, so a Redis outage turns into errors
/// (and local-only routing), never into hung requests.
pub struct RedisStore {
    conn: redis::aio::ConnectionManager,
    /// Tokens of the locks this edge holds.
    locks: Mutex<HashMap<String, String>>,
    url_redacted: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("url", &self.url_redacted).finish_non_exhaustive()
    }
}

fn redis_err(e: redis::RedisError) -> std::io::Error {
    std::io::Error::other(format!("redis: {e}"))
}

impl RedisStore {
    /// A store on the server at `url` (`redis://[:password@]host:port/db`). The connection is
    /// made on first use and remade after failures. Call it within a Tokio runtime.
    ///
    /// # Errors
    /// When the URL is not a valid Redis URL.
    pub fn new(url: &str) -> std::io::Result<Self> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, config).map_err(redis_err)?;
        Ok(RedisStore { conn, locks: Mutex::new(HashMap::new()), url_redacted: redact_url(url) })
    }

    /// Checks that the server answers.
    ///
    /// # Errors
    /// When it does not.
    pub async fn ping(&self) -> std::io::Result<()> {
        let mut c = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut c).await.map(|_| ()).map_err(redis_err)
    }
}

/// `redis://user:secret@host/` -> `redis://user:<redacted>@host/`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return "<invalid url>".into() };
    match rest.rsplit_once('@') {
        Some((cred, host)) => {
            let user = cred.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:<redacted>@{host}")
        }
        None => url.to_owned(),
    }
}

impl CertCache for RedisStore {
    fn load_all(&self) -> StoreFuture<'_, Vec<StoredCert>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let names: Vec<String> =
                redis::cmd("SMEMBERS").arg(format!("{PREFIX}:certs")).query_async(&mut c).await.map_err(redis_err)?;
            let mut out = Vec::with_capacity(names.len());
            for name in names {
                let (chain, key): (Option<String>, Option<String>) = redis::cmd("HMGET")
                    .arg(format!("{PREFIX}:cert:{name}"))
                    .arg("chain")
                    .arg("key")
                    .query_async(&mut c)
                    .await
                    .map_err(redis_err)?;
                if let (Some(chain_pem), Some(key_pem)) = (chain, key) {
                    out.push(StoredCert { name, chain_pem, key_pem });
                }
            }
            Ok(out)
        })
    }

    fn save<'a>(&'a self, cert: &'a StoredCert) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(format!("{PREFIX}:cert:{}", cert.name))
                .arg("chain")
                .arg(&cert.chain_pem)
                .arg("key")
                .arg(&cert.key_pem)
                .ignore()
                .cmd("SADD")
                .arg(format!("{PREFIX}:certs"))
                .arg(&cert.name)
                .ignore()
                .query_async::<()>(&mut c)
                .await
                .map_err(redis_err)
        })
    }

    fn try_lock<'a>(&'a self, name: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let token = format!("{:016x}{:016x}", OsRng.next_u64(), OsRng.next_u64());
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let got: Option<String> = redis::cmd("SET")
                .arg(format!("{PREFIX}:lock:{name}"))
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async(&mut c)
                .await
                .map_err(redis_err)?;
            if got.is_some() {
                self.locks.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), token);
            }
            Ok(got.is_some())
        })
    }

    fn unlock<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let Some(token) = self.locks.lock().unwrap_or_else(|e| e.into_inner()).remove(name) else {
                return Ok(());
            };
            let mut c = self.conn.clone();
            redis::cmd("EVAL")
                .arg(UNLOCK_SCRIPT)
                .arg(1)
                .arg(format!("{PREFIX}:lock:{name}"))
                .arg(token)
                .query_async::<i64>(&mut c)
                .await
                .map(|_| ())
                .map_err(redis_err)
        })
    }
}

impl Store for RedisStore {
    fn advertise<'a>(&'a self, peer: &'a str, names: &'a [String], ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if names.is_empty() {
                return Ok(());
            }
            let mut c = self.conn.clone();
            let expiry = unix_ms(SystemTime::now() + ttl);
            // The whole key outlives its newest entry a little, so a region with no edge left
            // leaves nothing behind.
            let key_ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).saturating_mul(2).max(1);
            let mut p = redis::pipe();
            for name in names {
                let key = format!("{PREFIX}:route:{name}");
                p.cmd("ZADD").arg(&key).arg(expiry).arg(peer).ignore();
                p.cmd("PEXPIRE").arg(&key).arg(key_ttl).ignore();
            }
            p.query_async::<()>(&mut c).await.map_err(redis_err)
        })
    }

    fn withdraw<'a>(&'a self, peer: &'a str, names: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if names.is_empty() {
                return Ok(());
            }
            let mut c = self.conn.clone();
            let mut p = redis::pipe();
            for name in names {
                p.cmd("ZREM").arg(format!("{PREFIX}:route:{name}")).arg(peer).ignore();
            }
            p.query_async::<()>(&mut c).await.map_err(redis_err)
        })
    }

    fn routes<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            redis::cmd("ZRANGEBYSCORE")
                .arg(format!("{PREFIX}:route:{name}"))
                .arg(unix_ms(SystemTime::now()))
                .arg("+inf")
                .query_async(&mut c)
                .await
                .map_err(redis_err)
        })
    }

    fn record_token<'a>(&'a self, claims: &'a Claims) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let json = serde_json::to_string(claims).map_err(std::io::Error::other)?;
            redis::cmd("HSET")
                .arg(format!("{PREFIX}:tokens"))
                .arg(&claims.id)
                .arg(json)
                .query_async::<i64>(&mut c)
                .await
                .map(|_| ())
                .map_err(redis_err)
        })
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<Claims>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let all: Vec<String> =
                redis::cmd("HVALS").arg(format!("{PREFIX}:tokens")).query_async(&mut c).await.map_err(redis_err)?;
            Ok(all.iter().filter_map(|j| serde_json::from_str(j).ok()).collect())
        })
    }

    fn revoke<'a>(&'a self, id: &'a str, until: SystemTime) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let key = format!("{PREFIX}:revoked");
            redis::pipe()
                .cmd("ZADD")
                .arg(&key)
                .arg(unix_ms(until))
                .arg(id)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&key)
                .arg("-inf")
                .arg(unix_ms(SystemTime::now()))
                .ignore()
                .query_async::<()>(&mut c)
                .await
                .map_err(redis_err)
        })
    }

    fn revoked(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            redis::cmd("ZRANGEBYSCORE")
                .arg(format!("{PREFIX}:revoked"))
                .arg(unix_ms(SystemTime::now()))
                .arg("+inf")
                .query_async(&mut c)
                .await
                .map_err(redis_err)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn saves_loads_and_locks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::new(dir.path()).expect("store");
        let c = StoredCert { name: "*.funnel.test".into(), chain_pem: "CHAIN".into(), key_pem: "KEY".into() };
        s.save(&c).await.expect("save");
        assert_eq!(s.load_all().await.expect("load"), vec![c.clone()]);
        assert!(!format!("{c:?}").contains("KEY"));
        let lock = |ttl| s.try_lock("a.test", ttl);
        assert!(lock(Duration::from_secs(60)).await.expect("lock"));
        assert!(!lock(Duration::from_secs(60)).await.expect("lock"), "held");
        assert!(lock(Duration::ZERO).await.expect("lock"), "a stale lock is taken over");
        s.unlock("a.test").await.expect("unlock");
        assert!(lock(Duration::from_secs(60)).await.expect("lock"));
    }

    #[tokio::test]
    async fn issued_and_revoked_tokens_are_kept_until_they_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::new(dir.path()).expect("store");
        let claims = Claims { id: "00aa".into(), names: vec!["web".into()], iat: 1, exp: 2 };
        s.record_token(&claims).await.expect("record");
        assert_eq!(s.tokens().await.expect("tokens"), vec![claims]);
        assert!(s.revoked().await.expect("revoked").is_empty());
        s.revoke("00aa", SystemTime::now() + Duration::from_secs(60)).await.expect("revoke");
        s.revoke("old", SystemTime::now() - Duration::from_secs(1)).await.expect("revoke");
        assert_eq!(s.revoked().await.expect("revoked"), vec!["00aa".to_owned()], "a past entry is gone");
        std::fs::write(dir.path().join(REVOKED_FILE), b"{ not json").expect("corrupt");
        assert!(s.revoked().await.is_err(), "a corrupt list is an error, not an empty list");
    }

    #[tokio::test]
    async fn redis_urls_never_show_passwords() {
        assert_eq!(redact_url("redis://:hunter22@10.0.0.9:6379/0"), "redis://:<redacted>@10.0.0.9:6379/0");
        assert_eq!(redact_url("redis://edge:pw@r/"), "redis://edge:<redacted>@r/");
        assert_eq!(redact_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        let s = RedisStore::new("redis://:hunter22@127.0.0.1:1/").expect("valid url");
        assert!(!format!("{s:?}").contains("hunter22"));
        assert!(RedisStore::new("not a url").is_err());
    }
}
