//! Helpers shared by the edge's integration tests: child processes, Debian's `redis-server`
//! and `pebble` started on free loopback ports.
#![allow(dead_code)]

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warren_common::testing::free_tcp_port;
#[allow(unused_imports)] // each test binary uses its own part
pub(crate) use warren_common::testing::{pebble_available, retry_on_fresh_ports, Pebble};

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
