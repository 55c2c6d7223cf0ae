//! Changing a running relay: a new configuration (SIGHUP), and manual certificates whose files
//! changed.
//!
//! A reload checks everything that can fail first (the certificate files, the allow-list) and
//! changes nothing when one does. Then it applies, in this order: the certificate (the next TLS
//! handshake presents it), the accept gate's rates, the admission policy, the configuration
//! snapshot (read by every connection made from then on, and by STUN at once), and the mesh
//! links (only the siblings that were added or removed are dialled or dropped). Connections
//! already up keep the limits they started with and are never closed by a reload.
//!
//! What only a restart can change (listen addresses, state directory, server key, host name,
//! TLS mode) keeps its running value; the reload says which of those differ.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use metrics::counter;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_common::tls::{self, CertSlot, TlsError};

use crate::admission::{modified, Admission, AllowListError};
use crate::config::{AdmissionConfig, Config, TlsMode};
use crate::state::Shared;

/// How often manual certificate files are checked for changes.
pub(crate) const CERT_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The certificate or key files could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The allow-list could not be read.
    #[error(transparent)]
    Admission(#[from] AllowListError),
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reloaded {
    /// Settings that differ from the running ones but take effect only after a restart.
    pub needs_restart: Vec<&'static str>,
    /// Whether the manual certificate was read again.
    pub certificate: bool,
    /// Whether the admission policy was rebuilt.
    pub admission: bool,
    /// Mesh links started.
    pub mesh_added: usize,
    /// Mesh links stopped.
    pub mesh_removed: usize,
}

/// Copies into `next` what only a restart can change, naming each setting that differs.
pub(crate) fn keep_restart_only(running: &Config, next: &mut Config) -> Vec<&'static str> {
    let mut differ = Vec::new();
    macro_rules! keep {
        ($($field:ident => $name:literal),* $(,)?) => {$(
            if running.$field != next.$field {
                differ.push($name);
                next.$field = running.$field.clone();
            }
        )*};
    }
    keep!(
        listen => "listen",
        state_dir => "state_dir",
        key_file => "key_file",
        hostname => "hostname",
        admin_listen => "admin.listen",
    );
    // Manual certificates may move to other files; any other TLS change needs a restart.
    let tls_reloadable = matches!((&running.tls, &next.tls), (TlsMode::Manual { .. }, TlsMode::Manual { .. }));
    if running.tls != next.tls && !tls_reloadable {
        differ.push("tls.mode");
        next.tls = running.tls.clone();
    }
    // The STUN socket stays; its rate is reloadable.
    match (&running.stun, &mut next.stun) {
        (Some(r), Some(n)) if r.listen != n.listen => {
            differ.push("stun.listen");
            n.listen = r.listen;
        }
        (Some(_), Some(_)) | (None, None) => {}
        (r, n) => {
            differ.push("stun.enabled");
            *n = r.clone();
        }
    }
    differ
}

/// Reads a manual certificate pair, checking that the key belongs to the leaf.
pub(crate) fn load_cert(cert_file: &Path, key_file: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let (chain, key) = tls::load_pem(cert_file, key_file)?;
    tls::certified_key(chain, key)
}

/// Logs a certificate just installed, and exports its expiry.
pub(crate) fn installed(cert: &rustls::sign::CertifiedKey, cert_file: &Path, why: &'static str) {
    let not_after = cert.cert.first().and_then(|leaf| warren_common::der::validity(leaf)).map(|(_, after)| after);
    if let Some(after) = not_after {
        metrics::gauge!("relay_tls_cert_not_after_seconds").set(after as f64);
    }
    info!(file = %cert_file.display(), not_after_unix = ?not_after, why, "TLS certificate in use");
}

/// Builds the admission policy a reload installs: `None` keeps the running one (unchanged
/// open or callout policy, so a callout keeps its cache); an allow-list is always read again.
pub(crate) fn next_admission(
    running: &AdmissionConfig,
    next: &AdmissionConfig,
) -> Result<Option<Admission>, AllowListError> {
    if running == next && !matches!(next, AdmissionConfig::AllowList { .. }) {
        return Ok(None);
    }
    Admission::new(next).map(Some)
}

/// Counts a reload's outcome (`relay_config_reloads_total{result}`).
pub fn count_reload(result: &'static str) {
    counter!("relay_config_reloads_total", "result" => result).increment(1);
}

impl Reloaded {
    /// Logs the outcome.
    pub(crate) fn log(&self) {
        info!(
            certificate = self.certificate,
            admission = self.admission,
            mesh_added = self.mesh_added,
            mesh_removed = self.mesh_removed,
            "configuration reloaded; new connections get the new limits, connections already up keep theirs"
        );
        if !self.needs_restart.is_empty() {
            warn!(settings = ?self.needs_restart, "these settings changed but take effect only after a restart");
        }
    }
}

/// Installs a manual certificate again whenever its files' modification times change, until
/// `cancel`. The files named by the configuration in force are watched (a reload may move
/// them). A pair that does not load or match (say, the certificate written and the key not
/// yet) is logged and counted, the running certificate stays, and the next change is tried.
pub(crate) async fn watch_cert_files(shared: Arc<Shared>, slot: Arc<CertSlot>, cancel: CancellationToken) {
    let mut seen: Option<(PathBuf, PathBuf, Stamp)> = None;
    let mut last_warning: Option<Instant> = None;
    loop {
        let TlsMode::Manual { cert_file, key_file } = shared.config().tls.clone() else { return };
        let stamp = (modified(&cert_file), modified(&key_file));
        // The same files, changed since the last check (files a reload moved to were loaded by
        // that reload, so they are only noted).
        let changed = seen.as_ref().is_some_and(|(c, k, s)| *c == cert_file && *k == key_file && *s != stamp);
        if changed {
            match load_cert(&cert_file, &key_file) {
                Ok(cert) => {
                    installed(&cert, &cert_file, "files changed");
                    slot.replace(cert);
                    counter!("relay_tls_cert_reloads_total", "result" => "ok").increment(1);
                }
                Err(e) => {
                    // Tried again at the next change (or the next check, if still changing).
                    counter!("relay_tls_cert_reloads_total", "result" => "error").increment(1);
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        warn!(error = %e, "changed certificate files not usable; keeping the running certificate");
                        last_warning = Some(Instant::now());
                    }
                }
            }
        }
        seen = Some((cert_file, key_file, stamp));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CERT_CHECK_EVERY) => {}
        }
    }
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn config(text: &str) -> Config {
        Config::try_from(FileConfig::parse(text).expect("parses")).expect("valid")
    }

    #[test]
    fn restart_only_settings_keep_their_running_values_and_are_named() {
        let running = config("listen = \"127.0.0.1:8443\"\n[stun]\nlisten = \"127.0.0.1:3478\"\n");
        let mut next = config(
            "listen = \"127.0.0.1:9443\"\nhostname = \"b.test\"\n[stun]\nlisten = \"127.0.0.1:3479\"\nrate_per_second = 5\n[limits]\nmax_conns_per_ip = 3\n",
        );
        let differ = keep_restart_only(&running, &mut next);
        assert_eq!(differ, vec!["listen", "hostname", "stun.listen"]);
        assert_eq!(next.listen, running.listen);
        assert_eq!(next.hostname, running.hostname);
        let stun = next.stun.as_ref().expect("stun");
        assert_eq!((stun.listen, stun.rate.per_second.get()), (running.stun.as_ref().expect("stun").listen, 5));
        assert_eq!(next.max_conns_per_ip.get(), 3, "limits are reloadable");

        let manual = |c: &str| format!("[tls]\nmode = \"manual\"\ncert_file = \"{c}\"\nkey_file = \"k.pem\"\n");
        let mut moved = config(&manual("new.pem"));
        assert!(keep_restart_only(&config(&manual("old.pem")), &mut moved).is_empty(), "manual files may move");
        let mut to_dev = config("");
        assert_eq!(keep_restart_only(&config(&manual("old.pem")), &mut to_dev), vec!["tls.mode"]);
        let mut no_stun = config("[stun]\nenabled = false\n");
        assert_eq!(keep_restart_only(&running, &mut no_stun), vec!["listen", "stun.enabled"]);
        assert!(no_stun.stun.is_some());
    }
}
