//! The services added with `warren funnel --bg`, kept in `services.json` next to the node key
//! so that a restarted `warren up` publishes them again.
//!
//! The file is written whole on every change: to a temporary file in the same directory
//! (mode 0600), synced, then renamed over the old one, so a crash leaves the old or the new
//! list and never half of one.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ServiceSpec;

/// Largest state file read back.
const MAX_STATE: u64 = 1 << 20;

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a service list this version understands.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    services: Vec<ServiceSpec>,
}

/// The state file of the node whose key is `key_file`.
pub fn path_for(key_file: &Path) -> PathBuf {
    key_file.parent().unwrap_or_else(|| Path::new(".")).join("services.json")
}

/// Reads the saved services; a missing file is an empty list.
///
/// # Errors
/// [`StateError`] when the file exists but cannot be read or parsed.
pub fn load(path: &Path) -> Result<Vec<ServiceSpec>, StateError> {
    let io = |source| StateError::Io { path: path.into(), source };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_STATE + 1), &mut raw).map_err(io)?;
    let invalid = |why: String| StateError::Invalid { path: path.into(), why };
    if raw.len() as u64 > MAX_STATE {
        return Err(invalid(format!("larger than {MAX_STATE} bytes")));
    }
    let state: StateFile = serde_json::from_str(&raw).map_err(|e| invalid(e.to_string()))?;
    if state.version != 1 {
        return Err(invalid(format!("version {} is not 1", state.version)));
    }
    Ok(state.services)
}

/// Replaces the saved services with `services`, atomically.
///
/// # Errors
/// [`StateError::Io`] when the directory is not writable.
pub fn save(path: &Path, services: &[ServiceSpec]) -> Result<(), StateError> {
    let io = |source| StateError::Io { path: path.into(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let body = serde_json::to_string_pretty(&StateFile { version: 1, services: services.to_vec() })
        .map_err(|e| io(std::io::Error::other(e)))?;
    let tmp = dir.join(format!(".services.json.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn saved_services_come_back_and_the_file_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_for(&dir.path().join("node.key"));
        assert_eq!(load(&path).expect("missing is empty"), []);
        let services = vec![ServiceSpec::new(443, "3000"), ServiceSpec::new(8443, "text:hi").at("/x")];
        save(&path, &services).expect("save");
        assert_eq!(load(&path).expect("load"), services);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        save(&path, &services[..1]).expect("save again");
        assert_eq!(load(&path).expect("load"), services[..1]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, [std::ffi::OsString::from("services.json")]);
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("services.json");
        for bad in ["{", "{\"version\":2,\"services\":[]}", "{\"version\":1,\"services\":[{\"port\":1}]}"] {
            std::fs::write(&path, bad).expect("write");
            let e = load(&path).expect_err(bad).to_string();
            assert!(e.contains("services.json"), "{e}");
        }
    }
}
