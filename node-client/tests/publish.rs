//! Publishing services the way a user does: `warren up --config node.toml` (the real binary)
//! with a real relay and edge on loopback, services from the file and from `warren funnel`,
//! curl as the visitor. The node is restarted and everything answers again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warren::services::ServiceSpec;
use warren_common::testing::until;
use warren_edge::config::{Config as EdgeConfig, FileConfig as EdgeFile};
use warren_edge::Edge;
use warren_relay::config::{Config, FileConfig};
use warren_relay::Server;
use warren_relay_proto::ws::{self, Role, WsDecoder};

const TOKEN: &str = "publish-test-token-0123456789";

/// A child process stopped when the test ends however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM (or SIGINT), then waits up to 10 s for the exit.
    fn signal_and_wait(mut self, signal: &str) -> std::process::ExitStatus {
        let _ = Command::new("kill").args([signal, &self.0.id().to_string()]).status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "process did not exit on {signal}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn warren() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warren"));
    c.env_remove("WARREN_CONTROL").env_remove("WARREN_FUNNEL_TOKEN");
    c
}

fn run(args: &[&str]) -> Output {
    warren().args(args).stdin(Stdio::null()).output().expect("warren runs")
}

struct Lab {
    dir: tempfile::TempDir,
    _relay: Server,
    edge: Edge,
    control: PathBuf,
    /// Edge ports offered for TCP services.
    tcp_port: u16,
    proxied_port: u16,
}

impl Lab {
    fn port(&self, i: usize) -> u16 {
        self.edge.public_addrs()[i].port()
    }

    fn edge_ca(&self) -> PathBuf {
        self.edge.dev_ca_cert().expect("dev ca").to_path_buf()
    }

    /// `curl` as a visitor of `web.funnel.test` on public listener `i`: status and body.
    fn curl(&self, i: usize, path: &str, extra: &[&str]) -> (u16, String) {
        self.curl_trusting(&self.edge_ca(), i, path, extra)
    }

    /// As [`Lab::curl`], trusting only the CA in `ca`.
    fn curl_trusting(&self, ca: &Path, i: usize, path: &str, extra: &[&str]) -> (u16, String) {
        warren_common::testing::curl_https(ca, "web.funnel.test", self.port(i), path, extra)
    }

    /// A funnel agent in this process for `web`, publishing `services` through the edge.
    fn funnel_agent(&self, services: Vec<ServiceSpec>) -> warren::funnel::Funnel {
        warren::funnel::Funnel::start(warren::funnel::FunnelConfig {
            edges: vec![self.edge.tunnel_addr().to_string()],
            edge_name: Some("localhost".into()),
            ca_file: Some(self.edge_ca()),
            token: TOKEN.into(),
            name: "web".into(),
            services,
            transport: Default::default(),
            domains: Vec::new(),
        })
    }

    fn funnel(&self, args: &[&str]) -> Output {
        let control = self.control.display().to_string();
        let mut all = vec!["funnel"];
        all.extend_from_slice(args);
        all.extend(["--control", control.as_str()]);
        run(&all)
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.funnel(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    fn up(&self, config: &Path) -> Proc {
        let log = std::fs::File::create(self.dir.path().join("node.log")).expect("log");
        let child =
            warren().args(["up", "--config"]).arg(config).stdout(Stdio::null()).stderr(log).spawn().expect("warren up");
        let mut proc = Proc(child);
        let start = Instant::now();
        loop {
            let s = self.status_json();
            if s["connected"] == true && s["services"].as_array().is_some_and(|v| !v.is_empty()) {
                return proc;
            }
            let exited = proc.0.try_wait().ok().flatten();
            assert!(
                exited.is_none() && start.elapsed() < Duration::from_secs(20),
                "the node did not register its services ({exited:?}): {s}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }
}

async fn start_lab() -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path();
    let relay_toml = format!(
        "listen = \"127.0.0.1:0\"\nkey_file = \"{}/relay.key\"\n[tls]\nmode = \"dev\"\n[stun]\nlisten = \"127.0.0.1:0\"\n[admin]\nenabled = false\n",
        state.display()
    );
    let mut f = FileConfig::parse(&relay_toml).expect("relay config");
    f.state_dir = Some(state.join("relay"));
    let relay = Server::spawn(Config::try_from(f).expect("valid"), None).await.expect("relay starts");
    let tcp_port = warren_common::testing::free_tcp_port();
    let proxied_port = warren_common::testing::free_tcp_port();
    let edge_toml = format!(
        "funnel_domain = \"funnel.test\"\npublic_listen = [\"127.0.0.1:0\", \"127.0.0.1:0\", \"127.0.0.1:0\"]\ntunnel_listen = \"127.0.0.1:0\"\n[admin]\nenabled = false\n[shutdown]\ngrace_period = \"500ms\"\n[tcp]\nports = [\"{tcp_port}\", \"{proxied_port}\"]\nlisten_ip = \"127.0.0.1\"\n[[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\"]\n"
    );
    let mut f = EdgeFile::parse(&edge_toml).expect("edge config");
    f.state_dir = Some(state.join("edge"));
    let edge = Edge::spawn(EdgeConfig::try_from(f).expect("valid"), None).await.expect("edge starts");
    let map = serde_json::json!({"Regions": {"1": {"RegionID": 1, "RegionCode": "r1", "Nodes": [{
        "Name": "1a", "HostName": "localhost", "IPv4": "127.0.0.1",
        "DERPPort": relay.http_addr().port(), "STUNPort": relay.stun_addr().expect("stun").port(),
    }]}}});
    std::fs::write(state.join("regions.json"), map.to_string()).expect("map");
    let relay_ca = relay.dev_ca_cert().expect("relay dev ca").to_path_buf();
    std::fs::copy(relay_ca, state.join("relay-ca.pem")).expect("copy ca");
    Lab { control: state.join("node/warren.sock"), dir, _relay: relay, edge, tcp_port, proxied_port }
}

/// An HTTP origin that says what it saw, and answers WebSocket upgrades with an echo.
async fn start_origin() -> SocketAddr {
    warren_common::testing::http_origin(|mut req: Request<Incoming>| async move {
        if req.headers().contains_key("upgrade") {
            let head = warren_common::testing::ws_echo_upgrade(&mut req);
            return Ok::<_, std::convert::Infallible>(head.map(|()| Full::new(bytes::Bytes::new())));
        }
        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("-").to_owned();
        let text = format!("origin saw {} host {host}", req.uri());
        Ok(Response::new(Full::new(bytes::Bytes::from(text))))
    })
    .await
}

/// One WebSocket round trip through the edge on `port`: sends `msg`, returns the echo.
async fn ws_echo(ca: &Path, port: u16, msg: &str) -> String {
    let tls = warren_common::tls::client_config(Some(ca)).expect("tls");
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("web.funnel.test").expect("name");
    let mut s = tokio_rustls::TlsConnector::from(Arc::clone(&tls)).connect(name, tcp).await.expect("tls");
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: web.funnel.test:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut input = BytesMut::new();
    let head_end = loop {
        if let Some(i) = input.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(s.read_buf(&mut input).await.expect("read") > 0, "closed before the 101");
    };
    let head = String::from_utf8_lossy(&input[..head_end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let _ = input.split_to(head_end);
    let mut frame = BytesMut::new();
    ws::encode_frame(&mut frame, ws::opcode::TEXT, msg.as_bytes(), Some([1, 2, 3, 4]));
    s.write_all(&frame).await.expect("send frame");
    let (mut dec, mut data) = (WsDecoder::new(Role::Client), BytesMut::new());
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            while let Ok(Some(_)) = dec.decode(&mut input, &mut data) {}
            if !data.is_empty() {
                return String::from_utf8_lossy(&data).into_owned();
            }
            assert!(s.read_buf(&mut input).await.expect("read") > 0, "closed before the echo");
        }
    })
    .await
    .expect("echo within 5 s")
}

fn node_toml(lab: &Lab, origin: SocketAddr, site: &Path, node_cert: &(PathBuf, PathBuf), admin: u16) -> String {
    let (a, b, c) = (lab.port(0), lab.port(1), lab.port(2));
    format!(
        "region_map = \"regions.json\"\nca_file = \"relay-ca.pem\"\nkey_file = \"node/node.key\"\ncontrol = \"node/warren.sock\"\nudp = \"127.0.0.1:0\"\n\n\
         [admin]\nenabled = true\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [funnel]\nedges = [\"{tunnel}\"]\nedge_name = \"localhost\"\nedge_ca = \"{ca}\"\ntoken_file = \"token\"\nname = \"web\"\n\n\
         [[service]]\nport = {a}\npath = \"/\"\ntarget = \"{site}\"\n\n\
         [[service]]\nport = {a}\npath = \"/api\"\ntarget = \"http://{origin}\"\n\n\
         [[service]]\nname = \"chat\"\nport = {b}\ntarget = \"http://{origin}\"\nhost_header = \"origin\"\n\n\
         [[service]]\nkind = \"tls\"\nport = {c}\ntarget = \"{origin}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n",
        cert = node_cert.0.display(),
        key = node_cert.1.display(),
        tunnel = lab.edge.tunnel_addr(),
        ca = lab.edge_ca().display(),
        site = site.display(),
    )
}

/// A plain HTTP/1.1 GET on loopback (the node's admin listener): the whole answer.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(tcp, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out);
    out
}

/// A TCP target that reads a PROXY v2 header (TCP over IPv4) and answers with the addresses
/// in it.
async fn start_proxy_header_reader() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let mut h = [0u8; 28];
            if tcp.read_exact(&mut h).await.is_err()
                || &h[..12] != b"\r\n\r\n\0\r\nQUIT\n"
                || h[12..16] != [0x21, 0x11, 0, 12]
            {
                continue;
            }
            let ip = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            let text = format!(
                "visitor {}:{} reached {}:{}",
                ip(&h[16..20]),
                port(&h[24..26]),
                ip(&h[20..24]),
                port(&h[26..28])
            );
            let _ = tcp.write_all(text.as_bytes()).await;
        }
    });
    addr
}

/// A Debian redis-server on a free loopback port; `None` (that part is skipped) when it is
/// not installed, unless `WARREN_REQUIRE_REDIS` is set.
fn start_redis(dir: &Path) -> Option<(Proc, u16)> {
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(std::env::var_os("WARREN_REQUIRE_REDIS").is_none(), "redis-server is required but missing");
        eprintln!("skipped the TCP service: redis-server is not installed");
        return None;
    }
    let port = warren_common::testing::free_tcp_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let proc = Proc(child);
    until(Duration::from_secs(10), "redis-server answers", || (redis_ping(port) == "PONG").then_some(()));
    Some((proc, port))
}

/// `redis-cli -p <port> PING`, the real client.
fn redis_ping(port: u16) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"])
        .output()
        .expect("redis-cli runs (Debian's redis-tools comes with redis-server)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_from_node_toml_and_the_cli_survive_a_restart() {
    let lab = start_lab().await;
    let origin = start_origin().await;
    let site = lab.dir.path().join("site");
    std::fs::create_dir_all(site.join("docs")).expect("site");
    std::fs::write(site.join("index.html"), "<h1>the site</h1>\n").expect("index");
    std::fs::write(site.join("docs/data.txt"), "0123456789").expect("data");
    std::fs::write(lab.dir.path().join("token"), format!("{TOKEN}\n")).expect("token");
    // The TLS-passthrough service's certificate comes from the node's own CA, not the edge's.
    let node_ca = warren_common::tls::DevCa::open_or_create(&lab.dir.path().join("node-ca")).expect("node ca");
    let (cert, key) = node_ca.issue_pem(&["web.funnel.test".into()]).expect("issue");
    let node_cert = (lab.dir.path().join("node-cert.pem"), lab.dir.path().join("node-key.pem"));
    std::fs::write(&node_cert.0, cert).expect("cert");
    std::fs::write(&node_cert.1, key).expect("key");
    let config = lab.dir.path().join("node.toml");
    let admin = warren_common::testing::free_tcp_port();
    std::fs::write(&config, node_toml(&lab, origin, &site, &node_cert, admin)).expect("node.toml");
    let (a, b) = (lab.port(0), lab.port(1));

    // The file checks out; a broken copy is refused with the key named and exit 64.
    let check = run(&["up", "--check-config", "--config", &config.display().to_string()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let broken = lab.dir.path().join("broken.toml");
    let text = std::fs::read_to_string(&config).expect("read").replace("path = \"/api\"", "path = \"api\"");
    std::fs::write(&broken, text).expect("write");
    let bad = run(&["up", "--check-config", "--config", &broken.display().to_string()]);
    assert_eq!(bad.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("service") && stderr.contains("path \"api\": a mount path starts with '/'"), "{stderr}");

    let node = lab.up(&config);
    // `/` is the directory, `/api` the origin with the mount stripped, 8443-like port the echo.
    assert_eq!(lab.curl(0, "/", &[]), (200, "<h1>the site</h1>\n".into()));
    assert_eq!(lab.curl(0, "/docs/data.txt", &["-H", "Range: bytes=2-4"]), (206, "234".into()));
    assert_eq!(lab.curl(0, "/docs", &[]).0, 301, "a directory without its slash is redirected");
    assert_eq!(lab.curl(0, "/../token", &[]).0, 400, "no way out of the root");
    assert_eq!(lab.curl(0, "/%2e%2e/token", &[]).0, 400, "not even encoded");
    assert_eq!(lab.curl(0, "/nothing-here", &[]).0, 404);
    let (status, body) = lab.curl(0, "/api/users?id=7", &[]);
    assert_eq!((status, body.as_str()), (200, "origin saw /users?id=7 host web.funnel.test"));
    assert_eq!(ws_echo(&lab.edge_ca(), b, "over the funnel").await, "over the funnel");
    assert_eq!(lab.curl(1, "/anything", &[]).1, format!("origin saw /anything host {origin}"), "host_header = origin");
    // TLS on the third port is the node's: its certificate verifies against the node's CA
    // and not against the edge's.
    let passed = lab.curl_trusting(&node_ca.ca_cert_path, 2, "/through", &["--http1.1"]);
    assert_eq!(passed, (200, "origin saw /through host web.funnel.test:".to_owned() + &lab.port(2).to_string()));
    assert_eq!(lab.curl(2, "/through", &[]).0, 0, "the edge's CA does not vouch for the node's certificate");
    let redis = start_redis(lab.dir.path());
    if let Some((_, redis_port)) = &redis {
        let tcp = lab.funnel(&["--bg", "--tcp", &lab.tcp_port.to_string(), &redis_port.to_string()]);
        assert!(tcp.status.success(), "{}", String::from_utf8_lossy(&tcp.stderr));
        assert_eq!(redis_ping(lab.tcp_port), "PONG");
    }

    // The owner's view: Prometheus metrics and readiness on the admin listener, and the
    // request log as it happens.
    let metrics = http_get(admin, "/metrics");
    for line in [
        format!("node_funnel_requests_total{{service=\"{a}/api\",status_class=\"2xx\"}} 1"),
        "node_relay_connected 1".into(),
    ] {
        assert!(metrics.contains(&line), "/metrics lacks {line:?}:\n{metrics}");
    }
    until(Duration::from_secs(5), "/readyz says ready (relay and edge connected)", || {
        http_get(admin, "/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    let control = lab.control.display().to_string();
    let mut follower = Proc(
        warren()
            .args(["funnel", "log", "--json", "--control", &control])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("warren funnel log"),
    );
    let mut log_lines = std::io::BufReader::new(follower.0.stdout.take().expect("stdout"));
    // The follower is subscribed once its first request shows; keep asking until then.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut log_lines, &mut line).is_ok_and(|n| n > 0) {
            if tx.send(std::mem::take(&mut line)).is_err() {
                return;
            }
        }
    });
    let entry = until(Duration::from_secs(10), "the request log shows a request", || {
        lab.curl(0, "/api/logged?x=1", &[]);
        rx.recv_timeout(Duration::from_millis(200)).ok()
    });
    let entry: serde_json::Value = serde_json::from_str(&entry).expect("a JSON log line");
    assert_eq!(
        (entry["service"].as_str(), entry["path"].as_str()),
        (Some(format!("{a}/api").as_str()), Some("/api/logged?x=1"))
    );
    assert_eq!((entry["status"].as_u64(), entry["method"].as_str()), (Some(200), Some("GET")));
    assert!(entry["visitor"].as_str().is_some_and(|v| v.starts_with("127.0.0.1:")), "{entry}");
    drop(follower);

    // A TCP target behind --proxy-protocol learns the visitor's address from the v2 header.
    let header_reader = start_proxy_header_reader().await;
    let proxied =
        lab.funnel(&["--bg", "--proxy-protocol", "--tcp", &lab.proxied_port.to_string(), &header_reader.to_string()]);
    assert!(proxied.status.success(), "{}", String::from_utf8_lossy(&proxied.stderr));
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", lab.proxied_port)).expect("connect");
    let visitor = tcp.local_addr().expect("addr");
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut tcp, &mut seen).expect("read");
    assert_eq!(seen, format!("visitor {visitor} reached 127.0.0.1:{}", lab.proxied_port));

    // Added from the command line: saved (--bg), and one in the foreground until Ctrl-C.
    let bg = lab.funnel(&["--bg", "--https-port", &a.to_string(), "--set-path", "/hello", "text:hi there"]);
    assert!(bg.status.success(), "{}", String::from_utf8_lossy(&bg.stderr));
    assert_eq!(lab.curl(0, "/hello", &[]), (200, "hi there".into()));
    // A protected one: the password hashed by `warren hash-password`, checked by the edge.
    let hash = hash_password("s3cret");
    assert!(hash.starts_with("$2b$10$"), "{hash}");
    let basic = format!("basic:alice:{hash}");
    let args = ["--bg", "--https-port", &a.to_string(), "--set-path", "/priv", "--auth", &basic];
    let guarded = lab.funnel(&[&args[..], &["--auth", "bearer:tok-abc", "text:classified"]].concat());
    assert!(guarded.status.success(), "{}", String::from_utf8_lossy(&guarded.stderr));
    let secret = |extra: &[&str]| {
        until(Duration::from_secs(10), "the edge enforces the new rule", || {
            Some(lab.curl(0, "/priv", extra)).filter(|(code, _)| *code != 503)
        })
    };
    assert_eq!(secret(&[]).0, 401);
    assert_eq!(secret(&["-u", "alice:nope"]).0, 401);
    assert_eq!(secret(&["-u", "alice:s3cret"]), (200, "classified".into()));
    assert_eq!(secret(&["-H", "Authorization: Bearer tok-abc"]), (200, "classified".into()));
    let fg = Proc(
        warren()
            .args([
                "funnel",
                "--https-port",
                &a.to_string(),
                "--set-path",
                "/fg",
                "text:foreground",
                "--control",
                &control,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("warren funnel"),
    );
    until(Duration::from_secs(10), "the foreground service answers", || {
        (lab.curl(0, "/fg", &[]) == (200, "foreground".into())).then_some(())
    });
    let status = lab.funnel(&["status"]);
    let tree = String::from_utf8_lossy(&status.stdout).into_owned();
    eprintln!("warren funnel status:\n{tree}");
    for line in [
        format!("https://web.funnel.test:{a}/"),
        format!("|-- /api    -> http://{origin}"),
        "foreground, ".to_owned(),
        format!("[{a}/hello, saved,"),
        format!("https://web.funnel.test:{b}/"),
        "[chat, config,".to_owned(),
        "access: basic auth (alice), 1 bearer token(s)".to_owned(),
    ] {
        assert!(tree.contains(&line), "status lacks {line:?}:\n{tree}");
    }
    assert!(fg.signal_and_wait("-INT").success());
    until(Duration::from_secs(10), "the foreground service is gone", || {
        (lab.curl(0, "/fg", &[]).0 == 404).then_some(())
    });

    // A restart publishes the file's services and the saved one again; not the foreground one.
    assert!(node.signal_and_wait("-TERM").success(), "{}", lab.log());
    let node = lab.up(&config);
    assert_eq!(lab.curl(0, "/", &[]), (200, "<h1>the site</h1>\n".into()));
    assert_eq!(lab.curl(0, "/api/x", &[]).1, "origin saw /x host web.funnel.test");
    assert_eq!(lab.curl(0, "/hello", &[]), (200, "hi there".into()));
    assert_eq!(secret(&[]).0, 401, "still protected after a restart");
    assert_eq!(secret(&["-u", "alice:s3cret"]), (200, "classified".into()));
    assert_eq!(lab.curl(0, "/fg", &[]).0, 404);
    assert_eq!(ws_echo(&lab.edge_ca(), b, "after a restart").await, "after a restart");
    let passed = lab.curl_trusting(&node_ca.ca_cert_path, 2, "/again", &["--http1.1"]);
    assert_eq!(passed.0, 200, "TLS passthrough after a restart");
    if redis.is_some() {
        assert_eq!(redis_ping(lab.tcp_port), "PONG", "the saved TCP service after a restart");
    }

    // Withdrawn for good; the file's own services cannot be withdrawn from the command line.
    assert!(lab.funnel(&["off", &format!("{a}/hello")]).status.success());
    assert_eq!(lab.curl(0, "/hello", &[]).0, 404);
    let saved = std::fs::read_to_string(lab.dir.path().join("node/services.json")).expect("state file");
    assert!(!saved.contains("hi there"), "{saved}");
    assert!(saved.contains("sha256:") && !saved.contains("tok-abc"), "a bearer token is saved as its digest: {saved}");
    let refused = lab.funnel(&["off", "chat"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("config file"));
    drop(node);
}

/// `warren hash-password` with `password` on stdin: the hash it prints.
fn hash_password(password: &str) -> String {
    use std::io::Write as _;
    let mut child = warren()
        .args(["hash-password", "--cost", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("warren hash-password");
    child.stdin.take().expect("stdin").write_all(format!("{password}\n").as_bytes()).expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether Python's grpcio is there; without it the gRPC test is skipped, unless
/// `WARREN_REQUIRE_GRPC` is set (scripts/test.sh installs it and sets it).
fn grpcio_available() -> bool {
    let ok = Command::new("python3").args(["-c", "import grpc"]).status().is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var_os("WARREN_REQUIRE_GRPC").is_none(), "Python grpcio is required but missing");
        eprintln!("skipped: Python grpcio is not installed (pip install grpcio)");
    }
    ok
}

/// gRPC through the funnel: a Python grpcio client over TLS to the edge, an h2c grpcio server
/// behind the node. Trailers (grpc-status, custom metadata) and streamed replies arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_arrive_with_their_trailers() {
    if !grpcio_available() {
        return;
    }
    let lab = start_lab().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_echo.py");
    let mut server = Command::new("python3")
        .arg(&script)
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 grpc server");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.stdout.take().expect("stdout")), &mut line)
        .expect("port line");
    let _server = Proc(server);
    let origin_port: u16 = line.trim().parse().expect("the server prints its port");
    let a = lab.port(0);
    let funnel = lab.funnel_agent(vec![ServiceSpec::new(a, format!("h2c://127.0.0.1:{origin_port}"))]);
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered");
    let out = Command::new("python3")
        .arg(&script)
        .args(["call", &a.to_string()])
        .arg(lab.edge_ca())
        .arg(format!("web.funnel.test:{a}"))
        .output()
        .expect("python3 grpc client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "say: echo: hello grpc trailer=kept code=OK",
            "count: ['part 0', 'part 1', 'part 2']",
            "fail: NOT_FOUND no such thing",
        ]
    );
    funnel.shutdown(Duration::from_secs(1)).await;
}

/// An HTTPS origin with a certificate for `localhost` from its own CA in `dir`: the address
/// and that CA's file.
async fn start_tls_origin(dir: &Path) -> (SocketAddr, PathBuf) {
    let ca = warren_common::tls::DevCa::open_or_create(dir).expect("origin ca");
    let tls = tokio_rustls::TlsAcceptor::from(ca.server_config(&["localhost".into()]).expect("cert"));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else { return };
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let text = format!("tls origin saw {}", req.uri());
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(bytes::Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, ca.ca_cert_path)
}

/// An HTTP origin on a Unix socket.
fn start_unix_origin(path: &Path) {
    let l = tokio::net::UnixListener::bind(path).expect("bind unix socket");
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let text = format!("unix origin saw {}", req.uri());
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(bytes::Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

/// HTTPS origins (verified with a given CA, refused without it, or not verified at all), a
/// Unix socket origin and a missing one, side by side on one public port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_unix_targets_answer_and_a_missing_socket_is_named() {
    let lab = start_lab().await;
    let (tls_origin, origin_ca) = start_tls_origin(&lab.dir.path().join("origin-ca")).await;
    let socket = lab.dir.path().join("app.sock");
    start_unix_origin(&socket);
    let a = lab.port(0);
    let svc = |path: &str, target: String| ServiceSpec::new(a, target).at(path);
    let services = vec![
        ServiceSpec {
            ca_file: Some(origin_ca.clone()),
            ..svc("/verified", format!("https://localhost:{}/base", tls_origin.port()))
        },
        svc("/unverified", format!("https://localhost:{}", tls_origin.port())),
        svc("/insecure", format!("https+insecure://127.0.0.1:{}", tls_origin.port())),
        svc("/unix", format!("unix:{}", socket.display())),
        svc("/gone", format!("unix:{}", lab.dir.path().join("missing.sock").display())),
    ];
    let funnel = lab.funnel_agent(services);
    funnel.wait_registered(Duration::from_secs(10)).await.expect("registered");
    assert_eq!(lab.curl(0, "/verified/x?q=1", &[]), (200, "tls origin saw /base/x?q=1".into()));
    let (status, page) = lab.curl(0, "/unverified/x", &[]);
    assert_eq!(status, 502, "an origin certificate no trusted CA vouches for is refused: {page}");
    assert_eq!(lab.curl(0, "/insecure/y", &[]), (200, "tls origin saw /y".into()));
    assert_eq!(lab.curl(0, "/unix/z", &[]), (200, "unix origin saw /z".into()));
    let (status, page) = lab.curl(0, "/gone/", &[]);
    assert_eq!(status, 502);
    assert!(page.contains("missing.sock"), "the page names the target: {page}");
    assert_eq!(lab.curl(0, "/elsewhere", &[]).0, 404, "no mount matches: the node answers 404");
    funnel.shutdown(Duration::from_secs(1)).await;
}
