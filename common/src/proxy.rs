//! HTTP CONNECT proxies: how a node behind one reaches its relay and its edges over TCP.
//!
//! ```text
//! node ──TCP──▶ proxy   CONNECT edge.example:443 HTTP/1.1
//!                       Host: edge.example:443
//!                       Proxy-Authorization: Basic …        (when the URL has user:password)
//!      ◀──────────────  HTTP/1.1 200 Connection established
//!      ════ TLS to edge.example, end to end ════════════════▶
//! ```
//!
//! Proxies come from a URL (`http://[user:password@]host[:port]`, port 3128 by default) or
//! from the environment as curl reads it: `HTTPS_PROXY`/`https_proxy`, then
//! `ALL_PROXY`/`all_proxy`, except for hosts `NO_PROXY`/`no_proxy` names. Every failure names
//! the proxy (never its password): one that cannot be reached, refuses (407, 403…), answers
//! something that is not HTTP, or does not answer in time. The proxy's answer head is bounded
//! ([`MAX_ANSWER`]) and parsed by [`parse_answer`], which never panics on any input.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::io::Prefixed;

/// Largest proxy answer head read.
pub const MAX_ANSWER: usize = 16 << 10;
/// Port of a proxy URL that names none (squid's and tinyproxy's default).
pub const DEFAULT_PORT: u16 = 3128;

/// An HTTP proxy that tunnels with CONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `user:password`, base64, for `Proxy-Authorization: Basic`.
    auth: Option<String>,
    user: Option<String>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({self})")
    }
}

/// The proxy as `http://[user@]host:port`, without its password.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match &self.user {
            Some(u) => write!(f, "http://{u}@{host}:{}", self.port),
            None => write!(f, "http://{host}:{}", self.port),
        }
    }
}

/// Why a proxy could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The proxy URL is not one this client speaks.
    #[error("proxy URL {url:?}: {why}")]
    Url {
        /// The URL, password removed.
        url: String,
        /// What is wrong.
        why: &'static str,
    },
    /// No TCP connection to the proxy.
    #[error("cannot reach proxy {proxy}: {source}")]
    Unreachable {
        /// The proxy.
        proxy: String,
        /// The connect error.
        source: std::io::Error,
    },
    /// The proxy answered CONNECT with an error status.
    #[error("proxy {proxy} refused CONNECT {target}: {status} {reason}{hint}")]
    Refused {
        /// The proxy.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// The status code.
        status: u16,
        /// Its reason phrase.
        reason: String,
        /// What to check, for statuses that say.
        hint: &'static str,
    },
    /// The proxy's answer is not an HTTP response (or its head is over [`MAX_ANSWER`]).
    #[error("proxy {proxy} answered CONNECT with something that is not HTTP: {why}")]
    Garbage {
        /// The proxy.
        proxy: String,
        /// What was wrong with it.
        why: String,
    },
    /// The proxy closed the connection, or failed, before answering.
    #[error("proxy {proxy} closed the connection before answering CONNECT")]
    Closed {
        /// The proxy.
        proxy: String,
    },
    /// No complete answer in time.
    #[error("proxy {proxy} did not answer CONNECT within {limit:?}")]
    Timeout {
        /// The proxy.
        proxy: String,
        /// The deadline.
        limit: Duration,
    },
}

/// What [`parse_answer`] found in a complete answer head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// Bytes of the head, up to and including the blank line.
    pub head_len: usize,
}

/// Parses the head of a proxy's answer to CONNECT: `Ok(None)` while incomplete, the status
/// once complete, an error for bytes that cannot be an HTTP/1 response head.
///
/// # Errors
/// A description of what is wrong.
pub fn parse_answer(buf: &[u8]) -> Result<Option<Answer>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            let status = resp.code.unwrap_or(0);
            let reason = resp.reason.unwrap_or("").chars().filter(|c| !c.is_control()).take(200).collect();
            Ok(Some(Answer { status, reason, head_len }))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_ANSWER => Err(format!("answer head over {MAX_ANSWER} bytes")),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => {
            let start: String = String::from_utf8_lossy(&buf[..buf.len().min(40)])
                .chars()
                .map(|c| if c.is_control() { '.' } else { c })
                .collect();
            Err(format!("{e} (it began {start:?})"))
        }
    }
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port][/]`.
    ///
    /// # Errors
    /// [`ProxyError::Url`] for another scheme (HTTPS proxies are not spoken), a path, or a bad
    /// port or host.
    pub fn parse(url: &str) -> Result<Proxy, ProxyError> {
        let shown = redact(url);
        let bad = |why| ProxyError::Url { url: shown.clone(), why };
        let rest = if let Some((scheme, rest)) = url.split_once("://") {
            if !scheme.eq_ignore_ascii_case("http") {
                return Err(bad("only http:// proxies are supported (CONNECT over plain TCP)"));
            }
            rest
        } else {
            url
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(bad("a proxy URL has no path"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("host[:port] expected"))?;
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("no host"));
        }
        let (auth, user) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let (user, pass) = (
                    percent_decode(user).ok_or_else(|| bad("bad %-escape"))?,
                    percent_decode(pass).ok_or_else(|| bad("bad %-escape"))?,
                );
                let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                (Some(creds), Some(user))
            }
        };
        Ok(Proxy { host: host.to_owned(), port: port.unwrap_or(DEFAULT_PORT), auth, user })
    }

    /// The proxy the environment names for reaching `host`, if any (see the module docs).
    ///
    /// # Errors
    /// [`ProxyError::Url`] when the variable's value is not a usable proxy URL.
    pub fn from_env(host: &str) -> Result<Option<Proxy>, ProxyError> {
        let var = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()));
        let Some(url) = var(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]) else { return Ok(None) };
        if var(&["NO_PROXY", "no_proxy"]).is_some_and(|list| no_proxy_matches(&list, host)) {
            return Ok(None);
        }
        Proxy::parse(url.trim()).map(Some)
    }

    /// Opens a TCP connection to `host:port` through the proxy, within `limit`. Bytes the
    /// proxy sent after its answer head are kept for the caller.
    ///
    /// # Errors
    /// [`ProxyError`], naming the proxy.
    pub async fn connect(&self, host: &str, port: u16, limit: Duration) -> Result<Prefixed<TcpStream>, ProxyError> {
        let proxy = self.to_string();
        tokio::time::timeout(limit, self.connect_inner(host, port))
            .await
            .map_err(|_| ProxyError::Timeout { proxy, limit })?
    }

    async fn connect_inner(&self, host: &str, port: u16) -> Result<Prefixed<TcpStream>, ProxyError> {
        let proxy = self.to_string();
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ProxyError::Unreachable { proxy: proxy.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: warren\r\n");
        if let Some(auth) = &self.auth {
            request.push_str(&format!("Proxy-Authorization: Basic {auth}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await.map_err(|_| ProxyError::Closed { proxy: proxy.clone() })?;
        let mut buf = BytesMut::with_capacity(1024);
        let answer = loop {
            if let Some(a) = parse_answer(&buf).map_err(|why| ProxyError::Garbage { proxy: proxy.clone(), why })? {
                break a;
            }
            let n = tcp.read_buf(&mut buf).await.map_err(|_| ProxyError::Closed { proxy: proxy.clone() })?;
            if n == 0 {
                return Err(ProxyError::Closed { proxy });
            }
        };
        if !(200..300).contains(&answer.status) {
            let hint = match answer.status {
                401 | 407 => " (check the proxy's user and password)",
                403 => " (the proxy may not allow CONNECT to this port)",
                _ => "",
            };
            return Err(ProxyError::Refused { proxy, target, status: answer.status, reason: answer.reason, hint });
        }
        let after: Bytes = buf.split_off(answer.head_len).freeze();
        Ok(Prefixed::new(after, tcp))
    }
}

/// Whether a `NO_PROXY` list exempts `host`: `*`, the host itself, or a domain it is under
/// (`example.com` and `.example.com` both cover `a.example.com`). Ports in entries are
/// ignored.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.trim_matches(['[', ']']).trim_end_matches('.').to_ascii_lowercase();
    list.split(',').map(str::trim).filter(|e| !e.is_empty()).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = match split_host_port(entry) {
            Some((h, _)) => h,
            None => entry,
        };
        let entry = entry.trim_start_matches("*.").trim_start_matches('.').trim_end_matches('.').to_ascii_lowercase();
        !entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}")))
    })
}

/// `host[:port]`, `[v6][:port]` or a bare IPv6 address.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => Some((s, None)),
        Some((h, p)) => Some((h, Some(p.parse().ok().filter(|p| *p != 0)?))),
        None => Some((s, None)),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A proxy URL with its password replaced by `***`.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    let prefix = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{prefix}{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_never_show_the_password() {
        let p = Proxy::parse("http://alice:s%40cret@proxy.example:8080/").expect("valid");
        assert_eq!(p.to_string(), "http://alice@proxy.example:8080");
        assert_eq!(p.auth.as_deref(), Some(base64::engine::general_purpose::STANDARD.encode("alice:s@cret").as_str()));
        assert_eq!(Proxy::parse("proxy.example").expect("valid").to_string(), "http://proxy.example:3128");
        assert_eq!(Proxy::parse("http://[::1]:3128").expect("valid").to_string(), "http://[::1]:3128");
        for bad in [
            "https://p:1",
            "socks5://p:1",
            "http://p:1/path",
            "http://:3128",
            "http://p:x",
            "http://p:0",
            "http://u:%zz@p",
        ] {
            let e = Proxy::parse(bad).expect_err(bad).to_string();
            assert!(!e.contains("cret"), "{e}");
        }
        let e = Proxy::parse("https://bob:hunter2@p:1").expect_err("https").to_string();
        assert!(e.contains("bob:***@p:1") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn no_proxy_lists_match_hosts_and_domains() {
        let list = "localhost, .internal.example,10.0.0.5, corp.example:443";
        for host in
            ["localhost", "a.internal.example", "internal.example", "10.0.0.5", "x.corp.example", "CORP.example."]
        {
            assert!(no_proxy_matches(list, host), "{host}");
        }
        for host in ["example", "notinternal.example", "10.0.0.50", "corp.example.org"] {
            assert!(!no_proxy_matches(list, host), "{host}");
        }
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("", "anything"));
    }

    #[test]
    fn answers_parse_in_pieces_and_garbage_is_an_error() {
        let ok = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\nEXTRA";
        for cut in 0..ok.len() - 5 {
            assert_eq!(parse_answer(&ok[..cut]), Ok(None), "cut at {cut}");
        }
        let a = parse_answer(ok).expect("valid").expect("complete");
        assert_eq!((a.status, a.reason.as_str(), a.head_len), (200, "Connection established", ok.len() - 5));
        let denied =
            parse_answer(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n").expect("valid").expect("complete");
        assert_eq!(denied.status, 407);
        for garbage in
            [&b"SSH-2.0-OpenSSH_9.2\r\n"[..], b"\x16\x03\x01\x02\x00\x01", b"HTTP/1.1 abc OK\r\n\r\n", b"<html>"]
        {
            assert!(parse_answer(garbage).is_err(), "{garbage:?}");
        }
        let endless = [b"HTTP/1.1 200 OK\r\n".as_slice(), &b"X-Pad: aaaaaaaa\r\n".repeat(MAX_ANSWER / 16)].concat();
        assert!(parse_answer(&endless).is_err());
    }

    #[test]
    fn corrupted_answers_never_panic() {
        let ok = b"HTTP/1.1 200 Connection established\r\nVia: 1.1 proxy\r\n\r\n".to_vec();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..5000 {
            let mut v = ok.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % v.len();
                v[i] = (seed >> 32) as u8;
            }
            let _ = parse_answer(&v);
        }
    }
}
