//! Edges sharing state in a real Redis server (Debian's `redis-server`, started here on a free
//! loopback port): the store's locks and routes, then two edge processes with one node
//! tunnelled to both, forwarding between them, and one edge killed while a visitor keeps
//! asking the other.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{plain_get, start_redis, wait_until, Proc};

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use warren::funnel::{Funnel, FunnelConfig};
use warren::services::{AccessSpec, ServiceSpec};
use warren_common::testing::{free_tcp_port, free_udp_port};
use warren_edge::store::{CertCache, RedisStore, Store, StoredCert};

const CLUSTER_KEY: &str = "edge-cluster-test-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_locks_routes_and_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_redis, url)) = start_redis(dir.path()) else { return };
    let (a, b) = (RedisStore::new(&url).expect("store"), RedisStore::new(&url).expect("store"));
    a.ping().await.expect("redis answers");

    // Issuance locks: SET NX PX, one holder at a time; only the holder releases; expiry frees.
    let ttl = Duration::from_secs(30);
    assert!(a.try_lock("web.funnel.test", ttl).await.expect("lock"));
    assert!(!b.try_lock("web.funnel.test", ttl).await.expect("lock"), "held by the other edge");
    b.unlock("web.funnel.test").await.expect("unlock");
    assert!(!b.try_lock("web.funnel.test", ttl).await.expect("lock"), "a non-holder's unlock does nothing");
    a.unlock("web.funnel.test").await.expect("unlock");
    assert!(b.try_lock("web.funnel.test", ttl).await.expect("lock"), "released by its holder");
    assert!(a.try_lock("short.funnel.test", Duration::from_millis(200)).await.expect("lock"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(b.try_lock("short.funnel.test", ttl).await.expect("lock"), "an expired lock is free");

    // Certificates saved by one edge are loaded by the other.
    let cert = StoredCert { name: "*.funnel.test".into(), chain_pem: "CHAIN".into(), key_pem: "KEY".into() };
    a.save(&cert).await.expect("save");
    assert_eq!(b.load_all().await.expect("load"), vec![cert]);

    // Routes: refreshed entries live, withdrawn ones go, unrefreshed ones expire.
    let names = ["web".to_owned(), "api".to_owned()];
    a.advertise("localhost@10.0.0.1:7443", &names, Duration::from_secs(30)).await.expect("advertise");
    b.advertise("localhost@10.0.0.2:7443", &names[..1], Duration::from_millis(300)).await.expect("advertise");
    let mut web = a.routes("web").await.expect("routes");
    web.sort();
    assert_eq!(web, ["localhost@10.0.0.1:7443", "localhost@10.0.0.2:7443"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.routes("web").await.expect("routes"), ["localhost@10.0.0.1:7443"], "b's entry expired");
    a.withdraw("localhost@10.0.0.1:7443", &names[1..]).await.expect("withdraw");
    assert!(b.routes("api").await.expect("routes").is_empty());
    assert!(b.routes("nobody").await.expect("routes").is_empty());

    // A store whose server is gone gives errors, not hangs.
    let gone = RedisStore::new(&format!("redis://127.0.0.1:{}/", free_tcp_port())).expect("store");
    let t = Instant::now();
    assert!(gone.routes("web").await.is_err());
    assert!(t.elapsed() < Duration::from_secs(10), "bounded by the store's deadlines");
}

struct EdgeProc {
    proc: Proc,
    public: SocketAddr,
    tunnel: SocketAddr,
    admin: SocketAddr,
}

/// An edge on its own loopback address (127.0.0.x): every edge of a cluster serves the same
/// public port, as behind one DNS name. `extra` is appended to its config file.
fn start_edge(ip: &str, public_port: u16, state: &Path, redis: &str, route_ttl: &str, extra: &str) -> EdgeProc {
    let public: SocketAddr = format!("{ip}:{public_port}").parse().expect("addr");
    let tunnel: SocketAddr = format!("{ip}:{}", free_udp_port()).parse().expect("addr");
    let admin: SocketAddr = format!("{ip}:{}", free_tcp_port()).parse().expect("addr");
    let config = state.join(format!("edge-{ip}.toml"));
    std::fs::write(
        &config,
        format!(
            "funnel_domain = \"funnel.test\"\npublic_listen = [\"{public}\"]\ntunnel_listen = \"{tunnel}\"\n\
             state_dir = \"{s}\"\n[tls]\nmode = \"dev\"\n[admin]\nlisten = \"{admin}\"\n\
             [shutdown]\ngrace_period = \"1s\"\n\
             [cluster]\nredis_url = \"{redis}\"\nadvertise = \"{tunnel}\"\nroute_ttl = \"{route_ttl}\"\n\
             [[tokens]]\ntoken = \"cluster-node-token\"\nnames = [\"*\"]\n{extra}",
            s = state.display()
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(state.join(format!("edge-{ip}.log"))).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_warren-edge"))
        .arg("--config")
        .arg(&config)
        .env("WARREN_EDGE_CLUSTER_KEY", CLUSTER_KEY)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("edge starts");
    let proc = Proc(child);
    wait_until(Duration::from_secs(15), "edge ready", || {
        plain_get(admin, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    EdgeProc { proc, public, tunnel, admin }
}

/// Redis, two clustered edges on their own loopback addresses (the first creates the shared dev
/// CA, the second starts once the first is ready), and an origin.
struct Pair {
    dir: tempfile::TempDir,
    redis: Proc,
    a: EdgeProc,
    b: EdgeProc,
    ca: PathBuf,
    origin: SocketAddr,
    port: u16,
}

impl Pair {
    /// `None` when redis-server is missing and not required (the test skips).
    async fn start(ips: [&str; 2], route_ttl: &str) -> Option<Pair> {
        Pair::start_in(tempfile::tempdir().expect("tempdir"), ips, route_ttl, "").await
    }

    /// As [`Pair::start`], in `dir`, with `extra` in both edges' config files.
    async fn start_in(dir: tempfile::TempDir, ips: [&str; 2], route_ttl: &str, extra: &str) -> Option<Pair> {
        let (redis, url) = start_redis(dir.path())?;
        let port = free_tcp_port();
        let a = start_edge(ips[0], port, dir.path(), &url, route_ttl, extra);
        let b = start_edge(ips[1], port, dir.path(), &url, route_ttl, extra);
        let ca = dir.path().join("dev-ca.pem");
        let origin = start_origin().await;
        Some(Pair { dir, redis, a, b, ca, origin, port })
    }
}

async fn start_origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                let xff = req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or("-");
                let body = format!("hello from origin; for {xff}");
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                    body,
                ))))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
        }
    });
    addr
}

/// One visitor request on a new connection to `edge`, with a deadline.
async fn visit(edge: SocketAddr, ca: &Path, host: &str) -> Result<(StatusCode, String), String> {
    let attempt = async {
        let tcp = TcpStream::connect(edge).await.map_err(|e| format!("connect: {e}"))?;
        let cfg = warren_common::tls::client_config(Some(ca)).map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| format!("tls: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req =
            Request::get("/").header("host", host).body(Empty::<bytes::Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.map_err(|_| "timed out".to_owned())?
}

fn funnel(name: &str, edges: &[&EdgeProc], ca: &Path, target: SocketAddr, port: u16) -> Funnel {
    Funnel::start(funnel_config(name, edges, ca, target, port))
}

fn funnel_config(name: &str, edges: &[&EdgeProc], ca: &Path, target: SocketAddr, port: u16) -> FunnelConfig {
    FunnelConfig {
        edges: edges.iter().map(|e| e.tunnel.to_string()).collect(),
        edge_name: Some("localhost".into()),
        ca_file: Some(PathBuf::from(ca)),
        token: "cluster-node-token".into(),
        name: name.into(),
        services: vec![ServiceSpec::new(port, format!("http://{target}"))],
        transport: Default::default(),
        domains: Vec::new(),
    }
}

/// Greets an edge as a sibling with `key`: Ok when welcomed, Err("refused") when refused.
async fn peer_hello(tunnel: SocketAddr, ca: &Path, key: &str) -> Result<(), String> {
    use warren_tunnel::{quic_client_config, read_message, write_message};
    use warren_tunnel_proto::{Message, VERSION};
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let keep_alive = warren_tunnel::KeepAlive::dead_after(Duration::from_secs(30));
    endpoint.set_default_client_config(quic_client_config(Some(ca), 4, keep_alive).expect("client config"));
    let conn = endpoint.connect(tunnel, "localhost").expect("connect").await.map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = (warren_tunnel::SendStream::from(send), warren_tunnel::RecvStream::from(recv));
    let hello = Message::PeerHello { version: VERSION, key: key.into() };
    write_message(&mut send, &hello).await.map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(5), read_message(&mut recv)).await;
    conn.close(0u32.into(), b"done");
    match answer.map_err(|_| "no answer".to_owned())?.map_err(|e| e.to_string())? {
        Message::Welcome { .. } => Ok(()),
        Message::Refused { .. } => Err("refused".into()),
        other => Err(format!("unexpected {other:?}")),
    }
}

fn metric(admin: SocketAddr, line_prefix: &str) -> f64 {
    plain_get(admin, "/metrics")
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok()))
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_on_one_redis_forward_and_survive_losing_one() {
    // Edge A creates the shared dev CA; B starts once A is ready and uses the same one.
    let Some(Pair { dir: _dir, redis: _redis, a, b, ca, origin, port }) =
        Pair::start(["127.0.0.2", "127.0.0.3"], "2s").await
    else {
        return;
    };

    // "web" keeps tunnels to both edges; "solo" only to A.
    let web = funnel("web", &[&a, &b], &ca, origin, port);
    let solo = funnel("solo", &[&a], &ca, origin, port);
    // "guarded" (on A only) keeps loopback out: the edge holding its tunnel enforces that
    // for visitors who came in through B too.
    let guarded = Funnel::start(FunnelConfig {
        services: vec![ServiceSpec {
            access: Some(AccessSpec { deny: vec!["127.0.0.0/8".into()], ..AccessSpec::default() }),
            ..ServiceSpec::new(port, format!("http://{origin}"))
        }],
        ..funnel_config("guarded", &[&a], &ca, origin, port)
    });
    let mut status = web.status();
    for _ in 0..200 {
        status = web.status();
        if status.edges.iter().all(|e| e.connected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(status.edges.iter().all(|e| e.connected), "web registered on both edges: {status:?}");
    solo.wait_registered(Duration::from_secs(10)).await.expect("solo registered");
    guarded.wait_registered(Duration::from_secs(10)).await.expect("guarded registered");
    while guarded.status().edges.iter().any(|e| e.access_generation.is_none()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for edge in [&a, &b] {
        let (code, body) = visit(edge.public, &ca, "web.funnel.test").await.expect("answer");
        assert_eq!(code, StatusCode::OK, "{body}");
        assert_eq!(body, "hello from origin; for 127.0.0.1");
    }
    // B has no tunnel of "solo": it forwards to A, and the origin still sees the visitor.
    let (code, body) = visit(b.public, &ca, "solo.funnel.test").await.expect("answer");
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body, "hello from origin; for 127.0.0.1", "the visitor's address survives the extra hop");
    assert_eq!(metric(b.admin, "edge_forwarded_total{direction=\"out\"} "), 1.0);
    assert_eq!(metric(a.admin, "edge_forwarded_total{direction=\"in\"} "), 1.0);
    for edge in [&a, &b] {
        let (code, _) = visit(edge.public, &ca, "guarded.funnel.test").await.expect("answer");
        assert_eq!(code, StatusCode::FORBIDDEN, "the node's deny list holds on every edge");
    }
    assert_eq!(metric(a.admin, "edge_access_refused_total{reason=\"ip_denied\"} "), 2.0, "both refused by A");
    let (code, _) = visit(b.public, &ca, "nobody.funnel.test").await.expect("answer");
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "a name no edge holds is offline");
    assert_eq!(peer_hello(a.tunnel, &ca, "not-the-cluster-key-0123456789").await, Err("refused".into()));
    assert_eq!(peer_hello(a.tunnel, &ca, CLUSTER_KEY).await, Ok(()));

    // Kill A outright while a visitor keeps asking B for "web" every 20 ms.
    let stop = tokio_util::sync::CancellationToken::new();
    let visitor = tokio::spawn({
        let (stop, ca, public) = (stop.clone(), ca.clone(), b.public);
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.is_cancelled() {
                match visit(public, &ca, "web.funnel.test").await {
                    Ok((StatusCode::OK, _)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let EdgeProc { proc: mut a_proc, .. } = a;
    let killed = Instant::now();
    a_proc.0.kill().expect("kill edge A");
    let _ = a_proc.0.wait();

    // "solo" lived only on A: once A's route entry expires (2 s here), B calls it offline
    // instead of trying a dead sibling.
    let (mut slowest, mut unreachable) = (Duration::ZERO, 0u32);
    let offline_after = loop {
        let t = Instant::now();
        let r = visit(b.public, &ca, "solo.funnel.test").await;
        slowest = slowest.max(t.elapsed());
        unreachable += u32::from(matches!(r, Ok((StatusCode::BAD_GATEWAY, _))));
        if matches!(r, Ok((StatusCode::SERVICE_UNAVAILABLE, _))) {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "solo still routed to a dead edge: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (ok, failed) = visitor.await.expect("visitor");
    eprintln!(
        "edge A killed: B answered web {ok} times, {} failures; solo: {unreachable} answers 502 (slowest \
         {slowest:?}), then offline after {offline_after:?}",
        failed.len()
    );
    assert!(ok > 20, "the visitor kept being answered ({ok})");
    assert!(failed.is_empty(), "every request through B was answered while A died: {failed:?}");
    assert!(web.status().connected);
}

/// A drained edge (SIGTERM) withdraws its routes at once: its siblings stop forwarding to it
/// long before the routes would expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_edge_withdraws_its_routes_at_once() {
    // Routes live 30 s here: anything faster than that is the withdrawal, not expiry.
    let Some(Pair { dir: _dir, redis: _redis, a, b, ca, origin, port }) =
        Pair::start(["127.0.0.4", "127.0.0.5"], "30s").await
    else {
        return;
    };
    let solo = funnel("solo", &[&a], &ca, origin, port);
    solo.wait_registered(Duration::from_secs(10)).await.expect("solo registered");
    let (code, _) = visit(b.public, &ca, "solo.funnel.test").await.expect("answer");
    assert_eq!(code, StatusCode::OK, "forwarded to A");

    // SIGTERM: A withdraws its routes as it stops accepting, lets in-flight requests finish
    // (none here) and closes its tunnels.
    let EdgeProc { proc: mut a_proc, .. } = a;
    let pid = i32::try_from(a_proc.0.id()).expect("pid");
    let term = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("kill").success());
    let mut answers = Vec::new();
    let offline_after = loop {
        let r = visit(b.public, &ca, "solo.funnel.test").await;
        let code = r.as_ref().map(|(c, _)| *c).ok();
        answers.push(code);
        if code == Some(StatusCode::SERVICE_UNAVAILABLE) {
            break term.elapsed();
        }
        assert!(term.elapsed() < Duration::from_secs(10), "still routed to a drained edge: {answers:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = a_proc.0.wait();
    eprintln!("edge A drained: solo offline on B {offline_after:?} after SIGTERM; answers on the way: {answers:?}");
    // Bounded by A's grace period (1 s) and B's lookup cache (2 s), far below the route TTL.
    assert!(offline_after < Duration::from_secs(5), "{offline_after:?}");
    // On the way: forwarded 200s, or a 502 once A's link closed; never a hang.
    assert!(
        answers
            .iter()
            .all(|c| matches!(c, Some(StatusCode::OK | StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE))),
        "{answers:?}"
    );
}

/// `warren-edge ARGS` (with the cluster key in the environment): stdout, or stderr as the error.
fn edge_cli(args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_warren-edge"))
        .args(args)
        .env("WARREN_EDGE_CLUSTER_KEY", CLUSTER_KEY)
        .output()
        .expect("warren-edge runs");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn signed_funnel(name: &str, token: &str, edges: &[&EdgeProc], pair: &Pair) -> Funnel {
    Funnel::start(FunnelConfig { token: token.into(), ..funnel_config(name, edges, &pair.ca, pair.origin, pair.port) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_token_works_on_every_edge_until_it_is_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("signing.key");
    let key_arg = key.display().to_string();
    let public = edge_cli(&["token", "keygen", "--key-file", &key_arg]).expect("keygen");
    let other_key = dir.path().join("other.key");
    edge_cli(&["token", "keygen", "--key-file", &other_key.display().to_string()]).expect("keygen");
    assert!(edge_cli(&["token", "keygen", "--key-file", &key_arg]).is_err(), "a key is never overwritten");
    let extra =
        format!("[credentials]\npublic_keys = [\"{public}\"]\nmax_lifetime = \"30d\"\nrevocation_check = \"500ms\"\n");
    let Some(pair) = Pair::start_in(dir, ["127.0.0.6", "127.0.0.7"], "30s", &extra).await else { return };
    let config = pair.dir.path().join("edge-127.0.0.6.toml").display().to_string();
    let issue = |key: &str, names: &str, expires: &str| {
        edge_cli(&["--config", &config, "token", "issue", "--key-file", key, "--names", names, "--expires", expires])
    };
    let token = issue(&key_arg, "signed", "1d").expect("issued");
    assert!(token.starts_with("wt1."), "{token}");
    let too_long = issue(&key_arg, "signed", "60d").expect_err("over max_lifetime");
    assert!(too_long.contains("at most 30 days"), "{too_long}");
    // Its own name, so that the list below tells the two tokens apart.
    let foreign = issue(&other_key.display().to_string(), "signed2", "1d").expect("issued with another key");

    let (a, b) = (&pair.a, &pair.b);
    let node = signed_funnel("signed", &token, &[a, b], &pair);
    let start = Instant::now();
    while !node.status().edges.iter().all(|e| e.connected) {
        assert!(start.elapsed() < Duration::from_secs(10), "registered on both edges: {:?}", node.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for edge in [a, b] {
        assert_eq!(visit(edge.public, &pair.ca, "signed.funnel.test").await.expect("answer").0, StatusCode::OK);
    }
    let wrong_name = signed_funnel("other", &token, &[a], &pair);
    let e = wrong_name.wait_registered(Duration::from_secs(5)).await.expect_err("not its name");
    assert!(e.contains("not valid for this name"), "{e}");
    let untrusted = signed_funnel("signed2", &foreign, &[a], &pair);
    let e = untrusted.wait_registered(Duration::from_secs(5)).await.expect_err("another key");
    assert!(e.contains("not signed by a key this edge trusts"), "{e}");

    // A token that expires closes its tunnel then, and is refused after.
    let brief = signed_funnel("brief", &issue(&key_arg, "brief", "2s").expect("issued"), &[a], &pair);
    brief.wait_registered(Duration::from_secs(5)).await.expect("registered until it expires");
    let start = Instant::now();
    while brief.status().connected || !brief.status().last_error.unwrap_or_default().contains("expired") {
        assert!(start.elapsed() < Duration::from_secs(6), "closed and refused at expiry: {:?}", brief.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(brief);

    let listed = edge_cli(&["--config", &config, "token", "list", "--json"]).expect("list");
    let mine: serde_json::Value = listed
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|t| t["names"][0] == "signed")
        .expect("the token is listed");
    assert_eq!((mine["names"][0].as_str(), mine["revoked"].as_bool()), (Some("signed"), Some(false)));
    let id = mine["id"].as_str().expect("id").to_owned();

    edge_cli(&["--config", &config, "token", "revoke", &id]).expect("revoked");
    let revoked_at = Instant::now();
    while node.status().edges.iter().any(|e| e.connected) {
        assert!(revoked_at.elapsed() < Duration::from_secs(5), "both tunnels closed within 5 s: {:?}", node.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed_after = revoked_at.elapsed();
    for edge in [a, b] {
        let (code, _) = visit(edge.public, &pair.ca, "signed.funnel.test").await.expect("answer");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "no tunnel is left on either edge");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let again = node.status().last_error.unwrap_or_default();
    assert!(again.contains("revoked"), "its reconnections are refused: {again}");
    let listed = edge_cli(&["--config", &config, "token", "list"]).expect("list");
    assert!(listed.contains(&id) && listed.contains("revoked"), "{listed}");
    eprintln!("token revoked: both edges closed its tunnels after {closed_after:?}");
}
