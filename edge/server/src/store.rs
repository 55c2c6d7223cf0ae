//! Shared edge state behind one trait: certificates and issuance locks.
//!
//! The [`FileStore`] (a directory) is the embedded default; a networked store for several
//! edges implements the same trait.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

/// Where certificates and locks live.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Every stored certificate.
    ///
    /// # Errors
    /// Storage I/O errors.
    fn load_all(&self) -> std::io::Result<Vec<StoredCert>>;
    /// Saves (or replaces) a certificate.
    ///
    /// # Errors
    /// Storage I/O errors.
    fn save(&self, cert: &StoredCert) -> std::io::Result<()>;
    /// Takes the issuance lock of `name` for `ttl`; false if someone else holds it.
    fn try_lock(&self, name: &str, ttl: Duration) -> bool;
    /// Releases the issuance lock of `name`.
    fn unlock(&self, name: &str);
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

impl Store for FileStore {
    fn load_all(&self) -> std::io::Result<Vec<StoredCert>> {
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

    fn save(&self, cert: &StoredCert) -> std::io::Result<()> {
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

    fn try_lock(&self, name: &str, ttl: Duration) -> bool {
        let path = self.file(name, "lock");
        let stale = fs::metadata(&path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() > ttl);
        if stale {
            let _ = fs::remove_file(&path);
        }
        fs::OpenOptions::new().write(true).create_new(true).open(&path).is_ok()
    }

    fn unlock(&self, name: &str) {
        let _ = fs::remove_file(self.file(name, "lock"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_locks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStore::new(dir.path()).expect("store");
        let c = StoredCert { name: "*.funnel.test".into(), chain_pem: "CHAIN".into(), key_pem: "KEY".into() };
        s.save(&c).expect("save");
        assert_eq!(s.load_all().expect("load"), vec![c.clone()]);
        assert!(!format!("{c:?}").contains("KEY"));
        assert!(s.try_lock("a.test", Duration::from_secs(60)));
        assert!(!s.try_lock("a.test", Duration::from_secs(60)), "held");
        assert!(s.try_lock("a.test", Duration::ZERO), "a stale lock is taken over");
        s.unlock("a.test");
        assert!(s.try_lock("a.test", Duration::from_secs(60)));
    }
}
