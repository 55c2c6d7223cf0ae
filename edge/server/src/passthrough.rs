//! Raw connections to a node: TCP ports it holds, and TLS sessions for its name passed
//! through without being terminated here.
//!
//! ```text
//! TCP:  node Publish { tcp: [p] } -> p in [tcp] ports, not held by another node -> listen on p
//!       visitor connects to p -> Connect { Tcp, p, visitor, local } on a new stream -> copy
//!       the node leaves or stops asking -> the listener closes
//! TLS:  node Publish { tls: [443] } -> its name's TLS on 443 is passed through
//!       visitor on 443: read the ClientHello (<= 16 KiB, within the handshake deadline)
//!         SNI = <name>.<domain> of a passing node -> Connect { Tls, ... }, the ClientHello
//!           and everything after go to the node as they are
//!         anything else -> the edge's own TLS, replaying the bytes it read
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warren_tunnel::write_message;
use warren_tunnel_proto::{ConnKind, ConnectHead, Message};

use crate::metrics::Limited;
use crate::routes::{name_in, Tunnel};
use crate::state::Shared;

/// Largest ClientHello read while looking for the server name.
const MAX_CLIENT_HELLO: usize = 16 << 10;

/// Makes `want` the TCP ports `tunnel` holds: new ones are listened on (when allowed and
/// free), ones no longer wanted are closed. Returns the granted ports and a reason for
/// each refused one.
pub(crate) async fn publish_tcp(shared: &Arc<Shared>, tunnel: &Arc<Tunnel>, want: &[u16]) -> (Vec<u16>, Vec<String>) {
    let ports = &shared.tcp_ports;
    ports.release(tunnel.id, |p| !want.contains(&p));
    let (mut granted, mut refused) = (Vec::new(), Vec::new());
    for &port in want {
        if !shared.config.tcp.allows(port) {
            refused.push(format!("tcp {port}: not a TCP port this edge offers"));
            continue;
        }
        if let Some((holder, owner)) = ports.holder(port) {
            // A node that reconnected takes its ports over from its previous tunnel.
            if owner == tunnel.id || holder == tunnel.name {
                ports.adopt(port, tunnel.id);
                granted.push(port);
            } else {
                refused.push(format!("tcp {port}: held by another node"));
            }
            continue;
        }
        let addr = SocketAddr::new(shared.config.tcp.listen_ip, port);
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                refused.push(format!("tcp {port}: cannot listen: {e}"));
                continue;
            }
        };
        let stop = CancellationToken::new();
        ports.insert(port, &tunnel.name, tunnel.id, stop.clone());
        info!(name = %tunnel.name, port, "TCP service published");
        shared.background.spawn(accept_loop(shared.clone(), listener, port, stop));
        granted.push(port);
    }
    (granted, refused)
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, port: u16, stop: CancellationToken) {
    loop {
        let (tcp, visitor) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    warn!(port, error = %e, "TCP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = shared.admit_visitor(visitor.ip()) else { continue };
        let Some((name, id)) = shared.tcp_ports.holder(port) else { return };
        let Some(tunnel) = shared.routes.get(&name).filter(|t| t.id == id) else { continue };
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            let _slot = slot;
            let head = ConnectHead {
                kind: ConnKind::Tcp,
                port,
                visitor: visitor.to_string(),
                local: tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                sni: String::new(),
            };
            bridge(&shared2, &tunnel, head, tcp, Bytes::new()).await;
        });
    }
}

/// Connects a visitor's TCP connection to a new stream on `tunnel`: Connect first, then
/// `already_read` (a ClientHello), then both directions as they come.
pub(crate) async fn bridge(
    shared: &Shared,
    tunnel: &Tunnel,
    head: ConnectHead,
    mut tcp: TcpStream,
    already_read: Bytes,
) {
    let _ = tcp.set_nodelay(true);
    let opened = match tunnel.open_stream().await {
        Ok(o) => o,
        Err(e) => {
            if e == crate::routes::RouteError::RateLimited {
                shared.metrics.limited(Limited::HostRate);
            }
            return debug!(name = %tunnel.name, error = %e, "connection not passed to the node");
        }
    };
    let (_permit, mut send, recv) = (opened.permit, opened.send, opened.recv);
    if write_message(&mut send, &Message::Connect(head)).await.is_err() {
        return;
    }
    if !already_read.is_empty() && send.write_all(&already_read).await.is_err() {
        return;
    }
    let mut node = tokio::io::join(recv, send);
    match tokio::io::copy_bidirectional(&mut tcp, &mut node).await {
        Ok((up, down)) => debug!(name = %tunnel.name, up, down, "passed-through connection closed"),
        Err(e) => debug!(name = %tunnel.name, error = %e, "passed-through connection ended"),
    }
    let _ = node.shutdown().await;
}

/// Reads a visitor's ClientHello and returns the bytes read and the server name it asks for.
/// `None` for the name when the bytes are not a ClientHello (the edge's TLS then refuses them
/// as it would have) or it is larger than [`MAX_CLIENT_HELLO`].
pub(crate) async fn read_client_hello(tcp: &mut TcpStream) -> io::Result<(BytesMut, Option<String>)> {
    let mut buf = BytesMut::with_capacity(2048);
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            return Ok((buf, None));
        }
        while fed < buf.len() {
            match acceptor.read_tls(&mut &buf[fed..]) {
                Ok(0) | Err(_) => return Ok((buf, None)),
                Ok(n) => fed += n,
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_ascii_lowercase);
                return Ok((buf, sni));
            }
            Ok(None) if buf.len() < MAX_CLIENT_HELLO => {}
            Ok(None) | Err(_) => return Ok((buf, None)),
        }
    }
}

/// The node that passes TLS through for `sni` on `port`, if one does.
pub(crate) fn passthrough_for(shared: &Shared, sni: &str, port: u16) -> Option<Arc<Tunnel>> {
    let name = name_in(sni.trim_end_matches('.'), &shared.config.funnel_domain)?;
    shared.routes.get(name).filter(|t| t.passes_tls(port))
}

#[cfg(test)]
mod tests {
    use warren_common::io::Prefixed;

    use super::*;

    #[tokio::test]
    async fn the_server_name_is_read_and_the_bytes_replay() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let cfg = warren_common::tls::client_config(None).expect("tls");
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("web.funnel.test").expect("name");
            // The handshake cannot finish (no server answers it); only the ClientHello matters.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
            )
            .await;
        });
        let (mut tcp, _) = l.accept().await.expect("accept");
        let (buf, sni) = read_client_hello(&mut tcp).await.expect("read");
        assert_eq!(sni.as_deref(), Some("web.funnel.test"));
        assert_eq!(buf[0], 0x16, "a TLS handshake record");
        let mut replay = Prefixed::new(buf.clone().freeze(), tokio::io::empty());
        let mut again = Vec::new();
        replay.read_to_end(&mut again).await.expect("replay");
        assert_eq!(again, buf.to_vec());
        drop(tcp);
        client.abort();
    }

    #[tokio::test]
    async fn bytes_that_are_not_tls_give_no_name() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut seed = 7;
        for junk in [b"GET / HTTP/1.1\r\n\r\n".to_vec(), warren_common::testing::noise(&mut seed, 3000)] {
            let sent = junk.clone();
            let client = tokio::spawn(async move {
                let mut tcp = TcpStream::connect(addr).await.expect("connect");
                tcp.write_all(&sent).await.expect("write");
                tcp.shutdown().await.expect("fin");
            });
            let (mut tcp, _) = l.accept().await.expect("accept");
            let (buf, sni) = read_client_hello(&mut tcp).await.expect("read");
            assert_eq!(sni, None);
            assert!(junk.starts_with(&buf), "what was read is what came");
            client.await.expect("client");
        }
    }
}
