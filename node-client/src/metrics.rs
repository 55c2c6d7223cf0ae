//! Node metrics, described once. The `service` label is the service's id (`443/api` or the
//! name given to it): a set the node's own user defines and keeps small; `edge` is the edge's
//! index in the node's configuration. No visitor address or host name is ever a label.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

use crate::node::Status;

/// Describes every metric.
pub fn describe() {
    describe_counter!("node_funnel_requests_total", "Funnel requests answered, by service and status class.");
    describe_counter!("node_funnel_response_bytes_total", Unit::Bytes, "Response body bytes sent, by service.");
    describe_histogram!(
        "node_funnel_request_duration_seconds",
        Unit::Seconds,
        "From a request's arrival to the end of its response."
    );
    describe_gauge!("node_funnel_edges_connected", "Edges the node is registered on.");
    describe_gauge!("node_funnel_edges_tcp", "Edges the node is registered on over the TCP tunnel (UDP blocked).");
    describe_gauge!("node_funnel_tunnel_rtt_seconds", Unit::Seconds, "Round-trip time of the tunnel, by edge.");
    describe_gauge!("node_funnel_services", "Services published.");
    describe_gauge!("node_relay_connected", "1 while the home relay connection is up.");
    describe_gauge!("node_peers", "Peers known to the node.");
    describe_gauge!("node_peers_direct", "Peers reached over a direct path.");
    describe_gauge!("node_region_links", "Open links to relays of other regions (peers homed there).");
    describe_gauge!("node_lookup_dropped", "Packets held for a peer lookup that found no region (since start).");
    describe_gauge!(
        "node_packets_resent",
        "Data packets resent over another path because their direct path was given up unconfirmed (since start)."
    );
    describe_gauge!(
        "node_packets_unprotected",
        "Data packets sent directly while too much was held to keep them for a resend (since start)."
    );
    describe_gauge!("node_packets_duplicate", "Data packets received twice; the copies were dropped (since start).");
}

/// Counts one answered request.
pub(crate) fn request(service: &str, status: u16, bytes: u64, seconds: f64) {
    let class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    counter!("node_funnel_requests_total", "service" => service.to_owned(), "status_class" => class).increment(1);
    if bytes > 0 {
        counter!("node_funnel_response_bytes_total", "service" => service.to_owned()).increment(bytes);
    }
    histogram!("node_funnel_request_duration_seconds").record(seconds);
}

/// Sets the funnel's gauges: edges connected and how many of them over the TCP tunnel,
/// services published, and the round-trip time of each edge's tunnel (by the edge's index),
/// in milliseconds.
pub fn funnel_gauges(
    edges_connected: usize,
    edges_tcp: usize,
    services: usize,
    rtt_ms: impl Iterator<Item = (usize, f64)>,
) {
    gauge!("node_funnel_edges_connected").set(edges_connected as f64);
    gauge!("node_funnel_edges_tcp").set(edges_tcp as f64);
    gauge!("node_funnel_services").set(services as f64);
    for (i, rtt) in rtt_ms {
        gauge!("node_funnel_tunnel_rtt_seconds", "edge" => i.to_string()).set(rtt / 1e3);
    }
}

/// Sets the gauges from a node status snapshot.
pub fn node_gauges(s: &Status) {
    gauge!("node_relay_connected").set(if s.relay_connected { 1.0 } else { 0.0 });
    gauge!("node_peers").set(s.peers.len() as f64);
    let direct = s.peers.iter().filter(|p| p.path.starts_with("direct")).count();
    gauge!("node_peers_direct").set(direct as f64);
    gauge!("node_region_links").set(s.region_links.len() as f64);
    gauge!("node_lookup_dropped").set(s.lookup_dropped as f64);
    let sum = |f: fn(&crate::core::PeerStatus) -> u64| s.peers.iter().map(f).sum::<u64>() as f64;
    gauge!("node_packets_resent").set(sum(|p| p.tx_resent));
    gauge!("node_packets_unprotected").set(sum(|p| p.tx_unprotected));
    gauge!("node_packets_duplicate").set(sum(|p| p.rx_duplicate));
}
