//! Every edge config shipped in deploy/ parses and validates.

use std::path::Path;

use warren_edge::config::{Config, FileConfig};

#[test]
fn every_shipped_edge_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/ exists") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !(name.starts_with("edge") && name.ends_with(".toml")) {
            continue;
        }
        let file = FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        Config::try_from(file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        checked += 1;
    }
    assert!(checked >= 1, "expected shipped edge configs in {}, found {checked}", dir.display());
}

#[test]
fn the_kubernetes_edge_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s/edge.yaml");
    let toml = warren_common::testing::k8s_embedded(&path, "Secret", "warren-edge-config", "edge.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    let c =
        Config::try_from(FileConfig::parse(&toml).unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.public_listen.len(), 3);
}
