//! Access rules end to end on loopback: curl as the visitor (from 127.0.0.1 or 127.0.0.2), a
//! real edge and node agent, a real origin, and a real forward-auth endpoint.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warren::funnel::{Funnel, FunnelConfig};
use warren::services::{AccessSpec, ServiceSpec};
use warren_edge::config::{Config, FileConfig};
use warren_edge::Edge;

const TOKEN: &str = "access-test-token-0123";

struct Lab {
    edge: Edge,
    _dir: tempfile::TempDir,
}

async fn start_edge(access: &str) -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "funnel_domain = \"funnel.test\"\npublic_listen = [\"127.0.0.1:0\"]\ntunnel_listen = \"127.0.0.1:0\"\n\
         [admin]\nenabled = false\n[shutdown]\ngrace_period = \"200ms\"\n\
         [[tokens]]\ntoken = \"{TOKEN}\"\nnames = [\"web\"]\n{access}"
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

    /// The node "web" publishing `services`, once every edge enforces its rules.
    async fn publish(&self, services: Vec<ServiceSpec>) -> Funnel {
        let f = Funnel::start(FunnelConfig {
            edges: vec![self.edge.tunnel_addr().to_string()],
            edge_name: Some("localhost".into()),
            ca_file: self.edge.dev_ca_cert().map(Into::into),
            token: TOKEN.into(),
            name: "web".into(),
            services,
            transport: Default::default(),
            domains: Vec::new(),
        });
        f.wait_registered(Duration::from_secs(10)).await.expect("registered");
        let start = Instant::now();
        while f.status().edges.iter().any(|e| e.access_generation.is_none()) {
            assert!(start.elapsed() < Duration::from_secs(10), "the edge never took the rules");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f
    }

    /// curl from `from` (a loopback address): status, `WWW-Authenticate`/`Retry-After`
    /// headers, body.
    fn curl(&self, from: &str, path: &str, extra: &[&str]) -> (u16, String, String) {
        curl(self.edge.dev_ca_cert().expect("dev ca"), self.port(), from, path, extra)
    }

    fn refused(&self, reason: &str) -> u64 {
        self.edge.access_refused(reason)
    }
}

fn curl(ca: &Path, port: u16, from: &str, path: &str, extra: &[&str]) -> (u16, String, String) {
    let args = [&["--interface", from, "-D", "-"][..], extra].concat();
    let (code, out) = warren_common::testing::curl_https(ca, "web.funnel.test", port, path, &args);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let wanted = head
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("www-authenticate:") || l.starts_with("retry-after:") || l.starts_with("location:")
        })
        .collect::<Vec<_>>()
        .join("\n");
    (code, wanted, body.to_owned())
}

/// An origin that tells which user the edge named and what `remote-user` it saw.
async fn start_origin() -> SocketAddr {
    warren_common::testing::http_origin(|req: Request<Incoming>| async move {
        let h = |n: &str| req.headers().get_all(n).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
        let text = format!("ok {} user={} remote-user={}", req.uri().path(), h("x-warren-user"), h("remote-user"));
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(text))))
    })
    .await
}

fn service(port: u16, path: &str, origin: SocketAddr, access: Option<AccessSpec>) -> ServiceSpec {
    ServiceSpec { access, ..ServiceSpec::new(port, format!("http://{origin}")).at(path) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_networks_are_enforced_at_the_edge() {
    let lab = start_edge("").await;
    let origin = start_origin().await;
    let hash = bcrypt::hash("s3cret", 4).expect("hashes");
    let private = AccessSpec { basic: vec![format!("alice:{hash}")], ..AccessSpec::default() };
    let lan = AccessSpec { deny: vec!["127.0.0.2/32".into()], ..AccessSpec::default() };
    let p = lab.port();
    let _f = lab
        .publish(vec![
            service(p, "/", origin, None),
            service(p, "/private", origin, Some(private)),
            service(p, "/lan", origin, Some(lan)),
        ])
        .await;

    let (status, challenge, _) = lab.curl("127.0.0.1", "/private/x", &[]);
    assert_eq!(status, 401);
    assert!(challenge.contains("Basic realm=\"web.funnel.test\""), "{challenge}");
    assert_eq!(lab.curl("127.0.0.1", "/private/x", &["-u", "alice:wrong"]).0, 401);
    assert_eq!(lab.curl("127.0.0.1", "/private/x", &["-u", "mallory:s3cret"]).0, 401);
    assert_eq!(lab.curl("127.0.0.1", "/private/x", &["-H", "Authorization: Basic %%%"]).0, 401);
    let (status, _, body) = lab.curl("127.0.0.1", "/private/x", &["-u", "alice:s3cret", "-H", "X-Warren-User: root"]);
    assert_eq!((status, body.as_str()), (200, "ok /x user=alice remote-user="), "the edge names the user");
    assert_eq!((lab.refused("no_credentials"), lab.refused("bad_credentials")), (1, 3), "counted by reason");

    assert_eq!(lab.curl("127.0.0.1", "/lan", &[]).0, 200);
    assert_eq!(lab.curl("127.0.0.2", "/lan", &[]).0, 403, "the denied address");
    let spoofed = ["-H", "X-Forwarded-For: 127.0.0.1", "-H", "Forwarded: for=127.0.0.1"];
    assert_eq!(lab.curl("127.0.0.2", "/lan", &spoofed).0, 403, "forwarding headers are not believed");
    assert_eq!(lab.curl("127.0.0.2", "/", &[]).0, 200, "other services stay open to it");
    assert_eq!(lab.refused("ip_denied"), 2);
    lab.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_rate_answers_429_with_retry_after() {
    let lab = start_edge("").await;
    let origin = start_origin().await;
    let limited = AccessSpec { rate: Some(1), burst: Some(2), ..AccessSpec::default() };
    let _f = lab.publish(vec![service(lab.port(), "/", origin, Some(limited))]).await;
    let codes: Vec<u16> = (0..4).map(|_| lab.curl("127.0.0.1", "/", &[]).0).collect();
    assert_eq!(&codes[..2], [200, 200], "{codes:?}");
    assert!(codes[2..].contains(&429), "{codes:?}");
    let (status, retry, _) = lab.curl("127.0.0.1", "/", &[]);
    assert_eq!(status, 429);
    assert!(retry.to_ascii_lowercase().starts_with("retry-after: "), "{retry}");
    lab.edge.shutdown().await;
}

/// A forward-auth endpoint: `Bearer good` passes as user bob, anything else is sent to a
/// login page. `down` makes it answer garbage.
async fn start_auth(garbage: Arc<AtomicBool>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let garbage = garbage.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let answer = if garbage.load(Ordering::Relaxed) {
                    "this is not HTTP at all\r\n\r\n".to_owned()
                } else if head.contains("authorization: bearer good") && head.contains("x-forwarded-uri: /app") {
                    "HTTP/1.1 200 OK\r\nremote-user: bob\r\ncontent-length: 0\r\n\r\n".to_owned()
                } else {
                    "HTTP/1.1 302 Found\r\nlocation: https://login.test/\r\ncontent-length: 8\r\n\r\nlog in!\n"
                        .to_owned()
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_decides_and_fails_closed() {
    let garbage = Arc::new(AtomicBool::new(false));
    let (auth, auth_task) = start_auth(garbage.clone()).await;
    // An endpoint that accepts and never answers.
    let hang = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hang_addr = hang.local_addr().expect("addr");
    let lab = start_edge(&format!(
        "[[access.forward_auth]]\nname = \"sso\"\nurl = \"http://{auth}/verify\"\ncache = \"0s\"\ntimeout = \"500ms\"\n\
         copy_headers = [\"remote-user\"]\n\
         [[access.forward_auth]]\nname = \"stuck\"\nurl = \"http://{hang_addr}/\"\ntimeout = \"300ms\"\n"
    ))
    .await;
    let origin = start_origin().await;
    let sso = AccessSpec { forward_auth: Some("sso".into()), ..AccessSpec::default() };
    let stuck = AccessSpec { forward_auth: Some("stuck".into()), ..AccessSpec::default() };
    let missing = AccessSpec { forward_auth: Some("nope".into()), ..AccessSpec::default() };
    let p = lab.port();
    let f = lab
        .publish(vec![
            service(p, "/app", origin, Some(sso)),
            service(p, "/stuck", origin, Some(stuck)),
            service(p, "/missing", origin, Some(missing)),
        ])
        .await;
    let refused = f.status().access_refused;
    assert!(refused.iter().any(|r| r.contains("/missing") && r.contains("nope")), "{refused:?}");

    let good = ["-H", "Authorization: Bearer good", "-H", "Remote-User: mallory"];
    let (status, _, body) = lab.curl("127.0.0.1", "/app", &good);
    assert_eq!(
        (status, body.as_str()),
        (200, "ok / user= remote-user=bob"),
        "the endpoint's user replaces the visitor's"
    );
    let (status, location, body) = lab.curl("127.0.0.1", "/app", &["-H", "Authorization: Bearer bad"]);
    assert_eq!((status, body.as_str()), (302, "log in!\n"), "the endpoint's answer goes to the visitor");
    assert!(location.contains("https://login.test/"), "{location}");

    garbage.store(true, Ordering::Relaxed);
    assert_eq!(lab.curl("127.0.0.1", "/app", &good).0, 503, "a garbage answer refuses");
    auth_task.abort();
    let _ = auth_task.await;
    assert_eq!(lab.curl("127.0.0.1", "/app", &good).0, 503, "an endpoint that is down refuses");
    let began = Instant::now();
    assert_eq!(lab.curl("127.0.0.1", "/stuck", &[]).0, 503, "an endpoint that hangs refuses");
    assert!(began.elapsed() < Duration::from_secs(3), "within its timeout");
    assert_eq!(lab.curl("127.0.0.1", "/missing", &[]).0, 403, "a rule naming no endpoint closes its service");
    assert_eq!((lab.refused("forward_auth_unavailable"), lab.refused("forward_auth_denied")), (3, 1));
    assert_eq!(lab.refused("rule_refused"), 1);
    drop(hang);
    lab.edge.shutdown().await;
}
