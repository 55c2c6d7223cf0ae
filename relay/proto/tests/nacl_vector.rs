//! The handshake's NaCl box checked against an independent implementation (PyNaCl/libsodium).
//!
//! The committed vector was produced by `vectors/nacl_box.py seal`. When python3 with PyNaCl is
//! present the script is also run live, in both directions; set `WARREN_REQUIRE_PYNACL=1` (CI
//! does) to make its absence a failure instead of a skip.

use std::process::Command;

use warren_relay_proto::handshake::{open, seal_with_nonce, ClientInfo};
use warren_relay_proto::{PublicKey, SecretKey};

const SEALED_HEX: &str = "404142434445464748494a4b4c4d4e4f50515253545556575ced510ea521fd8c93b5fb572cdc3b83c51736ebbff954bbcd71a150815a3b3a0d6425f015948ec55275cfc4f82af696";
const CLIENT_PUB_HEX: &str = "8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f";
const SERVER_PUB_HEX: &str = "358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254";
const MESSAGE: &[u8] = br#"{"version":2,"CanAckPings":true}"#;

fn keys() -> (SecretKey, SecretKey, [u8; 24]) {
    let mut c = [0u8; 32];
    let mut s = [0u8; 32];
    let mut n = [0u8; 24];
    for i in 0..32 {
        c[i] = i as u8;
        s[i] = 32 + i as u8;
    }
    for (i, b) in n.iter_mut().enumerate() {
        *b = 64 + i as u8;
    }
    (SecretKey::from_bytes(c), SecretKey::from_bytes(s), n)
}

#[test]
fn committed_vector_matches() {
    let (client, server, nonce) = keys();
    assert_eq!(client.public_key().to_hex(), CLIENT_PUB_HEX);
    assert_eq!(server.public_key().to_hex(), SERVER_PUB_HEX);
    let sealed = seal_with_nonce(&client, &server.public_key(), &nonce, MESSAGE);
    assert_eq!(hex::encode(&sealed), SEALED_HEX);
    let info = ClientInfo::open(&server, &client.public_key(), &sealed).expect("opens");
    assert_eq!(info.version, 2);
    assert!(info.can_ack_pings);
}

fn python(args: &[&str]) -> Option<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/nacl_box.py");
    let out = Command::new("python3").arg(script).args(args).output().ok()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No module named 'nacl'") {
            return None;
        }
        panic!("nacl_box.py {args:?} failed: {stderr}");
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_or_skip(what: &str) {
    if std::env::var_os("WARREN_REQUIRE_PYNACL").is_some_and(|v| v == "1") {
        panic!("{what}: python3 with PyNaCl is required (WARREN_REQUIRE_PYNACL=1)");
    }
    eprintln!("skipping live PyNaCl check: {what} (pip install pynacl)");
}

#[test]
fn live_pynacl_agrees_both_ways() {
    let Some(out) = python(&["seal"]) else {
        return require_or_skip("python3/PyNaCl not available");
    };
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(SEALED_HEX), "PyNaCl's box differs from ours");
    assert_eq!(lines.next(), Some(CLIENT_PUB_HEX));
    assert_eq!(lines.next(), Some(SERVER_PUB_HEX));

    // Server -> client direction: we seal with a fresh nonce, PyNaCl opens.
    let (client, server, _) = keys();
    let server_info = br#"{"version":2}"#;
    let sealed = seal_with_nonce(&server, &client.public_key(), &[9; 24], server_info);
    let opened = python(&["open", &hex::encode(&sealed)]).expect("python ran once already");
    assert_eq!(opened.trim_end().as_bytes(), server_info);
    // And we refuse what PyNaCl would refuse: a flipped bit.
    let mut bad = sealed.to_vec();
    bad[30] ^= 0x40;
    assert!(open(&client, &server.public_key(), &bad).is_err());
    let _ = PublicKey::from_hex(SERVER_PUB_HEX).expect("hex");
}
