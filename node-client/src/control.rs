//! The local control socket of a running node: one JSON request per line, one JSON answer.
//!
//! ```text
//! {"cmd":"status"}                                   -> {"ok":true,"status":{...}}
//! {"cmd":"ping","peer":"<hex>","count":3}            -> {"ok":true,"pings":[{"path":"direct 1.2.3.4:5","rtt_ms":0.4},..]}
//! {"cmd":"send","peer":"<hex>","data":"text"}        -> {"ok":true}
//! {"cmd":"recv","timeout_ms":5000}                   -> {"ok":true,"from":"<hex>","data":"text","path":"relay"}
//! {"cmd":"funnel","target":"8080","port":443}       -> {"ok":true,"urls":["https://<name>.<domain>/"]}
//! {"cmd":"funnel_status"}                           -> {"ok":true,"funnel":{...}|null}
//! {"cmd":"funnel_off"}                              -> {"ok":true}
//! ```
//! Errors answer `{"ok":false,"error":"..."}`. The socket is created 0600.

use std::os::unix::fs::PermissionsExt;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use warren_relay_proto::PublicKey;

use crate::core::paths::Path;
use crate::funnel::{parse_target, Funnel, FunnelConfig};
use crate::node::{Node, NodeError};

/// Longest request line accepted.
const MAX_LINE: u64 = 128 << 10;

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Status,
    Ping {
        peer: String,
        count: Option<u32>,
    },
    Send {
        peer: String,
        data: String,
    },
    Recv {
        timeout_ms: Option<u64>,
    },
    Funnel {
        target: String,
        port: Option<u16>,
    },
    #[serde(rename = "funnel_status")]
    FunnelStatus,
    #[serde(rename = "funnel_off")]
    FunnelOff,
}

/// What the control socket controls: the node and, when an edge is configured, its funnel.
#[derive(Debug)]
pub struct Daemon {
    /// The running node.
    pub node: Arc<Node>,
    /// Edge, token and name for `funnel`; `None` when no edge was configured.
    pub funnel_settings: Option<FunnelConfig>,
    funnel: tokio::sync::Mutex<Option<Funnel>>,
}

impl Daemon {
    /// Stops the funnel, if one runs, giving its requests up to `grace` to finish.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        if let Some(funnel) = self.funnel.lock().await.take() {
            funnel.shutdown(grace).await;
        }
    }

    /// A daemon for `node`, able to publish through the edge of `funnel_settings`.
    pub fn new(node: Arc<Node>, funnel_settings: Option<FunnelConfig>) -> Self {
        Daemon { node, funnel_settings, funnel: tokio::sync::Mutex::new(None) }
    }
}

/// Serves the control socket at `path` until `cancel` fires.
///
/// # Errors
/// I/O errors binding the socket.
pub async fn serve(daemon: Arc<Daemon>, path: &FsPath, cancel: CancellationToken) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let clients = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control accept failed");
                    continue;
                }
            },
        };
        let (daemon, cancel) = (daemon.clone(), cancel.clone());
        clients.spawn(async move {
            tokio::select! {
                () = handle(daemon, stream) => {}
                () = cancel.cancelled() => {}
            }
        });
    }
    let _ = std::fs::remove_file(path);
    // Open control connections (e.g. a `warren recv` waiting) end with the node.
    clients.close();
    clients.wait().await;
    Ok(())
}

async fn handle(daemon: Arc<Daemon>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(&daemon, req).await,
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        let mut out = answer.to_string();
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn path_str(p: Path) -> String {
    match p {
        Path::Direct(a) => format!("direct {a}"),
        Path::Relay => "relay".into(),
    }
}

fn err(e: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": e.to_string()})
}

async fn answer(daemon: &Daemon, req: Request) -> Value {
    let node = &daemon.node;
    match req {
        Request::Status => match node.status().await {
            Ok(s) => json!({"ok": true, "status": s}),
            Err(e) => err(e),
        },
        Request::Ping { peer, count } => {
            let Ok(peer) = PublicKey::from_hex(&peer) else { return err("peer must be 64 hex digits") };
            let mut pings = Vec::new();
            for _ in 0..count.unwrap_or(1).clamp(1, 100) {
                match node.ping(peer, Duration::from_secs(3)).await {
                    Ok((path, rtt)) => pings.push(json!({"path": path_str(path), "rtt_ms": rtt.as_secs_f64() * 1e3})),
                    Err(NodeError::Timeout) => pings.push(json!({"path": null, "error": "timeout"})),
                    Err(e) => return err(e),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            json!({"ok": true, "pings": pings})
        }
        Request::Send { peer, data } => {
            let Ok(peer) = PublicKey::from_hex(&peer) else { return err("peer must be 64 hex digits") };
            match node.send(peer, Bytes::from(data.into_bytes())).await {
                Ok(()) => json!({"ok": true}),
                Err(e) => err(e),
            }
        }
        Request::Recv { timeout_ms } => {
            let wait = Duration::from_millis(timeout_ms.unwrap_or(5000).min(600_000));
            match tokio::time::timeout(wait, node.recv()).await {
                Ok(Ok(r)) => json!({
                    "ok": true,
                    "from": r.from.to_hex(),
                    "data": String::from_utf8_lossy(&r.data),
                    "path": path_str(r.path),
                }),
                Ok(Err(e)) => err(e),
                Err(_) => err("timeout"),
            }
        }
        Request::Funnel { target, port } => {
            let Some(settings) = &daemon.funnel_settings else {
                return err("no edge configured: start `warren up` with --edge and --funnel-token");
            };
            let target = match parse_target(&target) {
                Ok(t) => t,
                Err(e) => return err(e),
            };
            let cfg = FunnelConfig { target, ports: vec![port.unwrap_or(443)], ..settings.clone() };
            let mut slot = daemon.funnel.lock().await;
            *slot = None; // stops the previous funnel first
            let funnel = Funnel::start(cfg);
            let result = funnel.wait_registered(Duration::from_secs(15)).await;
            *slot = Some(funnel);
            match result {
                Ok(urls) => json!({"ok": true, "urls": urls}),
                Err(e) => {
                    err(format!("funnel not registered yet: {e} (it keeps retrying; see `warren funnel status`)"))
                }
            }
        }
        Request::FunnelStatus => {
            let slot = daemon.funnel.lock().await;
            json!({"ok": true, "funnel": slot.as_ref().map(Funnel::status)})
        }
        Request::FunnelOff => {
            *daemon.funnel.lock().await = None;
            json!({"ok": true})
        }
    }
}

/// Sends one request to the node at `path` and returns its answer.
///
/// # Errors
/// I/O errors, or an answer that is not JSON.
pub async fn request(path: &FsPath, req: &Value) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(path).await?;
    let mut line = req.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(stream).lines();
    let answer = lines.next_line().await?.ok_or_else(|| std::io::Error::other("no answer"))?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}
