//! Who may reach an HTTP service, as the node's owner writes it, and the rules the edges get.
//!
//! ```toml
//! [[services]]
//! port = 443
//! path = "/admin"
//! target = "3000"
//! [services.access]
//! basic = ["alice:$2b$10$…"]          # bcrypt (warren hash-password, htpasswd -B, caddy hash-password)
//! bearer = ["sha256:<hex>", "TOKEN"]  # sent to the edge as SHA-256 digests only
//! allow = ["10.0.0.0/8", "2001:db8::/32"]
//! deny = ["10.9.0.0/16"]
//! rate = 20                           # requests per second at the edge (burst: one second)
//! burst = 40
//! forward_auth = "sso"                # an endpoint the edge's operator configured
//! ```
//!
//! The edges enforce every rule ([`warren_tunnel_proto::AccessRule`]). Each rule set has a
//! generation; the node refuses a request for a protected service unless the edge says it
//! enforced that service's rule at a generation at least as new as the rule
//! ([`AccessBook::enforced`]), so a service never runs ahead of its protection.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use warren_common::cidr::Cidr;
use warren_tunnel_proto::{AccessRule, RequestHead};

use super::ServiceError;

/// A service's access rule as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSpec {
    /// `user:bcrypt-hash` pairs for HTTP basic auth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub basic: Vec<String>,
    /// Bearer tokens, as `sha256:<hex>` digests or the tokens themselves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bearer: Vec<String>,
    /// Visitor networks let in (CIDR); empty lets every network in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Visitor networks kept out, checked first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Requests per second, enforced at the edge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    /// Requests at once above the rate (default: one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// The name of a forward-auth endpoint the edge's operator configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_auth: Option<String>,
}

impl AccessSpec {
    /// Whether the rule restricts anything.
    pub fn is_open(&self) -> bool {
        *self == AccessSpec::default()
    }

    /// Checks the rule without I/O.
    ///
    /// # Errors
    /// [`ServiceError::Access`] saying which entry is wrong.
    pub fn check(&self) -> Result<(), ServiceError> {
        let bad = |s: String| Err(ServiceError::Access(s));
        for entry in &self.basic {
            let Some((user, hash)) = entry.split_once(':') else {
                return bad(format!("basic entry {:?} is not user:bcrypt-hash", short(entry)));
            };
            if user.is_empty() || bcrypt::HashParts::from_str(hash).is_err() {
                return bad(format!(
                    "basic entry for {user:?}: the password must be a bcrypt hash (warren hash-password)"
                ));
            }
        }
        for token in &self.bearer {
            if token.is_empty() || token.starts_with("sha256:") && digest_of(token).is_none() {
                return bad("a bearer entry is empty or not sha256:<64 hex digits>".into());
            }
        }
        for net in self.allow.iter().chain(&self.deny) {
            net.parse::<Cidr>().map_err(|e| ServiceError::Access(e.to_string()))?;
        }
        if self.rate == Some(0) || self.burst == Some(0) || self.burst.is_some() && self.rate.is_none() {
            return bad("rate and burst are at least 1, and burst needs a rate".into());
        }
        if let Some(name) = &self.forward_auth {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return bad(format!("forward_auth {name:?} is not an endpoint name"));
            }
            if !self.basic.is_empty() || !self.bearer.is_empty() {
                return bad("forward_auth decides alone: no basic or bearer entries beside it".into());
            }
        }
        Ok(())
    }

    /// The rule an edge gets for the service at `port` and `mount` (checked first: entries
    /// that do not parse are left out).
    pub fn rule(&self, port: u16, mount: &str) -> AccessRule {
        AccessRule {
            port,
            path: mount.to_owned(),
            basic: self.basic.iter().filter_map(|e| e.split_once(':')).map(|(u, h)| (u.into(), h.into())).collect(),
            bearer: self.bearer.iter().filter_map(|t| digest_of(t)).collect(),
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            rate: self.rate.unwrap_or(0),
            burst: self.burst.or(self.rate).unwrap_or(0),
            forward_auth: self.forward_auth.clone().unwrap_or_default(),
        }
    }

    /// Replaces plain bearer tokens by their `sha256:<hex>` digests, so that what is saved
    /// (the node's state file) holds no token.
    pub fn digest_tokens(&mut self) {
        for t in &mut self.bearer {
            if !t.starts_with("sha256:") {
                if let Some(d) = digest_of(t) {
                    *t = format!("sha256:{}", hex::encode(d));
                }
            }
        }
    }

    /// A one-line summary for `warren funnel status`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.basic.is_empty() {
            let users: Vec<_> = self.basic.iter().filter_map(|e| e.split_once(':')).map(|(u, _)| u).collect();
            parts.push(format!("basic auth ({})", users.join(", ")));
        }
        if !self.bearer.is_empty() {
            parts.push(format!("{} bearer token(s)", self.bearer.len()));
        }
        if let Some(fa) = &self.forward_auth {
            parts.push(format!("forward-auth {fa}"));
        }
        if !self.allow.is_empty() {
            parts.push(format!("allow {}", self.allow.join(" ")));
        }
        if !self.deny.is_empty() {
            parts.push(format!("deny {}", self.deny.join(" ")));
        }
        if let Some(r) = self.rate {
            parts.push(format!("{r}/s"));
        }
        parts.join(", ")
    }
}

fn short(s: &str) -> String {
    s.chars().take(24).collect()
}

/// The SHA-256 digest an edge gets for a bearer entry: `sha256:<hex>` decoded, or the token's.
fn digest_of(entry: &str) -> Option<Vec<u8>> {
    if let Some(hex) = entry.strip_prefix("sha256:") {
        return hex::decode(hex).ok().filter(|d| d.len() == 32);
    }
    Some(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, entry.as_bytes()).as_ref().to_vec())
}

/// The node's rules for its edges, with their generation and the generation each rule has
/// been the same since.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessBook {
    /// Counts up with every change; 1 for the first set.
    pub generation: u32,
    /// One per HTTP service.
    pub rules: Vec<AccessRule>,
    /// For each rule, the generation it first appeared in as it is.
    since: Vec<u32>,
}

impl AccessBook {
    /// The book for `rules` after `old`: the same generation if nothing changed, else the
    /// next, with unchanged rules keeping their age.
    pub fn next(old: &AccessBook, rules: Vec<AccessRule>) -> AccessBook {
        if old.generation > 0 && rules == old.rules {
            return old.clone();
        }
        let generation = old.generation.wrapping_add(1).max(1);
        let since =
            rules.iter().map(|r| old.rules.iter().position(|o| o == r).map_or(generation, |i| old.since[i])).collect();
        AccessBook { generation, rules, since }
    }

    /// Whether the edge enforced the rule of the service at `port` and `mount` for `head`:
    /// always for an open service; for a protected one only if the head names that rule at
    /// a generation no older than the rule.
    pub fn enforced(&self, port: u16, mount: &str, head: &RequestHead) -> bool {
        let Some(i) = self.rules.iter().position(|r| r.port == port && r.path == mount) else { return true };
        if is_open(&self.rules[i]) {
            return true;
        }
        head.checked.as_ref().is_some_and(|c| c.mount == mount && c.generation >= self.since[i])
    }
}

fn is_open(r: &AccessRule) -> bool {
    *r == AccessRule { port: r.port, path: r.path.clone(), ..AccessRule::default() }
}

#[cfg(test)]
mod tests {
    use warren_tunnel_proto::Checked;

    use super::*;

    fn spec(text: &str) -> AccessSpec {
        toml::from_str(text).expect("parses")
    }

    #[test]
    fn rules_are_checked_and_secrets_leave_as_hashes_and_digests() {
        let hash = bcrypt::hash("pw", 4).expect("hashes");
        let a = spec(&format!(
            "basic = [\"alice:{hash}\"]\nbearer = [\"tok\", \"sha256:{}\"]\nallow = [\"10.0.0.0/8\"]\nrate = 5\n",
            "ab".repeat(32)
        ));
        assert_eq!(a.check(), Ok(()));
        let rule = a.rule(443, "/admin");
        assert_eq!(rule.basic, vec![("alice".to_owned(), hash)]);
        assert_eq!(rule.bearer[0].len(), 32);
        assert_ne!(rule.bearer[0], b"tok".to_vec(), "the token itself never leaves");
        assert_eq!(rule.bearer[1], vec![0xab; 32]);
        assert_eq!((rule.rate, rule.burst), (5, 5));
        let mut saved = a.clone();
        saved.digest_tokens();
        assert!(saved.bearer.iter().all(|t| t.starts_with("sha256:")), "{:?}", saved.bearer);
        assert_eq!(saved.rule(443, "/admin"), rule, "the same rule either way");
        assert!(a.summary().contains("basic auth (alice)"), "{}", a.summary());
        for bad in [
            "basic = [\"alice:plaintext\"]",
            "basic = [\"nocolon\"]",
            "bearer = [\"sha256:abc\"]",
            "allow = [\"10.0.0.1/8\"]",
            "deny = [\"nonsense\"]",
            "rate = 0",
            "burst = 3",
            "forward_auth = \"a b\"",
            "forward_auth = \"sso\"\nbearer = [\"t\"]",
        ] {
            assert!(matches!(spec(bad).check(), Err(ServiceError::Access(_))), "{bad}");
        }
        assert!(toml::from_str::<AccessSpec>("password = \"x\"").is_err(), "unknown keys are refused");
    }

    #[test]
    fn generations_count_changes_and_rules_keep_their_age() {
        let open = AccessRule { port: 443, path: "/".into(), ..AccessRule::default() };
        let locked = AccessRule { port: 443, path: "/a".into(), rate: 1, burst: 1, ..AccessRule::default() };
        let first = AccessBook::next(&AccessBook::default(), vec![open.clone()]);
        assert_eq!(first.generation, 1);
        assert_eq!(AccessBook::next(&first, vec![open.clone()]), first, "no change, same generation");
        let second = AccessBook::next(&first, vec![open.clone(), locked.clone()]);
        assert_eq!(second.generation, 2);
        let head = |generation, mount: &str| RequestHead {
            checked: Some(Checked { generation, mount: mount.into() }),
            ..RequestHead::default()
        };
        assert!(second.enforced(443, "/", &RequestHead::default()), "an open service needs no mark");
        assert!(!second.enforced(443, "/a", &RequestHead::default()), "no mark from the edge");
        assert!(!second.enforced(443, "/a", &head(1, "/a")), "checked against older rules");
        assert!(!second.enforced(443, "/a", &head(2, "/")), "checked against another service's rule");
        assert!(second.enforced(443, "/a", &head(2, "/a")));
        let third = AccessBook::next(&second, vec![locked, open]);
        assert_eq!(third.generation, 3);
        assert!(third.enforced(443, "/a", &head(2, "/a")), "an unchanged rule keeps its age");
    }
}
