//! Long-term key pairs of relays and nodes, persisted in files only their owner can read.
//!
//! Format: one line `privkey:<64 hex digits>`. Created on first start with mode 0600; a key
//! file that group or others can read is refused.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand_core::OsRng;
use warren_relay_proto::SecretKey;

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or creating the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not hold a key in the expected format.
    #[error("key file {path}: not a `privkey:<64 hex digits>` line")]
    Format {
        /// The file.
        path: String,
    },
    /// The file is readable by group or others.
    #[error("key file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)")]
    Permissions {
        /// The file.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
}

/// Loads the key at `path`, creating a new one (and its directory) if the file does not exist.
///
/// # Errors
/// [`KeyFileError`] when the file cannot be read or created, is malformed, or is too open.
pub fn load_or_create(path: &Path) -> Result<SecretKey, KeyFileError> {
    let io = |source| KeyFileError::Io { path: path.display().to_string(), source };
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Permissions { path: path.display().to_string(), mode });
            }
            parse(&fs::read_to_string(path).map_err(io)?)
                .ok_or(KeyFileError::Format { path: path.display().to_string() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
            }
            let key = SecretKey::generate(&mut OsRng);
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
            f.write_all(format!("privkey:{}\n", hex::encode(key.to_bytes())).as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

fn parse(text: &str) -> Option<SecretKey> {
    let hex_part = text.trim().strip_prefix("privkey:")?;
    let mut raw = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut raw).ok()?;
    Some(SecretKey::from_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_0600_then_reloaded_identically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/relay.key");
        let k1 = load_or_create(&path).expect("created");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = load_or_create(&path).expect("loaded");
        assert_eq!(k1.public_key(), k2.public_key());
    }

    #[test]
    fn world_readable_and_garbage_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.key");
        load_or_create(&path).expect("created");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(load_or_create(&path), Err(KeyFileError::Permissions { .. })));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        fs::write(&path, "privkey:zz").expect("write");
        assert!(matches!(load_or_create(&path), Err(KeyFileError::Format { .. })));
    }
}
