//! Shared edge state behind one trait: certificates, issuance locks and the route table.
//!
//! The [`FileStore`] (a directory) is the embedded default for a single edge; the
//! [`RedisStore`] serves a cluster of edges behind one DNS name.

use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand_core::{OsRng, RngCore};

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

/// What a [`Store`] call returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = std::io::Result<T>> + Send + 'a>>;

/// Where certificates, issuance locks and routes live.
///
/// A route says "the edge `peer` holds a tunnel of node `name`"; entries expire unless the
/// edge refreshes them, so a dead edge's routes vanish on their own.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every stored certificate.
    fn load_all(&self) -> StoreFuture<'_, Vec<StoredCert>>;
    /// Saves (or replaces) a certificate.
    fn save<'a>(&'a self, cert: &'a StoredCert) -> StoreFuture<'a, ()>;
    /// Takes the issuance lock of `name` for `ttl`; false if someone else holds it.
    fn try_lock<'a>(&'a self, name: &'a str, ttl: Duration) -> StoreFuture<'a, bool>;
    /// Releases the issuance lock of `name` if this store still holds it.
    fn unlock<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()>;
    /// Announces (or refreshes) that `peer` holds tunnels of `names`, for `ttl`.
    fn advertise<'a>(&'a self, peer: &'a str, names: &'a [String], ttl: Duration) -> StoreFuture<'a, ()>;
    /// Withdraws `peer`'s routes for `names`.
    fn withdraw<'a>(&'a self, peer: &'a str, names: &'a [String]) -> StoreFuture<'a, ()>;
    /// The peers holding a tunnel of `name` whose entries have not expired.
    fn routes<'a>(&'a self, name: &'a str) -> StoreFuture<'a, Vec<String>>;
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Certificates as files `<dir>/<name>.crt` and `.key` (mode 0600); locks as `<dir>/<name>.lock`.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// A store in `dir` (created if missing).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(FileStore { dir: dir.to_path_buf() })
    }

    fn file(&self, name: &str, ext: &str) -> PathBuf {
        // `*` is not a good file-name character: wildcards are stored as `_wildcard_.domain`.
        self.dir.join(format!("{}.{ext}", name.replace('*', "_wildcard_")))
    }
}

impl FileStore {
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

/// The file store serves one edge: its certificate files are small and local, so they are
/// read and written in place; it keeps no routes (a single edge forwards to nobody).
impl Store for FileStore {
    fn load_all(&self) -> StoreFuture<'_, Vec<StoredCert>> {
        Box::pin(std::future::ready(self.load_all_now()))
    }

    fn save<'a>(&'a self, cert: &'a StoredCert) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(self.save_now(cert)))
    }

    fn try_lock<'a>(&'a self, name: &'a str, ttl: Duration) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(self.try_lock_now(name, ttl))))
    }

    fn unlock<'a>(&'a self, name: &'a str) -> StoreFuture<'a, ()> {
        let _ = fs::remove_file(self.file(name, "lock"));
        Box::pin(std::future::ready(Ok(())))
    }

    fn advertise<'a>(&'a self, _peer: &'a str, _names: &'a [String], _ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn withdraw<'a>(&'a self, _peer: &'a str, _names: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn routes<'a>(&'a self, _name: &'a str) -> StoreFuture<'a, Vec<String>> {
        Box::pin(std::future::ready(Ok(Vec::new())))
    }
}

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

impl Store for RedisStore {
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
    async fn redis_urls_never_show_passwords() {
        assert_eq!(redact_url("redis://:hunter22@10.0.0.9:6379/0"), "redis://:<redacted>@10.0.0.9:6379/0");
        assert_eq!(redact_url("redis://edge:pw@r/"), "redis://edge:<redacted>@r/");
        assert_eq!(redact_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        let s = RedisStore::new("redis://:hunter22@127.0.0.1:1/").expect("valid url");
        assert!(!format!("{s:?}").contains("hunter22"));
        assert!(RedisStore::new("not a url").is_err());
    }
}
