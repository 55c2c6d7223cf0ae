//! Every node config shipped in deploy/ parses and validates.

use std::path::Path;

use warren::config::NodeFile;

#[test]
fn every_shipped_node_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/ exists") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !(name.starts_with("node") && name.ends_with(".toml")) {
            continue;
        }
        let file = NodeFile::load(&path).unwrap_or_else(|e| panic!("{e}"));
        file.check().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!file.services.is_empty(), "{} shows services", path.display());
        checked += 1;
    }
    assert!(checked >= 1, "expected shipped node configs in {}, found {checked}", dir.display());
}
