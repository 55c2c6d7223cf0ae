//! The tunnel's TCP transport on loopback: a real edge, a real funnel agent, a real origin.
//!
//! - the TCP+TLS tunnel (HTTP/2 inside) on the edge's public port serves requests, uploads
//!   and WebSockets, and one visitor that does not read does not stall the others;
//! - `auto` falls back to TCP when QUIC is black-holed (a UDP forwarder in the test drops
//!   every datagram) and moves back to QUIC once datagrams pass again, the request in flight
//!   finishing on TCP;
//! - proxies that refuse, answer garbage, intercept TLS or are down give an error naming the
//!   proxy, and the agent keeps retrying; a real proxy (tinyproxy, with basic auth) carries it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use warren::funnel::{Funnel, FunnelConfig, FunnelStatus};
use warren::net::{ProxyChoice, TransportMode, TransportSettings};
use warren::services::ServiceSpec;
use warren_edge::config::{Config, FileConfig};
use warren_edge::Edge;

const TOKEN: &str = "transport-test-token";

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn origin(req: Request<Incoming>) -> Result<Response<OriginBody>, Infallible> {
    let resp = match req.uri().path() {
        "/hello" => Response::new(Full::new(Bytes::from("hello over any transport")).boxed()),
        "/count" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                n += f.data_ref().map_or(0, |d| d.len() as u64);
            }
            Response::new(Full::new(Bytes::from(n.to_string())).boxed())
        }
        // 64 MiB, far more than any window: a visitor that does not read holds it back.
        "/big" => Response::new(chunks(1024, 64 << 10).boxed()),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            Response::new(Full::new(Bytes::from("slow but sure")).boxed())
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from("no such page")).boxed());
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(resp)
}

/// `n` chunks of `size` zero bytes, as a stream of body frames.
fn chunks(n: usize, size: usize) -> ChanBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![0u8; size]);
        for _ in 0..n {
            if tx.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    ChanBody(rx)
}

struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

async fn start_origin() -> SocketAddr {
    warren_common::testing::http_origin(origin).await
}

struct Lab {
    edge: Edge,
    origin: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn lab() -> Lab {
    lab_with("").await
}

/// An edge with extra top-level settings.
async fn lab_with(extra: &str) -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "funnel_domain = \"funnel.test\"\npublic_listen = [\"127.0.0.1:0\"]\ntunnel_listen = \"127.0.0.1:0\"\n{extra}\n[admin]\nenabled = false\n[[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\"]\n"
    );
    let mut f = FileConfig::parse(&toml).expect("config");
    f.state_dir = Some(dir.path().to_path_buf());
    let edge = Edge::spawn(Config::try_from(f).expect("valid"), None).await.expect("edge starts");
    Lab { edge, origin: start_origin().await, _dir: dir }
}

impl Lab {
    fn port(&self) -> u16 {
        self.edge.public_addrs()[0].port()
    }

    /// Transport settings pointing TCP tunnels at this edge's public port.
    fn transport(&self, mode: TransportMode) -> TransportSettings {
        TransportSettings {
            mode,
            tcp_port: self.port(),
            proxy: ProxyChoice::Direct,
            quic_fallback_after: Duration::from_millis(800),
            quic_retry: Duration::from_secs(1),
            ..TransportSettings::default()
        }
    }

    /// A funnel agent for `web` whose QUIC goes to `quic_addr`.
    fn funnel(&self, quic_addr: SocketAddr, transport: TransportSettings) -> Funnel {
        Funnel::start(FunnelConfig {
            edges: vec![quic_addr.to_string()],
            edge_name: Some("localhost".into()),
            ca_file: self.edge.dev_ca_cert().map(Into::into),
            token: TOKEN.into(),
            name: "web".into(),
            services: vec![ServiceSpec::new(self.port(), format!("http://{}", self.origin))],
            transport,
            domains: Vec::new(),
        })
    }

    fn visitors(&self) -> Visitors {
        Visitors { addr: self.edge.public_addrs()[0], ca: self.edge.dev_ca_cert().map(Into::into) }
    }

    async fn visitor(&self) -> hyper::client::conn::http1::SendRequest<OriginBody> {
        self.visitors().visitor().await
    }

    async fn request(&self, method: &str, path: &str, body: Bytes) -> (StatusCode, String) {
        self.visitors().request(method, path, body).await
    }
}

/// Visitors of `web.funnel.test` at the edge.
#[derive(Clone)]
struct Visitors {
    addr: SocketAddr,
    ca: Option<std::path::PathBuf>,
}

impl Visitors {
    async fn visitor(&self) -> hyper::client::conn::http1::SendRequest<OriginBody> {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        let cfg = warren_common::tls::client_config(self.ca.as_deref()).expect("tls");
        let name = rustls_pki_types::ServerName::try_from("web.funnel.test").expect("name");
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.expect("visitor TLS");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("http handshake");
        tokio::spawn(conn.with_upgrades());
        send
    }

    async fn request(&self, method: &str, path: &str, body: Bytes) -> (StatusCode, String) {
        let mut v = self.visitor().await;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web.funnel.test")
            .body(Full::new(body).boxed())
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(20), v.send_request(req))
            .await
            .expect("never a hang")
            .expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Waits until `f` holds for the agent's status; returns the time it took.
async fn wait_status(funnel: &Funnel, limit: Duration, what: &str, f: impl Fn(&FunnelStatus) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let s = funnel.status();
        if f(&s) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}; status {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn transport_is(s: &FunnelStatus, t: &str) -> bool {
    s.edges[0].connected && s.edges[0].transport.as_deref() == Some(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_tunnel_carries_requests_uploads_and_reports_itself() {
    let lab = lab().await;
    let funnel = lab.funnel(lab.edge.tunnel_addr(), lab.transport(TransportMode::Tcp));
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered over TCP");
    wait_status(&funnel, Duration::from_secs(5), "tcp with an rtt", |s| {
        transport_is(s, "tcp") && s.edges[0].rtt_ms.is_some()
    })
    .await;
    assert_eq!(lab.request("GET", "/hello", Bytes::new()).await, (StatusCode::OK, "hello over any transport".into()));
    let upload = Bytes::from(vec![7u8; 5 << 20]);
    assert_eq!(lab.request("POST", "/count", upload).await, (StatusCode::OK, (5u64 << 20).to_string()));
    assert_eq!(lab.request("GET", "/nope", Bytes::new()).await.0, StatusCode::NOT_FOUND);
    // Many at once: each is its own stream.
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let v = lab.visitors();
        all.spawn(async move { v.request("GET", "/hello", Bytes::new()).await.0 });
    }
    while let Some(status) = all.join_next().await {
        assert_eq!(status.expect("task"), StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_who_stops_reading_stalls_only_their_own_stream_on_tcp() {
    let lab = lab().await;
    let funnel = lab.funnel(lab.edge.tunnel_addr(), lab.transport(TransportMode::Tcp));
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered over TCP");
    // A download of 64 MiB that is never read past its head.
    let mut stalled = lab.visitor().await;
    let req =
        Request::get("/big").header("host", "web.funnel.test").body(Full::new(Bytes::new()).boxed()).expect("req");
    let resp =
        tokio::time::timeout(Duration::from_secs(10), stalled.send_request(req)).await.expect("head").expect("ok");
    assert_eq!(resp.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Everyone else is served meanwhile.
    let start = Instant::now();
    for _ in 0..20 {
        assert_eq!(lab.request("GET", "/hello", Bytes::new()).await.0, StatusCode::OK);
    }
    assert!(start.elapsed() < Duration::from_secs(10), "others were slowed: {:?}", start.elapsed());
    let upload = Bytes::from(vec![1u8; 8 << 20]);
    assert_eq!(lab.request("POST", "/count", upload).await, (StatusCode::OK, (8u64 << 20).to_string()));
    drop(resp);
}

/// A UDP forwarder between the agent and the edge's QUIC port that can black-hole every
/// datagram, as a network that blocks UDP does.
struct UdpGate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
}

async fn udp_gate(edge: SocketAddr, open: bool) -> UdpGate {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    back.connect(edge).await.expect("connect");
    let addr = front.local_addr().expect("addr");
    let open = Arc::new(AtomicBool::new(open));
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let (f, b, o, c) = (front.clone(), back.clone(), open.clone(), client.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = f.recv_from(&mut buf).await {
            *c.lock().expect("lock") = Some(from);
            if o.load(Ordering::Relaxed) {
                let _ = b.send(&buf[..n]).await;
            }
        }
    });
    let o = open.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = back.recv(&mut buf).await {
            let to = *client.lock().expect("lock");
            if let (true, Some(to)) = (o.load(Ordering::Relaxed), to) {
                let _ = front.send_to(&buf[..n], to).await;
            }
        }
    });
    UdpGate { addr, open }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_is_blocked_and_moves_back_when_it_passes() {
    let lab = lab().await;
    let gate = udp_gate(lab.edge.tunnel_addr(), false).await;
    let start = Instant::now();
    let funnel = lab.funnel(gate.addr, lab.transport(TransportMode::Auto));
    let fell_back = wait_status(&funnel, Duration::from_secs(10), "fallback to tcp", |s| transport_is(s, "tcp")).await;
    eprintln!("figure: fallback to TCP {:.2} s after start (QUIC given 0.8 s)", fell_back.as_secs_f64());
    assert_eq!(lab.request("GET", "/hello", Bytes::new()).await.0, StatusCode::OK);
    // A request in flight on TCP when UDP comes back finishes there.
    let slow = tokio::spawn({
        let mut v = lab.visitor().await;
        async move {
            let req = Request::get("/slow")
                .header("host", "web.funnel.test")
                .body(Full::new(Bytes::new()).boxed())
                .expect("r");
            let resp = v.send_request(req).await.expect("response");
            let status = resp.status();
            (status, resp.into_body().collect().await.expect("body").to_bytes())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.open.store(true, Ordering::Relaxed);
    let opened = Instant::now();
    wait_status(&funnel, Duration::from_secs(10), "move back to quic", |s| transport_is(s, "quic")).await;
    eprintln!("figure: back on QUIC {:.2} s after UDP passed (retry every 1 s ±50 %)", opened.elapsed().as_secs_f64());
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), slow).await.expect("in time").expect("task");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow but sure"[..]), "the request on TCP finished");
    assert_eq!(lab.request("GET", "/hello", Bytes::new()).await.0, StatusCode::OK);
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// A fake proxy: reads each connection's request head, writes `answer`, then hands the
/// connection to `then` (a TLS acceptor, or nothing); counts the connections.
async fn fake_proxy(answer: &'static [u8], then: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            let then = then.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(answer).await;
                match then {
                    Some(acceptor) => drop(acceptor.accept(tcp).await),
                    None => tokio::time::sleep(Duration::from_secs(2)).await,
                }
            });
        }
    });
    (addr, count)
}

/// A proxy that says yes to CONNECT and then speaks TLS itself with a certificate of its own
/// (TLS interception).
async fn intercepting_proxy() -> (SocketAddr, Arc<AtomicUsize>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = warren_common::tls::DevCa::open_or_create(dir.path()).expect("a CA the agent does not trust");
    let (chain, key) = ca.issue(&["localhost".to_owned()]).expect("cert");
    let cfg = rustls::ServerConfig::builder_with_provider(warren_common::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\n", Some(acceptor)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_proxies_give_errors_naming_them_and_the_agent_keeps_trying() {
    let lab = lab().await;
    let (refusing, refusing_n) =
        fake_proxy(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n", None).await;
    let (garbage, garbage_n) = fake_proxy(b"SSH-2.0-OpenSSH_9.2p1\r\n\x00\x01\x02", None).await;
    let (mitm, mitm_n) = intercepting_proxy().await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let cases = [
        (refusing, Some(refusing_n), "refused CONNECT"),
        (garbage, Some(garbage_n), "not HTTP"),
        (mitm, Some(mitm_n), "intercept TLS"),
        (down, None, "cannot reach proxy"),
    ];
    for (proxy, count, expect) in cases {
        let mut t = lab.transport(TransportMode::Tcp);
        t.proxy = ProxyChoice::parse(Some(&format!("http://user:secret-pw@{proxy}"))).expect("proxy url");
        let funnel = lab.funnel(lab.edge.tunnel_addr(), t);
        let err = wait_status(&funnel, Duration::from_secs(10), expect, |s| {
            s.last_error.as_deref().is_some_and(|e| e.contains(expect))
        })
        .await;
        let s = funnel.status();
        let e = s.last_error.clone().unwrap_or_default();
        assert!(e.contains(&format!("http://user@{proxy}")), "the error names the proxy: {e}");
        assert!(!e.contains("secret-pw"), "never its password: {e}");
        assert!(!s.connected);
        if let Some(count) = count {
            let tried =
                wait_status(&funnel, Duration::from_secs(10), "a retry", |_| count.load(Ordering::Relaxed) >= 2).await;
            eprintln!("{expect}: error after {err:?}, retried after {tried:?}");
        }
        funnel.shutdown(Duration::from_secs(1)).await;
    }
    // The edge took no harm: a direct agent still registers and serves.
    let funnel = lab.funnel(lab.edge.tunnel_addr(), lab.transport(TransportMode::Tcp));
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered");
    assert_eq!(lab.request("GET", "/hello", Bytes::new()).await.0, StatusCode::OK);
}

/// tinyproxy in the foreground with basic auth, on a free loopback port.
struct Tinyproxy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tinyproxy(connect_port: u16) -> Option<Tinyproxy> {
    if Command::new("tinyproxy").arg("-v").output().is_err() {
        if std::env::var_os("WARREN_REQUIRE_PROXY").is_some_and(|v| v == "1") {
            panic!("tinyproxy is required (WARREN_REQUIRE_PROXY=1)");
        }
        eprintln!("skipping: tinyproxy is not installed");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let conf = dir.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nAllow 127.0.0.1\nBasicAuth tunnel s3cret\nConnectPort {connect_port}\nLogLevel Info\n"
        ),
    )
    .expect("conf");
    let child = Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tinyproxy");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "tinyproxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Tinyproxy { child, addr, _dir: dir })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_proxy_with_basic_auth_carries_the_tcp_tunnel() {
    let lab = lab().await;
    let Some(proxy) = tinyproxy(lab.port()) else { return };
    // Wrong password first: refused, named.
    let mut t = lab.transport(TransportMode::Tcp);
    t.proxy = ProxyChoice::parse(Some(&format!("http://tunnel:wrong@{}", proxy.addr))).expect("url");
    let funnel = lab.funnel(lab.edge.tunnel_addr(), t);
    // tinyproxy answers a wrong password with 401 (not 407).
    wait_status(&funnel, Duration::from_secs(10), "refused by tinyproxy", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("refused CONNECT") && e.contains("user and password"))
    })
    .await;
    funnel.shutdown(Duration::from_secs(1)).await;
    let mut t = lab.transport(TransportMode::Tcp);
    t.proxy = ProxyChoice::parse(Some(&format!("http://tunnel:s3cret@{}", proxy.addr))).expect("url");
    let funnel = lab.funnel(lab.edge.tunnel_addr(), t);
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered through tinyproxy");
    let s = funnel.status();
    assert_eq!(s.edges[0].proxy.as_deref(), Some(format!("http://tunnel@{}", proxy.addr).as_str()));
    assert_eq!(lab.request("GET", "/hello", Bytes::new()).await, (StatusCode::OK, "hello over any transport".into()));
    let upload = Bytes::from(vec![3u8; 2 << 20]);
    assert_eq!(lab.request("POST", "/count", upload).await, (StatusCode::OK, (2u64 << 20).to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_without_tcp_tunnels_says_so_and_quic_still_works() {
    let lab = lab_with("tunnel_tcp = false").await;
    let funnel = lab.funnel(lab.edge.tunnel_addr(), lab.transport(TransportMode::Tcp));
    wait_status(&funnel, Duration::from_secs(10), "no TCP tunnels there", |s| {
        s.last_error.as_deref().is_some_and(|e| e.contains("does not take TCP tunnels"))
    })
    .await;
    funnel.shutdown(Duration::from_secs(1)).await;
    let funnel = lab.funnel(lab.edge.tunnel_addr(), lab.transport(TransportMode::Auto));
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered over QUIC");
    assert!(transport_is(&funnel.status(), "quic"));
    assert_eq!(lab.request("GET", "/hello", Bytes::new()).await.0, StatusCode::OK);
}

/// Opens `n` downloads of /big whose bodies are never read; keeps them open.
type Held = (hyper::client::conn::http1::SendRequest<OriginBody>, Response<Incoming>);

async fn stalled_downloads(lab: &Lab, n: usize) -> Vec<Held> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut v = lab.visitor().await;
        let req =
            Request::get("/big").header("host", "web.funnel.test").body(Full::new(Bytes::new()).boxed()).expect("req");
        let resp = tokio::time::timeout(Duration::from_secs(10), v.send_request(req)).await.expect("head").expect("ok");
        assert_eq!(resp.status(), StatusCode::OK);
        held.push((v, resp));
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_visitors_who_stop_reading_do_not_stall_the_tunnel_on_either_transport() {
    for mode in [TransportMode::Quic, TransportMode::Tcp] {
        let lab = lab().await;
        let funnel = lab.funnel(lab.edge.tunnel_addr(), lab.transport(mode));
        funnel.wait_registered(Duration::from_secs(10)).await.expect("registered");
        // Each holds a full stream window unread at the edge; 24 of them were once enough to
        // use up the tunnel's connection window.
        let held = stalled_downloads(&lab, 24).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let answer = tokio::time::timeout(Duration::from_secs(5), lab.request("GET", "/hello", Bytes::new())).await;
        assert_eq!(answer.map(|a| a.0).ok(), Some(StatusCode::OK), "{mode:?}: the tunnel still answers");
        drop(held);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_stalled_past_the_limit_loses_its_response_as_an_error() {
    let lab = lab_with("[limits]\nstalled_reader = \"1s\"").await;
    let funnel = lab.funnel(lab.edge.tunnel_addr(), lab.transport(TransportMode::Tcp));
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered");
    let mut held = stalled_downloads(&lab, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The edge gave up on the stalled response: reading it now ends in an error, not a
    // complete-looking body.
    let (_conn, resp) = held.pop().expect("one");
    let read = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await.expect("ends");
    assert!(read.is_err(), "a cut response is an error to the visitor");
    assert_eq!(lab.request("GET", "/hello", Bytes::new()).await.0, StatusCode::OK);
}
