//! Helpers for the project's own tests (not a stable API).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file below `dir`, recursively, sorted.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The YAML documents of a file as JSON values, parsed by PyYAML (`yaml.safe_load_all`).
///
/// # Errors
/// A message when python3/PyYAML is missing or the YAML does not parse.
pub fn yaml_documents(path: &Path) -> Result<Vec<serde_json::Value>, String> {
    let script = "import json, sys, yaml\nprint(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))";
    let out = Command::new("python3").args(["-c", script]).arg(path).output().map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(format!("{}: {}", path.display(), String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The string `data.<key>` or `stringData.<key>` of the Kubernetes object `kind`/`name` in a
/// manifest file.
///
/// # Errors
/// A message when the object or key is missing.
pub fn k8s_embedded(path: &Path, kind: &str, name: &str, key: &str) -> Result<String, String> {
    let docs = yaml_documents(path)?;
    let obj = docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| format!("no {kind}/{name} in {}", path.display()))?;
    obj["data"][key]
        .as_str()
        .or_else(|| obj["stringData"][key].as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{kind}/{name} has no {key}"))
}

/// A loopback TCP port that was free a moment ago (for servers that must know each other's
/// ports before they start).
///
/// # Panics
/// If no port can be bound.
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

/// As [`free_tcp_port`], for UDP.
///
/// # Panics
/// If no port can be bound.
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a loopback port");
    s.local_addr().expect("local address").port()
}

/// `n` pseudo-random bytes from a xorshift generator seeded (and advanced) by `seed`: the same
/// hostile input on every run.
pub fn noise(seed: &mut u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

/// Answers a WebSocket upgrade request and echoes every message it then receives as a text
/// message (a test origin). The caller gives the returned `101` head a body of its own type.
pub fn ws_echo_upgrade(req: &mut hyper::Request<hyper::body::Incoming>) -> hyper::Response<()> {
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warren_relay_proto::ws::{self, Role, WsDecoder};

    let key = req.headers().get("sec-websocket-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut io = hyper_util::rt::TokioIo::new(up);
        let (mut dec, mut input, mut data) = (WsDecoder::new(Role::Server), BytesMut::new(), BytesMut::new());
        loop {
            while let Ok(Some(_)) = dec.decode(&mut input, &mut data) {}
            if !data.is_empty() {
                let mut out = BytesMut::new();
                ws::encode_frame(&mut out, ws::opcode::TEXT, &data.split(), None);
                if io.write_all(&out).await.is_err() {
                    return;
                }
            }
            input.reserve(4096);
            if !matches!(io.read_buf(&mut input).await, Ok(n) if n > 0) {
                return;
            }
        }
    });
    let mut r = hyper::Response::new(());
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", hyper::header::HeaderValue::from_static("websocket"));
    h.insert("connection", hyper::header::HeaderValue::from_static("Upgrade"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(&ws::accept_key(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

/// Serves HTTP/1.1 (with upgrades) on a fresh loopback port with `handler`, one task per
/// connection, for as long as the test runs; returns the address (a test origin).
pub async fn http_origin<F, Fut, B>(handler: F) -> std::net::SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a test origin");
    let addr = l.local_addr().expect("origin address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let svc = hyper::service::service_fn(handler.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Calls `f` every 100 ms until it returns a value, for at most `limit`.
///
/// # Panics
/// When `limit` passes first, naming `what` was awaited.
pub fn until<T>(limit: std::time::Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `curl` as a visitor of `https://{host}:{port}{path}` on loopback, trusting only `ca`, with
/// `extra` arguments: the HTTP status (0 when the connection or TLS failed) and what curl
/// printed (the body, after the head when `extra` asks for it with `-D -`).
///
/// # Panics
/// When curl cannot be run.
pub fn curl_https(ca: &Path, host: &str, port: u16, path: &str, extra: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--path-as-is", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1"), "-w", "\n%{http_code}"])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl runs (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}
