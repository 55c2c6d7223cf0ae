//! TLS setup shared by the relay and the edge: certificates from files, or a development CA
//! made with rcgen.
//!
//! Every rustls config in Warren uses the aws-lc-rs provider, passed explicitly, so no process
//! wide default has to be installed.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was missing or wrong.
        what: &'static str,
    },
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[error("dev certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The crypto provider of the whole workspace.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server config for a chain and key, offering HTTP/1.1 by ALPN.
///
/// # Errors
/// [`TlsError::Rustls`] if the key does not match the certificate or is unsupported.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    CertSlot::new(certified_key(chain, key)?).server_config()
}

/// A chain and key as rustls signs with them, after checking that the key is the one the
/// leaf certificate names.
///
/// # Errors
/// [`TlsError::Rustls`] if the key is unsupported or belongs to another certificate.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
}

/// A server certificate that can be replaced while the server runs: every handshake after
/// [`CertSlot::replace`] presents the new one, and connections already made keep theirs.
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertSlot {
    /// A slot holding `first`.
    pub fn new(first: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(CertSlot { current: RwLock::new(first) })
    }

    /// The certificate new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs `next` for the handshakes to come.
    pub fn replace(&self, next: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// A server config presenting this slot's certificate, offering HTTP/1.1 by ALPN.
    ///
    /// # Errors
    /// [`TlsError::Rustls`] if the provider offers no safe protocol version (never with
    /// aws-lc-rs).
    pub fn server_config(self: Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        Ok(Arc::new(resolved_server_config(self, &[b"http/1.1"])?))
    }
}

/// A server config (safe protocol versions, no client auth) whose certificates come from
/// `resolver`, offering `alpn` in that order.
///
/// # Errors
/// [`TlsError::Rustls`] if the provider offers no safe protocol version (never with
/// aws-lc-rs).
pub fn resolved_server_config(resolver: Arc<dyn ResolvesServerCert>, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Reads a PEM chain and key from files.
///
/// # Errors
/// [`TlsError`] if a file is unreadable or holds no certificate or key.
pub fn load_pem(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|_| TlsError::Pem { path: cert_file.into(), what: "cannot read PEM certificates" })?
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem { path: cert_file.into(), what: "invalid PEM certificate" })?;
    if chain.is_empty() {
        return Err(TlsError::Pem { path: cert_file.into(), what: "no certificate found" });
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|_| TlsError::Pem { path: key_file.into(), what: "no usable private key found" })?;
    Ok((chain, key))
}

/// Loads a PEM chain and key from files.
///
/// # Errors
/// [`TlsError`] if a file is unreadable, empty of certificates/keys, or mismatched.
pub fn load_manual(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, key) = load_pem(cert_file, key_file)?;
    server_config(chain, key)
}

/// Where system root certificates are read from, when the file exists.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A client config trusting the system roots (if found) and the PEM certificates of
/// `ca_file`, offering HTTP/1.1 by ALPN (callers set their own ALPN where they speak another).
///
/// # Errors
/// [`TlsError::Io`] or [`TlsError::Pem`] if `ca_file` cannot be read or holds no certificate.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let system = Path::new(SYSTEM_ROOTS);
    if system.exists() {
        if let Ok(iter) = CertificateDer::pem_file_iter(system) {
            let _ = roots.add_parsable_certificates(iter.flatten());
        }
    }
    if let Some(ca) = ca_file {
        let certs: Vec<_> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| pem_io_error(ca, e))?
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::Pem { path: ca.into(), what: "invalid PEM certificate" })?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsError::Pem { path: ca.into(), what: "no certificate found" });
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The I/O error inside a PEM read failure, kept with the file's path.
fn pem_io_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => TlsError::Io { path: path.into(), source },
        _ => TlsError::Pem { path: path.into(), what: "invalid PEM certificate" },
    }
}

/// A development CA kept in a directory, issuing leaf certificates for local names.
#[derive(Debug)]
pub struct DevCa {
    /// PEM file of the CA certificate, for clients to trust.
    pub ca_cert_path: PathBuf,
    key: KeyPair,
    params: CertificateParams,
}

impl DevCa {
    /// Opens the CA in `dir` (`dev-ca.pem`, `dev-ca.key`), creating it on first use.
    ///
    /// # Errors
    /// [`TlsError`] on I/O failure or an unreadable existing key.
    pub fn open_or_create(dir: &Path) -> Result<Self, TlsError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key_path = dir.join("dev-ca.key");
        let ca_cert_path = dir.join("dev-ca.pem");
        let params = ca_params()?;
        let key = match fs::read_to_string(&key_path) {
            Ok(pem) => KeyPair::from_pem(&pem)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate()?;
                write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
                let _ = fs::remove_file(&ca_cert_path);
                key
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        if !ca_cert_path.exists() {
            let cert = params.self_signed(&key)?;
            fs::write(&ca_cert_path, cert.pem()).map_err(io(&ca_cert_path))?;
        }
        Ok(DevCa { ca_cert_path, key, params })
    }

    /// Issues a leaf certificate for `names` (DNS names or IP literals) and returns a server
    /// config using it.
    ///
    /// # Errors
    /// [`TlsError`] if generation fails.
    pub fn server_config(&self, names: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
        let (chain, key) = self.issue(names)?;
        server_config(chain, key)
    }

    /// Issues a leaf certificate and key for `names`, as PEM text (certificate, key).
    ///
    /// # Errors
    /// [`TlsError`] if generation fails.
    pub fn issue_pem(&self, names: &[String]) -> Result<(String, String), TlsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let leaf_key = KeyPair::generate()?;
        let cert = params.signed_by(&leaf_key, &Issuer::from_params(&self.params, &self.key))?;
        Ok((cert.pem(), leaf_key.serialize_pem()))
    }

    /// Issues a leaf certificate and key for `names`.
    ///
    /// # Errors
    /// [`TlsError`] if generation fails.
    pub fn issue(&self, names: &[String]) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let leaf_key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&leaf_key, &issuer)?;
        let key = PrivateKeyDer::try_from(leaf_key.serialize_der())
            .map_err(|_| TlsError::Pem { path: PathBuf::new(), what: "generated key" })?;
        Ok((vec![cert.der().clone()], key))
    }
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "Warren development CA");
    params.distinguished_name.push(DnType::OrganizationName, "Warren (development only)");
    Ok(params)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_ca_is_stable_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca1 = DevCa::open_or_create(dir.path()).expect("ca");
        let pem1 = fs::read_to_string(&ca1.ca_cert_path).expect("pem");
        let ca2 = DevCa::open_or_create(dir.path()).expect("ca again");
        assert_eq!(pem1, fs::read_to_string(&ca2.ca_cert_path).expect("pem"));
        ca2.server_config(&["localhost".into(), "127.0.0.1".into()]).expect("leaf");
    }

    #[test]
    fn manual_mode_reports_missing_files() {
        let err = load_manual(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem"));
        assert!(matches!(err, Err(TlsError::Pem { .. })));
    }

    #[test]
    fn a_cert_slot_refuses_a_key_of_another_certificate_and_swaps_whole_pairs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DevCa::open_or_create(dir.path()).expect("ca");
        let (chain_a, key_a) = ca.issue(&["a.test".into()]).expect("issue");
        let (chain_b, key_b) = ca.issue(&["b.test".into()]).expect("issue");
        let mixed = certified_key(chain_a.clone(), key_b.clone_key());
        assert!(matches!(mixed, Err(TlsError::Rustls(rustls::Error::InconsistentKeys(_)))), "{mixed:?}");
        let slot = CertSlot::new(certified_key(chain_a.clone(), key_a).expect("pair a"));
        let _config = slot.clone().server_config().expect("config");
        assert_eq!(slot.current().cert, chain_a);
        slot.replace(certified_key(chain_b.clone(), key_b).expect("pair b"));
        assert_eq!(slot.current().cert, chain_b);
    }
}
