//! Helpers shared by the edge's integration tests: child processes, Debian's `redis-server`
//! and `pebble` started on free loopback ports.
#![allow(dead_code)]

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warren_common::testing::{free_tcp_port, free_udp_port};

/// A child process killed when the test ends however it ends.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn plain_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    std::io::Write::write_all(&mut tcp, req.as_bytes()).ok()?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A throwaway Redis server on a free loopback port, no persistence; `None` (the test skips)
/// when `redis-server` is missing, unless `WARREN_REQUIRE_REDIS` is set (CI sets it).
pub(crate) fn start_redis(dir: &Path) -> Option<(Proc, String)> {
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(std::env::var_os("WARREN_REQUIRE_REDIS").is_none(), "redis-server is required but missing");
        eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
        return None;
    }
    Some(retry_on_fresh_ports("redis-server", || {
        let port = free_tcp_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(std::fs::File::create(dir.join("redis.log")).expect("redis log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test.sh installs Debian's redis-server)");
        let mut proc = Proc(child);
        let start = Instant::now();
        loop {
            if let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let mut buf = [0u8; 7];
                if std::io::Write::write_all(&mut tcp, b"PING\r\n").is_ok()
                    && tcp.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return Ok((proc, format!("redis://127.0.0.1:{port}/")));
                }
            }
            if proc.0.try_wait().ok().flatten().is_some() || start.elapsed() > Duration::from_secs(20) {
                drop(proc);
                let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
                return Err(format!("redis-server on port {port} did not answer PING:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }))
}

/// Runs `start` up to three times. A server given ports that were free a moment earlier can
/// lose one of them to another test's socket; a fresh attempt picks new ports. The last
/// failure, with the server's own log, fails the test.
pub(crate) fn retry_on_fresh_ports<T>(what: &str, mut start: impl FnMut() -> Result<T, String>) -> T {
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

pub(crate) fn pebble_available() -> bool {
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

pub(crate) struct Pebble {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    pub(crate) directory: String,
    mgmt: u16,
    pub(crate) challtest_mgmt: u16,
    /// challtestsrv's DNS port (UDP).
    pub(crate) dns: u16,
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
    pub(crate) fn start(http_port: u16, tls_port: u16) -> Pebble {
        retry_on_fresh_ports("pebble", || Pebble::try_start(http_port, tls_port))
    }

    fn try_start(http_port: u16, tls_port: u16) -> Result<Pebble, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = warren_common::tls::DevCa::open_or_create(dir.path()).expect("ca for pebble's own listener");
        let (cert, key) = ca.issue_pem(&["localhost".into(), "127.0.0.1".into()]).expect("issue");
        std::fs::write(dir.path().join("pebble.crt"), cert).expect("write");
        std::fs::write(dir.path().join("pebble.key"), key).expect("write");
        let (listen, mgmt, dns, challtest_mgmt) = (free_tcp_port(), free_tcp_port(), free_udp_port(), free_tcp_port());
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

    pub(crate) fn listener_ca(&self) -> PathBuf {
        self.dir.path().join("dev-ca.pem")
    }

    /// Pebble's issuing root (regenerated at every start), written to a file.
    pub(crate) async fn root(&self) -> PathBuf {
        let url = format!("https://127.0.0.1:{}/roots/0", self.mgmt);
        let pem = warren::fetch::get(&url, Some(&self.listener_ca()), 1 << 20).await.expect("pebble root");
        let path = self.dir.path().join("root.pem");
        std::fs::write(&path, pem).expect("write root");
        path
    }

    /// Publishes (`Some`) or removes (`None`) the TXT record of `host` in challtestsrv's DNS.
    pub(crate) fn set_txt(&self, host: &str, value: Option<&str>) {
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

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}
