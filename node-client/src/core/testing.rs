//! Test helpers for the core: region maps and a starting time.

use std::time::Instant;

use crate::regionmap::RegionMap;

/// A starting time; tests move it forward themselves.
pub(super) fn now() -> Instant {
    Instant::now()
}

/// A region map of `(region id, [DERP port of each relay])`, all on 127.0.0.1, each region with
/// a STUN server on port 3478 + id.
pub(super) fn map(regions: &[(u32, &[u16])]) -> RegionMap {
    let regions: serde_json::Map<String, serde_json::Value> = regions
        .iter()
        .map(|(id, ports)| {
            let nodes: Vec<serde_json::Value> = ports
                .iter()
                .map(|p| {
                    serde_json::json!({"Name": format!("{id}-{p}"), "HostName": "localhost", "IPv4": "127.0.0.1",
                        "DERPPort": p, "STUNPort": 3478 + id})
                })
                .collect();
            (id.to_string(), serde_json::json!({"RegionID": id, "RegionCode": format!("r{id}"), "Nodes": nodes}))
        })
        .collect();
    let json = serde_json::json!({ "Regions": regions }).to_string();
    RegionMap::parse(json.as_bytes()).unwrap_or_else(|e| panic!("test map: {e}"))
}
