//! Every metric the relay exports, described once, with handles resolved once per server.
//!
//! Labels come only from closed enums; keys and addresses never appear in metrics.

use crate::admission::AdmissionResult;
use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit};
use warren_common::limits::Rejected;

/// Why a packet was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The destination's send queue was full (slow reader).
    QueueFull,
    /// The destination key is not connected here.
    UnknownDest,
    /// The destination disconnected with the packet still queued.
    Gone,
    /// A mesh-only frame from a client without the mesh key.
    NotMesh,
    /// The link to the sibling holding the destination was full (slow or stuck sibling).
    MeshQueueFull,
    /// The link to the sibling failed with the packet queued or in flight.
    MeshLinkDown,
}

impl DropReason {
    const ALL: [DropReason; 6] = [
        DropReason::QueueFull,
        DropReason::UnknownDest,
        DropReason::Gone,
        DropReason::NotMesh,
        DropReason::MeshQueueFull,
        DropReason::MeshLinkDown,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::UnknownDest => "unknown_dest",
            DropReason::Gone => "gone",
            DropReason::NotMesh => "not_mesh",
            DropReason::MeshQueueFull => "mesh_queue_full",
            DropReason::MeshLinkDown => "mesh_link_down",
        }
    }
}

/// Why a connection did not reach the logged-in state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// TLS handshake failed.
    Tls,
    /// Not a valid HTTP request, or an upgrade we do not serve.
    BadRequest,
    /// Deadline passed before login completed.
    Timeout,
    /// The first frame was not a valid ClientInfo.
    BadFrame,
    /// The ClientInfo box did not open, or its JSON was invalid.
    BadClientInfo,
    /// The connection failed mid-handshake.
    Io,
    /// The client offered a mesh key that is not this region's (or this relay has no mesh).
    BadMeshKey,
    /// A trusted load balancer's connection did not start with a valid PROXY header.
    ProxyHeader,
    /// A PROXY header came from an address not in `proxy_protocol.trusted`.
    ProxyUntrusted,
}

impl HandshakeFailure {
    const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::Tls,
        HandshakeFailure::BadRequest,
        HandshakeFailure::Timeout,
        HandshakeFailure::BadFrame,
        HandshakeFailure::BadClientInfo,
        HandshakeFailure::Io,
        HandshakeFailure::BadMeshKey,
        HandshakeFailure::ProxyHeader,
        HandshakeFailure::ProxyUntrusted,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::BadRequest => "bad_request",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::BadFrame => "bad_frame",
            HandshakeFailure::BadClientInfo => "bad_client_info",
            HandshakeFailure::Io => "io",
            HandshakeFailure::BadMeshKey => "bad_mesh_key",
            HandshakeFailure::ProxyHeader => "proxy_header",
            HandshakeFailure::ProxyUntrusted => "proxy_untrusted",
        }
    }
}

/// Outcome of one STUN datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StunResult {
    /// Answered.
    Ok,
    /// Not STUN, or corrupt.
    Malformed,
    /// STUN, but not a Binding request.
    NotBinding,
    /// Over the per-source rate.
    RateLimited,
}

impl StunResult {
    const ALL: [StunResult; 4] =
        [StunResult::Ok, StunResult::Malformed, StunResult::NotBinding, StunResult::RateLimited];

    fn label(self) -> &'static str {
        match self {
            StunResult::Ok => "ok",
            StunResult::Malformed => "malformed",
            StunResult::NotBinding => "not_binding",
            StunResult::RateLimited => "rate_limited",
        }
    }
}

/// Answer to one FindPeer question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    /// Connected here or to a sibling.
    Present,
    /// Not in the region.
    Absent,
    /// Over the client's lookup budget: not answered.
    Limited,
}

impl LookupResult {
    const ALL: [LookupResult; 3] = [LookupResult::Present, LookupResult::Absent, LookupResult::Limited];

    fn label(self) -> &'static str {
        match self {
            LookupResult::Present => "present",
            LookupResult::Absent => "absent",
            LookupResult::Limited => "limited",
        }
    }
}

/// Describes every metric (call once, after installing the recorder).
pub fn describe() {
    describe_gauge!("relay_clients_connected", "DERP clients currently logged in");
    describe_gauge!("relay_clients_home", "Connected clients that marked this relay as their home (NotePreferred)");
    describe_counter!("relay_connections_total", "Logged-in DERP connections, by transport");
    describe_counter!("relay_clients_replaced_total", "Connections closed because the same key connected again");
    describe_counter!("relay_packets_forwarded_total", "Packets written to their destination");
    describe_counter!("relay_bytes_forwarded_total", Unit::Bytes, "Packet payload bytes written to their destination");
    describe_counter!("relay_packets_dropped_total", "Packets not delivered, by reason");
    describe_histogram!("relay_queue_delay_seconds", Unit::Seconds, "Time packets wait in the destination's queue");
    describe_counter!("relay_handshake_failures_total", "Connections that failed before login, by reason");
    describe_counter!("relay_frames_unknown_total", "Frames of unknown type received and skipped");
    describe_counter!("relay_protocol_errors_total", "Connections closed for a protocol violation after login");
    describe_counter!("relay_stun_requests_total", "STUN datagrams received, by result");
    describe_counter!("relay_http_requests_total", "Plain HTTP requests served (probes, landing page)");
    describe_counter!(
        "relay_connections_rejected_total",
        "Connections closed at accept, by reason (accept_rate, per_ip)"
    );
    describe_counter!("relay_admission_total", "Login admission decisions, by result");
    describe_counter!(
        "relay_clients_throttled_total",
        "Times a client exceeded its send budget and was read more slowly"
    );
    describe_counter!(
        "relay_clients_backpressured_total",
        "Times a client's packet found its destination's queue (or mesh link) full and the client was not read for a moment"
    );
    describe_gauge!("relay_mesh_peers", "Mesh links to sibling relays that are logged in and watching");
    describe_gauge!("relay_mesh_remote_clients", "Client keys that sibling relays hold, as they told us");
    describe_counter!("relay_mesh_forwarded_total", "Packets sent to (out) or received from (in) sibling relays");
    describe_counter!(
        "relay_peer_lookups_total",
        "FindPeer questions from clients, by answer (present, absent) or limited (over the client's budget)"
    );
    describe_counter!("relay_config_reloads_total", "SIGHUP reloads, by result (ok, invalid, failed)");
    describe_counter!(
        "relay_tls_cert_reloads_total",
        "Manual certificates installed again after their files changed, by result (ok, error)"
    );
    describe_gauge!(
        "relay_tls_cert_not_after_seconds",
        Unit::Seconds,
        "Expiry (Unix time) of the manual TLS certificate in use"
    );
}

/// Metric handles of one relay, resolved once so the hot path does no registry lookups.
#[derive(Debug)]
pub struct RelayMetrics {
    pub(crate) clients: Gauge,
    pub(crate) clients_home: Gauge,
    pub(crate) conns_derp: Counter,
    pub(crate) conns_ws: Counter,
    pub(crate) replaced: Counter,
    pub(crate) forwarded: Counter,
    pub(crate) forwarded_bytes: Counter,
    pub(crate) queue_delay: Histogram,
    pub(crate) unknown_frames: Counter,
    pub(crate) protocol_errors: Counter,
    pub(crate) http_requests: Counter,
    pub(crate) throttled: Counter,
    pub(crate) backpressure: Counter,
    rejected: [Counter; 2],
    admission: [Counter; 3],
    pub(crate) mesh_peers: Gauge,
    pub(crate) mesh_remote_clients: Gauge,
    pub(crate) mesh_forwarded_out: Counter,
    pub(crate) mesh_forwarded_in: Counter,
    lookups: [Counter; 3],
    dropped: [Counter; 6],
    handshake: [Counter; 9],
    stun: [Counter; 4],
}

impl RelayMetrics {
    /// Resolves all handles against the currently installed recorder (no-ops without one).
    pub fn new() -> Self {
        RelayMetrics {
            clients: metrics::gauge!("relay_clients_connected"),
            clients_home: metrics::gauge!("relay_clients_home"),
            conns_derp: metrics::counter!("relay_connections_total", "transport" => "derp"),
            conns_ws: metrics::counter!("relay_connections_total", "transport" => "websocket"),
            replaced: metrics::counter!("relay_clients_replaced_total"),
            forwarded: metrics::counter!("relay_packets_forwarded_total"),
            forwarded_bytes: metrics::counter!("relay_bytes_forwarded_total"),
            queue_delay: metrics::histogram!("relay_queue_delay_seconds"),
            unknown_frames: metrics::counter!("relay_frames_unknown_total"),
            protocol_errors: metrics::counter!("relay_protocol_errors_total"),
            http_requests: metrics::counter!("relay_http_requests_total"),
            throttled: metrics::counter!("relay_clients_throttled_total"),
            backpressure: metrics::counter!("relay_clients_backpressured_total"),
            rejected: [Rejected::AcceptRate, Rejected::PerIp]
                .map(|r| metrics::counter!("relay_connections_rejected_total", "reason" => r.label())),
            admission: [AdmissionResult::Allowed, AdmissionResult::Denied, AdmissionResult::CalloutError]
                .map(|r| metrics::counter!("relay_admission_total", "result" => r.label())),
            mesh_peers: metrics::gauge!("relay_mesh_peers"),
            mesh_remote_clients: metrics::gauge!("relay_mesh_remote_clients"),
            mesh_forwarded_out: metrics::counter!("relay_mesh_forwarded_total", "direction" => "out"),
            mesh_forwarded_in: metrics::counter!("relay_mesh_forwarded_total", "direction" => "in"),
            lookups: LookupResult::ALL.map(|r| metrics::counter!("relay_peer_lookups_total", "result" => r.label())),
            dropped: DropReason::ALL.map(|r| metrics::counter!("relay_packets_dropped_total", "reason" => r.label())),
            handshake: HandshakeFailure::ALL
                .map(|r| metrics::counter!("relay_handshake_failures_total", "reason" => r.label())),
            stun: StunResult::ALL.map(|r| metrics::counter!("relay_stun_requests_total", "result" => r.label())),
        }
    }

    /// Counts `n` dropped packets.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].increment(n);
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake[reason as usize].increment(1);
    }

    /// Counts a connection turned away at accept.
    pub fn rejected(&self, why: Rejected) {
        self.rejected[why as usize].increment(1);
    }

    /// Counts an admission decision.
    pub fn admission(&self, result: AdmissionResult) {
        self.admission[result as usize].increment(1);
    }

    /// Counts a STUN datagram.
    pub fn stun(&self, result: StunResult) {
        self.stun[result as usize].increment(1);
    }

    /// Counts a FindPeer question by its answer.
    pub fn lookup(&self, result: LookupResult) {
        self.lookups[result as usize].increment(1);
    }
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}
