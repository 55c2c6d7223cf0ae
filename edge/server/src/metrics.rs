//! Edge metrics, described once; labels only from closed sets.

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit};

/// Why a node's registration was refused (or that it succeeded).
#[derive(Debug, Clone, Copy)]
pub enum Registration {
    /// Registered.
    Ok,
    /// Token unknown or not allowed for the name.
    Unauthorized,
    /// Malformed hello, bad name or version.
    BadHello,
    /// None of the requested ports is served.
    NoPorts,
}

impl Registration {
    const ALL: [Registration; 4] =
        [Registration::Ok, Registration::Unauthorized, Registration::BadHello, Registration::NoPorts];

    fn label(self) -> &'static str {
        match self {
            Registration::Ok => "ok",
            Registration::Unauthorized => "unauthorized",
            Registration::BadHello => "bad_hello",
            Registration::NoPorts => "no_ports",
        }
    }
}

/// Why a visitor connection, tunnel handshake or request was turned away by a limit.
#[derive(Debug, Clone, Copy)]
pub enum Limited {
    /// Visitor connections over `limits.accept_rate`.
    AcceptRate,
    /// Visitor connections over `limits.max_conns_per_ip`.
    PerIp,
    /// Tunnel handshakes over `limits.tunnel_accept_rate`.
    TunnelRate,
    /// Requests over `limits.requests_per_second_per_host` (answered 429).
    HostRate,
}

impl Limited {
    const ALL: [Limited; 4] = [Limited::AcceptRate, Limited::PerIp, Limited::TunnelRate, Limited::HostRate];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Limited::AcceptRate => "accept_rate",
            Limited::PerIp => "per_ip",
            Limited::TunnelRate => "tunnel_rate",
            Limited::HostRate => "host_rate",
        }
    }
}

/// Describes every metric.
pub fn describe() {
    describe_counter!("edge_requests_total", "Visitor requests answered, by status class");
    describe_histogram!("edge_request_duration_seconds", Unit::Seconds, "Time from request to response head");
    describe_gauge!("edge_tunnels", "Node tunnels connected");
    describe_gauge!("edge_tcp_tunnels", "Node tunnels on the TCP transport (from networks without UDP)");
    describe_counter!("edge_tunnel_registrations_total", "Node registrations, by result");
    describe_counter!("edge_tls_handshake_failures_total", "Visitor TLS handshakes that failed");
    describe_counter!("edge_acme_orders_total", "ACME certificate orders, by result");
    describe_counter!("edge_limited_total", "Connections, tunnel handshakes and requests turned away by a limit");
    describe_gauge!("edge_cert_expiry_seconds", Unit::Seconds, "Seconds until the soonest certificate expiry");
    describe_counter!("edge_forwarded_total", "Requests forwarded between sibling edges, by direction (out, in)");
    describe_counter!("edge_store_errors_total", "Failed calls to the cluster's shared store");
    describe_counter!("edge_access_refused_total", "Visitor requests refused by access rules and floors, by reason");
}

/// Metric handles of one edge.
#[derive(Debug)]
pub struct EdgeMetrics {
    requests: [Counter; 5],
    pub(crate) duration: Histogram,
    pub(crate) tunnels: Gauge,
    pub(crate) tcp_tunnels: Gauge,
    pub(crate) tls_failures: Counter,
    registrations: [Counter; 4],
    limited: [Counter; 4],
}

impl EdgeMetrics {
    /// Resolves all handles against the installed recorder.
    pub fn new() -> Self {
        EdgeMetrics {
            requests: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|c| metrics::counter!("edge_requests_total", "status_class" => c)),
            duration: metrics::histogram!("edge_request_duration_seconds"),
            tunnels: metrics::gauge!("edge_tunnels"),
            tcp_tunnels: metrics::gauge!("edge_tcp_tunnels"),
            tls_failures: metrics::counter!("edge_tls_handshake_failures_total"),
            registrations: Registration::ALL
                .map(|r| metrics::counter!("edge_tunnel_registrations_total", "result" => r.label())),
            limited: Limited::ALL.map(|r| metrics::counter!("edge_limited_total", "reason" => r.label())),
        }
    }

    /// Counts an answered request.
    pub fn request(&self, status: u16) {
        let i = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[i].increment(1);
    }

    /// Counts something a limit turned away.
    pub fn limited(&self, why: Limited) {
        self.limited[why as usize].increment(1);
    }

    /// Counts a registration outcome.
    pub fn registration(&self, r: Registration) {
        self.registrations[r as usize].increment(1);
    }
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}
