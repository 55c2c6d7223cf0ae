//! Node credentials the operator issues without touching the edges' config: signed tokens.
//!
//! ```text
//! wt1.<base64url(claims JSON)>.<base64url(Ed25519 signature over "wt1.<claims>")>
//! claims: {"id": "<16 hex>", "names": ["web", "docs"], "iat": <unix s>, "exp": <unix s>}
//! ```
//!
//! `warren-edge token issue` signs one with the operator's key (a PKCS#8 file); every edge
//! holding the public key in `[credentials] public_keys` accepts it for its names until it
//! expires, as long as its id is not on the revocation list in the store (checked every
//! `revocation_check`; a revoked or expired token's tunnels are closed). Static `[[tokens]]`
//! keep working beside them.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// What every signed token starts with.
pub const PREFIX: &str = "wt1.";
/// Longest token read.
pub const MAX_TOKEN: usize = 2048;
/// Most names one token may carry.
pub const MAX_NAMES: usize = 64;

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Its id, for revocation (16 hex digits).
    pub id: String,
    /// Node names it may register (`*`: any).
    pub names: Vec<String>,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
}

impl Claims {
    /// Whether the token allows `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == "*" || n == name)
    }

    /// When it expires.
    pub fn expires(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// Not a signed token of this form.
    #[error("malformed token")]
    Malformed,
    /// No configured key made this signature.
    #[error("token not signed by a key this edge trusts")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Valid for longer than the operator allows.
    #[error("token lifetime beyond this edge's maximum")]
    TooLong,
    /// On the revocation list.
    #[error("token revoked")]
    Revoked,
}

impl CredentialError {
    /// A short stable name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialError::Malformed => "malformed",
            CredentialError::BadSignature => "bad_signature",
            CredentialError::Expired => "expired",
            CredentialError::TooLong => "too_long",
            CredentialError::Revoked => "revoked",
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Signs `claims` with `key`.
pub fn sign(key: &Ed25519KeyPair, claims: &Claims) -> String {
    // Serialising a struct of strings and numbers cannot fail.
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let signed = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json));
    let sig = key.sign(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// Checks a token against the trusted `keys` at `now`: signature, expiry, and a lifetime of at
/// most `max_lifetime` from now.
///
/// # Errors
/// [`CredentialError`] saying why it is refused.
pub fn verify(token: &str, keys: &[[u8; 32]], now: u64, max_lifetime: Duration) -> Result<Claims, CredentialError> {
    if token.len() > MAX_TOKEN || !token.starts_with(PREFIX) {
        return Err(CredentialError::Malformed);
    }
    let (signed, sig) = token.rsplit_once('.').ok_or(CredentialError::Malformed)?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| CredentialError::Malformed)?;
    let trusted = keys.iter().any(|k| UnparsedPublicKey::new(&ED25519, k).verify(signed.as_bytes(), &sig).is_ok());
    if !trusted {
        return Err(CredentialError::BadSignature);
    }
    let json = URL_SAFE_NO_PAD.decode(&signed[PREFIX.len()..]).map_err(|_| CredentialError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| CredentialError::Malformed)?;
    if claims.names.len() > MAX_NAMES || claims.id.is_empty() || claims.id.len() > 64 {
        return Err(CredentialError::Malformed);
    }
    if claims.exp <= now {
        return Err(CredentialError::Expired);
    }
    if claims.exp.saturating_sub(now) > max_lifetime.as_secs() {
        return Err(CredentialError::TooLong);
    }
    Ok(claims)
}

/// A new random token id.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    // The system RNG does not fail on Linux; a zero id would still be unique enough to revoke.
    let _ = aws_lc_rs::rand::SecureRandom::fill(&SystemRandom::new(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Why a signing key could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not an Ed25519 PKCS#8 key.
    #[error("{0}: not an Ed25519 PKCS#8 key")]
    NotAKey(String),
}

/// Creates a signing key file (mode 0600; refused if it exists) and returns its public key.
///
/// # Errors
/// [`KeyFileError`].
pub fn create_key(path: &Path) -> Result<String, KeyFileError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| KeyFileError::Io { path: path.display().to_string(), source };
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyFileError::NotAKey("generated".into()))?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    f.write_all(pkcs8.as_ref()).map_err(io)?;
    load_key(path).map(|k| public_key(&k))
}

/// Reads a signing key file.
///
/// # Errors
/// [`KeyFileError`].
pub fn load_key(path: &Path) -> Result<Ed25519KeyPair, KeyFileError> {
    let bytes = std::fs::read(path).map_err(|source| KeyFileError::Io { path: path.display().to_string(), source })?;
    Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| KeyFileError::NotAKey(path.display().to_string()))
}

/// The public key of `key`, as `[credentials] public_keys` holds it (base64url).
pub fn public_key(key: &Ed25519KeyPair) -> String {
    URL_SAFE_NO_PAD.encode(key.public_key().as_ref())
}

/// Parses a configured public key.
///
/// # Errors
/// When it is not 32 bytes of base64url.
pub fn parse_public_key(s: &str) -> Result<[u8; 32], String> {
    let b = URL_SAFE_NO_PAD.decode(s.trim()).map_err(|_| format!("{s:?} is not base64url"))?;
    b.try_into().map_err(|_| format!("{s:?} is not a 32-byte Ed25519 public key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("generates");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("parses")
    }

    fn claims(exp: u64) -> Claims {
        Claims { id: new_id(), names: vec!["web".into()], iat: 1000, exp }
    }

    fn pk(k: &Ed25519KeyPair) -> [u8; 32] {
        parse_public_key(&public_key(k)).expect("32 bytes")
    }

    #[test]
    fn a_signed_token_verifies_for_its_names_until_it_expires() {
        let k = key();
        let t = sign(&k, &claims(1000 + 30 * DAY));
        assert!(t.starts_with(PREFIX));
        let c = verify(&t, &[pk(&k)], 1000, Duration::from_secs(90 * DAY)).expect("valid");
        assert!(c.allows("web") && !c.allows("docs"));
        assert_eq!(c.id.len(), 16);
        assert_eq!(
            verify(&t, &[pk(&k)], 1000 + 30 * DAY, Duration::from_secs(90 * DAY)),
            Err(CredentialError::Expired)
        );
    }

    #[test]
    fn other_keys_tampering_and_long_lives_are_refused() {
        let (k, other) = (key(), key());
        let max = Duration::from_secs(90 * DAY);
        let t = sign(&k, &claims(1000 + DAY));
        assert_eq!(verify(&t, &[pk(&other)], 1000, max), Err(CredentialError::BadSignature));
        assert!(verify(&t, &[pk(&other), pk(&k)], 1000, max).is_ok(), "any trusted key (rotation)");
        let (signed, sig) = t.rsplit_once('.').expect("two parts");
        let forged = URL_SAFE_NO_PAD.encode(br#"{"id":"x","names":["*"],"iat":0,"exp":99999999999}"#);
        assert_eq!(
            verify(&format!("{PREFIX}{forged}.{sig}"), &[pk(&k)], 1000, max),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(verify(&format!("{signed}.AAAA"), &[pk(&k)], 1000, max), Err(CredentialError::BadSignature));
        let far = sign(&k, &claims(1000 + 400 * DAY));
        assert_eq!(verify(&far, &[pk(&k)], 1000, max), Err(CredentialError::TooLong));
        for bad in ["", "wt1.", "wt1.a.b.c", "static-token", &format!("{PREFIX}{}", "A".repeat(MAX_TOKEN))] {
            let e = verify(bad, &[pk(&k)], 1000, max).expect_err(bad);
            assert!(matches!(e, CredentialError::Malformed | CredentialError::BadSignature), "{bad}: {e}");
        }
    }

    #[test]
    fn key_files_are_private_and_refuse_to_be_overwritten() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("signing.key");
        let public = create_key(&path).expect("created");
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        assert_eq!(public_key(&load_key(&path).expect("loads")), public);
        assert!(create_key(&path).is_err(), "an existing key is never replaced");
        std::fs::write(dir.path().join("junk"), b"junk").expect("write");
        assert!(matches!(load_key(&dir.path().join("junk")), Err(KeyFileError::NotAKey(_))));
        assert!(parse_public_key("short").is_err());
    }
}
