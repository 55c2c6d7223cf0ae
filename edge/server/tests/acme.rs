//! Real ACME orders against Debian's `pebble` (a test CA) and its `pebble-challtestsrv` (DNS):
//! HTTP-01, TLS-ALPN-01, and DNS-01 for a wildcard through the edge's hook. Each test checks
//! that a visitor's TLS handshake validates against pebble's issuing root and the page loads.
//!
//! Needs `pebble` (Debian package); without it the tests skip unless `WARREN_REQUIRE_PEBBLE=1`
//! (CI sets it).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{pebble_available, start_redis, Pebble};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use warren::funnel::{Funnel, FunnelConfig};
use warren::services::ServiceSpec;
use warren_common::testing::{free_tcp_port, free_udp_port, until};
use warren_edge::config::{Config, FileConfig};
use warren_edge::Edge;

const TOKEN: &str = "acme-test-token";

async fn start_origin() -> SocketAddr {
    warren_common::testing::http_origin(|_req| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"hello over ACME"))))
    })
    .await
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

/// A DNS-01 hook publishing TXT records in pebble's DNS; it also appends `<action> <fqdn>` to
/// `hook.log` beside it, so a test can count the challenges published.
fn dns_hook(dir: &Path, pebble: &Pebble) -> std::path::PathBuf {
    let hook = dir.join("dns-hook.py");
    let log = dir.join("hook.log");
    std::fs::write(
        &hook,
        format!(
            "#!/usr/bin/env python3\nimport json, sys, urllib.request\naction, fqdn, value = sys.argv[1:4]\nopen('{log}', 'a').write(action + ' ' + fqdn + '\\n')\npath = '/set-txt' if action == 'set' else '/clear-txt'\nbody = {{'host': fqdn + '.', 'value': value}} if action == 'set' else {{'host': fqdn + '.'}}\nurllib.request.urlopen(urllib.request.Request('http://127.0.0.1:{}' + path, data=json.dumps(body).encode(), method='POST'))\n",
            pebble.challtest_mgmt,
            log = log.display()
        ),
    )
    .expect("hook");
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    hook
}

/// An edge taking its certificates from `pebble` with `challenge` (HTTP-01 answered on
/// `ports.0`, visitors on `ports.1`); `extra` follows the `[acme]` section's keys.
async fn acme_edge(pebble: &Pebble, state: &Path, ports: (u16, u16), challenge: &str, extra: &str) -> Edge {
    let (http01, public_port) = ports;
    let toml = format!(
        "funnel_domain = \"funnel.test\"\nhostname = \"edge.test\"\npublic_listen = [\"127.0.0.1:{public_port}\"]\ntunnel_listen = \"127.0.0.1:0\"\n[tls]\nmode = \"acme\"\n[admin]\nenabled = false\n[[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\"]\n\
         [acme]\ndirectory = \"{}\"\nca_file = \"{}\"\nchallenge = \"{challenge}\"\nhttp01_listen = \"127.0.0.1:{http01}\"\n{extra}",
        pebble.directory,
        pebble.listener_ca().display()
    );
    let mut f = FileConfig::parse(&toml).expect("config");
    f.state_dir = Some(state.to_path_buf());
    Edge::spawn(Config::try_from(f).expect("valid"), None).await.expect("edge starts")
}

/// The node "web" publishing `origin` on `public_port` through `edge`, trusting `root` for the
/// edge's tunnel certificate, asking for `domains`.
fn acme_funnel(edge: &Edge, root: &Path, public_port: u16, origin: SocketAddr, domains: Vec<String>) -> Funnel {
    Funnel::start(FunnelConfig {
        edges: vec![edge.tunnel_addr().to_string()],
        edge_name: Some("edge.test".into()),
        ca_file: Some(root.to_path_buf()),
        token: TOKEN.into(),
        name: "web".into(),
        services: vec![ServiceSpec::new(public_port, format!("http://{origin}"))],
        transport: Default::default(),
        domains,
    })
}

async fn run_case(challenge: &str) {
    if !pebble_available() {
        return;
    }
    let (http01, public_port) = (free_tcp_port(), free_tcp_port());
    let pebble = Pebble::start(http01, public_port);
    let state = tempfile::tempdir().expect("tempdir");
    let extra = match challenge {
        "dns-01" => format!("dns01_hook = \"{}\"\nwildcard = true\n", dns_hook(state.path(), &pebble).display()),
        _ => String::new(),
    };
    let edge = acme_edge(&pebble, state.path(), (http01, public_port), challenge, &extra).await;
    let root = pebble.root();
    let origin = start_origin().await;
    // The node trusts pebble's root for the edge's tunnel certificate (also from ACME).
    let funnel = acme_funnel(&edge, &root, public_port, origin, Vec::new());
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

/// Two edges of a cluster share one Redis and start together, each needing the same two
/// certificates (the tunnel name and the wildcard). The `SET NX PX` issuance lock lets one edge
/// order each; the other waits and installs it from the store. Counted at the DNS hook: two
/// challenges published, not four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_orders_each_certificate_once() {
    if !pebble_available() {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let Some((_redis, redis_url)) = start_redis(state.path()) else { return };
    let pebble = Pebble::start(free_tcp_port(), free_tcp_port());
    let hook = dns_hook(state.path(), &pebble);
    let config = |i: usize| {
        let (public, tunnel) = (free_tcp_port(), free_udp_port());
        let toml = format!(
            "funnel_domain = \"funnel.test\"\nhostname = \"edge.test\"\npublic_listen = [\"127.0.0.1:{public}\"]\n\
             tunnel_listen = \"127.0.0.1:{tunnel}\"\n[tls]\nmode = \"acme\"\n[admin]\nenabled = false\n\
             [acme]\ndirectory = \"{}\"\nca_file = \"{}\"\nchallenge = \"dns-01\"\ndns01_hook = \"{}\"\nwildcard = true\n\
             [cluster]\nredis_url = \"{redis_url}\"\nadvertise = \"127.0.0.1:{tunnel}\"\n",
            pebble.directory,
            pebble.listener_ca().display(),
            hook.display()
        );
        let mut f = FileConfig::parse(&toml).expect("config");
        f.state_dir = Some(state.path().join(format!("edge-{i}")));
        f.cluster.key = Some("acme-cluster-test-key-0123456789".into());
        Config::try_from(f).expect("valid")
    };
    let (a, b) = tokio::join!(Edge::spawn(config(0), None), Edge::spawn(config(1), None));
    let (a, b) = (a.expect("edge a"), b.expect("edge b"));
    let root = pebble.root();
    for edge in [&a, &b] {
        for host in ["edge.test", "web.funnel.test"] {
            // No node is connected: the page says so, over a certificate pebble issued.
            let (status, _) = visit_until_certified(edge.public_addrs()[0], host, &root, &pebble).await;
            assert!(status == StatusCode::NOT_FOUND || status == StatusCode::SERVICE_UNAVAILABLE, "{host}: {status}");
        }
    }
    let log = std::fs::read_to_string(state.path().join("hook.log")).expect("hook log");
    let mut published: Vec<&str> = log.lines().filter_map(|l| l.strip_prefix("set ")).collect();
    published.sort_unstable();
    assert_eq!(published, ["_acme-challenge.edge.test", "_acme-challenge.funnel.test"], "one order per name");
    a.shutdown().await;
    b.shutdown().await;
}

/// curl as a visitor of `https://{host}:{port}/`, trusting only `root`.
fn curl_verified(root: &Path, host: &str, port: u16) -> (u16, String) {
    warren_common::testing::curl_https(root, host, port, "/", &[])
}

/// A node asks for app.example.com: refused until `_warren.app.example.com` holds its proof
/// (a record made for another node does not count), then served with a certificate pebble
/// issued (curl checks the chain against pebble's root), and no longer served once the
/// record is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_domain_is_served_once_its_dns_proves_it() {
    if !pebble_available() {
        return;
    }
    let (http01, public_port) = (free_tcp_port(), free_tcp_port());
    let pebble = Pebble::start(http01, public_port);
    let state = tempfile::tempdir().expect("tempdir");
    let domains = format!("[domains]\nresolver = \"127.0.0.1:{}\"\nrecheck = \"300ms\"\n", pebble.dns);
    let edge = acme_edge(&pebble, state.path(), (http01, public_port), "http-01", &domains).await;
    let root = pebble.root();
    let origin = start_origin().await;
    let funnel =
        acme_funnel(&edge, &root, public_port, origin, vec!["app.example.com".into(), "web.funnel.test".into()]);
    funnel.wait_registered(Duration::from_secs(90)).await.expect("registered");
    let proof = warren_edge::domains::proof_value("app.example.com", "web");
    let pending = until(Duration::from_secs(10), "the edge answers about the domains", || {
        Some(funnel.status().domains_pending).filter(|p| p.len() == 2)
    });
    assert!(pending.iter().any(|p| p.starts_with("app.example.com: ") && p.contains(&proof)), "{pending:?}");
    assert!(pending.iter().any(|p| p.starts_with("web.funnel.test: not a domain")), "{pending:?}");
    assert!(funnel.status().domains.is_empty());

    // Another node's proof, then this node's.
    pebble.set_txt("_warren.app.example.com", Some(&warren_edge::domains::proof_value("app.example.com", "other")));
    std::thread::sleep(Duration::from_secs(1));
    let (code, _) = curl_verified(&root, "app.example.com", public_port);
    assert_ne!(code, 200, "served on someone else's record");
    pebble.set_txt("_warren.app.example.com", Some(&proof));
    let (_, body) = until(Duration::from_secs(60), "app.example.com is served with a verified certificate", || {
        Some(curl_verified(&root, "app.example.com", public_port)).filter(|(code, _)| *code == 200)
    });
    assert_eq!(body, "hello over ACME");
    assert!(state.path().join("certs/app.example.com.crt").exists(), "its certificate is in the store");
    // The node asks again every 30 s, and then lists the domain as served.
    until(Duration::from_secs(40), "the node's status shows the domain served", || {
        Some(()).filter(|()| funnel.status().domains == ["app.example.com"])
    });

    pebble.set_txt("_warren.app.example.com", None);
    let (code, page) = until(Duration::from_secs(10), "the domain stops being served", || {
        Some(curl_verified(&root, "app.example.com", public_port)).filter(|(code, _)| *code != 200)
    });
    assert_eq!(code, 404, "{page}");
    drop(funnel);
    edge.shutdown().await;
}
