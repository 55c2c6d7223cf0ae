//! Every relay config shipped in deploy/ parses and validates.

use std::path::Path;

use warren_relay::config::{Config, FileConfig};

#[test]
fn every_shipped_relay_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/ exists") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !(name.starts_with("relay") && name.ends_with(".toml")) {
            continue;
        }
        let file = FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        Config::try_from(file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        checked += 1;
    }
    assert!(checked >= 2, "expected the shipped relay configs in {}, found {checked}", dir.display());
}

#[test]
fn the_kubernetes_relay_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/relay.yaml");
    let toml = warren_common::testing::k8s_embedded(&path, "ConfigMap", "warren-relay", "relay.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut file = FileConfig::parse(&toml).unwrap_or_else(|e| panic!("{e}"));
    // The mesh key reaches the pods from the Secret, as WARREN_MESH_KEY.
    file.mesh.key = Some(
        warren_common::testing::k8s_embedded(&path, "Secret", "warren-relay-mesh", "mesh-key")
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let config = Config::try_from(file).unwrap_or_else(|e| panic!("{e}"));
    let mesh = config.mesh.expect("the region's relays mesh");
    assert_eq!(mesh.dns, Some(("warren-relay-peers".into(), 443)));
}
