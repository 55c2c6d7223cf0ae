//! The local control socket of a running node: one JSON request per line, one JSON answer.
//!
//! ```text
//! {"cmd":"status"}                                   -> {"ok":true,"status":{...}}
//! {"cmd":"ping","peer":"<hex>[@region]","count":3}  -> {"ok":true,"pings":[{"path":"direct 1.2.3.4:5","rtt_ms":0.4},..]}
//! {"cmd":"send","peer":"<hex>[@region]","data":"text"} -> {"ok":true}
//!     @region (an id or code of the region map) says where the peer is homed
//! {"cmd":"recv","timeout_ms":5000}                   -> {"ok":true,"from":"<hex>","data":"text","path":"relay"}
//! {"cmd":"funnel_add","service":{...},"background":false}
//!                                                    -> {"ok":true,"urls":["https://<name>.<domain>/api"]}
//!     background: saved in services.json and restored at start; otherwise the service lasts
//!     as long as this connection (`warren funnel 3000` in the foreground)
//! {"cmd":"funnel_off","id":"443/api"}                -> {"ok":true}
//! {"cmd":"funnel_reset"}                             -> {"ok":true}   every added service removed
//! {"cmd":"funnel_status"}                            -> {"ok":true,"funnel":{...}|null}
//! {"cmd":"funnel_log"}                               -> {"ok":true}, then one JSON line per request
//! ```
//! Errors answer `{"ok":false,"error":"..."}`. The socket is created 0600.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use warren_relay_proto::PublicKey;

use crate::core::paths::Path;
use crate::funnel::{url_port, Funnel, FunnelConfig};
use crate::node::{Node, NodeError};
use crate::services::{check_all, state, ServiceKind, ServiceSpec};

/// Longest request line accepted.
const MAX_LINE: u64 = 128 << 10;

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
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
    FunnelAdd {
        service: Box<ServiceSpec>,
        #[serde(default)]
        background: bool,
    },
    FunnelOff {
        id: String,
    },
    FunnelReset,
    FunnelStatus,
    FunnelLog,
}

/// Where a published service came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `node.toml`: changed by editing the file.
    Config,
    /// `warren funnel --bg`: saved, restored at start.
    Saved,
    /// `warren funnel` in the foreground: gone when that command ends.
    Foreground,
}

#[derive(Debug, Default)]
struct Services {
    config: Vec<ServiceSpec>,
    saved: Vec<ServiceSpec>,
    /// With the control connection that holds each.
    foreground: Vec<(u64, ServiceSpec)>,
}

impl Services {
    fn all(&self) -> Vec<ServiceSpec> {
        let fg = self.foreground.iter().map(|(_, s)| s.clone());
        self.config.iter().cloned().chain(self.saved.iter().cloned()).chain(fg).collect()
    }

    fn origin_of(&self, id: &str) -> Option<Origin> {
        let has = |v: &[ServiceSpec]| v.iter().any(|s| s.id() == id);
        if has(&self.config) {
            Some(Origin::Config)
        } else if has(&self.saved) {
            Some(Origin::Saved)
        } else if self.foreground.iter().any(|(_, s)| s.id() == id) {
            Some(Origin::Foreground)
        } else {
            None
        }
    }
}

/// What the control socket controls: the node and, when an edge is configured, its funnel.
#[derive(Debug)]
pub struct Daemon {
    /// The running node.
    pub node: Arc<Node>,
    funnel: Option<Funnel>,
    services: tokio::sync::Mutex<Services>,
    state_file: Option<PathBuf>,
}

impl Daemon {
    /// A daemon for `node`. With `funnel` settings it publishes `funnel.services` (from
    /// `node.toml`) and the services saved in `state_file`, and accepts more over the socket.
    ///
    /// # Errors
    /// The saved services cannot be read (a damaged state file is never overwritten).
    pub fn new(
        node: Arc<Node>,
        funnel: Option<FunnelConfig>,
        state_file: Option<PathBuf>,
    ) -> Result<Self, state::StateError> {
        let saved = match &state_file {
            Some(p) => state::load(p)?,
            None => Vec::new(),
        };
        let mut services = Services { saved, ..Default::default() };
        let funnel = funnel.map(|mut cfg| {
            services.config = std::mem::take(&mut cfg.services);
            cfg.services = services.all();
            if !services.saved.is_empty() {
                info!(count = services.saved.len(), "restoring saved funnel services");
            }
            Funnel::start(cfg)
        });
        Ok(Daemon { node, funnel, services: tokio::sync::Mutex::new(services), state_file })
    }

    /// Stops the funnel, if one runs, giving its requests up to `grace` to finish.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        if let Some(funnel) = &self.funnel {
            funnel.shutdown(grace).await;
        }
    }

    /// The funnel, when an edge is configured.
    pub fn funnel(&self) -> Option<&Funnel> {
        self.funnel.as_ref()
    }

    fn apply(&self, services: &Services) -> Vec<crate::funnel::BrokenService> {
        self.funnel.as_ref().map(|f| f.set_services(&services.all())).unwrap_or_default()
    }

    fn save(&self, services: &Services) -> Result<(), String> {
        match &self.state_file {
            Some(p) => state::save(p, &services.saved).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Adds a service; `holder` is the control connection a foreground service lives with.
    async fn add(&self, spec: ServiceSpec, background: bool, holder: u64) -> Result<Vec<String>, String> {
        let Some(funnel) = &self.funnel else {
            return Err("no edge configured: start `warren up` with --edge and --funnel-token".into());
        };
        let spec = spec.normalized().map_err(|e| e.to_string())?;
        let publishes = funnel.status().publishes;
        let mut services = self.services.lock().await;
        let mut all = services.all();
        all.push(spec.clone());
        check_all(&all).map_err(|(id, e)| format!("{id}: {e}"))?;
        if background {
            services.saved.push(spec.clone());
            if let Err(e) = self.save(&services) {
                services.saved.pop();
                return Err(format!("cannot save the service: {e}"));
            }
        } else {
            services.foreground.push((holder, spec.clone()));
        }
        let broken = self.apply(&services);
        drop(services);
        if let Some(b) = broken.iter().find(|b| b.id == spec.id()) {
            // It cannot be opened: take it back rather than keep a service that never answers.
            self.remove(&spec.id()).await.ok();
            return Err(format!("{}: {}", b.id, b.error));
        }
        let urls = funnel
            .wait_registered(Duration::from_secs(15))
            .await
            .map_err(|e| format!("funnel not registered yet: {e} (it keeps retrying; see `warren funnel status`)"))?;
        if spec.kind != ServiceKind::Http {
            return self.raw_granted(funnel, &spec, publishes).await;
        }
        let path = if spec.path == "/" { "" } else { spec.path.trim_start_matches('/') };
        Ok(urls.iter().filter(|u| url_port(u) == spec.port).map(|u| format!("{u}{path}")).collect())
    }

    /// Waits until an edge has granted (or refused) the port of a `tcp` or `tls` service.
    /// Only answers newer than the `publishes`-th count.
    async fn raw_granted(&self, funnel: &Funnel, spec: &ServiceSpec, publishes: u64) -> Result<Vec<String>, String> {
        let kind = if spec.kind == ServiceKind::Tcp { "tcp" } else { "tls" };
        let scheme = format!("{kind}://");
        let refusal = format!("{kind} {}:", spec.port);
        let start = tokio::time::Instant::now();
        loop {
            let s = funnel.status();
            if s.publishes <= publishes && start.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let granted: Vec<String> =
                s.raw_urls.iter().filter(|u| u.starts_with(&scheme) && url_port(u) == spec.port).cloned().collect();
            if !granted.is_empty() {
                return Ok(granted);
            }
            if let Some(r) = s.refused.iter().find(|r| r.starts_with(&refusal)) {
                let reason = r.clone();
                self.remove(&spec.id()).await.ok();
                return Err(format!("the edge refused it: {reason}"));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err("no edge granted the port within 10 s (see `warren funnel status`)".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn remove(&self, id: &str) -> Result<(), String> {
        let mut services = self.services.lock().await;
        match services.origin_of(id) {
            None => return Err(format!("no service {id:?} (see `warren funnel status`)")),
            Some(Origin::Config) => return Err(format!("{id} is defined in the node's config file; edit it there")),
            Some(Origin::Saved) => {
                services.saved.retain(|s| s.id() != id);
                self.save(&services)?;
            }
            Some(Origin::Foreground) => services.foreground.retain(|(_, s)| s.id() != id),
        }
        self.apply(&services);
        Ok(())
    }

    async fn release(&self, holder: u64) {
        let mut services = self.services.lock().await;
        let before = services.foreground.len();
        services.foreground.retain(|(h, _)| *h != holder);
        if services.foreground.len() != before {
            self.apply(&services);
        }
    }

    async fn reset(&self) -> Result<(), String> {
        let mut services = self.services.lock().await;
        services.saved.clear();
        services.foreground.clear();
        self.save(&services)?;
        self.apply(&services);
        Ok(())
    }

    async fn funnel_status(&self) -> Value {
        let Some(funnel) = &self.funnel else { return Value::Null };
        let services = self.services.lock().await;
        let mut status = serde_json::to_value(funnel.status()).unwrap_or(Value::Null);
        if let Some(list) = status.get_mut("services").and_then(Value::as_array_mut) {
            for s in list {
                let origin = s.get("id").and_then(Value::as_str).and_then(|id| services.origin_of(id));
                s["origin"] = serde_json::to_value(origin).unwrap_or(Value::Null);
            }
        }
        status
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
    let mut holders = 0u64;
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
        holders += 1;
        let holder = holders;
        clients.spawn(async move {
            tokio::select! {
                () = handle(daemon, stream, holder) => {}
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

/// What a connection does after an answer.
enum After {
    /// Reads the next request.
    Next,
    /// Holds a foreground service until the client goes away.
    Hold,
    /// Streams the request log until the client goes away.
    FollowLog,
}

async fn handle(daemon: Arc<Daemon>, stream: UnixStream, holder: u64) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE)).lines();
    let mut holding = false;
    while let Ok(Some(line)) = lines.next_line().await {
        let (answer, after) = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(&daemon, req, holder).await,
            Err(e) => (json!({"ok": false, "error": format!("bad request: {e}")}), After::Next),
        };
        let mut out = answer.to_string();
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            break;
        }
        match after {
            After::Next => {}
            After::Hold => holding = true,
            After::FollowLog => {
                let Some(funnel) = daemon.funnel() else { break };
                let mut log = funnel.subscribe_log();
                loop {
                    let entry = tokio::select! {
                        e = log.recv() => e,
                        // The client closed its side (or sent more): stop following.
                        _ = lines.next_line() => break,
                    };
                    let line = match entry {
                        Ok(e) => serde_json::to_string(&e).unwrap_or_default(),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => json!({"missed": n}).to_string(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    };
                    if write.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    if holding {
        daemon.release(holder).await;
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

fn done(r: Result<(), String>) -> Value {
    match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => err(e),
    }
}

/// `KEY` or `KEY@REGION`; a region hint is given to the node before the key is used.
async fn peer_address(node: &Node, s: &str) -> Result<PublicKey, NodeError> {
    let (key, region) = node.parse_peer(s)?;
    if let Some(r) = region {
        node.hint(key, r).await?;
    }
    Ok(key)
}

async fn answer(daemon: &Daemon, req: Request, holder: u64) -> (Value, After) {
    let node = &daemon.node;
    let answer = match req {
        Request::Status => match node.status().await {
            Ok(s) => json!({"ok": true, "status": s}),
            Err(e) => err(e),
        },
        Request::Ping { peer, count } => {
            let peer = match peer_address(node, &peer).await {
                Ok(p) => p,
                Err(e) => return (err(e), After::Next),
            };
            let mut pings = Vec::new();
            for _ in 0..count.unwrap_or(1).clamp(1, 100) {
                match node.ping(peer, Duration::from_secs(3)).await {
                    Ok((path, rtt)) => pings.push(json!({"path": path_str(path), "rtt_ms": rtt.as_secs_f64() * 1e3})),
                    Err(NodeError::Timeout) => pings.push(json!({"path": null, "error": "timeout"})),
                    Err(e) => return (err(e), After::Next),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            json!({"ok": true, "pings": pings})
        }
        Request::Send { peer, data } => {
            let peer = match peer_address(node, &peer).await {
                Ok(p) => p,
                Err(e) => return (err(e), After::Next),
            };
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
        Request::FunnelAdd { service, background } => {
            let id = service.id();
            return match daemon.add(*service, background, holder).await {
                Ok(urls) => {
                    (json!({"ok": true, "id": id, "urls": urls}), if background { After::Next } else { After::Hold })
                }
                // A foreground service that was added stays until the client leaves, even
                // when the edge has not answered yet.
                Err(e) if !background && daemon.services.lock().await.origin_of(&id) == Some(Origin::Foreground) => {
                    (err(e), After::Hold)
                }
                Err(e) => (err(e), After::Next),
            };
        }
        Request::FunnelOff { id } => done(daemon.remove(&id).await),
        Request::FunnelReset => done(daemon.reset().await),
        Request::FunnelStatus => json!({"ok": true, "funnel": daemon.funnel_status().await}),
        Request::FunnelLog => {
            if daemon.funnel().is_none() {
                return (err("no edge configured"), After::Next);
            }
            return (json!({"ok": true}), After::FollowLog);
        }
    };
    (answer, After::Next)
}

/// A client connection to a running node's control socket.
#[derive(Debug)]
pub struct Connection {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Connection {
    /// Connects to the node at `path`.
    ///
    /// # Errors
    /// The socket cannot be reached.
    pub async fn open(path: &FsPath) -> std::io::Result<Connection> {
        let (read, write) = UnixStream::connect(path).await?.into_split();
        Ok(Connection { lines: BufReader::new(read).lines(), write })
    }

    /// Sends one request and reads its answer.
    ///
    /// # Errors
    /// I/O errors, or an answer that is not JSON.
    pub async fn call(&mut self, req: &Value) -> std::io::Result<Value> {
        let mut line = req.to_string();
        line.push('\n');
        self.write.write_all(line.as_bytes()).await?;
        self.next().await?.ok_or_else(|| std::io::Error::other("no answer"))
    }

    /// The next line the node sends (e.g. a request log entry); `None` when it closed.
    ///
    /// # Errors
    /// I/O errors, or a line that is not JSON.
    pub async fn next(&mut self) -> std::io::Result<Option<Value>> {
        match self.lines.next_line().await? {
            Some(l) => serde_json::from_str(&l).map(Some).map_err(std::io::Error::other),
            None => Ok(None),
        }
    }
}

/// Sends one request to the node at `path` and returns its answer.
///
/// # Errors
/// I/O errors, or an answer that is not JSON.
pub async fn request(path: &FsPath, req: &Value) -> std::io::Result<Value> {
    Connection::open(path).await?.call(req).await
}
