//! `RecvStream::read_available` over both transports: what has arrived comes out in one
//! buffer (not a packet or an HTTP/2 frame at a time), in order, and a stream cut after some
//! data still ends with an error, never as a clean end.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use warren_tunnel::{KeepAlive, Link, RecvStream, SendStream, TcpLink};

const KEEP_ALIVE: Duration = Duration::from_secs(10);
const PIECE: usize = 4 << 10;
const PIECES: usize = 20;

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// Writes the pattern in PIECE-sized writes (one QUIC frame or HTTP/2 DATA frame each).
async fn write_pieces(send: &mut SendStream, data: &[u8]) {
    for piece in data.chunks(PIECE) {
        send.write_chunk(Bytes::copy_from_slice(piece)).await.expect("write");
    }
}

/// Reads the whole stream with read_available(max); returns the reads' sizes and the bytes.
async fn read_all(recv: &mut RecvStream, max: usize) -> (Vec<usize>, Vec<u8>) {
    let (mut sizes, mut got) = (Vec::new(), Vec::new());
    while let Some(b) = recv.read_available(max).await.expect("read") {
        assert!(b.len() <= max, "a read is bounded by its max");
        sizes.push(b.len());
        got.extend_from_slice(&b);
    }
    (sizes, got)
}

/// An HTTP/2 tunnel over an in-memory pipe: (edge, node).
async fn tcp_pair() -> (Link, Link) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let ka = KeepAlive::dead_after(KEEP_ALIVE);
    let (edge, node) = tokio::join!(TcpLink::edge(a, ka), TcpLink::node(b, ka, 8));
    let (edge, node) = (Link::Tcp(edge.expect("edge side")), Link::Tcp(node.expect("node side")));
    // The edge opened the control stream; the node takes it first, as a node does.
    let _ = node.open_control().await.expect("control stream");
    (edge, node)
}

/// A QUIC tunnel on loopback with a throwaway CA: (opening side, accepting side).
async fn quic_pair(dir: &std::path::Path) -> (quinn::Connection, quinn::Connection) {
    let ca = warren_common::tls::DevCa::open_or_create(dir).expect("dev CA");
    let mut tls = (*ca.server_config(&["localhost".into()]).expect("server cert")).clone();
    tls.alpn_protocols = vec![warren_tunnel_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).expect("QUIC TLS");
    let ka = KeepAlive::dead_after(KEEP_ALIVE);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(warren_tunnel::transport_config(8, ka)));
    let server = warren_tunnel::endpoint("127.0.0.1:0".parse().expect("addr"), Some(server)).expect("server");
    let mut client = warren_tunnel::endpoint("127.0.0.1:0".parse().expect("addr"), None).expect("client");
    client.set_default_client_config(
        warren_tunnel::quic_client_config(Some(&ca.ca_cert_path), 8, ka).expect("client config"),
    );
    let addr = server.local_addr().expect("server address");
    let accept = async { server.accept().await.expect("incoming").await.expect("handshake") };
    let connect = async { client.connect(addr, "localhost").expect("connect").await.expect("handshake") };
    let (accepted, opened) = tokio::join!(accept, connect);
    (opened, accepted)
}

/// PIECES writes on a stream `opener` opens, read at `acceptor` once all have arrived: the
/// first read takes all it may (64 KiB), and the reads together give every byte in order.
async fn reads_come_coalesced_and_whole(opener: Link, acceptor: Link) {
    let data = pattern(PIECE * PIECES);
    let (mut send, _r) = opener.open().await.expect("open");
    write_pieces(&mut send, &data).await;
    send.finish().expect("finish");
    let (_s, mut recv) = acceptor.accept().await.expect("accept");
    // Let everything arrive before the first read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sizes, got) = read_all(&mut recv, 64 << 10).await;
    assert_eq!(got, data, "every byte, in order");
    assert_eq!(sizes[0], 64 << 10, "the first read joins what arrived, up to its max: {sizes:?}");
}

#[tokio::test]
async fn quic_stream_reads_come_coalesced_and_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (opener, acceptor) = quic_pair(dir.path()).await;
    reads_come_coalesced_and_whole(Link::Quic(opener), Link::Quic(acceptor)).await;
}

#[tokio::test]
async fn h2_stream_reads_come_coalesced_and_whole() {
    let (edge, node) = tcp_pair().await;
    reads_come_coalesced_and_whole(edge, node).await;
}

#[tokio::test]
async fn a_reset_after_data_is_an_error_not_an_end() {
    let (edge, node) = tcp_pair().await;
    let (mut send, _r) = edge.open().await.expect("open");
    write_pieces(&mut send, &pattern(3 * PIECE)).await;
    // Give the data a head start, so that the reset lands behind it in one read.
    tokio::time::sleep(Duration::from_millis(100)).await;
    send.reset();
    let (_s, mut recv) = node.accept().await.expect("accept");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = recv.read_available(64 << 10).await.expect("the data that came before the reset");
    assert_eq!(first.as_deref(), Some(&pattern(3 * PIECE)[..]));
    let next = recv.read_available(64 << 10).await;
    assert!(next.is_err(), "the reset must surface, not look like a finished stream: {next:?}");
}
