//! The relay process: listeners, the client table, and structured shutdown.
//!
//! [`Server::spawn`] binds every listener (DERP/HTTP(S), STUN, admin) and returns at once;
//! every task it starts belongs to the server's [`TaskTracker`]. [`Server::shutdown`] drains:
//! it stops accepting, tells every client `Restarting`, keeps forwarding for the clients that
//! stay until the grace period ends or all have left, then closes what remains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use warren_relay_proto::ws::Role;
use warren_relay_proto::{FrameDecoder, Framer, PublicKey, Transport};

use crate::admission::{Admission, AllowListError};
use crate::config::{Config, TlsMode};
use crate::core::router::{Control, Router};
use crate::io::lean_tls;
use crate::mesh::Mesh;
use crate::metrics::{HandshakeFailure, RelayMetrics};
use crate::reload::{self, ReloadError, Reloaded};
use crate::state::Shared;
use crate::web::{self, HeadError, Route};
use crate::{conn, stun};
use warren_common::acme::{Acme, AcmeSettings, Challenge, FileCertCache, ACME_TLS_ALPN};
use warren_common::certs::CertStore;
use warren_common::cidr::Cidr;
use warren_common::limits::{AcceptGate, ConnSlot, LogLimiter};
use warren_common::runtime::serve_admin;
use warren_common::{keyfile, proxy_protocol, tls};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file could not be used.
    #[error(transparent)]
    KeyFile(#[from] keyfile::KeyFileError),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The admission allow-list could not be read.
    #[error(transparent)]
    Admission(#[from] AllowListError),
    /// The ACME certificate cache directory could not be created.
    #[error("ACME certificate cache {path}: {source}")]
    AcmeCache {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ServerError {
    /// A short stable name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerError::Bind { .. } => "bind",
            ServerError::KeyFile(_) => "key_file",
            ServerError::Tls(_) => "tls",
            ServerError::Admission(_) => "admission",
            ServerError::AcmeCache { .. } => "acme_cache",
        }
    }
}

/// A running relay.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    stun_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    dev_ca_cert: Option<PathBuf>,
    /// The root of the relay's cancellation tree: `accept_cancel` (listeners) and
    /// `Shared::conns_cancel` (connections, mesh links, STUN, admin) are its children.
    root: CancellationToken,
    accept_cancel: CancellationToken,
    tracker: TaskTracker,
    /// Manual TLS: the certificate handshakes present, replaced by reloads.
    cert: Option<Arc<tls::CertSlot>>,
    /// What reloads change besides the configuration snapshot.
    reloadable: Mutex<Reloadable>,
}

/// The parts of a running relay a reload rebuilds.
#[derive(Debug)]
struct Reloadable {
    mesh: Mesh,
    /// Stops the watcher of the admission policy in force (its allow-list file).
    admission_watch: CancellationToken,
}

impl Server {
    /// Loads the key, sets up TLS, binds every listener and starts serving.
    ///
    /// `prometheus` is the handle `/metrics` renders; without it the admin listener serves
    /// only `/healthz`.
    ///
    /// # Errors
    /// [`ServerError`] if the key, TLS material or a listener cannot be set up.
    pub async fn spawn(config: Config, prometheus: Option<PrometheusHandle>) -> Result<Server, ServerError> {
        let secret = keyfile::load_or_create(&config.key_file)?;
        let admission = Arc::new(Admission::new(&config.admission)?);
        let mut acme = None;
        let (acceptor, dev_ca_cert, cert) = match &config.tls {
            TlsMode::Acme(settings) => {
                let (tls, manager) = acme_tls(&config, settings).await?;
                acme = Some(manager);
                (Some(tls), None, None)
            }
            TlsMode::Manual { cert_file, key_file } => {
                let first = reload::load_cert(cert_file, key_file)?;
                reload::installed(&first, cert_file, "start");
                let slot = tls::CertSlot::new(first);
                (Some(slot.clone().server_config()?), None, Some(slot))
            }
            TlsMode::Dev => {
                let ca = tls::DevCa::open_or_create(&config.state_dir)?;
                let mut names = vec![config.hostname.clone(), "localhost".into(), "127.0.0.1".into(), "::1".into()];
                names.dedup();
                (Some(ca.server_config(&names)?), Some(ca.ca_cert_path), None)
            }
            TlsMode::Plain => (None, None, None),
        };
        let bind = |what, addr| move |source| ServerError::Bind { what, addr, source };
        let http01 = match &config.tls {
            TlsMode::Acme(s) if s.challenge == Challenge::Http01 => {
                Some(TcpListener::bind(s.http01_listen).await.map_err(bind("ACME HTTP-01 listener", s.http01_listen))?)
            }
            _ => None,
        };
        let listener = TcpListener::bind(config.listen).await.map_err(bind("DERP listener", config.listen))?;
        let http_addr = listener.local_addr().map_err(bind("DERP listener", config.listen))?;
        let stun_socket = match &config.stun {
            Some(s) => {
                let socket = UdpSocket::bind(s.listen).await.map_err(bind("STUN", s.listen))?;
                // Learns each request's destination address, to answer from it.
                let state = quinn_udp::UdpSocketState::new((&socket).into()).map_err(bind("STUN", s.listen))?;
                Some((socket, state))
            }
            None => None,
        };
        let admin_listener = match config.admin_listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(bind("admin listener", a))?),
            None => None,
        };
        let stun_addr = stun_socket.as_ref().and_then(|(s, _)| s.local_addr().ok());
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

        let public = secret.public_key();
        let root = CancellationToken::new();
        let shared = Arc::new(Shared {
            secret,
            public,
            live: watch::Sender::new(Arc::new(config.clone())),
            router: Router::default(),
            mesh_links: std::sync::atomic::AtomicUsize::new(0),
            metrics: RelayMetrics::new(),
            admission: RwLock::new(admission.clone()),
            gate: AcceptGate::new(
                config.accept_rate.per_second.get(),
                config.accept_rate.burst.get(),
                config.max_conns_per_ip.get(),
                Instant::now(),
            ),
            reject_log: LogLimiter::new(Duration::from_secs(10)),
            conns_cancel: root.child_token(),
            draining: AtomicBool::new(false),
            next_conn_id: AtomicU64::new(1),
        });
        let accept_cancel = root.child_token();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(listener, acceptor, shared.clone(), accept_cancel.clone(), tracker.clone()));
        if let Some((socket, state)) = stun_socket {
            tracker.spawn(stun::serve(socket, state, shared.clone(), shared.conns_cancel.clone()));
        }
        if let Some(l) = admin_listener {
            let ready = {
                let shared = shared.clone();
                Arc::new(move || !shared.is_draining())
            };
            tracker.spawn(serve_admin(l, prometheus, ready, shared.conns_cancel.clone(), tracker.clone()));
        }
        let admission_watch = shared.conns_cancel.child_token();
        tracker.spawn(watch_admission(admission, admission_watch.clone()));
        if let Some(slot) = &cert {
            tracker.spawn(reload::watch_cert_files(shared.clone(), slot.clone(), shared.conns_cancel.clone()));
        }
        if let Some(acme) = acme {
            if let Some(l) = http01 {
                tracker.spawn(acme.clone().serve_http01(l, shared.conns_cancel.clone()));
            }
            tracker.spawn(keep_certificate(acme, config.hostname.clone(), shared.conns_cancel.clone()));
        }
        let mut mesh = Mesh::default();
        if let Some(m) = &config.mesh {
            info!(peers = m.peers.len(), dns = ?m.dns, "region mesh on");
        }
        mesh.apply(&shared, config.mesh.clone(), &tracker);
        info!(
            key = %public,
            listen = %http_addr,
            tls = match &config.tls {
                TlsMode::Manual { .. } => "manual",
                TlsMode::Acme(_) => "acme",
                TlsMode::Dev => "dev",
                TlsMode::Plain => "plain",
            },
            stun = ?stun_addr,
            admin = ?admin_addr,
            "relay listening"
        );
        if let Some(ca) = &dev_ca_cert {
            info!(ca = %ca.display(), "dev TLS: clients must trust this CA certificate");
        }
        Ok(Server {
            shared,
            http_addr,
            stun_addr,
            admin_addr,
            dev_ca_cert,
            root,
            accept_cancel,
            tracker,
            cert,
            reloadable: Mutex::new(Reloadable { mesh, admission_watch }),
        })
    }

    /// Applies a new configuration without dropping any connection: see [`crate::reload`].
    /// Settings only a restart can change keep their running values and are listed in the
    /// result.
    ///
    /// # Errors
    /// [`ReloadError`] if a new certificate or allow-list cannot be used; nothing changed then.
    pub fn reload(&self, mut next: Config) -> Result<Reloaded, ReloadError> {
        let running = self.shared.config();
        let needs_restart = reload::keep_restart_only(&running, &mut next);
        let cert = match (&self.cert, &next.tls) {
            (Some(_), TlsMode::Manual { cert_file, key_file }) => {
                Some((reload::load_cert(cert_file, key_file)?, cert_file))
            }
            _ => None,
        };
        let admission = reload::next_admission(&running.admission, &next.admission)?;

        let mut done = Reloaded { needs_restart, ..Reloaded::default() };
        if let (Some(slot), Some((cert, file))) = (&self.cert, cert) {
            reload::installed(&cert, file, "reload");
            slot.replace(cert);
            done.certificate = true;
        }
        self.shared.gate.set_limits(
            next.accept_rate.per_second.get(),
            next.accept_rate.burst.get(),
            next.max_conns_per_ip.get(),
            Instant::now(),
        );
        let mut reloadable = self.reloadable.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(admission) = admission {
            let admission = Arc::new(admission);
            *self.shared.admission.write().unwrap_or_else(|e| e.into_inner()) = admission.clone();
            reloadable.admission_watch.cancel();
            reloadable.admission_watch = self.shared.conns_cancel.child_token();
            self.tracker.spawn(watch_admission(admission, reloadable.admission_watch.clone()));
            done.admission = true;
        }
        let mesh = next.mesh.clone();
        self.shared.live.send_replace(Arc::new(next));
        let change = reloadable.mesh.apply(&self.shared, mesh, &self.tracker);
        (done.mesh_added, done.mesh_removed) = (change.added, change.removed);
        done.log();
        Ok(done)
    }

    /// Address of the DERP/HTTP(S) listener.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Address of the STUN socket, if enabled.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun_addr
    }

    /// Address of the admin listener, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The relay's public key.
    pub fn public_key(&self) -> PublicKey {
        self.shared.public
    }

    /// The dev CA certificate file, in dev TLS mode.
    pub fn dev_ca_cert(&self) -> Option<&std::path::Path> {
        self.dev_ca_cert.as_deref()
    }

    /// Number of logged-in clients.
    pub fn client_count(&self) -> usize {
        self.shared.router.len()
    }

    /// Number of client keys that mesh siblings told this relay they hold.
    pub fn mesh_remote_count(&self) -> usize {
        self.shared.router.sibling_keys()
    }

    /// Number of mesh links to siblings that are logged in and watching.
    pub fn mesh_link_count(&self) -> usize {
        self.shared.mesh_links.load(Ordering::Relaxed)
    }

    /// Drains and stops: see the module docs. Returns when every task has ended.
    pub async fn shutdown(self) {
        let config = self.shared.config();
        let grace = config.grace_period;
        self.shared.draining.store(true, Ordering::Relaxed);
        self.accept_cancel.cancel();
        let restarting = Control::Restarting {
            reconnect_in_ms: millis_u32(config.restart_reconnect_in),
            try_for_ms: millis_u32(config.restart_try_for),
        };
        let clients = self.shared.router.len();
        info!(clients, grace = ?grace, "draining: sent Restarting to every client");
        self.shared.router.broadcast(&restarting);
        let _ = tokio::time::timeout(grace, clients_gone(&self.shared.router)).await;
        let left = self.shared.router.len();
        self.root.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await.is_err() {
            warn!("some connections did not close within 5s of the drain deadline");
        }
        info!(closed_at_deadline = left, "relay stopped");
    }
}

/// The TLS config of ACME mode: certificates resolved through a [`CertStore`] holding what the
/// cache already has (so a restart serves at once) and, during a TLS-ALPN-01 validation, the
/// challenge certificate; ALPN offers `acme-tls/1` beside HTTP/1.1 for that validation.
async fn acme_tls(
    config: &Config,
    settings: &AcmeSettings,
) -> Result<(Arc<rustls::ServerConfig>, Arc<Acme>), ServerError> {
    let dir = config.state_dir.join("acme");
    let cache = FileCertCache::new(&dir).map_err(|source| ServerError::AcmeCache { path: dir, source })?;
    let certs = Arc::new(CertStore::default());
    let acme = Acme::new(settings.clone(), Arc::new(cache), certs.clone(), config.state_dir.clone(), "relay");
    acme.reload().await;
    let tls = tls::resolved_server_config(certs, &[b"http/1.1", ACME_TLS_ALPN])?;
    info!(name = %config.hostname, directory = %settings.directory, challenge = ?settings.challenge, "TLS certificates from ACME");
    Ok((Arc::new(tls), acme))
}

/// Keeps a fresh certificate for `name`: orders one now unless the cache holds a fresh one,
/// then checks every `renew_check_interval` and renews at two thirds of its lifetime. A failed
/// order (the CA down, a challenge refused) is logged and counted
/// (`relay_acme_orders_total{result="error"}`) and tried again after a backoff; the relay keeps
/// serving with the certificate it has.
async fn keep_certificate(acme: Arc<Acme>, name: String, cancel: CancellationToken) {
    const RETRY: warren_common::limits::Backoff =
        warren_common::limits::Backoff::new(Duration::from_secs(5), Duration::from_secs(600));
    let mut failures = 0u32;
    loop {
        let wait = match tokio::select! {
            _ = cancel.cancelled() => return,
            r = acme.ensure(&name) => r,
        } {
            Ok(()) => {
                failures = 0;
                acme.renew_check_interval()
            }
            Err(_) => {
                failures += 1;
                RETRY.delay(failures)
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Follows `admission`'s allow-list file until `stop` (a reload replacing the policy, or the end).
async fn watch_admission(admission: Arc<Admission>, stop: CancellationToken) {
    admission.watch(stop).await;
}

/// Resolves once no client is logged in.
async fn clients_gone(router: &Router) {
    loop {
        let emptied = router.emptied().notified();
        tokio::pin!(emptied);
        emptied.as_mut().enable();
        if router.len() == 0 {
            return;
        }
        emptied.await;
    }
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The configuration in force for this connection's accept-time choices.
        let config = shared.config();
        // A load balancer's own address says nothing about the client: its connections are
        // admitted once their PROXY header names one.
        let slot = if Cidr::any_contains(&config.proxy_trusted, remote.ip()) {
            None
        } else {
            match admit(&shared, remote) {
                Some(slot) => Some(slot),
                None => continue,
            }
        };
        tune_socket(&tcp, &config);
        // One deadline from accept to login covers TLS, the HTTP head and the DERP handshake.
        let deadline = tokio::time::Instant::now() + config.handshake_timeout;
        drop(config);
        tracker.spawn(handle_tcp(shared.clone(), tls.clone(), tcp, remote, deadline, slot));
    }
}

/// The accept gate (rate, connections per source address) for a client at `remote`.
fn admit(shared: &Shared, remote: SocketAddr) -> Option<ConnSlot> {
    match shared.gate.admit(remote.ip(), Instant::now()) {
        Ok(slot) => Some(slot),
        Err(why) => {
            shared.metrics.rejected(why);
            if let Some(held_back) = shared.reject_log.allow() {
                warn!(reason = why.label(), held_back, "connection rejected at accept (logged at most every 10 s)");
            }
            None
        }
    }
}

/// TCP keep-alive and TCP_USER_TIMEOUT, as configured; a socket that refuses keeps the
/// kernel's defaults (the relay's own KeepAlive frames and write deadline still apply).
fn tune_socket(tcp: &TcpStream, config: &Config) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    if let Some(idle) = config.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(15).min(idle))
            .with_retries(4);
        let _ = sock.set_tcp_keepalive(&keepalive);
    }
    if let Some(timeout) = config.tcp_user_timeout {
        let _ = sock.set_tcp_user_timeout(Some(timeout));
    }
}

/// Reads the PROXY header of a trusted load balancer's connection and admits the client it
/// names; `None` (counted, logged at most every 10 s) when there is no valid header in time or
/// the client is over its limits.
async fn proxied_client(
    shared: &Shared,
    tcp: &mut TcpStream,
    lb: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<(SocketAddr, ConnSlot)> {
    let header = match tokio::time::timeout_at(deadline, proxy_protocol::read_header(tcp)).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            shared.metrics.handshake_failed(HandshakeFailure::ProxyHeader);
            if let Some(held_back) = shared.reject_log.allow() {
                warn!(load_balancer = %lb, reason = e.label(), error = %e, held_back, "bad PROXY header from a trusted load balancer (logged at most every 10 s)");
            }
            return None;
        }
        Err(_) => {
            shared.metrics.handshake_failed(HandshakeFailure::Timeout);
            return None;
        }
    };
    let client = header.source_or(lb);
    admit(shared, client).map(|slot| (client, slot))
}

/// Whether an untrusted connection opens with a PROXY header (a load balancer this relay was
/// not told to trust). Peeks, so whatever the client sent stays to be read.
async fn untrusted_proxy_header(tcp: &TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut start = [0u8; 12];
    matches!(
        tokio::time::timeout_at(deadline, tcp.peek(&mut start)).await,
        Ok(Ok(n)) if proxy_protocol::looks_like_header(&start[..n])
    )
}

/// One accepted connection, for its whole life: the task's own future stays small (a few
/// hundred bytes), because every phase is boxed on its own and no phase's state is kept once it
/// is done. An idle client then costs its connection actor and little else. Keep it that way:
/// a value held across an `.await` here is held by every connection.
async fn handle_tcp(
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut tcp: TcpStream,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
    slot: Option<ConnSlot>,
) {
    // The client's address and its place in the accept gate: a trusted load balancer's
    // connection gets both from its PROXY header (boxed: only those connections pay for it).
    let (remote, _slot) = match slot {
        Some(slot) => {
            if untrusted_proxy_header(&tcp, deadline).await {
                shared.metrics.handshake_failed(HandshakeFailure::ProxyUntrusted);
                if let Some(held_back) = shared.reject_log.allow() {
                    warn!(peer = %remote, held_back, "PROXY header from an address not in proxy_protocol.trusted; closed (logged at most every 10 s)");
                }
                return;
            }
            (remote, slot)
        }
        None => match Box::pin(proxied_client(&shared, &mut tcp, remote, deadline)).await {
            Some(admitted) => admitted,
            None => return,
        },
    };
    let upgrading = match tls {
        None => upgrade_then_run(shared, tcp, remote, deadline),
        Some(config) => {
            // Scoped so that the handshake's result is gone before the connection runs.
            let accepted = tokio::time::timeout_at(deadline, Box::pin(lean_tls::accept(tcp, config))).await;
            match accepted {
                Ok(Ok(stream)) => upgrade_then_run(shared, stream, remote, deadline),
                Ok(Err(_)) => return shared.metrics.handshake_failed(HandshakeFailure::Tls),
                Err(_) => return shared.metrics.handshake_failed(HandshakeFailure::Timeout),
            }
        }
    };
    // The upgrade's box (which held the stream while reading the HTTP head) is freed here; the
    // connection actor lives on in its own box.
    if let Some(run) = upgrading.await {
        run.await;
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Reads the HTTP head and serves plain HTTP, or completes a DERP/WebSocket upgrade and returns
/// the connection actor, ready to run.
fn upgrade_then_run<S>(
    shared: Arc<Shared>,
    io: S,
    remote: SocketAddr,
    deadline: tokio::time::Instant,
) -> BoxFuture<Option<BoxFuture<()>>>
where
    S: AsyncRead + AsyncWrite + crate::io::framed::ReadReady + Unpin + Send + 'static,
{
    Box::pin(async move {
        let (io, framer, transport) = upgrade(&shared, io, deadline).await?;
        let run: BoxFuture<()> = Box::pin(conn::run(shared, io, framer, remote, transport, deadline));
        Some(run)
    })
}

/// Handles the HTTP part of a connection: answers plain requests itself (returning `None`) or
/// completes a DERP/WebSocket upgrade and returns the stream with its framer.
async fn upgrade<S>(shared: &Arc<Shared>, mut io: S, deadline: tokio::time::Instant) -> Option<(S, Framer, Transport)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(1024);
    let (head, head_len) = match tokio::time::timeout_at(deadline, web::read_head(&mut io, &mut buf)).await {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(e)) => {
            shared.metrics.handshake_failed(HandshakeFailure::BadRequest);
            let msg = match e {
                HeadError::Closed => return None,
                HeadError::TooLarge => {
                    web::error_response(::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request header too large")
                }
                HeadError::Malformed => web::error_response(::http::StatusCode::BAD_REQUEST, "malformed request"),
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), io.write_all(msg.as_bytes())).await;
            return None;
        }
        Err(_) => {
            shared.metrics.handshake_failed(HandshakeFailure::Timeout);
            return None;
        }
    };
    let transport = match web::route(&head) {
        // Boxed: an HTTP/1 server connection is large, and most connections are DERP.
        Route::Http => {
            Box::pin(serve_hyper(shared.clone(), warren_common::io::Prefixed::new(buf.freeze(), io))).await;
            return None;
        }
        Route::Reject(status, msg) => {
            shared.metrics.handshake_failed(HandshakeFailure::BadRequest);
            let _ =
                tokio::time::timeout(Duration::from_secs(2), io.write_all(web::error_response(status, msg).as_bytes()))
                    .await;
            return None;
        }
        Route::Derp { fast_start } => {
            if !fast_start
                && io.write_all(web::derp_switching_response(&shared.public.to_hex()).as_bytes()).await.is_err()
            {
                shared.metrics.handshake_failed(HandshakeFailure::Io);
                return None;
            }
            Transport::Derp
        }
        Route::WebSocket { response } => {
            if io.write_all(response.as_bytes()).await.is_err() {
                shared.metrics.handshake_failed(HandshakeFailure::Io);
                return None;
            }
            Transport::WebSocket
        }
    };
    let mut framer = Framer::new(Role::Server, transport, FrameDecoder::default());
    framer.push_rx(&buf[head_len..]);
    Some((io, framer, transport))
}

async fn serve_hyper<S>(shared: Arc<Shared>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cancel = shared.conns_cancel.clone();
    let svc = service_fn(move |req| std::future::ready(web::serve_http(shared.clone(), req)));
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(Duration::from_secs(10))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}
