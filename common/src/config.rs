//! Configuration plumbing shared by the binaries: the error type, TOML loading, durations and
//! addresses with messages that name the offending key.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        /// The offending key.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { field, reason: reason.into() }
    }
}

/// `[admin]` of every server config: the listener for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Whether to serve the admin endpoints (default true).
    pub enabled: Option<bool>,
    /// TCP address.
    pub listen: Option<String>,
}

/// Reads and parses a TOML file.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`].
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), source: Box::new(e) })
}

/// Parses TOML text.
///
/// # Errors
/// [`ConfigError::Parse`].
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), source: Box::new(e) })
}

/// Parses `"250ms"`, `"10s"`, `"2m"`, `"1h"`, `"30d"` (one number, one unit).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        "d" => n.checked_mul(86_400).map(Duration::from_secs),
        _ => None,
    }
}

/// A duration as config files write it (`"250ms"`, `"10s"`, `"2m"`, `"1h"`, `"30d"`), parsed when the
/// file is read: a bad one is a parse error naming its key and line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    /// `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        ConfigDuration(Duration::from_millis(ms))
    }

    /// `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        ConfigDuration(Duration::from_secs(s))
    }

    /// The value in `v`, or `default` when the key is absent.
    pub fn or(v: Option<ConfigDuration>, default: Duration) -> Duration {
        v.map_or(default, |d| d.0)
    }
}

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration like \"500ms\", \"10s\" or \"2m\"")]
pub struct DurationError(pub String);

impl std::str::FromStr for ConfigDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, DurationError> {
        parse_duration(s).map(ConfigDuration).ok_or_else(|| DurationError(s.to_owned()))
    }
}

impl TryFrom<String> for ConfigDuration {
    type Error = DurationError;

    fn try_from(s: String) -> Result<Self, DurationError> {
        s.parse()
    }
}

/// A count that must be at least 1.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `field` when `v` is 0.
pub fn nonzero(field: &'static str, v: u32) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(v).ok_or_else(|| ConfigError::invalid(field, "must be at least 1"))
}

/// A rate limit: `per_second` on average, up to `burst` at once. Both are at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: NonZeroU32,
    /// Tokens the bucket holds at most.
    pub burst: NonZeroU32,
}

impl Rate {
    /// A rate from two file keys, each naming itself when it is zero.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key that is 0.
    pub fn new(
        (rate_field, per_second): (&'static str, u32),
        (burst_field, burst): (&'static str, u32),
    ) -> Result<Rate, ConfigError> {
        Ok(Rate { per_second: nonzero(rate_field, per_second)?, burst: nonzero(burst_field, burst)? })
    }

    /// A full token bucket for this rate.
    pub fn bucket(&self, now: std::time::Instant) -> crate::limits::TokenBucket {
        crate::limits::TokenBucket::new(f64::from(self.per_second.get()), f64::from(self.burst.get()), now)
    }
}

/// The largest key file read (a shared key is one line).
pub const MAX_SECRET_FILE: u64 = 4096;

/// Reads a file holding one secret (a mesh or cluster key), refusing anything over
/// [`MAX_SECRET_FILE`] bytes before reading it.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `field` when the file is unreadable or too large.
pub fn read_secret_file(field: &'static str, path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let cannot = |e: std::io::Error| ConfigError::invalid(field, format!("cannot read {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    if len > MAX_SECRET_FILE {
        return Err(ConfigError::invalid(
            field,
            format!("{} holds {len} bytes; a key file holds at most {MAX_SECRET_FILE}", path.display()),
        ));
    }
    let mut text = String::new();
    file.take(MAX_SECRET_FILE).read_to_string(&mut text).map_err(cannot)?;
    Ok(text)
}

/// An `ip:port` address.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `field`.
pub fn socket_addr(field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| ConfigError::invalid(field, format!("{s:?} is not an ip:port address")))
}

/// A list of networks (`10.0.0.0/8`, a bare address), or [`ConfigError::Invalid`] naming
/// `field` and the first bad entry.
pub fn cidrs(field: &'static str, list: &[String]) -> Result<Vec<crate::cidr::Cidr>, ConfigError> {
    list.iter()
        .map(|s| s.parse().map_err(|e: crate::cidr::CidrError| ConfigError::invalid(field, e.to_string())))
        .collect()
}

/// A secret a group of servers shares (a relay region's mesh key, an edge cluster's key): at
/// least [`SharedKey::MIN_LEN`] visible ASCII characters, compared in constant time, never
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey(String);

impl SharedKey {
    /// Shortest key.
    pub const MIN_LEN: usize = 16;

    /// Checks a key (surrounding whitespace, as a key file's newline, is dropped).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `field` and saying what a `what` (e.g. "mesh key") must
    /// be, without the key.
    pub fn parse(field: &'static str, what: &str, key: &str) -> Result<Self, ConfigError> {
        let key = key.trim();
        if key.len() < Self::MIN_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                field,
                format!("a {what} is at least {} visible ASCII characters", Self::MIN_LEN),
            ));
        }
        Ok(SharedKey(key.to_owned()))
    }

    /// Whether `offered` is this key, in time independent of where they differ.
    pub fn matches(&self, offered: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(self.0.as_bytes(), offered.as_bytes()).is_ok()
    }

    /// The key, for this server's own links to its siblings.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ok, big) = (dir.path().join("ok.key"), dir.path().join("big.key"));
        std::fs::write(&ok, "0123456789abcdef-shared\n").expect("write");
        std::fs::write(&big, vec![b'k'; MAX_SECRET_FILE as usize + 1]).expect("write");
        assert_eq!(read_secret_file("mesh.key_file", &ok).expect("read"), "0123456789abcdef-shared\n");
        let refused = read_secret_file("mesh.key_file", &big);
        assert!(matches!(refused, Err(ConfigError::Invalid { field: "mesh.key_file", .. })));
        let missing = read_secret_file("cluster.key_file", &dir.path().join("none"));
        assert!(matches!(missing, Err(ConfigError::Invalid { field: "cluster.key_file", .. })));
    }

    #[test]
    fn durations_and_addresses() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("30d"), Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("99999999999999999999h"), None);
        assert_eq!("5 parsecs".parse::<ConfigDuration>(), Err(DurationError("5 parsecs".into())));
        #[derive(Debug, serde::Deserialize)]
        struct Section {
            #[allow(dead_code)] // read by Debug only
            timeout: Option<ConfigDuration>,
        }
        let refused = parse_toml::<Section>("timeout = \"5 parsecs\"").expect_err("refused");
        assert!(refused.to_string().contains("timeout") && refused.to_string().contains("5 parsecs"), "{refused}");
        let ok: Section = parse_toml("timeout = \"2m\"").expect("parses");
        assert_eq!(ok.timeout, Some(ConfigDuration::from_secs(120)));
        assert!(socket_addr("a", "127.0.0.1:1").is_ok());
        assert!(socket_addr("a", "nope").is_err());
    }
}
