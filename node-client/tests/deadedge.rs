//! A dead edge is noticed in seconds, on either transport: two real `warren-edge` processes
//! on loopback (127.0.0.2 and 127.0.0.3), a funnel agent tunnelled to both, and edge A killed
//! with SIGKILL (its sockets close) or frozen with SIGSTOP (a black hole: nothing answers,
//! nothing is reset). The agent must mark A dead within 5 s (dead_after = 4 s) while visitors
//! of edge B are served throughout.
//!
//! Each test prints its measured detection times (`figure:` lines).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use warren::funnel::{Funnel, FunnelConfig};
use warren::net::{ProxyChoice, TransportMode, TransportSettings};
use warren::services::ServiceSpec;

const TOKEN: &str = "dead-edge-test-token";

fn edge_bin() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_warren")).with_file_name("warren-edge");
    assert!(path.exists(), "{} not built: run `cargo build --workspace --bins` first", path.display());
    path
}

/// An edge process, killed (and continued first, if stopped) when dropped.
struct EdgeProc {
    child: Child,
    tunnel: SocketAddr,
}

impl Drop for EdgeProc {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EdgeProc {
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([sig, &self.child.id().to_string()]).status();
    }
}

/// A port free on both 127.0.0.2 and 127.0.0.3 (TCP), for the edges' public listeners.
fn shared_port() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.2:0").expect("bind");
        let port = a.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.3", port)).is_ok() {
            return port;
        }
    }
}

fn free_udp(ip: &str) -> SocketAddr {
    std::net::UdpSocket::bind((ip, 0)).expect("bind").local_addr().expect("addr")
}

/// Starts an edge on `ip`, public port `port`; the dev CA lives in `state` (shared).
fn start_edge(state: &Path, ip: &str, port: u16) -> EdgeProc {
    let tunnel = free_udp(ip);
    let conf = state.join(format!("edge-{ip}.toml"));
    std::fs::write(
        &conf,
        format!(
            "funnel_domain = \"funnel.test\"\nhostname = \"localhost\"\nstate_dir = \"{}\"\npublic_listen = [\"{ip}:{port}\"]\ntunnel_listen = \"{tunnel}\"\n[admin]\nenabled = false\n[[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\"]\n",
            state.display()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(state.join(format!("edge-{ip}.log"))).expect("log");
    let child =
        Command::new(edge_bin()).arg("--config").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().expect("edge");
    let edge = EdgeProc { child, tunnel };
    let start = Instant::now();
    while std::net::TcpStream::connect((ip, port)).is_err() || !state.join("dev-ca.pem").exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "edge on {ip} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    edge
}

async fn start_origin() -> SocketAddr {
    warren_common::testing::http_origin(|_req| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(bytes::Bytes::from("alive"))))
    })
    .await
}

/// GET https://web.funnel.test/ at `ip:port`; the status, or 0 when no answer came.
async fn visit(ca: &Path, ip: &str, port: u16) -> u16 {
    let visit = async {
        let tcp = TcpStream::connect((ip, port)).await.ok()?;
        let cfg = warren_common::tls::client_config(Some(ca)).ok()?;
        let name = rustls_pki_types::ServerName::try_from("web.funnel.test").ok()?;
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.ok()?;
        tokio::spawn(conn);
        let req = Request::get("/").header("host", "web.funnel.test").body(Full::new(bytes::Bytes::new())).ok()?;
        let resp = send.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    tokio::time::timeout(Duration::from_secs(5), visit).await.ok().flatten().unwrap_or(0)
}

async fn detection(mode: TransportMode) {
    let state = tempfile::tempdir().expect("tempdir");
    let port = shared_port();
    let origin = start_origin().await;
    let ca = state.path().join("dev-ca.pem");
    let b = start_edge(state.path(), "127.0.0.3", port);
    for signal in ["-KILL", "-STOP"] {
        let a = start_edge(state.path(), "127.0.0.2", port);
        let funnel = Funnel::start(FunnelConfig {
            edges: vec![a.tunnel.to_string(), b.tunnel.to_string()],
            edge_name: Some("localhost".into()),
            ca_file: Some(ca.clone()),
            token: TOKEN.into(),
            name: "web".into(),
            services: vec![ServiceSpec::new(port, format!("http://{origin}"))],
            transport: TransportSettings {
                mode,
                tcp_port: port,
                proxy: ProxyChoice::Direct,
                ..TransportSettings::default()
            },
            domains: Vec::new(),
        });
        let start = Instant::now();
        while !funnel.status().edges.iter().all(|e| e.connected) {
            assert!(start.elapsed() < Duration::from_secs(15), "not on both edges: {:?}", funnel.status());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let want = match mode {
            TransportMode::Tcp => "tcp",
            _ => "quic",
        };
        assert!(funnel.status().edges.iter().all(|e| e.transport.as_deref() == Some(want)), "{:?}", funnel.status());
        assert_eq!(visit(&ca, "127.0.0.2", port).await, 200, "edge A serves");
        assert_eq!(visit(&ca, "127.0.0.3", port).await, 200, "edge B serves");
        a.signal(signal);
        let killed = Instant::now();
        let mut b_failures = 0;
        loop {
            let s = funnel.status();
            if !s.edges[0].connected {
                break;
            }
            assert!(killed.elapsed() < Duration::from_secs(5), "edge A ({signal}) not noticed within 5 s: {s:?}");
            if visit(&ca, "127.0.0.3", port).await != 200 {
                b_failures += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = killed.elapsed();
        let s = funnel.status();
        eprintln!(
            "figure: {want} transport, edge {signal}: noticed after {:.2} s ({})",
            took.as_secs_f64(),
            s.edges[0].last_error.clone().unwrap_or_default()
        );
        assert!(s.edges[1].connected, "edge B still linked: {s:?}");
        assert_eq!(b_failures, 0, "visitors of edge B were served throughout");
        assert_eq!(visit(&ca, "127.0.0.3", port).await, 200, "edge B serves after A died");
        funnel.shutdown(Duration::from_secs(1)).await;
        drop(a);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_edge_is_noticed_within_seconds_on_quic() {
    detection(TransportMode::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_edge_is_noticed_within_seconds_on_tcp() {
    detection(TransportMode::Tcp).await;
}
