//! Reloading a running relay: limits, STUN rate, admission, mesh peers and manual certificates
//! change for what comes next while the connections already up stay; a reload that cannot be
//! applied changes nothing; certificate files that change are picked up on their own; and the
//! binary does all of this on SIGHUP.

mod common;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{relay_config, start_relay};
use rand_core::OsRng;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpStream, UdpSocket};
use warren_common::testing::free_tcp_port;
use warren_common::tls::{client_config, DevCa};
use warren_relay::config::{AdmissionConfig, FileConfig};
use warren_relay::{ReloadError, Server};
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::{SecretKey, Transport};

const MESH_KEY: &str = "test-region-mesh-key-0123456789";

/// Writes a fresh leaf certificate for localhost, signed by `ca`, to `dir`/cert.pem and
/// `dir`/key.pem; returns its DER.
fn write_cert(ca: &DevCa, dir: &Path) -> CertificateDer<'static> {
    let (cert, key) = ca.issue_pem(&["localhost".into()]).expect("issue");
    std::fs::write(dir.join("key.pem"), key).expect("write key");
    std::fs::write(dir.join("cert.pem"), &cert).expect("write cert");
    CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem")
}

fn manual_tls(f: &mut FileConfig, dir: &Path) {
    f.tls.mode = Some(warren_relay::config::TlsModeName::Manual);
    f.tls.cert_file = Some(dir.join("cert.pem"));
    f.tls.key_file = Some(dir.join("key.pem"));
}

/// The leaf certificate a new TLS connection to `addr` is shown. It comes from 127.0.0.2, so
/// that it never counts against the clients' address, 127.0.0.1.
async fn presented(addr: std::net::SocketAddr, ca: &Path) -> CertificateDer<'static> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind");
    let tcp: TcpStream = socket.connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(client_config(Some(ca)).expect("tls"));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certificates")[0].clone().into_owned()
}

fn opts(ca: &Path) -> ConnectOptions {
    ConnectOptions { ca_file: Some(ca.to_path_buf()), timeout: Duration::from_secs(5), ..Default::default() }
}

async fn login(server: &Server, ca: &Path) -> Result<DerpClient, warren_relay_client::ClientError> {
    let url = format!("https://localhost:{}", server.http_addr().port());
    DerpClient::connect(&url, &SecretKey::generate(&mut OsRng), &opts(ca)).await
}

/// `a` and `b` still exchange packets both ways.
async fn still_talk(a: &mut DerpClient, b: &mut DerpClient, what: &str) {
    one_way(a, b, what).await;
    one_way(b, a, what).await;
}

async fn one_way(from: &mut DerpClient, to: &mut DerpClient, what: &str) {
    from.send_packet(to.public_key(), what.as_bytes()).await.expect("send");
    let (src, got) =
        tokio::time::timeout(Duration::from_secs(5), to.recv_packet()).await.expect("in time").expect("recv");
    assert_eq!((src, &got[..]), (from.public_key(), what.as_bytes()));
}

async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_limits_and_the_certificate_for_new_connections_and_keeps_the_old_ones() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = DevCa::open_or_create(certs.path()).expect("ca");
    let first = write_cert(&ca, certs.path());
    let relay = start_relay(|f| {
        manual_tls(f, certs.path());
        f.limits.max_conns_per_ip = Some(10);
    })
    .await;
    let cfg = |max_per_ip: u32, tweak: &dyn Fn(&mut FileConfig)| {
        relay_config(relay.dir.path(), |f| {
            manual_tls(f, certs.path());
            f.limits.max_conns_per_ip = Some(max_per_ip);
            tweak(f);
        })
    };
    let ca_file = &ca.ca_cert_path;
    assert_eq!(presented(relay.server.http_addr(), ca_file).await, first);
    let mut a = login(&relay.server, ca_file).await.expect("a logs in");
    let mut b = login(&relay.server, ca_file).await.expect("b logs in");

    // New certificate and a per-address cap below what is already open.
    let second = write_cert(&ca, certs.path());
    assert_ne!(first, second);
    let done = relay.server.reload(cfg(2, &|_| {})).expect("reloads");
    assert!(done.certificate && done.needs_restart.is_empty(), "{done:?}");
    assert_eq!(presented(relay.server.http_addr(), ca_file).await, second, "the next handshake sees the new one");
    assert!(login(&relay.server, ca_file).await.is_err(), "a third connection from 127.0.0.1 is over the new cap");
    assert_eq!(relay.metric("relay_connections_rejected_total{reason=\"per_ip\"}").await, 1.0);
    still_talk(&mut a, &mut b, "after the reload").await;

    // A reload that cannot be applied changes nothing: not the cap, not the certificate.
    std::fs::write(certs.path().join("broken.pem"), "not a certificate").expect("write");
    let broken = relay_config(relay.dir.path(), |f| {
        manual_tls(f, certs.path());
        f.tls.cert_file = Some(certs.path().join("broken.pem"));
        f.limits.max_conns_per_ip = Some(100);
    });
    assert!(matches!(relay.server.reload(broken), Err(ReloadError::Tls(_))));
    let mut missing_list = cfg(100, &|_| {});
    missing_list.admission = AdmissionConfig::AllowList { file: PathBuf::from("/nonexistent/allow-list") };
    assert!(matches!(relay.server.reload(missing_list), Err(ReloadError::Admission(_))));
    assert!(login(&relay.server, ca_file).await.is_err(), "the cap is still 2");
    drop(b);

    // What only a restart changes is named and kept.
    let moved = relay_config(relay.dir.path(), |f| {
        manual_tls(f, certs.path());
        f.listen = Some("127.0.0.1:1".into());
        f.hostname = Some("elsewhere.test".into());
    });
    let done = relay.server.reload(moved).expect("reloads");
    assert_eq!(done.needs_restart, vec!["listen", "hostname"]);
    let mut c = login(&relay.server, ca_file).await.expect("the default cap again, on the port in use");
    still_talk(&mut a, &mut c, "on the same listener").await;

    // Certificate files that change are picked up without a reload.
    let third = write_cert(&ca, certs.path());
    let start = Instant::now();
    while presented(relay.server.http_addr(), ca_file).await != third {
        assert!(start.elapsed() < Duration::from_secs(10), "changed files were not picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(relay.metric("relay_tls_cert_reloads_total{result=\"ok\"}").await >= 1.0);
    still_talk(&mut a, &mut c, "after the files changed").await;
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_stun_rate_and_the_admission_policy() {
    let relay = start_relay(|_| {}).await;
    let stun = relay.server.stun_addr().expect("stun");
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let answered = |n: u8| {
        let socket = &socket;
        async move {
            let mut got = 0;
            for i in 0..n {
                let req = warren_relay_proto::stun::binding_request([i; 12]).expect("req");
                socket.send_to(&req, stun).await.expect("send");
            }
            let mut buf = [0u8; 512];
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await {
                got += 1;
            }
            got
        }
    };
    assert_eq!(answered(10).await, 10, "the default rate answers a burst of ten");
    relay
        .server
        .reload(relay_config(relay.dir.path(), |f| {
            f.stun.rate_per_second = Some(1);
            f.stun.burst = Some(2);
        }))
        .expect("reloads");
    assert_eq!(answered(10).await, 2, "the new burst, for a source seen before");

    // Admission: open, then an allow-list holding one key, then open again.
    let ca = relay.ca();
    let allowed = SecretKey::generate(&mut OsRng);
    let list = relay.dir.path().join("allow-list");
    std::fs::write(&list, format!("{}\n", allowed.public_key())).expect("write list");
    let mut open_client = login(&relay.server, &ca).await.expect("open admission");
    let mut with_list = relay_config(relay.dir.path(), |_| {});
    with_list.admission = AdmissionConfig::AllowList { file: list.clone() };
    assert!(relay.server.reload(with_list.clone()).expect("reloads").admission);
    let url = relay.url();
    let mut listed = DerpClient::connect(&url, &allowed, &opts(&ca)).await.expect("listed key");
    let stranger = DerpClient::connect(&url, &SecretKey::generate(&mut OsRng), &opts(&ca)).await;
    let refused = match stranger {
        Err(_) => true,
        Ok(mut c) => tokio::time::timeout(Duration::from_secs(5), c.recv_packet()).await.is_ok_and(|r| r.is_err()),
    };
    assert!(refused, "a key not on the list is refused");
    still_talk(&mut open_client, &mut listed, "admitted before the list stays").await;
    assert!(relay.server.reload(relay_config(relay.dir.path(), |_| {})).expect("reloads").admission);
    login(&relay.server, &ca).await.expect("open again");
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_mesh_siblings() {
    let state = tempfile::tempdir().expect("tempdir");
    let ports = [free_tcp_port(), free_tcp_port()];
    let mesh = |f: &mut FileConfig, i: usize, peers: Vec<String>| {
        f.listen = Some(format!("127.0.0.1:{}", ports[i]));
        f.state_dir = Some(state.path().to_path_buf());
        f.key_file = Some(state.path().join(format!("relay-{i}.key")));
        f.mesh.key = Some(MESH_KEY.into());
        f.mesh.peers = peers;
        f.mesh.ca_file = Some(state.path().join("dev-ca.pem"));
    };
    let url = |i: usize| format!("https://localhost:{}", ports[i]);
    let a = start_relay(|f| mesh(f, 0, vec![])).await;
    let b = start_relay(|f| mesh(f, 1, vec![])).await;
    let mut on_a = a.client(Transport::Derp).await;
    let mut on_b = b.client(Transport::Derp).await;
    assert_eq!(a.server.mesh_link_count(), 0);

    let done = a.server.reload(relay_config(state.path(), |f| mesh(f, 0, vec![url(1)]))).expect("reloads");
    assert_eq!((done.mesh_added, done.mesh_removed), (1, 0));
    eventually(Duration::from_secs(10), "a's link to b", || a.server.mesh_link_count() == 1).await;
    eventually(Duration::from_secs(5), "b's client known on a", || a.server.mesh_remote_count() == 1).await;
    // a reaches b's client over its link; b answers through its own new link to a.
    b.server.reload(relay_config(state.path(), |f| mesh(f, 1, vec![url(0)]))).expect("reloads");
    eventually(Duration::from_secs(10), "b's link to a", || b.server.mesh_link_count() == 1).await;
    eventually(Duration::from_secs(5), "a's client known on b", || b.server.mesh_remote_count() == 1).await;
    still_talk(&mut on_a, &mut on_b, "across the new links").await;

    // The same peers again: nothing restarts.
    let same = a.server.reload(relay_config(state.path(), |f| mesh(f, 0, vec![url(1)]))).expect("reloads");
    assert_eq!((same.mesh_added, same.mesh_removed), (0, 0));
    let gone = a.server.reload(relay_config(state.path(), |f| mesh(f, 0, vec![]))).expect("reloads");
    assert_eq!((gone.mesh_added, gone.mesh_removed), (0, 1));
    eventually(Duration::from_secs(5), "a's link stopped", || a.server.mesh_link_count() == 0).await;
    eventually(Duration::from_secs(5), "a forgets b's clients", || a.server.mesh_remote_count() == 0).await;
    a.server.shutdown().await;
    b.server.shutdown().await;
}

/// Runs the binary with `config`, returns it once its admin port answers.
fn spawn_relay(config: &Path, admin_port: u16) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_warren-relay"))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("relay starts");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "relay up");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn metrics(admin_port: u16) -> String {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", admin_port)).expect("admin");
    std::io::Write::write_all(&mut tcp, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    tcp.read_to_string(&mut out).expect("read");
    out
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill");
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_a_bad_file_keeps_the_running_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = DevCa::open_or_create(dir.path()).expect("ca");
    let first = write_cert(&ca, dir.path());
    let (port, admin) = (free_tcp_port(), free_tcp_port());
    let file = dir.path().join("relay.toml");
    let config = |max_per_ip: u32| {
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{d}\"\n[tls]\nmode = \"manual\"\ncert_file = \"{d}/cert.pem\"\nkey_file = \"{d}/key.pem\"\n[stun]\nenabled = false\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[shutdown]\ngrace_period = \"300ms\"\n[limits]\nmax_conns_per_ip = {max_per_ip}\n",
            d = dir.path().display()
        )
    };
    std::fs::write(&file, config(10)).expect("write config");
    let mut child = spawn_relay(&file, admin);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let ca_file = ca.ca_cert_path.clone();
    let url = format!("https://localhost:{port}");
    let key = || SecretKey::generate(&mut OsRng);
    let mut a = DerpClient::connect(&url, &key(), &opts(&ca_file)).await.expect("a");
    let mut b = DerpClient::connect(&url, &key(), &opts(&ca_file)).await.expect("b");
    assert_eq!(presented(addr, &ca_file).await, first);

    // A broken file: counted, logged, nothing changes.
    std::fs::write(&file, "listen = [broken").expect("write");
    signal(&child, "-HUP");
    let start = Instant::now();
    while !metrics(admin).contains("relay_config_reloads_total{result=\"invalid\"} 1") {
        assert!(start.elapsed() < Duration::from_secs(10), "the invalid reload is counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    still_talk(&mut a, &mut b, "after a bad reload").await;

    // A good one: new certificate for the next handshake, a cap of 2 for the next connection.
    let second = write_cert(&ca, dir.path());
    std::fs::write(&file, config(2)).expect("write config");
    signal(&child, "-HUP");
    let start = Instant::now();
    while !metrics(admin).contains("relay_config_reloads_total{result=\"ok\"} 1") {
        assert!(start.elapsed() < Duration::from_secs(10), "the reload is applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(presented(addr, &ca_file).await, second);
    assert!(DerpClient::connect(&url, &key(), &opts(&ca_file)).await.is_err(), "over the new cap");
    still_talk(&mut a, &mut b, "after SIGHUP").await;

    signal(&child, "-TERM");
    let status = child.wait().expect("exits");
    let mut log = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut log).expect("log");
    assert!(status.success(), "{log}");
    assert!(log.contains("new configuration is invalid; keeping the one in force"), "{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
}
