//! The running edge: public HTTPS listeners, the QUIC tunnel endpoint, admin, and drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics_exporter_prometheus::PrometheusHandle;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use warren_common::io::Prefixed;
use warren_common::limits::{AcceptGate, ConnSlot, LogLimiter};
use warren_common::tls::{self as ctls, DevCa};
use warren_tunnel_proto::{ConnKind, ConnectHead};

use crate::acme::Acme;
use crate::certs::{CertStore, ACME_TLS_ALPN};
use crate::cluster::Cluster;
use crate::config::{Challenge, Config, TlsMode};
use crate::metrics::EdgeMetrics;
use crate::passthrough::{passthrough_for, read_client_hello};
use crate::proxy::{self, ConnInfo};
use crate::routes::Routes;
use crate::state::Shared;
use crate::store::{FileStore, Store};
use crate::tunnel;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// Certificates could not be set up.
    #[error(transparent)]
    Tls(#[from] ctls::TlsError),
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the TLS configuration.
    #[error("QUIC TLS: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The cluster settings could not be used.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterSetupError),
}

/// Time a visitor has to send a complete request head.
const VISITOR_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest visitor request head.
const VISITOR_MAX_HEAD: usize = 64 << 10;

/// A running edge.
#[derive(Debug)]
pub struct Edge {
    shared: Arc<Shared>,
    public_addrs: Vec<SocketAddr>,
    tunnel_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    dev_ca_cert: Option<PathBuf>,
    endpoint: quinn::Endpoint,
    stop_accepting: CancellationToken,
    accept_loops: TaskTracker,
}

impl Edge {
    /// Sets up certificates, binds every listener and starts serving.
    ///
    /// # Errors
    /// [`EdgeError`] when certificates or listeners cannot be set up.
    pub async fn spawn(config: Config, prometheus: Option<PrometheusHandle>) -> Result<Edge, EdgeError> {
        let store = Arc::new(CertStore::default());
        let dev_ca_cert = match &config.tls {
            TlsMode::Dev => {
                let ca = DevCa::open_or_create(&config.state_dir)?;
                let d = &config.funnel_domain;
                let names =
                    vec![format!("*.{d}"), d.clone(), config.hostname.clone(), "localhost".into(), "127.0.0.1".into()];
                let (chain, key) = ca.issue(&names)?;
                store.insert(&names, chain, key)?;
                Some(ca.ca_cert_path)
            }
            TlsMode::Manual { cert_file, key_file } => {
                let (chain, key) = ctls::load_pem(cert_file, key_file)?;
                store.insert(&[], chain, key)?;
                None
            }
            TlsMode::Acme(_) => None,
        };
        let cluster = match &config.cluster {
            Some(c) => {
                let cluster = Cluster::new(c.clone(), &config.hostname, dev_ca_cert.as_deref())?;
                Some(Arc::new(cluster))
            }
            None => None,
        };
        let access = Arc::new(crate::access::EdgeAccess::new(&config.access)?);
        let acme = match &config.tls {
            TlsMode::Acme(settings) => {
                let shared_store: Arc<dyn Store> = match &cluster {
                    Some(c) => c.store.clone(),
                    None => {
                        let dir = config.state_dir.join("certs");
                        Arc::new(FileStore::new(&dir).map_err(|source| EdgeError::Bind {
                            what: "certificate store",
                            addr: config.tunnel_listen,
                            source,
                        })?)
                    }
                };
                let acme = Acme::new(settings.clone(), shared_store, store.clone(), config.state_dir.clone(), "edge");
                acme.reload().await;
                Some(acme)
            }
            _ => None,
        };
        let alpn_challenge = matches!(&config.tls, TlsMode::Acme(s) if s.challenge == Challenge::TlsAlpn01);
        let public_tls = {
            let mut c = ctls::resolved_server_config(store.clone(), &[b"h2", b"http/1.1"])?;
            if alpn_challenge {
                c.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
            }
            // Nodes whose network blocks UDP tunnel here over TCP (browsers never offer it).
            if config.tunnel_tcp {
                c.alpn_protocols.push(warren_tunnel_proto::ALPN_TCP.to_vec());
            }
            TlsAcceptor::from(Arc::new(c))
        };
        let endpoint = tunnel_endpoint(&config, store)?;
        let tunnel_addr = endpoint.local_addr().map_err(|source| EdgeError::Bind {
            what: "tunnel",
            addr: config.tunnel_listen,
            source,
        })?;

        let mut listeners = Vec::new();
        for addr in &config.public_listen {
            let l = TcpListener::bind(addr).await.map_err(|source| EdgeError::Bind {
                what: "public HTTPS",
                addr: *addr,
                source,
            })?;
            listeners.push(l);
        }
        let public_addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
        let admin = match config.admin_listen {
            Some(a) => {
                Some(TcpListener::bind(a).await.map_err(|source| EdgeError::Bind { what: "admin", addr: a, source })?)
            }
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let http01 = match &config.tls {
            TlsMode::Acme(s) if s.challenge == Challenge::Http01 => {
                Some(TcpListener::bind(s.http01_listen).await.map_err(|source| EdgeError::Bind {
                    what: "ACME HTTP-01",
                    addr: s.http01_listen,
                    source,
                })?)
            }
            _ => None,
        };
        let wildcard = matches!(&config.tls, TlsMode::Acme(s) if s.wildcard);

        let now = std::time::Instant::now();
        let accept = config.accept_rate;
        let visitor_gate =
            AcceptGate::new(accept.per_second.get(), accept.burst.get(), config.max_conns_per_ip.get(), now);
        let tunnel_rate = std::sync::Mutex::new(config.tunnel_accept_rate.bucket(now));
        let shared = Arc::new(Shared {
            public_ports: public_addrs.iter().map(SocketAddr::port).collect(),
            visitor_gate,
            tunnel_rate,
            limit_log: LogLimiter::new(Duration::from_secs(10)),
            config,
            routes: Arc::new(Routes::default()),
            access,
            metrics: EdgeMetrics::new(),
            tasks: TaskTracker::new(),
            background: TaskTracker::new(),
            acme: acme.clone().filter(|_| !wildcard),
            cluster: cluster.clone(),
            endpoint: endpoint.clone(),
            draining: AtomicBool::new(false),
            tcp_ports: crate::tcp_ports::TcpPorts::default(),
            revoked: Default::default(),
            domains: Default::default(),
        });
        let stop_accepting = CancellationToken::new();
        let accept_loops = TaskTracker::new();
        for (l, public) in listeners.into_iter().zip(&public_addrs) {
            accept_loops.spawn(public_loop(
                l,
                public.port(),
                public_tls.clone(),
                shared.clone(),
                stop_accepting.clone(),
            ));
        }
        accept_loops.spawn(tunnel_loop(endpoint.clone(), shared.clone(), stop_accepting.clone()));
        if let Some(acme) = acme {
            if let Some(l) = http01 {
                accept_loops.spawn(acme.clone().serve_http01(l, stop_accepting.clone()));
            }
            accept_loops.spawn(acme.clone().renew_loop(stop_accepting.clone()));
            // The tunnel's own name, and the wildcard when configured, are ordered at start.
            let mut names = vec![shared.config.hostname.clone()];
            if wildcard {
                names.push(format!("*.{}", shared.config.funnel_domain));
            }
            shared.background.spawn(async move {
                for n in names {
                    let _ = acme.ensure(&n).await;
                }
            });
        }
        if shared.config.domains.enabled {
            accept_loops.spawn(crate::domains::recheck_loop(shared.clone(), stop_accepting.clone()));
        }
        if let Some(creds) = &shared.config.credentials {
            let store: Arc<dyn Store> = match &cluster {
                Some(c) => c.store.clone(),
                None => Arc::new(FileStore::new(&shared.config.state_dir.join("certs")).map_err(|source| {
                    EdgeError::Bind { what: "token store", addr: shared.config.tunnel_listen, source }
                })?),
            };
            info!(keys = creds.public_keys.len(), every = ?creds.revocation_check, "signed node tokens accepted");
            let every = creds.revocation_check;
            accept_loops.spawn(tunnel::watch_revocations(shared.clone(), store, every, stop_accepting.clone()));
        }
        if let Some(c) = cluster {
            match c.store.routes("-").await {
                Ok(_) => info!(edge = %c.me(), store = ?c.store, "cluster: shared store reachable"),
                Err(e) => warn!(error = %e, "cluster: shared store unreachable for now; serving local tunnels only"),
            }
            accept_loops.spawn(c.heartbeat(shared.routes.clone(), stop_accepting.clone()));
        }
        if let Some(l) = admin {
            let ready = {
                let shared = shared.clone();
                Arc::new(move || !shared.is_draining())
            };
            let (stop, tasks) = (stop_accepting.clone(), accept_loops.clone());
            accept_loops.spawn(warren_common::runtime::serve_admin(l, prometheus, ready, stop, tasks));
        }
        info!(public = ?public_addrs, tunnel = %tunnel_addr, admin = ?admin_addr, domain = %shared.config.funnel_domain, "edge listening");
        if let Some(ca) = &dev_ca_cert {
            info!(ca = %ca.display(), "dev TLS: visitors and nodes must trust this CA certificate");
        }
        Ok(Edge { shared, public_addrs, tunnel_addr, admin_addr, dev_ca_cert, endpoint, stop_accepting, accept_loops })
    }

    /// Public listener addresses, in configuration order.
    pub fn public_addrs(&self) -> &[SocketAddr] {
        &self.public_addrs
    }

    /// The QUIC tunnel address.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// The admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The dev CA certificate, in dev TLS mode.
    pub fn dev_ca_cert(&self) -> Option<&std::path::Path> {
        self.dev_ca_cert.as_deref()
    }

    /// Number of node tunnels.
    pub fn tunnel_count(&self) -> usize {
        self.shared.routes.len()
    }

    /// Visitor requests this edge's access rules refused for `reason` (a label of
    /// `edge_access_refused_total`, e.g. `"ip_denied"`).
    pub fn access_refused(&self, reason: &str) -> u64 {
        self.shared.access.refused_count(reason)
    }

    /// Drains: stops accepting, lets in-flight requests and upgraded connections finish within
    /// the grace period, then closes tunnels.
    pub async fn shutdown(self) {
        let grace = self.shared.config.grace_period;
        self.shared.draining.store(true, Ordering::Relaxed);
        info!(grace = ?grace, "draining: no new visitors; in-flight requests may finish");
        self.stop_accepting.cancel();
        self.shared.tcp_ports.close_all();
        self.accept_loops.close();
        self.shared.tasks.close();
        let drained = async {
            self.accept_loops.wait().await;
            self.shared.tasks.wait().await;
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            warn!("grace period over with requests still in flight");
        }
        self.shared.routes.close_all();
        self.endpoint.close(0u32.into(), b"edge shutting down");
        self.shared.background.close();
        let stopped = async {
            self.endpoint.wait_idle().await;
            self.shared.background.wait().await;
        };
        if tokio::time::timeout(Duration::from_secs(2), stopped).await.is_err() {
            info!("tasks still running 2 s after the tunnels closed; leaving them");
        }
        info!("edge stopped");
    }
}

fn tunnel_endpoint(config: &Config, store: Arc<CertStore>) -> Result<quinn::Endpoint, EdgeError> {
    let mut tls = ServerConfig::builder_with_provider(ctls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    tls.alpn_protocols = vec![warren_tunnel_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let keep_alive = warren_tunnel::KeepAlive::dead_after(config.tunnel_dead_after);
    server.transport_config(Arc::new(warren_tunnel::transport_config(4, keep_alive)));
    warren_tunnel::endpoint(config.tunnel_listen, Some(server)).map_err(|source| EdgeError::Bind {
        what: "tunnel",
        addr: config.tunnel_listen,
        source,
    })
}

async fn tunnel_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        if !shared.admit_tunnel() {
            incoming.refuse();
            continue;
        }
        // Tunnels live beyond the accept loop; they are closed by shutdown().
        shared.background.spawn(tunnel::serve(shared.clone(), incoming));
    }
}

async fn public_loop(listener: TcpListener, port: u16, tls: TlsAcceptor, shared: Arc<Shared>, stop: CancellationToken) {
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, visitor) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = shared.admit_visitor(visitor.ip()) else { continue };
        let _ = tcp.set_nodelay(true);
        serve_visitor(tcp, visitor, port, tls.clone(), shared.clone(), &graceful, slot);
    }
    drop(listener);
    graceful.shutdown().await;
}

fn serve_visitor(
    tcp: TcpStream,
    visitor: SocketAddr,
    port: u16,
    tls: TlsAcceptor,
    shared: Arc<Shared>,
    graceful: &GracefulShutdown,
    slot: ConnSlot,
) {
    let watcher = graceful.watcher();
    let background = shared.background.clone();
    background.spawn(async move {
        let _slot = slot;
        // A node passing TLS through for its name gets the session as it is; everyone else
        // gets the edge's TLS, the ClientHello read so far replayed into it.
        let handshake = async {
            let mut tcp = tcp;
            if !shared.routes.any_tls_passthrough() {
                return Some(Err(Prefixed::new(Bytes::new(), tcp)));
            }
            let (hello, sni) = read_client_hello(&mut tcp).await.ok()?;
            let passing = sni.and_then(|sni| passthrough_for(&shared, &sni, port).map(|t| (t, sni)));
            Some(match passing {
                Some((tunnel, sni)) => Ok((tunnel, sni, tcp, hello.freeze())),
                None => Err(Prefixed::new(hello.freeze(), tcp)),
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let tcp = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Some(Ok((tunnel, sni, tcp, hello)))) => {
                let head = ConnectHead {
                    kind: ConnKind::Tls,
                    port,
                    visitor: visitor.to_string(),
                    local: tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                    sni,
                };
                let tasks = shared.tasks.clone();
                tasks.spawn(async move { crate::passthrough::bridge(&shared, &tunnel, head, tcp, hello).await });
                return;
            }
            Ok(Some(Err(tcp))) => tcp,
            _ => return shared.metrics.tls_failures.increment(1),
        };
        let stream = match tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
            Ok(Ok(s)) => s,
            _ => return shared.metrics.tls_failures.increment(1),
        };
        let (_, conn) = stream.get_ref();
        if conn.alpn_protocol() == Some(warren_tunnel_proto::ALPN_TCP) {
            // A node's tunnel, not a visitor: it counts against the tunnel handshake rate.
            drop(_slot);
            if !shared.admit_tunnel() {
                return;
            }
            return crate::tunnel::serve_tcp(shared, stream, visitor).await;
        }
        let info = Arc::new(ConnInfo {
            visitor,
            port,
            sni: conn.server_name().unwrap_or_default().to_owned(),
            tls_version: conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default(),
        });
        let svc = service_fn(move |req| proxy::handle(shared.clone(), info.clone(), req));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // A visitor gets 10 s to send a request head of at most 64 KiB (slowloris, header floods).
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(VISITOR_HEAD_TIMEOUT)
            .max_buf_size(VISITOR_MAX_HEAD);
        builder.http2().timer(hyper_util::rt::TokioTimer::new()).max_header_list_size(VISITOR_MAX_HEAD as u32);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
        let _ = watcher.watch(conn).await;
    });
}
