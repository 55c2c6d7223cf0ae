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
