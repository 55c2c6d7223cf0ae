//! Credentials a visitor presents: `Authorization: Basic` checked against bcrypt hashes,
//! `Authorization: Bearer` against SHA-256 digests of the node's tokens.
//!
//! A bcrypt check is slow on purpose (tens of milliseconds at cost 10), so checks run on the
//! blocking pool, at most [`PARALLEL_CHECKS`] at a time, and a user's good password is
//! remembered (by a digest of user, password and hash) for [`REMEMBERED`]: a browser sends
//! the header with every request and pays the cost once.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::Semaphore;
use warren_tunnel_proto::Header;

/// Largest Authorization header read.
const MAX_AUTHORIZATION: usize = 4096;
/// bcrypt checks running at once.
const PARALLEL_CHECKS: usize = 2;
/// Longest wait for a check slot before the visitor is asked to come back.
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// How long a good password is remembered.
const REMEMBERED: Duration = Duration::from_secs(600);
/// Good passwords remembered at most.
const REMEMBERED_MAX: u64 = 10_000;

/// What the Authorization header holds.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Presented {
    /// No Authorization header.
    None,
    /// One this edge cannot read (unknown scheme, bad base64, no colon, too long, several).
    Malformed,
    Basic {
        user: String,
        password: String,
    },
    Bearer(Vec<u8>),
}

/// Reads the Authorization header of `headers`.
pub(super) fn presented(headers: &[Header]) -> Presented {
    let mut values = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("authorization"));
    let Some((_, value)) = values.next() else { return Presented::None };
    if values.next().is_some() || value.len() > MAX_AUTHORIZATION {
        return Presented::Malformed;
    }
    let Ok(value) = std::str::from_utf8(value) else { return Presented::Malformed };
    let Some((scheme, rest)) = value.trim().split_once(' ') else { return Presented::Malformed };
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Presented::Bearer(rest.as_bytes().to_vec());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Presented::Malformed;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else { return Presented::Malformed };
    let Ok(text) = String::from_utf8(decoded) else { return Presented::Malformed };
    match text.split_once(':') {
        Some((user, password)) if !user.is_empty() => {
            Presented::Basic { user: user.to_owned(), password: password.to_owned() }
        }
        _ => Presented::Malformed,
    }
}

/// Checks a rule's user and bcrypt hash before it is accepted.
///
/// # Errors
/// Why the pair cannot be used.
pub(super) fn check_hash(user: &str, hash: &str, max_cost: u32) -> Result<(), String> {
    if user.is_empty() || user.len() > 128 || user.contains(':') || user.chars().any(char::is_control) {
        return Err("a basic-auth user name is empty, too long or holds ':'".into());
    }
    let parts =
        bcrypt::HashParts::from_str(hash).map_err(|_| format!("the password hash of {user:?} is not bcrypt"))?;
    if parts.get_cost() > max_cost {
        return Err(format!("the password hash of {user:?} has cost {}; at most {max_cost}", parts.get_cost()));
    }
    Ok(())
}

/// Whether `token`'s SHA-256 is one of `digests` (compared in constant time).
pub(super) fn bearer_matches(digests: &[[u8; 32]], token: &[u8]) -> bool {
    let digest = sha256(&[token]);
    digests.iter().fold(false, |found, d| found | constant_eq(d, &digest))
}

fn constant_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 over `parts`, one after the other.
fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// No check slot came free in time.
#[derive(Debug)]
pub(super) struct Busy;

/// The bcrypt checker, with its slots and its memory of good passwords.
#[derive(Debug)]
pub(crate) struct Passwords {
    slots: Arc<Semaphore>,
    good: moka::future::Cache<[u8; 32], ()>,
}

impl Passwords {
    pub(crate) fn new() -> Self {
        let good = moka::future::Cache::builder().max_capacity(REMEMBERED_MAX).time_to_live(REMEMBERED).build();
        Passwords { slots: Arc::new(Semaphore::new(PARALLEL_CHECKS)), good }
    }

    /// Whether `password` is `user`'s under `hash`.
    ///
    /// # Errors
    /// [`Busy`] when no check slot came free within [`SLOT_WAIT`].
    pub(super) async fn verify(&self, user: &str, password: &str, hash: &str) -> Result<bool, Busy> {
        // Zero bytes keep the parts from running together (none of them holds one).
        let key = sha256(&[user.as_bytes(), &[0], password.as_bytes(), &[0], hash.as_bytes()]);
        if self.good.contains_key(&key) {
            return Ok(true);
        }
        let permit = tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| Busy)?
            .map_err(|_| Busy)?;
        let (password, hash) = (password.to_owned(), hash.to_owned());
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok {
            self.good.insert(key, ()).await;
        }
        Ok(ok)
    }
}

/// The digest a node sends for a bearer token: plain SHA-256 (`printf %s TOKEN | sha256sum`).
#[cfg(test)]
pub(super) fn token_digest(token: &str) -> [u8; 32] {
    sha256(&[token.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(v: &[u8]) -> Vec<Header> {
        vec![("authorization".into(), v.to_vec())]
    }

    #[test]
    fn authorization_headers_in_every_shape() {
        assert_eq!(presented(&[]), Presented::None);
        let basic = |s: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
        assert_eq!(
            presented(&auth(basic("alice:pa:ss").as_bytes())),
            Presented::Basic { user: "alice".into(), password: "pa:ss".into() }
        );
        assert_eq!(presented(&auth(b"bearer abc")), Presented::Bearer(b"abc".to_vec()));
        for bad in [
            b"Basic".to_vec(),
            b"Basic !!!notbase64".to_vec(),
            basic("no-colon").into_bytes(),
            basic(":nouser").into_bytes(),
            b"Digest x=1".to_vec(),
            b"Bearer ".to_vec(),
            vec![0xff, 0xfe],
            format!("Bearer {}", "x".repeat(MAX_AUTHORIZATION)).into_bytes(),
        ] {
            assert_eq!(presented(&auth(&bad)), Presented::Malformed, "{:?}", String::from_utf8_lossy(&bad));
        }
        let twice = [auth(b"Bearer a"), auth(b"Bearer b")].concat();
        assert_eq!(presented(&twice), Presented::Malformed, "two Authorization headers are not guessed between");
    }

    #[test]
    fn hashes_are_bcrypt_with_a_bounded_cost() {
        let hash = bcrypt::hash("pw", 4).expect("hashes");
        assert_eq!(check_hash("alice", &hash, 14), Ok(()));
        assert!(check_hash("alice", "plaintext", 14).is_err());
        assert!(check_hash("al:ice", &hash, 14).is_err());
        assert!(check_hash("", &hash, 14).is_err());
        let costly = bcrypt::hash("pw", 5).expect("hashes");
        assert!(check_hash("alice", &costly, 4).expect_err("over the cost").contains("cost 5"));
    }

    #[test]
    fn bearer_tokens_match_by_digest() {
        let hex: String = token_digest("abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "plain SHA-256");
        let digests = [token_digest("one"), token_digest("two")];
        assert!(bearer_matches(&digests, b"two"));
        assert!(!bearer_matches(&digests, b"three"));
        assert!(!bearer_matches(&[], b"one"));
    }

    #[tokio::test]
    async fn good_passwords_are_checked_once() {
        let hash = bcrypt::hash("secret", 4).expect("hashes");
        let p = Passwords::new();
        assert!(!p.verify("alice", "wrong", &hash).await.expect("a slot"));
        assert!(p.verify("alice", "secret", &hash).await.expect("a slot"));
        p.good.run_pending_tasks().await;
        assert_eq!(p.good.entry_count(), 1, "only the good password is remembered");
        assert!(p.verify("alice", "secret", &hash).await.expect("a slot"));
    }
}
