//! The region map: which relays exist, grouped by region, in the spirit of Tailscale's DERP map.
//!
//! ```json
//! {"Regions": {"1": {"RegionID": 1, "RegionCode": "fra", "RegionName": "Frankfurt",
//!   "Nodes": [{"Name": "1a", "HostName": "relay1.example.com", "IPv4": "192.0.2.10",
//!              "DERPPort": 443, "STUNPort": 3478}]}}}
//! ```
//!
//! `DERPPort` 0 or absent means 443; `STUNPort` 0 or absent means 3478, -1 disables STUN.
//! `"STUNOnly": true` marks a node that only answers STUN: it helps endpoint discovery (a second
//! STUN server tells whether the NAT's mapping varies by destination) but is never a home.
//! `"Avoid": true` on a region (as in Tailscale's DERP map) keeps nodes from choosing it as home
//! unless every region is avoided; nodes still dial it to reach peers homed there.
//! `IPv4`/`IPv6`, when present, are dialled instead of resolving `HostName` (which still
//! names the TLS certificate).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

/// Largest region map file accepted.
const MAX_MAP_BYTES: u64 = 1 << 20;

/// Why a region map was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionMapError {
    /// Unreadable file.
    #[error("region map {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid JSON for the schema.
    #[error("region map: {0}")]
    Json(#[from] serde_json::Error),
    /// Valid JSON, unusable content.
    #[error("region map: {0}")]
    Invalid(String),
}

/// All regions.
#[derive(Debug, Clone, Deserialize)]
pub struct RegionMap {
    /// Regions by id (the JSON keys are decimal ids).
    #[serde(rename = "Regions")]
    pub regions: BTreeMap<String, Region>,
}

/// One region: relays that mesh with each other.
#[derive(Debug, Clone, Deserialize)]
pub struct Region {
    /// Numeric id.
    #[serde(rename = "RegionID")]
    pub region_id: u32,
    /// Short code, e.g. "fra".
    #[serde(rename = "RegionCode", default)]
    pub region_code: String,
    /// Human name.
    #[serde(rename = "RegionName", default)]
    pub region_name: String,
    /// Not to be chosen as home (peers homed here are still reached).
    #[serde(rename = "Avoid", default)]
    pub avoid: bool,
    /// The region's relays, preferred first.
    #[serde(rename = "Nodes")]
    pub nodes: Vec<RelayNode>,
}

/// One relay.
#[derive(Debug, Clone, Deserialize)]
pub struct RelayNode {
    /// Unique name.
    #[serde(rename = "Name", default)]
    pub name: String,
    /// DNS name (and TLS server name).
    #[serde(rename = "HostName")]
    pub host_name: String,
    /// IPv4 address to dial instead of resolving the host name.
    #[serde(rename = "IPv4", default)]
    pub ipv4: Option<IpAddr>,
    /// IPv6 address to dial instead of resolving the host name.
    #[serde(rename = "IPv6", default)]
    pub ipv6: Option<IpAddr>,
    /// DERP (HTTPS) port; 0 means 443.
    #[serde(rename = "DERPPort", default)]
    pub derp_port: u16,
    /// STUN port; 0 means 3478, -1 disables.
    #[serde(rename = "STUNPort", default)]
    pub stun_port: i32,
    /// Only a STUN server (no DERP): used for endpoint discovery, never as home relay.
    #[serde(rename = "STUNOnly", default)]
    pub stun_only: bool,
}

impl RelayNode {
    /// The DERP (HTTPS) port: `DERPPort`, 443 when 0 or absent.
    pub fn derp_port(&self) -> u16 {
        if self.derp_port == 0 {
            443
        } else {
            self.derp_port
        }
    }

    /// The DERP URL.
    pub fn url(&self) -> String {
        let port = self.derp_port();
        if self.host_name.contains(':') {
            format!("https://[{}]:{port}", self.host_name)
        } else {
            format!("https://{}:{port}", self.host_name)
        }
    }

    /// The address to dial for DERP, if given as an IP.
    pub fn derp_addr(&self) -> Option<SocketAddr> {
        self.ipv4.or(self.ipv6).map(|ip| SocketAddr::new(ip, self.derp_port()))
    }

    /// The STUN port, if enabled.
    pub fn stun_port(&self) -> Option<u16> {
        match self.stun_port {
            0 => Some(3478),
            p => u16::try_from(p).ok(),
        }
    }
}

impl RegionMap {
    /// Reads a map from a JSON file.
    ///
    /// # Errors
    /// [`RegionMapError`] for unreadable, oversized or invalid files.
    pub fn load(path: &Path) -> Result<Self, RegionMapError> {
        let io = |source| RegionMapError::Io { path: path.display().to_string(), source };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_MAP_BYTES {
            return Err(RegionMapError::Invalid(format!("{} is larger than 1 MiB", path.display())));
        }
        Self::parse(&std::fs::read(path).map_err(io)?)
    }

    /// Reads a map from a file path or an `http(s)://` URL (`ca_file` adds a CA to trust).
    ///
    /// # Errors
    /// [`RegionMapError`] for unreachable, oversized or invalid maps.
    pub async fn load_from(source: &str, ca_file: Option<&Path>) -> Result<Self, RegionMapError> {
        if source.starts_with("https://") || source.starts_with("http://") {
            let body = crate::fetch::get(source, ca_file, MAX_MAP_BYTES as usize)
                .await
                .map_err(|e| RegionMapError::Invalid(format!("fetching {source}: {e}")))?;
            return Self::parse(&body);
        }
        Self::load(Path::new(source))
    }

    /// Parses and checks a map.
    ///
    /// # Errors
    /// [`RegionMapError`] if it is not valid or has no usable relay.
    pub fn parse(json: &[u8]) -> Result<Self, RegionMapError> {
        let map: RegionMap = serde_json::from_slice(json)?;
        if map.regions.is_empty() {
            return Err(RegionMapError::Invalid("no regions".into()));
        }
        for (id, r) in &map.regions {
            if id.parse::<u32>().ok() != Some(r.region_id) {
                return Err(RegionMapError::Invalid(format!(
                    "region key {id:?} differs from its RegionID {}",
                    r.region_id
                )));
            }
            if r.nodes.is_empty() {
                return Err(RegionMapError::Invalid(format!("region {id} has no nodes")));
            }
            if let Some(n) = r.nodes.iter().find(|n| n.host_name.is_empty() || n.stun_port < -1 || n.stun_port > 65535)
            {
                return Err(RegionMapError::Invalid(format!(
                    "region {id}: node {:?} needs a HostName and a valid STUNPort",
                    n.name
                )));
            }
        }
        Ok(map)
    }

    /// Regions in id order.
    pub fn regions(&self) -> impl Iterator<Item = &Region> {
        self.regions.values()
    }

    /// Regions with at least one relay (not STUN-only), in id order.
    pub fn relay_regions(&self) -> impl Iterator<Item = &Region> {
        self.regions().filter(|r| RegionMap::derp_node(r).is_some())
    }

    /// The first node of a region that serves DERP, if any.
    pub fn derp_node(region: &Region) -> Option<&RelayNode> {
        region.nodes.iter().find(|n| !n.stun_only)
    }

    /// The nodes of a region that serve DERP, in map order (siblings of one meshed region).
    pub fn derp_nodes(region: &Region) -> impl Iterator<Item = &RelayNode> {
        region.nodes.iter().filter(|n| !n.stun_only)
    }

    /// The region with this id.
    pub fn region(&self, id: u32) -> Option<&Region> {
        self.regions.values().find(|r| r.region_id == id)
    }

    /// The region a user named, by id (`2`) or code (`ams`, any case).
    ///
    /// # Errors
    /// [`UnknownRegion`] naming the regions there are.
    pub fn resolve(&self, name: &str) -> Result<u32, UnknownRegion> {
        let name = name.trim();
        let by_id = name.parse::<u32>().ok().and_then(|id| self.region(id));
        let by_code = || self.regions().find(|r| !r.region_code.is_empty() && r.region_code.eq_ignore_ascii_case(name));
        match by_id.or_else(by_code) {
            Some(r) if RegionMap::derp_node(r).is_some() => Ok(r.region_id),
            _ => Err(UnknownRegion {
                name: name.to_owned(),
                known: self
                    .relay_regions()
                    .map(|r| {
                        if r.region_code.is_empty() {
                            r.region_id.to_string()
                        } else {
                            format!("{} ({})", r.region_id, r.region_code)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// A region name ([`RegionMap::resolve`]) that is not in the map, or has no relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("region {name:?} is not in the region map (regions with relays: {known})")]
pub struct UnknownRegion {
    /// What was asked for.
    pub name: String,
    /// The regions there are, for the message.
    pub known: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape() {
        let m = RegionMap::parse(
            br#"{"Regions":{"1":{"RegionID":1,"RegionCode":"lab","Nodes":[
            {"Name":"1a","HostName":"relay.lab","IPv4":"10.99.0.1","DERPPort":8443,"STUNPort":3478}]},
            "2":{"RegionID":2,"Nodes":[{"HostName":"r2","STUNPort":-1}]},
            "3":{"RegionID":3,"Nodes":[{"HostName":"s3","STUNOnly":true}]}}}"#,
        )
        .expect("valid");
        let r1 = m.region(1).expect("region 1");
        assert_eq!(r1.nodes[0].url(), "https://relay.lab:8443");
        assert_eq!(r1.nodes[0].derp_addr(), Some("10.99.0.1:8443".parse().expect("addr")));
        assert_eq!(m.region(2).expect("r2").nodes[0].stun_port(), None);
        assert_eq!(m.region(2).expect("r2").nodes[0].url(), "https://r2:443");
        assert!(RegionMap::derp_node(m.region(3).expect("r3")).is_none());
        assert_eq!(m.region(3).expect("r3").nodes[0].stun_port(), Some(3478));
    }

    #[test]
    fn regions_resolve_by_id_or_code_and_unknown_ones_are_named() {
        let m = RegionMap::parse(
            br#"{"Regions":{"1":{"RegionID":1,"RegionCode":"fra","Nodes":[{"HostName":"a"}]},
            "2":{"RegionID":2,"RegionCode":"ams","Avoid":true,"Nodes":[{"HostName":"b"}]},
            "3":{"RegionID":3,"Nodes":[{"HostName":"s","STUNOnly":true}]}}}"#,
        )
        .expect("valid");
        assert_eq!(m.resolve("2"), Ok(2));
        assert_eq!(m.resolve("AMS"), Ok(2));
        assert!(m.region(2).expect("r2").avoid && !m.region(1).expect("r1").avoid);
        let e = m.resolve("9").expect_err("no region 9");
        assert_eq!(e.to_string(), "region \"9\" is not in the region map (regions with relays: 1 (fra), 2 (ams))");
        assert!(m.resolve("3").is_err(), "a STUN-only region carries no packets");
        assert!(m.resolve("").is_err());
    }

    #[test]
    fn refuses_unusable_maps() {
        for bad in [
            &br#"{"Regions":{}}"#[..],
            br#"{"Regions":{"1":{"RegionID":2,"Nodes":[{"HostName":"x"}]}}}"#,
            br#"{"Regions":{"1":{"RegionID":1,"Nodes":[]}}}"#,
            br#"{"Regions":{"1":{"RegionID":1,"Nodes":[{"HostName":""}]}}}"#,
            br#"{"Regions":{"1":{"RegionID":1,"Nodes":[{"HostName":"x","STUNPort":70000}]}}}"#,
            b"not json",
        ] {
            assert!(RegionMap::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
