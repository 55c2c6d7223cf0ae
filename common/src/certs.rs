//! A certificate store for TLS listeners: SNI picks the certificate, and TLS-ALPN-01
//! validation connections get the challenge certificate of their name.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN of TLS-ALPN-01 validation connections (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Certificates by exact name and by wildcard, plus a default for clients without SNI.
#[derive(Debug, Default)]
pub struct CertStore {
    by_name: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// TLS-ALPN-01 challenge certificates, by name.
    alpn_challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    default: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertStore {
    /// Adds a chain and key for `names` (exact or `*.domain`); the first one added is also the
    /// default.
    ///
    /// # Errors
    /// The key is not supported by the crypto provider.
    pub fn insert(
        &self,
        names: &[String],
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), rustls::Error> {
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)?;
        let ck = Arc::new(CertifiedKey::new(chain, signing));
        let mut map = self.by_name.write().unwrap_or_else(|e| e.into_inner());
        for n in names {
            map.insert(n.to_ascii_lowercase(), ck.clone());
        }
        let mut d = self.default.write().unwrap_or_else(|e| e.into_inner());
        d.get_or_insert(ck);
        Ok(())
    }

    /// Installs the TLS-ALPN-01 challenge certificate of `name`.
    ///
    /// # Errors
    /// The key is not supported.
    pub fn insert_alpn_challenge(
        &self,
        name: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), rustls::Error> {
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)?;
        let ck = Arc::new(CertifiedKey::new(chain, signing));
        self.alpn_challenges.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_ascii_lowercase(), ck);
        Ok(())
    }

    /// Removes the TLS-ALPN-01 challenge certificate of `name`.
    pub fn remove_alpn_challenge(&self, name: &str) {
        self.alpn_challenges.write().unwrap_or_else(|e| e.into_inner()).remove(&name.to_ascii_lowercase());
    }

    /// The certificate for a server name: exact match, then the parent's wildcard, then the
    /// default.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let map = self.by_name.read().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = sni.map(str::to_ascii_lowercase) {
            if let Some(c) = map.get(&name) {
                return Some(c.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(c) = map.get(&format!("*.{parent}")) {
                    return Some(c.clone());
                }
            }
        }
        self.default.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme_validation = hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if acme_validation {
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.alpn_challenges.read().unwrap_or_else(|e| e.into_inner()).get(&name).cloned();
        }
        self.lookup(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_then_wildcard_then_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::tls::DevCa::open_or_create(dir.path()).expect("ca");
        let store = CertStore::default();
        let (c1, k1) = ca.issue(&["*.funnel.test".into()]).expect("issue");
        let (c2, k2) = ca.issue(&["edge.test".into()]).expect("issue");
        store.insert(&["*.funnel.test".into()], c1.clone(), k1).expect("insert");
        store.insert(&["edge.test".into()], c2.clone(), k2).expect("insert");
        assert_eq!(store.lookup(Some("edge.test")).expect("exact").cert[0], c2[0]);
        assert_eq!(store.lookup(Some("Node1.Funnel.Test")).expect("wildcard").cert[0], c1[0]);
        assert_eq!(store.lookup(None).expect("default").cert[0], c1[0]);
        assert_eq!(
            store.lookup(Some("a.b.funnel.test")).expect("default").cert[0],
            c1[0],
            "wildcards cover one label; the default answers"
        );
    }
}
