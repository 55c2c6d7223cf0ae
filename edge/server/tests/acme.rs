//! Real ACME orders against Debian's `pebble` (a test CA) and its `pebble-challtestsrv` (DNS):
//! HTTP-01, TLS-ALPN-01, and DNS-01 for a wildcard through the edge's hook. Each test checks
//! that a visitor's TLS handshake validates against pebble's issuing root and the page loads.
//!
//! Needs `pebble` (Debian package); without it the tests skip unless `WARREN_REQUIRE_PEBBLE=1`
//! (CI sets it).

use std::net::{SocketAddr, TcpListener as StdListener, UdpSocket as StdUdp};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use warren::funnel::{Funnel, FunnelConfig};
use warren_edge::config::{Config, FileConfig};
use warren_edge::Edge;

const TOKEN: &str = "acme-test-token";

fn free_tcp() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn free_udp() -> u16 {
    StdUdp::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("free port")
}

fn pebble_available() -> bool {
    let ok = Command::new("pebble").arg("-h").output().is_ok()
        && Command::new("pebble-challtestsrv").arg("-h").output().is_ok();
    if !ok {
        if std::env::var_os("WARREN_REQUIRE_PEBBLE").is_some_and(|v| v == "1") {
            panic!("pebble is required (WARREN_REQUIRE_PEBBLE=1): apt-get install pebble");
        }
        eprintln!("skipping: pebble not installed (apt-get install pebble)");
    }
    ok
}

struct Pebble {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    directory: String,
    mgmt: u16,
    challtest_mgmt: u16,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// Starts challtestsrv (DNS answering 127.0.0.1 for every name) and pebble, which
    /// validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of 127.0.0.1.
    fn start(http_port: u16, tls_port: u16) -> Pebble {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = warren_common::tls::DevCa::open_or_create(dir.path()).expect("ca for pebble's own listener");
        let (cert, key) = ca.issue_pem(&["localhost".into(), "127.0.0.1".into()]).expect("issue");
        std::fs::write(dir.path().join("pebble.crt"), cert).expect("write");
        std::fs::write(dir.path().join("pebble.key"), key).expect("write");
        let (listen, mgmt, dns, challtest_mgmt) = (free_tcp(), free_tcp(), free_udp(), free_tcp());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": dir.path().join("pebble.crt"),
            "privateKey": dir.path().join("pebble.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).expect("write");
        let mut children = Vec::new();
        let log = |n: &str| std::fs::File::create(dir.path().join(n)).expect("log");
        children.push(
            Command::new("pebble-challtestsrv")
                .args([
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                ])
                .args(["-dns01", &format!("127.0.0.1:{dns}"), "-management", &format!("127.0.0.1:{challtest_mgmt}")])
                .stdout(Stdio::null())
                .stderr(log("challtestsrv.log"))
                .spawn()
                .expect("challtestsrv"),
        );
        children.push(
            Command::new("pebble")
                .arg("-config")
                .arg(dir.path().join("pebble.json"))
                .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log("pebble.log"))
                .stderr(Stdio::null())
                .spawn()
                .expect("pebble"),
        );
        let p = Pebble { children, dir, directory: format!("https://127.0.0.1:{listen}/dir"), mgmt, challtest_mgmt };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", challtest_mgmt)).is_err()
        {
            assert!(start.elapsed() < Duration::from_secs(10), "pebble did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn listener_ca(&self) -> PathBuf {
        self.dir.path().join("dev-ca.pem")
    }

    /// Pebble's issuing root (regenerated at every start), written to a file.
    async fn root(&self) -> PathBuf {
        let url = format!("https://127.0.0.1:{}/roots/0", self.mgmt);
        let pem = warren::fetch::get(&url, Some(&self.listener_ca()), 1 << 20).await.expect("pebble root");
        let path = self.dir.path().join("root.pem");
        std::fs::write(&path, pem).expect("write root");
        path
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

async fn start_origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"hello over ACME",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    addr
}

/// Connects as a visitor of `host`, trusting only pebble's root, until the edge has its
/// certificate; then fetches `/`.
async fn visit_until_certified(public: SocketAddr, host: &str, root: &Path, pebble: &Pebble) -> (StatusCode, String) {
    let cfg = {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(root).expect("root");
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
            roots.add(c.expect("pem")).expect("root cert");
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let c = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(c))
    };
    let start = Instant::now();
    let tls = loop {
        let tcp = TcpStream::connect(public).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).expect("name");
        match cfg.connect(name, tcp).await {
            Ok(t) => break t,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "no valid certificate for {host} after 60 s: {e}\npebble log:\n{}",
                    pebble.log()
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("http");
    tokio::spawn(conn);
    let req = Request::get("/").header("host", host).body(Full::new(Bytes::new())).expect("req");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn run_case(challenge: &str) {
    if !pebble_available() {
        return;
    }
    let (http01, public_port) = (free_tcp(), free_tcp());
    let pebble = Pebble::start(http01, public_port);
    let state = tempfile::tempdir().expect("tempdir");
    let mut acme = format!(
        "[acme]\ndirectory = \"{}\"\nca_file = \"{}\"\nchallenge = \"{challenge}\"\nhttp01_listen = \"127.0.0.1:{http01}\"\n",
        pebble.directory,
        pebble.listener_ca().display()
    );
    if challenge == "dns-01" {
        let hook = state.path().join("dns-hook.py");
        std::fs::write(
            &hook,
            format!(
                "#!/usr/bin/env python3\nimport json, sys, urllib.request\naction, fqdn, value = sys.argv[1:4]\npath = '/set-txt' if action == 'set' else '/clear-txt'\nbody = {{'host': fqdn + '.', 'value': value}} if action == 'set' else {{'host': fqdn + '.'}}\nurllib.request.urlopen(urllib.request.Request('http://127.0.0.1:{}' + path, data=json.dumps(body).encode(), method='POST'))\n",
                pebble.challtest_mgmt
            ),
        )
        .expect("hook");
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        acme.push_str(&format!("dns01_hook = \"{}\"\nwildcard = true\n", hook.display()));
    }
    let toml = format!(
        "funnel_domain = \"funnel.test\"\nhostname = \"edge.test\"\npublic_listen = [\"127.0.0.1:{public_port}\"]\ntunnel_listen = \"127.0.0.1:0\"\n[tls]\nmode = \"acme\"\n[admin]\nenabled = false\n[[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\"]\n{acme}"
    );
    let mut f = FileConfig::parse(&toml).expect("config");
    f.state_dir = Some(state.path().to_path_buf());
    let edge = Edge::spawn(Config::try_from(f).expect("valid"), None).await.expect("edge starts");
    let root = pebble.root().await;
    let origin = start_origin().await;
    // The node trusts pebble's root for the edge's tunnel certificate (also from ACME).
    let funnel = Funnel::start(FunnelConfig {
        edges: vec![edge.tunnel_addr().to_string()],
        edge_name: Some("edge.test".into()),
        ca_file: Some(root.clone()),
        token: TOKEN.into(),
        name: "web".into(),
        target: format!("http://{origin}"),
        ports: vec![public_port],
    });
    funnel
        .wait_registered(Duration::from_secs(90))
        .await
        .expect("node registered once the edge had its tunnel certificate");
    let public = edge.public_addrs()[0];
    let (status, body) = visit_until_certified(public, "web.funnel.test", &root, &pebble).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello over ACME"));
    let stored = if challenge == "dns-01" { "_wildcard_.funnel.test.crt" } else { "web.funnel.test.crt" };
    assert!(state.path().join("certs").join(stored).exists(), "certificate persisted in the store");
    drop(funnel);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_order_against_pebble() {
    run_case("http-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_order_against_pebble() {
    run_case("tls-alpn-01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_01_wildcard_order_against_pebble() {
    run_case("dns-01").await;
}
