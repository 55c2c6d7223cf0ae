//! Funnel end to end on loopback: a visitor over real TLS -> edge -> QUIC -> node agent ->
//! a real local HTTP origin, and back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use warren::funnel::{Funnel, FunnelConfig};
use warren::services::ServiceSpec;
use warren_common::testing::noise;
use warren_edge::config::{Config, FileConfig};
use warren_edge::Edge;
use warren_relay_proto::ws::{self, Role, WsDecoder};

const TOKEN: &str = "test-token-123";

/// A body fed from a channel (for streamed uploads and server-sent events).
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> OriginBody {
    Full::new(s.into()).boxed()
}

async fn origin(mut req: Request<Incoming>) -> Result<Response<OriginBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let resp = match path.as_str() {
        "/hello" => Response::new(full("hello from origin")),
        "/headers" => {
            let mut out = String::new();
            for n in ["host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"] {
                let v = req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("-");
                out.push_str(&format!("{n}: {v}\n"));
            }
            Response::new(full(out))
        }
        "/count" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                n += f.data_ref().map_or(0, |d| d.len() as u64);
            }
            Response::new(full(n.to_string()))
        }
        "/sse" => {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                for i in 0..3 {
                    if tx.send(Bytes::from(format!("data: event {i}\n\n"))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
            let mut r = Response::new(ChanBody(rx).boxed());
            r.headers_mut().insert("content-type", "text/event-stream".parse().expect("hv"));
            r
        }
        "/early" => {
            // Answers at once and discards the upload in the background, as nginx does when it
            // refuses a body (closing instead would race the answer against a TCP reset).
            let mut body = req.into_body();
            tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
            let mut r = Response::new(full("too large"));
            *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            r
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(700)).await;
            Response::new(full("slow but sure"))
        }
        "/ws" => warren_common::testing::ws_echo_upgrade(&mut req).map(|()| full("")),
        _ => {
            let mut r = Response::new(full("no such page"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(resp)
}

async fn start_origin() -> SocketAddr {
    warren_common::testing::http_origin(origin).await
}

struct Lab {
    edge: Edge,
    _dir: tempfile::TempDir,
}

async fn start_edge(grace: &str) -> Lab {
    start_edge_with(grace, "").await
}

/// An edge with extra `[limits]` lines.
async fn start_edge_with(grace: &str, limits: &str) -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "funnel_domain = \"funnel.test\"\npublic_listen = [\"127.0.0.1:0\"]\ntunnel_listen = \"127.0.0.1:0\"\n[admin]\nenabled = false\n[shutdown]\ngrace_period = \"{grace}\"\n[limits]\n{limits}\n[[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\", \"other\", \"broken\"]\n"
    );
    let mut f = FileConfig::parse(&toml).expect("config");
    f.state_dir = Some(dir.path().to_path_buf());
    let edge = Edge::spawn(Config::try_from(f).expect("valid"), None).await.expect("edge starts");
    Lab { edge, _dir: dir }
}

impl Lab {
    fn port(&self) -> u16 {
        self.edge.public_addrs()[0].port()
    }

    fn funnel(&self, name: &str, token: &str, target: String) -> Funnel {
        Funnel::start(FunnelConfig {
            edges: vec![self.edge.tunnel_addr().to_string()],
            edge_name: Some("localhost".into()),
            ca_file: self.edge.dev_ca_cert().map(Into::into),
            token: token.into(),
            name: name.into(),
            services: vec![ServiceSpec::new(self.port(), target)],
            transport: Default::default(),
            domains: Vec::new(),
        })
    }

    /// Opens an HTTP/1.1 connection to the edge as a visitor of `host`.
    async fn visitor(&self, host: &str) -> hyper::client::conn::http1::SendRequest<OriginBody> {
        let tcp = TcpStream::connect(self.edge.public_addrs()[0]).await.expect("connect");
        let cfg = warren_common::tls::client_config(self.edge.dev_ca_cert()).expect("tls");
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).expect("name");
        let tls =
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.expect("visitor TLS handshake validates");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("http handshake");
        tokio::spawn(conn.with_upgrades());
        send
    }

    /// Opens an HTTP/2 connection to the edge as a visitor of `host`.
    async fn visitor_h2(&self, host: &str) -> hyper::client::conn::http2::SendRequest<OriginBody> {
        let tcp = TcpStream::connect(self.edge.public_addrs()[0]).await.expect("connect");
        let mut cfg = (*warren_common::tls::client_config(self.edge.dev_ca_cert()).expect("tls")).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.expect("TLS");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "the edge speaks HTTP/2");
        let (send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        send
    }

    async fn get(&self, host: &str, path: &str) -> (StatusCode, String) {
        self.get_via(host, host, path).await
    }

    /// GET with TLS server name `sni` and Host header `host`.
    async fn get_via(&self, sni: &str, host: &str, path: &str) -> (StatusCode, String) {
        let mut v = self.visitor(sni).await;
        let req = Request::get(path).header("host", host).body(full("")).expect("req");
        let resp = tokio::time::timeout(Duration::from_secs(10), v.send_request(req))
            .await
            .expect("never a hang")
            .expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_headers_and_error_pages() {
    let lab = start_edge("1s").await;
    let origin = start_origin().await;
    let f = lab.funnel("web", TOKEN, format!("http://{origin}"));
    let urls = f.wait_registered(Duration::from_secs(10)).await.expect("registered");
    assert_eq!(urls, vec![format!("https://web.funnel.test:{}/", lab.port())]);
    assert_eq!(lab.get("web.funnel.test", "/hello").await, (StatusCode::OK, "hello from origin".into()));
    let (_, headers) = lab.get("web.funnel.test", "/headers").await;
    for want in [
        "host: web.funnel.test",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: https",
        "x-forwarded-host: web.funnel.test",
        "forwarded: for=127.0.0.1;proto=https;host=web.funnel.test",
    ] {
        assert!(headers.contains(want), "{want:?} missing in:\n{headers}");
    }
    assert_eq!(lab.get("web.funnel.test", "/nope").await.0, StatusCode::NOT_FOUND, "origin's own 404 passes through");
    let (status, page) = lab.get_via("web.funnel.test", "elsewhere.example", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("no funnel"), "{page}");
    assert_eq!(
        lab.get("other.funnel.test", "/").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "registered name, no tunnel"
    );
    // A node whose local service is down answers 502 with a clear message.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let broken = lab.funnel("broken", TOKEN, format!("http://{dead}"));
    broken.wait_registered(Duration::from_secs(10)).await.expect("registered");
    let (status, page) = lab.get("broken.funnel.test", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(page.contains("could not reach its local service"), "{page}");
    lab.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_valid_token_registers_nothing() {
    let lab = start_edge("1s").await;
    let origin = start_origin().await;
    let f = lab.funnel("web", "wrong-token-000", format!("http://{origin}"));
    let err = f.wait_registered(Duration::from_secs(2)).await.expect_err("refused");
    assert!(err.contains("refused"), "{err}");
    let g = lab.funnel("notallowed", TOKEN, format!("http://{origin}"));
    assert!(g.wait_registered(Duration::from_secs(2)).await.is_err(), "token does not cover this name");
    assert_eq!(lab.edge.tunnel_count(), 0);
    assert_eq!(lab.get("web.funnel.test", "/hello").await.0, StatusCode::SERVICE_UNAVAILABLE);
    lab.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_streams_sse_arrives_event_by_event_and_websocket_echoes() {
    let lab = start_edge("1s").await;
    let origin = start_origin().await;
    let f = lab.funnel("web", TOKEN, format!("http://{origin}"));
    f.wait_registered(Duration::from_secs(10)).await.expect("registered");

    // 64 MiB upload generated on the fly: neither side can hold it whole in this test.
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..64 {
            if tx.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    let mut v = lab.visitor("web.funnel.test").await;
    let req = Request::post("/count").header("host", "web.funnel.test").body(ChanBody(rx).boxed()).expect("req");
    let resp = v.send_request(req).await.expect("response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], (64u64 << 20).to_string().as_bytes());

    // Server-sent events arrive one by one, not at the end.
    let mut v = lab.visitor("web.funnel.test").await;
    let resp = v
        .send_request(Request::get("/sse").header("host", "web.funnel.test").body(full("")).expect("req"))
        .await
        .expect("resp");
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            arrivals.push((Instant::now(), String::from_utf8_lossy(d).into_owned()));
        }
    }
    let text: String = arrivals.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(text, "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n");
    let spread = arrivals.last().expect("some").0 - arrivals[0].0;
    assert!(
        arrivals.len() >= 3 && spread >= Duration::from_millis(450),
        "events were buffered: {} chunks over {spread:?}",
        arrivals.len()
    );

    // WebSocket through the funnel.
    let mut v = lab.visitor("web.funnel.test").await;
    let req = Request::get("/ws")
        .header("host", "web.funnel.test")
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(full(""))
        .expect("req");
    let resp = v.send_request(req).await.expect("resp");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        resp.headers().get("sec-websocket-accept").and_then(|v| v.to_str().ok()),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
    for msg in ["ping-ws", "second message"] {
        let mut out = BytesMut::new();
        ws::encode_frame(&mut out, ws::opcode::TEXT, msg.as_bytes(), Some([1, 2, 3, 4]));
        io.write_all(&out).await.expect("write");
        let (mut dec, mut input, mut data) = (WsDecoder::new(Role::Client), BytesMut::new(), BytesMut::new());
        while data.len() < msg.len() {
            input.reserve(1024);
            let n = tokio::time::timeout(Duration::from_secs(5), io.read_buf(&mut input))
                .await
                .expect("echo in time")
                .expect("read");
            assert!(n > 0, "closed");
            while let Ok(Some(_)) = dec.decode(&mut input, &mut data) {}
        }
        assert_eq!(&data[..], msg.as_bytes());
    }
    lab.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_node_replaces_its_registration() {
    let lab = start_edge("1s").await;
    let origin = start_origin().await;
    let first = lab.funnel("web", TOKEN, format!("http://{origin}"));
    first.wait_registered(Duration::from_secs(10)).await.expect("registered");
    let second = lab.funnel("web", TOKEN, format!("http://{origin}"));
    second.wait_registered(Duration::from_secs(10)).await.expect("the newer registration wins");
    assert_eq!(lab.edge.tunnel_count(), 1);
    assert_eq!(lab.get("web.funnel.test", "/hello").await.0, StatusCode::OK);
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lab.get("web.funnel.test", "/hello").await.0, StatusCode::OK);
    let _ = Arc::new(second);
    lab.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_in_flight_requests_finish() {
    let lab = start_edge("5s").await;
    let origin = start_origin().await;
    let f = lab.funnel("web", TOKEN, format!("http://{origin}"));
    f.wait_registered(Duration::from_secs(10)).await.expect("registered");
    let mut v = lab.visitor("web.funnel.test").await;
    let pending = v.send_request(Request::get("/slow").header("host", "web.funnel.test").body(full("")).expect("req"));
    let addr = lab.edge.public_addrs()[0];
    let shutdown = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        lab.edge.shutdown().await;
    };
    let (resp, ()) = tokio::join!(pending, shutdown);
    let resp = resp.expect("in-flight request finished during the drain");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.into_body().collect().await.expect("body").to_bytes()[..], b"slow but sure");
    assert!(TcpStream::connect(addr).await.is_err(), "no longer accepting");
    let _ = Empty::<Bytes>::new();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_ends_the_visitors_http2_upload() {
    let lab = start_edge("1s").await;
    let origin = start_origin().await;
    let f = lab.funnel("web", TOKEN, format!("http://{origin}"));
    f.wait_registered(Duration::from_secs(10)).await.expect("registered");
    // Up to 1 GiB offered; the origin answers 413 without reading any of it.
    let (tx, rx) = mpsc::channel(4);
    let producer = tokio::spawn(async move {
        let chunk = Bytes::from(vec![1u8; 1 << 20]);
        let mut sent = 0u32;
        while sent < 1024 && tx.send(chunk.clone()).await.is_ok() {
            sent += 1;
        }
        sent
    });
    let mut v = lab.visitor_h2("web.funnel.test").await;
    let req = Request::post("/early").header("host", "web.funnel.test").body(ChanBody(rx).boxed()).expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(10), v.send_request(req))
        .await
        .expect("the answer arrives")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"too large");
    // Once the answer is complete the edge resets the stream: the visitor stops uploading
    // (without the reset, curl was seen stalled on a closed flow-control window, and here the
    // whole GiB would be carried to an origin that throws it away).
    let sent = tokio::time::timeout(Duration::from_secs(10), producer)
        .await
        .expect("the upload ends instead of stalling")
        .expect("producer");
    assert!(sent < 1024, "the upload was cut short, not carried whole ({sent} MiB)");
    lab.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_name_request_rate_and_visitor_connections_per_address_are_limited() {
    let lab = start_edge_with("1s", "requests_per_second_per_host = 1\nburst_per_host = 2\nmax_conns_per_ip = 3").await;
    let origin = start_origin().await;
    let f = lab.funnel("web", TOKEN, format!("http://{origin}"));
    f.wait_registered(Duration::from_secs(10)).await.expect("registered");
    let mut v = lab.visitor("web.funnel.test").await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let req = Request::get("/hello").header("host", "web.funnel.test").body(full("")).expect("req");
        v.ready().await.expect("connection ready for the next request");
        let resp = v.send_request(req).await.expect("response");
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = resp.headers().get("retry-after").cloned();
        }
        statuses.push(resp.status().as_u16());
        let _ = resp.into_body().collect().await;
    }
    assert_eq!(&statuses[..2], &[200, 200], "the burst passes");
    assert!(statuses[2..].contains(&429), "then 429: {statuses:?}");
    assert_eq!(retry_after.as_ref().and_then(|v| v.to_str().ok()), Some("1"));

    // Three visitor connections from one address at most: v and two more; a fourth is closed.
    let second = lab.visitor("web.funnel.test").await;
    let third = lab.visitor("web.funnel.test").await;
    let tcp = TcpStream::connect(lab.edge.public_addrs()[0]).await.expect("connect");
    let cfg = warren_common::tls::client_config(lab.edge.dev_ca_cert()).expect("tls");
    let name = rustls_pki_types::ServerName::try_from("web.funnel.test").expect("name");
    let handshake =
        tokio::time::timeout(Duration::from_secs(5), tokio_rustls::TlsConnector::from(cfg).connect(name, tcp))
            .await
            .expect("closed promptly");
    assert!(handshake.is_err(), "a fourth connection from the same address is refused");
    drop((v, second, third));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(lab.get("web.funnel.test", "/hello").await.0, StatusCode::OK, "slots freed, budget refilled");
    lab.edge.shutdown().await;
}

/// Writes `bytes` to `s` and reads (bounded) until the edge answers or closes.
async fn poke<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, bytes: &[u8]) -> Vec<u8> {
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_visitors_and_tunnel_garbage_leave_the_funnel_serving() {
    let lab = start_edge("1s").await;
    let origin = start_origin().await;
    let f = lab.funnel("web", TOKEN, format!("http://{origin}"));
    f.wait_registered(Duration::from_secs(10)).await.expect("registered");
    let public = lab.edge.public_addrs()[0];
    let tls = || async {
        let tcp = TcpStream::connect(public).await.expect("connect");
        let cfg = warren_common::tls::client_config(lab.edge.dev_ca_cert()).expect("tls");
        let name = rustls_pki_types::ServerName::try_from("web.funnel.test").expect("name");
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.expect("TLS")
    };
    let mut seed = 0x1234_5678_9abc_def1_u64;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    for round in 0..4 {
        // Not TLS.
        poke(TcpStream::connect(public).await.expect("tcp"), &noise(&mut seed, 1500)).await;
        // TLS, then not HTTP.
        let answer = poke(tls().await, &noise(&mut seed, 3000)).await;
        assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 4"), "round {round}: {answer:?}");
        // A header line that never ends.
        let mut endless = b"GET /hello HTTP/1.1\r\nHost: web.funnel.test\r\nX-Junk: ".to_vec();
        endless.extend(std::iter::repeat_n(b'a', 200_000));
        let answer = poke(tls().await, &endless).await;
        assert!(answer.starts_with(b"HTTP/1.1 431"), "round {round}: an oversized head is refused at once");
        // A broken chunked body.
        let answer = poke(
            tls().await,
            b"POST /count HTTP/1.1\r\nHost: web.funnel.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n",
        )
        .await;
        assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "round {round}: a broken body is not a success");
        // Garbage datagrams on the QUIC tunnel port.
        for _ in 0..20 {
            let _ = udp.send_to(&noise(&mut seed, 1200), lab.edge.tunnel_addr()).await;
        }
    }
    assert_eq!(lab.edge.tunnel_count(), 1, "the node's tunnel survived");
    assert_eq!(lab.get("web.funnel.test", "/hello").await, (StatusCode::OK, "hello from origin".into()));
    lab.edge.shutdown().await;
}
