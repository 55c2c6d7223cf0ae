//! The HTTP side of the DERP port.
//!
//! The first request head on a connection is parsed here (bounded), because a DERP upgrade
//! with `Derp-Fast-Start: 1` must get no HTTP response at all, which an HTTP library would not
//! allow. Upgrades to DERP or WebSocket go to the connection actor; every other request, with
//! the bytes already read, goes to hyper: probes, `/generate_204`, `/healthz`, the landing page.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt};
use warren_relay_proto::{ws, PROTOCOL_VERSION};

use crate::state::Shared;

/// Largest request head accepted.
pub(crate) const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 64;

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) method: String,
    pub(crate) path: String,
    headers: Vec<(String, String)>,
}

impl RequestHead {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// What the first request asks for.
#[derive(Debug)]
pub(crate) enum Route {
    /// `Upgrade: DERP`; `fast_start` means no 101 response is wanted.
    Derp { fast_start: bool },
    /// WebSocket with subprotocol `derp`: the 101 response to send.
    WebSocket { response: String },
    /// Anything else: served by hyper.
    Http,
    /// A malformed upgrade: status and message to answer with before closing.
    Reject(StatusCode, &'static str),
}

/// Why no head could be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    Closed,
    TooLarge,
    Malformed,
}

/// Reads one request head into `buf` and parses it. Returns the head and its length in
/// `buf`; `buf` keeps every byte read (hyper needs the head again for plain requests).
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<(RequestHead, usize), HeadError> {
    loop {
        if let Some(parsed) = parse_head(buf)? {
            return Ok(parsed);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(1024);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

pub(crate) fn parse_head_for_fuzzing(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    parse_head(buf)
}

fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let head = RequestHead {
                method: req.method.unwrap_or_default().to_owned(),
                path: req.path.unwrap_or_default().to_owned(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect(),
            };
            Ok(Some((head, len)))
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed),
    }
}

/// Decides how to serve a request head.
pub(crate) fn route(head: &RequestHead) -> Route {
    let path = head.path.split('?').next().unwrap_or_default();
    if path != "/derp" || head.method != "GET" {
        return Route::Http;
    }
    let Some(upgrade) = head.header("Upgrade") else {
        return Route::Http; // hyper answers 426
    };
    if upgrade.trim().eq_ignore_ascii_case("derp") {
        return Route::Derp { fast_start: head.header("Derp-Fast-Start").map(str::trim) == Some("1") };
    }
    if !upgrade.trim().eq_ignore_ascii_case("websocket") {
        return Route::Reject(StatusCode::BAD_REQUEST, "unsupported upgrade; use DERP or websocket");
    }
    if !head.header_has_token("Sec-WebSocket-Protocol", ws::SUBPROTOCOL) {
        return Route::Reject(StatusCode::BAD_REQUEST, "websocket subprotocol \"derp\" required");
    }
    if head.header("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        return Route::Reject(StatusCode::BAD_REQUEST, "websocket version 13 required");
    }
    let Some(key) = head.header("Sec-WebSocket-Key").filter(|k| !k.trim().is_empty()) else {
        return Route::Reject(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        ws::accept_key(key),
        ws::SUBPROTOCOL
    );
    Route::WebSocket { response }
}

/// The 101 response to `Upgrade: DERP`.
pub(crate) fn derp_switching_response(server_key_hex: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: {PROTOCOL_VERSION}\r\nDerp-Public-Key: {server_key_hex}\r\n\r\n"
    )
}

/// A complete, closing plain-text error response.
pub(crate) fn error_response(status: StatusCode, msg: &str) -> String {
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        msg.len() + 1
    )
}

/// The challenge echo of `/generate_204`: only short values of a safe alphabet are echoed.
pub(crate) fn challenge_response(challenge: &str) -> Option<String> {
    let ok = challenge.len() <= 64
        && !challenge.is_empty()
        && challenge.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    ok.then(|| format!("response {challenge}"))
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

const LANDING: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Warren relay</title></head>\n<body><h1>Warren relay</h1>\n<p>This is a Warren relay. It forwards end-to-end encrypted packets between mesh nodes\n(DERP v2 at <code>/derp</code>) and answers STUN. There is nothing to see here in a browser.</p>\n</body></html>\n";

/// The plain HTTP endpoints of the DERP port.
pub(crate) fn serve_http(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    shared.metrics.http_requests.increment(1);
    let get_or_head = matches!(*req.method(), Method::GET | Method::HEAD);
    let resp = match req.uri().path() {
        _ if !get_or_head => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        "/" => {
            let mut r = text(StatusCode::OK, LANDING);
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
            r
        }
        "/derp/probe" | "/derp/latency-check" => {
            let mut r = text(StatusCode::OK, "");
            r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, header::HeaderValue::from_static("*"));
            r
        }
        "/generate_204" => {
            let mut r = text(StatusCode::NO_CONTENT, "");
            let challenge = req.headers().get("X-Tailscale-Challenge").and_then(|v| v.to_str().ok());
            if let Some(v) = challenge.and_then(challenge_response).and_then(|v| header::HeaderValue::from_str(&v).ok())
            {
                r.headers_mut().insert("X-Tailscale-Response", v);
            }
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache, no-store, must-revalidate, no-transform, max-age=0"),
            );
            r
        }
        "/healthz" if shared.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/derp" => text(StatusCode::UPGRADE_REQUIRED, "DERP requires connection upgrade\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> RequestHead {
        parse_head(raw.as_bytes()).ok().flatten().expect("complete head").0
    }

    #[test]
    fn routes() {
        let derp = head("GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n");
        assert!(matches!(route(&derp), Route::Derp { fast_start: false }));
        let fast = head("GET /derp HTTP/1.1\r\nUpgrade: derp\r\nDerp-Fast-Start: 1\r\n\r\n");
        assert!(matches!(route(&fast), Route::Derp { fast_start: true }));
        let ws = head("GET /derp HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: chat, derp\r\n\r\n");
        match route(&ws) {
            Route::WebSocket { response } => {
                assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"))
            }
            other => panic!("expected websocket, got {other:?}"),
        }
        let no_proto = head(
            "GET /derp HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: a\r\n\r\n",
        );
        assert!(matches!(route(&no_proto), Route::Reject(StatusCode::BAD_REQUEST, _)));
        assert!(matches!(route(&head("GET /derp/probe HTTP/1.1\r\n\r\n")), Route::Http));
        assert!(matches!(route(&head("GET /derp HTTP/1.1\r\n\r\n")), Route::Http));
    }

    #[test]
    fn heads_are_bounded_and_validated() {
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nHost"), Ok(None)));
        assert!(matches!(parse_head(b"\x00\x01garbage\r\n\r\n"), Err(HeadError::Malformed)));
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        assert!(matches!(parse_head(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), Err(HeadError::TooLarge)));
    }

    #[test]
    fn challenge_echo_only_for_safe_values() {
        assert_eq!(challenge_response("abc-1.2_3:4").as_deref(), Some("response abc-1.2_3:4"));
        assert_eq!(challenge_response("bad value"), None);
        assert_eq!(challenge_response(&"a".repeat(65)), None);
        assert_eq!(challenge_response(""), None);
    }
}
