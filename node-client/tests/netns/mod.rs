//! What the network-namespace labs (`natlab.rs`, `proxylab.rs`) share: namespaces, veth links
//! and child processes that belong to one test and are removed by a drop guard (also when the
//! test fails), the workspace's binaries, and the node's control socket.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs a command; panics with its stderr when it fails.
pub(crate) fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Whether the lab can run: root, iproute2, iptables and the `extra` tools (each checked by
/// running it with `-v`). Without them the lab skips, unless `WARREN_REQUIRE_NETNS=1` (CI sets
/// it) makes that a failure.
pub(crate) fn available(lab: &str, extra: &[&str]) -> bool {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["ip", "iptables"].iter().all(|t| Command::new(t).arg("-V").output().is_ok_and(|o| o.status.success()))
        && extra.iter().all(|t| Command::new(t).arg("-v").output().is_ok());
    let needs = ["root", "iproute2", "iptables"].iter().chain(extra).copied().collect::<Vec<_>>().join(", ");
    if root && tools {
        return true;
    }
    if std::env::var_os("WARREN_REQUIRE_NETNS").is_some_and(|v| v == "1") {
        panic!("the {lab} needs {needs} (WARREN_REQUIRE_NETNS=1)");
    }
    eprintln!("skipping the {lab}: needs {needs}");
    false
}

/// A binary of the workspace (they live next to this package's own).
pub(crate) fn bin(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_warren")).with_file_name(name);
    assert!(path.exists(), "{} not built: run `cargo build --workspace --bins` first", path.display());
    path
}

/// Waits until `ok`, at most `limit` (then panics with `msg`); returns the time it took.
pub(crate) fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool, msg: impl Fn() -> String) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{}", msg());
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// One request on a node's control socket (`Null` when it does not answer).
pub(crate) fn control(sock: &Path, req: Value) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(warren::control::request(sock, &req)).unwrap_or(Value::Null)
}

/// Namespaces named `<prefix><name>`, the processes started in them and a directory for
/// their files, all removed when dropped.
pub(crate) struct Netns {
    ns: Vec<String>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
    prefix: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.ns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Netns {
    /// Creates namespaces `names` (loopback up), prefixed with `tag`, the process id and a
    /// counter so that labs running at once never meet.
    pub(crate) fn new(tag: &str, names: &[&str]) -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!("{tag}{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed));
        let mut net =
            Netns { ns: Vec::new(), children: Vec::new(), dir: tempfile::tempdir().expect("tempdir"), prefix };
        for n in names {
            let name = net.name(n);
            run(&["ip", "netns", "add", &name]);
            net.ns.push(name);
            net.ip(n, &["link", "set", "dev", "lo", "up"]);
        }
        net
    }

    /// The full name of namespace `n`.
    pub(crate) fn name(&self, n: &str) -> String {
        format!("{}{n}", self.prefix)
    }

    /// `ip -n <ns> args…`, which must succeed.
    pub(crate) fn ip(&self, ns: &str, args: &[&str]) {
        let name = self.name(ns);
        let mut v = vec!["ip", "-n", &name];
        v.extend_from_slice(args);
        run(&v);
    }

    /// Runs `args` in namespace `ns`; it must succeed.
    pub(crate) fn exec(&self, ns: &str, args: &[&str]) {
        let out = self.output(ns, args);
        assert!(out.status.success(), "{args:?} in {ns} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Runs `args` in namespace `ns` and returns what it did.
    pub(crate) fn output(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.name(ns)]).args(args).output().expect("ip netns exec")
    }

    /// A veth pair: `if1` with `addr1` in `ns1`, `if2` with `addr2` in `ns2`, both up.
    pub(crate) fn link(&self, ns1: &str, if1: &str, addr1: &str, ns2: &str, if2: &str, addr2: &str) {
        let (n1, n2) = (self.name(ns1), self.name(ns2));
        run(&["ip", "link", "add", "name", if1, "netns", &n1, "type", "veth", "peer", "name", if2, "netns", &n2]);
        self.ip(ns1, &["addr", "add", addr1, "dev", if1]);
        self.ip(ns2, &["addr", "add", addr2, "dev", if2]);
        self.ip(ns1, &["link", "set", "dev", if1, "up"]);
        self.ip(ns2, &["link", "set", "dev", if2, "up"]);
    }

    /// Starts `args` in namespace `ns` with its stderr in the file `log` (debug logs on, no
    /// proxy from the environment), killed when the lab is dropped.
    pub(crate) fn spawn(&mut self, ns: &str, log: &str, args: &[&str]) {
        let log = std::fs::File::create(self.path(log)).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name(ns)])
            .args(args)
            .env("RUST_LOG", "info,warren=debug")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        self.children.push(child);
    }

    /// A file in the lab's directory.
    pub(crate) fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// The text of a file in the lab's directory (empty when missing).
    pub(crate) fn log(&self, f: &str) -> String {
        std::fs::read_to_string(self.path(f)).unwrap_or_default()
    }
}
