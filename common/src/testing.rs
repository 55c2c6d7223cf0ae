//! Helpers for the project's own tests (not a stable API).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Every file below `dir`, recursively, sorted.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The YAML documents of a file as JSON values, parsed by PyYAML (`yaml.safe_load_all`).
///
/// # Errors
/// A message when python3/PyYAML is missing or the YAML does not parse.
pub fn yaml_documents(path: &Path) -> Result<Vec<serde_json::Value>, String> {
    let script = "import json, sys, yaml\nprint(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))";
    let out = Command::new("python3").args(["-c", script]).arg(path).output().map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(format!("{}: {}", path.display(), String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The string `data.<key>` or `stringData.<key>` of the Kubernetes object `kind`/`name` in a
/// manifest file.
///
/// # Errors
/// A message when the object or key is missing.
pub fn k8s_embedded(path: &Path, kind: &str, name: &str, key: &str) -> Result<String, String> {
    let docs = yaml_documents(path)?;
    let obj = docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .ok_or_else(|| format!("no {kind}/{name} in {}", path.display()))?;
    obj["data"][key]
        .as_str()
        .or_else(|| obj["stringData"][key].as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{kind}/{name} has no {key}"))
}

/// A loopback TCP port that was free a moment ago (for servers that must know each other's
/// ports before they start).
///
/// # Panics
/// If no port can be bound.
pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

/// As [`free_tcp_port`], for UDP.
///
/// # Panics
/// If no port can be bound.
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a loopback port");
    s.local_addr().expect("local address").port()
}

/// `n` pseudo-random bytes from a xorshift generator seeded (and advanced) by `seed`: the same
/// hostile input on every run.
pub fn noise(seed: &mut u64, n: usize) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

pub use crate::ws_echo::upgrade as ws_echo_upgrade;

/// Serves HTTP/1.1 (with upgrades) on a fresh loopback port with `handler`, one task per
/// connection, for as long as the test runs; returns the address (a test origin).
pub async fn http_origin<F, Fut, B>(handler: F) -> std::net::SocketAddr
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<hyper::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a test origin");
    let addr = l.local_addr().expect("origin address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let svc = hyper::service::service_fn(handler.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Calls `f` every 100 ms until it returns a value, for at most `limit`.
///
/// # Panics
/// When `limit` passes first, naming `what` was awaited.
pub fn until<T>(limit: std::time::Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `curl` as a visitor of `https://{host}:{port}{path}` on loopback, trusting only `ca`, with
/// `extra` arguments: the HTTP status (0 when the connection or TLS failed) and what curl
/// printed (the body, after the head when `extra` asks for it with `-D -`).
///
/// # Panics
/// When curl cannot be run.
pub fn curl_https(ca: &Path, host: &str, port: u16, path: &str, extra: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--path-as-is", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1"), "-w", "\n%{http_code}"])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("curl runs (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Runs `start` up to three times. A server given ports that were free a moment earlier can
/// lose one of them to another test's socket; a fresh attempt picks new ports. The last
/// failure, with the server's own log, fails the test.
pub fn retry_on_fresh_ports<T>(what: &str, mut start: impl FnMut() -> Result<T, String>) -> T {
    let mut last = String::new();
    for attempt in 1..=3 {
        match start() {
            Ok(v) => return v,
            Err(e) => {
                eprintln!("{what} did not start (attempt {attempt} of 3): {e}");
                last = e;
            }
        }
    }
    panic!("{what} did not start: {last}");
}

pub fn pebble_available() -> bool {
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

/// Debian's pebble test CA with its challtestsrv (DNS) on free loopback ports; both are killed
/// when this is dropped.
#[derive(Debug)]
pub struct Pebble {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    pub directory: String,
    mgmt: u16,
    pub challtest_mgmt: u16,
    /// challtestsrv's DNS port (UDP).
    pub dns: u16,
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
    pub fn start(http_port: u16, tls_port: u16) -> Pebble {
        Pebble::start_with_validity(http_port, tls_port, None)
    }

    /// As [`Pebble::start`], issuing certificates valid for `validity` (pebble's own default is
    /// five years), e.g. a few seconds to watch renewals.
    pub fn start_with_validity(http_port: u16, tls_port: u16, validity: Option<Duration>) -> Pebble {
        retry_on_fresh_ports("pebble", || Pebble::try_start(http_port, tls_port, validity))
    }

    fn try_start(http_port: u16, tls_port: u16, validity: Option<Duration>) -> Result<Pebble, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::tls::DevCa::open_or_create(dir.path()).expect("ca for pebble's own listener");
        let (cert, key) = ca.issue_pem(&["localhost".into(), "127.0.0.1".into()]).expect("issue");
        std::fs::write(dir.path().join("pebble.crt"), cert).expect("write");
        std::fs::write(dir.path().join("pebble.key"), key).expect("write");
        let (listen, mgmt, dns, challtest_mgmt) = (free_tcp_port(), free_tcp_port(), free_udp_port(), free_tcp_port());
        let mut config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": dir.path().join("pebble.crt"),
            "privateKey": dir.path().join("pebble.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(v) = validity {
            config["pebble"]["certificateValidityPeriod"] = v.as_secs().into();
        }
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
                .stdout(log("challtestsrv.out"))
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
                .stderr(log("pebble.err"))
                .spawn()
                .expect("pebble"),
        );
        let mut p =
            Pebble { children, dir, directory: format!("https://127.0.0.1:{listen}/dir"), mgmt, challtest_mgmt, dns };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", challtest_mgmt)).is_err()
        {
            let exited = p.children.iter_mut().any(|c| c.try_wait().ok().flatten().is_some());
            if exited || start.elapsed() > Duration::from_secs(20) {
                let read = |n: &str| std::fs::read_to_string(p.dir.path().join(n)).unwrap_or_default();
                let why = if exited { "a process exited" } else { "no listener within 20 s" };
                return Err(format!(
                    "{why}\n--- pebble\n{}{}\n--- challtestsrv\n{}{}",
                    read("pebble.log"),
                    read("pebble.err"),
                    read("challtestsrv.out"),
                    read("challtestsrv.log")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }

    pub fn listener_ca(&self) -> PathBuf {
        self.dir.path().join("dev-ca.pem")
    }

    /// Pebble's issuing root (regenerated at every start), written to a file.
    pub fn root(&self) -> PathBuf {
        let url = format!("https://127.0.0.1:{}/roots/0", self.mgmt);
        let out = Command::new("curl")
            .args(["-sS", "-f", "--cacert"])
            .arg(self.listener_ca())
            .arg(&url)
            .output()
            .expect("curl");
        assert!(out.status.success(), "pebble root: {}", String::from_utf8_lossy(&out.stderr));
        let path = self.dir.path().join("root.pem");
        std::fs::write(&path, out.stdout).expect("write root");
        path
    }

    /// Publishes (`Some`) or removes (`None`) the TXT record of `host` in challtestsrv's DNS.
    pub fn set_txt(&self, host: &str, value: Option<&str>) {
        let (path, body) = match value {
            Some(v) => ("set-txt", serde_json::json!({"host": format!("{host}."), "value": v})),
            None => ("clear-txt", serde_json::json!({"host": format!("{host}.")})),
        };
        let out = Command::new("curl")
            .args(["-sS", "-f", "-X", "POST", "-d", &body.to_string()])
            .arg(format!("http://127.0.0.1:{}/{path}", self.challtest_mgmt))
            .output()
            .expect("curl");
        assert!(out.status.success(), "challtestsrv {path}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}
