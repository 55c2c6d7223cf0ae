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
    let mut file = FileConfig::parse(&toml).unwrap_or_else(|e| panic!("{e}"));
    // What the Deployment passes in: the pod IP, the Redis URL and the key from the Secret.
    let docs = warren_common::testing::yaml_documents(&path).unwrap_or_else(|e| panic!("{e}"));
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "warren-edge")
        .expect("the edge Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<&str> = container["env"].as_array().expect("env").iter().filter_map(|e| e["name"].as_str()).collect();
    for var in ["POD_IP", "WARREN_EDGE_CLUSTER_KEY", "WARREN_EDGE_REDIS_URL"] {
        assert!(env.contains(&var), "the edge gets {var}: {env:?}");
    }
    let args: Vec<&str> = container["args"].as_array().expect("args").iter().filter_map(|a| a.as_str()).collect();
    assert!(args.windows(2).any(|w| w == ["--advertise", "$(POD_IP):7443"]), "{args:?}");
    assert!(
        docs.iter().any(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "warren-edge-redis"),
        "the shared store ships too"
    );
    file.cluster.redis_url = Some("redis://:pw@warren-edge-redis:6379/0".into());
    file.cluster.advertise = Some("10.0.0.5:7443".into());
    file.cluster.key = Some(
        warren_common::testing::k8s_embedded(&path, "Secret", "warren-edge-cluster", "cluster-key")
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let c = Config::try_from(file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.public_listen.len(), 3);
    assert!(c.cluster.is_some(), "the shipped edges form a cluster");
}
