//! The tunnel side: nodes connect (QUIC on the tunnel port, or TCP+TLS on a public port with
//! the TCP tunnel's ALPN), authenticate with a token, and register their name.
//!
//! A node's control stream comes first (see `warren_tunnel::link`): Hello in, Welcome or
//! Refused out. The stream stays open: a later Hello on it (same name and token) replaces the
//! ports the node publishes and gets its own Welcome, or a Refused that leaves the previous
//! ports in place. An Access message replaces the node's access rules (answered with
//! AccessSet). A node that reconnects (or moves to another transport) replaces its
//! previous registration: new requests go to the new tunnel at once, and the old one is closed
//! once the requests it carries have finished, or after [`REPLACED_DRAIN`]. The registration
//! ends when the tunnel closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tracing::{debug, info};
use warren_tunnel::{read_message, write_message, KeepAlive, Link, SendStream, TcpLink, Transport};
use warren_tunnel_proto::{Message, MIN_VERSION, VERSION};

use crate::config::valid_name;
use crate::credentials::{self, Claims};
use crate::metrics::Registration;
use crate::routes::Tunnel;
use crate::state::Shared;

/// Time a new connection has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a replaced tunnel is kept for the requests it still carries.
pub(crate) const REPLACED_DRAIN: Duration = Duration::from_secs(30);

/// The edge's side of the tunnels' keep-alives.
pub(crate) fn keep_alive(shared: &Shared) -> KeepAlive {
    KeepAlive::dead_after(shared.config.tunnel_dead_after)
}

/// Handles one incoming QUIC connection until it closes.
pub(crate) async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HELLO_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return debug!(%remote, error = %e, "tunnel handshake failed"),
        Err(_) => return debug!(%remote, "tunnel handshake timed out"),
    };
    serve_link(shared, Link::Quic(conn), remote).await;
}

/// Handles a TLS session on a public port that asked for the TCP tunnel, until it closes.
pub(crate) async fn serve_tcp<T>(shared: Arc<Shared>, io: T, remote: SocketAddr)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let link = match tokio::time::timeout(HELLO_TIMEOUT, TcpLink::edge(io, keep_alive(&shared))).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return debug!(%remote, error = %e, "TCP tunnel did not start"),
        Err(_) => return debug!(%remote, "TCP tunnel handshake timed out"),
    };
    serve_link(shared, Link::Tcp(link), remote).await;
}

async fn serve_link(shared: Arc<Shared>, link: Link, remote: SocketAddr) {
    let (tunnel, control) = match tokio::time::timeout(HELLO_TIMEOUT, register(&shared, &link, remote)).await {
        Ok(Some(Registered::Node(t, control))) => (t, control),
        Ok(Some(Registered::Peer(conn))) => {
            let Some(cluster) = shared.cluster.clone() else { return };
            let tasks = shared.tasks.clone();
            return crate::cluster::serve_peer(cluster, shared.local_routes(), conn, remote, tasks).await;
        }
        _ => return link.close(1, "no valid hello"),
    };
    let tcp = link.transport() == Transport::Tcp;
    if tcp {
        shared.metrics.tcp_tunnels.increment(1.0);
    }
    let reason = tokio::select! {
        reason = link.closed() => reason,
        () = updates(&shared, &tunnel, control) => link.closed().await,
        () = expiry(&tunnel) => {
            link.close(3, "token expired");
            link.closed().await
        }
    };
    if tcp {
        shared.metrics.tcp_tunnels.decrement(1.0);
    }
    shared.tcp_ports.release(tunnel.id, |_| true);
    shared.domains.remove_tunnel(tunnel.id);
    shared.routes.set_tls_ports(&tunnel, Vec::new());
    if shared.routes.remove(&tunnel.name, tunnel.id) {
        shared.metrics.tunnels.decrement(1.0);
        if let Some(c) = &shared.cluster {
            c.withdraw(std::slice::from_ref(&tunnel.name)).await;
        }
    }
    info!(name = %tunnel.name, %remote, transport = %link.transport(), %reason, "node tunnel closed");
}

/// Ends when the signed token the tunnel registered with expires (never for a static one).
async fn expiry(tunnel: &Tunnel) {
    match &tunnel.credential {
        Some((_, expires)) => {
            let left = expires.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// Reads the revocation list from `store` at once and then every `every`, and closes the
/// tunnels of revoked tokens. A store that cannot be read keeps the last list (and is logged).
pub(crate) async fn watch_revocations(
    shared: Arc<Shared>,
    store: Arc<dyn crate::store::Store>,
    every: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let logs = warren_common::limits::LogLimiter::new(Duration::from_secs(30));
    loop {
        match store.revoked().await {
            Ok(ids) => {
                let ids: std::collections::HashSet<String> = ids.into_iter().collect();
                // The list first: a node whose tunnel is closed next must not get back in.
                *shared.revoked.write().unwrap_or_else(|e| e.into_inner()) = ids.clone();
                let closed = shared.routes.close_revoked(&ids);
                if closed > 0 {
                    info!(closed, "tunnels of revoked tokens closed");
                }
            }
            Err(e) => {
                if let Some(skipped) = logs.allow() {
                    tracing::warn!(error = %e, skipped, "cannot read the token revocation list; keeping the last one");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Whether `token` may register `name`: a static `[[tokens]]` entry (`Ok(None)`), or a
/// signed token that verifies, is not revoked and names it (`Ok(Some(claims))`).
fn authorize(shared: &Shared, token: &str, name: &str) -> Result<Option<Claims>, String> {
    if shared.config.tokens.iter().any(|t| t.allows(token, name)) {
        return Ok(None);
    }
    let unknown = || "token not valid for this name".to_owned();
    let Some(creds) = shared.config.credentials.as_ref().filter(|_| token.starts_with(credentials::PREFIX)) else {
        return Err(unknown());
    };
    let now = credentials::unix_now(std::time::SystemTime::now());
    let claims = credentials::verify(token, &creds.public_keys, now, creds.max_lifetime).map_err(|e| e.to_string())?;
    if shared.revoked.read().unwrap_or_else(|e| e.into_inner()).contains(&claims.id) {
        return Err(credentials::CredentialError::Revoked.to_string());
    }
    if !claims.allows(name) {
        return Err(unknown());
    }
    Ok(Some(claims))
}

/// Who a new connection turned out to be.
enum Registered {
    /// A node, now registered, with its control stream.
    Node(Arc<Tunnel>, Control),
    /// A sibling edge, authenticated with the cluster key (siblings link over QUIC only).
    Peer(quinn::Connection),
}

/// A node's control stream.
struct Control {
    send: SendStream,
    recv: warren_tunnel::RecvStream,
    token: String,
}

/// Answers what a registered node sends on its control stream (Hellos changing its ports,
/// Publish for TCP and TLS passthrough), until the stream ends or carries anything else.
async fn updates(shared: &Arc<Shared>, tunnel: &Arc<Tunnel>, mut control: Control) {
    loop {
        let ports = match read_message(&mut control.recv).await {
            Ok(Message::Hello { version, name, token, ports })
                if version == tunnel.version && name == tunnel.name && token == control.token =>
            {
                ports
            }
            Ok(Message::Publish { tcp, tls }) => {
                let answer = publish(shared, tunnel, &tcp, &tls).await;
                if write_message(&mut control.send, &answer).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Message::Domains { names }) => {
                let (served, pending) = crate::domains::wish(shared, tunnel.id, &tunnel.name, names).await;
                info!(name = %tunnel.name, ?served, pending = pending.len(), "node asked for custom domains");
                if write_message(&mut control.send, &Message::DomainsSet { served, pending }).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Message::Access { generation, rules }) => {
                let answer = set_access(shared, tunnel, generation, rules);
                if write_message(&mut control.send, &answer).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(_) => {
                debug!(name = %tunnel.name, "unexpected message on a control stream");
                return;
            }
            Err(_) => return,
        };
        let served = shared.served_ports(&ports);
        let answer = if served.is_empty() && !ports.is_empty() {
            Message::Refused { reason: "none of the requested ports is served here".into() }
        } else {
            let urls = served.iter().map(|p| shared.config.public_url(&tunnel.name, *p)).collect();
            info!(name = %tunnel.name, ports = ?served, "node changed its ports");
            *tunnel.ports.write().unwrap_or_else(|e| e.into_inner()) = served;
            Message::Welcome { urls }
        };
        if write_message(&mut control.send, &answer).await.is_err() {
            return;
        }
    }
}

/// Grants what it can of a node's TCP and TLS-passthrough wishes.
async fn publish(shared: &Arc<Shared>, tunnel: &Arc<Tunnel>, tcp: &[u16], tls: &[u16]) -> Message {
    let host = format!("{}.{}", tunnel.name, shared.config.funnel_domain);
    let (granted, mut refused) = crate::passthrough::publish_tcp(shared, tunnel, tcp).await;
    let mut urls: Vec<String> = granted.iter().map(|p| format!("tcp://{host}:{p}")).collect();
    let mut passing = Vec::new();
    for &port in tls {
        if shared.public_ports.contains(&port) {
            passing.push(port);
            urls.push(format!("tls://{host}:{port}"));
        } else {
            refused.push(format!("tls {port}: not a public port of this edge"));
        }
    }
    info!(name = %tunnel.name, tcp = ?granted, tls = ?passing, "node published raw services");
    shared.routes.set_tls_ports(tunnel, passing);
    Message::Published { urls, refused }
}

/// Enforces a node's new access rules from its next request on.
fn set_access(
    shared: &Shared,
    tunnel: &Tunnel,
    generation: u32,
    rules: Vec<warren_tunnel_proto::AccessRule>,
) -> Message {
    let count = rules.len();
    let (table, refused) = shared.access.table(generation, rules);
    for r in &refused {
        info!(name = %tunnel.name, refused = %r, "access rule refused; its service is closed");
    }
    *tunnel.access.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    info!(name = %tunnel.name, generation, rules = count, "node set its access rules");
    Message::AccessSet { generation, refused }
}

async fn refuse_with(send: &mut SendStream, reason: &str) {
    let _ = write_message(send, &Message::Refused { reason: reason.into() }).await;
    let _ = send.finish();
    // Give the Refused a moment to leave before the connection closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn register(shared: &Shared, link: &Link, remote: SocketAddr) -> Option<Registered> {
    let (mut send, mut recv) = link.accept_control().await.ok()?;
    let refuse = |r: Registration| shared.metrics.registration(r);
    let (version, name, token, ports) = match read_message(&mut recv).await {
        Ok(Message::Hello { version, name, token, ports }) => (version, name, token, ports),
        Ok(Message::PeerHello { version, key }) => {
            let ok = (MIN_VERSION..=VERSION).contains(&version)
                && shared.cluster.as_ref().is_some_and(|c| c.key_matches(&key));
            let conn = match link {
                Link::Quic(c) if ok => c.clone(),
                _ => {
                    refuse(Registration::Unauthorized);
                    info!(%remote, "sibling edge refused: not a cluster member, wrong key or not on QUIC");
                    refuse_with(&mut send, "not a member of this cluster").await;
                    return None;
                }
            };
            write_message(&mut send, &Message::Welcome { urls: Vec::new() }).await.ok()?;
            return Some(Registered::Peer(conn));
        }
        _ => {
            refuse(Registration::BadHello);
            return None;
        }
    };
    let verdict = if !(MIN_VERSION..=VERSION).contains(&version) || !valid_name(&name) {
        Err((Registration::BadHello, "unsupported version or invalid name".to_owned()))
    } else {
        match authorize(shared, &token, &name) {
            Err(why) => Err((Registration::Unauthorized, why)),
            Ok(claims) => {
                // A node with only TCP or TLS-passthrough services asks for no HTTPS port.
                let served = shared.served_ports(&ports);
                if served.is_empty() && !ports.is_empty() {
                    Err((Registration::NoPorts, "none of the requested ports is served here".to_owned()))
                } else {
                    Ok((served, claims))
                }
            }
        }
    };
    let (ports, claims) = match verdict {
        Ok(v) => v,
        Err((r, reason)) => {
            refuse(r);
            info!(%remote, %name, reason, "node registration refused");
            refuse_with(&mut send, &reason).await;
            return None;
        }
    };
    let id = shared.routes.next_id();
    let streams = Arc::new(Semaphore::new(shared.config.max_streams_per_tunnel as usize));
    let rate = shared.config.host_rate.map(|r| std::sync::Mutex::new(r.bucket(std::time::Instant::now())));
    let tunnel = Arc::new(Tunnel {
        id,
        name: name.clone(),
        conn: link.clone(),
        version,
        ports: std::sync::RwLock::new(ports.clone()),
        tls_ports: std::sync::RwLock::new(Vec::new()),
        streams,
        rate,
        access: std::sync::RwLock::new(Arc::default()),
        credential: claims.map(|c| (c.id.clone(), c.expires())),
    });
    match shared.routes.insert(tunnel.clone()) {
        Some(old) => {
            info!(%name, %remote, transport = %link.transport(), "node reconnected; previous tunnel replaced");
            let max = shared.config.max_streams_per_tunnel;
            shared.background.spawn(shared.routes.clone().retire(old, max, REPLACED_DRAIN));
        }
        None => shared.metrics.tunnels.increment(1.0),
    }
    let urls: Vec<String> = ports.iter().map(|p| shared.config.public_url(&name, *p)).collect();
    shared.metrics.registration(Registration::Ok);
    info!(%name, %remote, transport = %link.transport(), urls = ?urls, "node registered");
    if let Some(c) = &shared.cluster {
        c.announce(&name).await;
    }
    if let Some(acme) = shared.acme.clone() {
        let host = format!("{name}.{}", shared.config.funnel_domain);
        shared.background.spawn(async move { acme.ensure(&host).await });
    }
    write_message(&mut send, &Message::Welcome { urls }).await.ok()?;
    Some(Registered::Node(tunnel, Control { send, recv, token }))
}
