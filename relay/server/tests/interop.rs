//! An independent DERP client (Python + PyNaCl, written from the protocol description, sharing
//! no code with Warren) against the real relay. Set `WARREN_REQUIRE_PYNACL=1` (CI does) to make
//! a missing python3/PyNaCl a failure instead of a skip.

mod common;

use std::process::Command;

use common::start_relay;

fn python_has_nacl() -> bool {
    Command::new("python3").args(["-c", "import nacl.public"]).output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_python_client_interoperates() {
    if !python_has_nacl() {
        if std::env::var_os("WARREN_REQUIRE_PYNACL").is_some_and(|v| v == "1") {
            panic!("python3 with PyNaCl is required (WARREN_REQUIRE_PYNACL=1)");
        }
        eprintln!("skipping: python3 with PyNaCl not available (pip install pynacl)");
        return;
    }
    let relay = start_relay(|_| {}).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/derp_client.py");
    let port = relay.server.http_addr().port().to_string();
    let ca = relay.ca();
    for mode in [&[][..], &["--fast-start"][..], &["--websocket"][..]] {
        let out = tokio::task::spawn_blocking({
            let (port, ca) = (port.clone(), ca.clone());
            move || Command::new("python3").arg(script).args(["--port", &port, "--ca"]).arg(&ca).args(mode).output()
        })
        .await
        .expect("join")
        .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.starts_with("OK"),
            "{mode:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    relay.server.shutdown().await;
}
