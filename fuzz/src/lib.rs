//! One fuzz body per decoder of bytes that arrive from the network or from operators.
//!
//! Each body must never panic, loop forever or allocate without bound on any input. The
//! libFuzzer targets in `fuzz_targets/` call these; `tests/corpus.rs` replays the committed
//! corpus through them as an ordinary test, so CI needs no nightly toolchain.

use std::net::SocketAddr;

use bytes::BytesMut;
use warren_relay_proto::ws::Role;
use warren_relay_proto::{FrameDecoder, Framer, PublicKey, SecretKey, Transport};

/// A fuzz body.
pub type Body = fn(&[u8]);

/// The body `WARREN_FUZZ_TARGET` names (read once), for the `any` target: one binary serves
/// every body, so `scripts/fuzz.sh` builds (and links, with LTO) once instead of per target.
///
/// # Panics
/// When the variable is unset or names no target: the run is misconfigured.
pub fn by_env(data: &[u8]) {
    static BODY: std::sync::OnceLock<Body> = std::sync::OnceLock::new();
    let body = BODY.get_or_init(|| {
        let name = std::env::var("WARREN_FUZZ_TARGET").unwrap_or_default();
        match TARGETS.iter().find(|(n, _)| *n == name) {
            Some((_, body)) => *body,
            None => panic!("WARREN_FUZZ_TARGET={name:?} names none of the fuzz targets"),
        }
    });
    body(data);
}

/// Every body by target name (the corpus directory names).
pub const TARGETS: &[(&str, Body)] = &[
    ("derp_frames", derp_frames),
    ("websocket", websocket),
    ("client_info", client_info),
    ("stun", stun),
    ("tunnel_message", tunnel_message),
    ("disco", disco),
    ("der_validity", der_validity),
    ("relay_config", relay_config),
    ("edge_config", edge_config),
    ("region_map", region_map),
    ("http_head", http_head),
    ("static_request", static_request),
    ("node_config", node_config),
    ("proxy_answer", proxy_answer),
    ("access", access),
    ("dns_reply", dns_reply),
    ("proxy_header", proxy_header),
    ("relay_conversation", relay_conversation),
    ("tunnel_conversation", tunnel_conversation),
];

/// A tunnel stream carrying a sequence of messages, as `read_message` takes them: the first
/// byte seeds where the stream is split. Splitting never changes what decodes, and every
/// message decoded re-encodes (when within the encoder's limits) to one that decodes the same.
pub fn tunnel_conversation(data: &[u8]) {
    use warren_tunnel_proto::Message;
    let Some((seed, stream)) = data.split_first() else { return };
    let whole: Vec<Message> = {
        let mut buf = BytesMut::from(stream);
        std::iter::from_fn(|| Message::decode(&mut buf).ok().flatten()).collect()
    };
    // The same bytes arriving in chunks of 1 to 16 bytes.
    let mut buf = BytesMut::new();
    let mut split = Vec::new();
    let mut failed = false;
    let mut step = usize::from(*seed % 16) + 1;
    for chunk in stream.chunks(step) {
        buf.extend_from_slice(chunk);
        step = step % 16 + 1;
        while !failed {
            match Message::decode(&mut buf) {
                Ok(Some(m)) => split.push(m),
                Ok(None) => break,
                Err(_) => failed = true,
            }
        }
    }
    assert_eq!(split, whole, "what decodes does not depend on how the stream was split");
    for m in whole {
        let mut out = BytesMut::new();
        if m.encode(&mut out).is_ok() {
            assert_eq!(Message::decode(&mut out).ok().flatten().as_ref(), Some(&m), "re-encoded");
            assert!(out.is_empty(), "one message, no bytes left");
        }
    }
}

/// A whole conversation of four clients and a mesh sibling with the relay's core, scripted by
/// the input (raw frames, packets, inboxes drained, time passing, clients leaving).
pub fn relay_conversation(data: &[u8]) {
    warren_relay::fuzzing::relay_conversation(data, std::time::Instant::now());
}

/// A DNS reply as the edge reads it when checking a custom domain's proof (the first two bytes
/// are taken as the id of the query it answers).
pub fn dns_reply(data: &[u8]) {
    use warren_edge::dns::{decode_answers, RecordType};
    let id = data.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    for ty in [RecordType::Txt, RecordType::Cname] {
        if let Ok(answers) = decode_answers(data, id, ty) {
            assert!(answers.len() <= data.len(), "every answer takes bytes of the reply");
        }
    }
}

/// What visitors and nodes hand the edge's checks: the first line is an `Authorization` header
/// value and a node's signed token, each further line a network (CIDR) and then an address to
/// test against it.
pub fn access(data: &[u8]) {
    let (first, rest) = data.split_at(data.iter().position(|b| *b == b'\n').unwrap_or(data.len()));
    let _ = warren_edge::fuzzing::authorization(first);
    // The same line as a node's signed token (key and time fixed: only the parsing is at stake).
    let token = String::from_utf8_lossy(first);
    let _ = warren_edge::credentials::verify(&token, &[[7; 32]], 1000, std::time::Duration::from_secs(86_400));
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.lines();
    while let Some(net) = lines.next() {
        let Ok(cidr) = net.parse::<warren_common::cidr::Cidr>() else { continue };
        assert_eq!(cidr.to_string().parse::<warren_common::cidr::Cidr>(), Ok(cidr), "{net}");
        if let Some(Ok(ip)) = lines.next().map(str::parse::<std::net::IpAddr>) {
            let _ = cidr.contains(ip);
        }
    }
}

/// DERP frames, as the relay and client read them (any split of the stream).
pub fn derp_frames(data: &[u8]) {
    let dec = FrameDecoder::default();
    let mut buf = BytesMut::from(data);
    let mut frames = 0;
    while let Ok(Some(f)) = dec.decode(&mut buf) {
        assert!(f.encoded_len() >= 5);
        frames += 1;
        assert!(frames <= data.len(), "every frame consumes at least its header");
    }
}

/// WebSocket-wrapped DERP as the server reads it (masked), and as a client reads it.
pub fn websocket(data: &[u8]) {
    for role in [Role::Server, Role::Client] {
        let mut f = Framer::new(role, Transport::WebSocket, FrameDecoder::default());
        f.push_rx(data);
        let mut n = 0;
        while let Ok(Some(_)) = f.poll_frame() {
            n += 1;
            assert!(n <= data.len());
        }
    }
}

/// The sealed ClientInfo a relay opens at login, and its JSON.
pub fn client_info(data: &[u8]) {
    let server = SecretKey::from_bytes([7; 32]);
    let client = PublicKey::from_bytes([9; 32]);
    let _ = warren_relay_proto::handshake::ClientInfo::open(&server, &client, data);
    let _ = serde_json::from_slice::<warren_relay_proto::handshake::ClientInfo>(data);
    let _ = serde_json::from_slice::<warren_relay_proto::handshake::ServerInfo>(data);
}

/// STUN datagrams, at the relay's responder and the node's response parser.
pub fn stun(data: &[u8]) {
    let from: SocketAddr = SocketAddr::from(([192, 0, 2, 1], 4242));
    let _ = warren_relay_proto::stun::binding_response(data, from);
    let _ = warren_relay_proto::stun::parse_binding_response(data);
}

/// Node-edge tunnel messages.
pub fn tunnel_message(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut n = 0;
    while let Ok(Some(_)) = warren_tunnel_proto::Message::decode(&mut buf) {
        n += 1;
        assert!(n <= data.len());
    }
}

/// Peer-to-peer envelopes and their decrypted bodies.
pub fn disco(data: &[u8]) {
    let _ = warren::disco::sender(data);
    let ours = SecretKey::from_bytes([1; 32]);
    let theirs = SecretKey::from_bytes([2; 32]).public_key();
    let _ = warren::disco::PeerBox::new(&ours, &theirs).open(data);
    let _ = warren::disco::decode_plaintext(data);
}

/// Certificate validity, as read from ACME-issued or stored certificates.
pub fn der_validity(data: &[u8]) {
    if let Some((before, after)) = warren_common::der::validity(data) {
        let _ = after.checked_sub(before);
    }
}

/// Relay configuration files.
pub fn relay_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(f) = warren_relay::config::FileConfig::parse(text) {
            let _ = warren_relay::Config::try_from(f);
        }
    }
}

/// Edge configuration files.
pub fn edge_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(f) = warren_edge::config::FileConfig::parse(text) {
            let _ = warren_edge::Config::try_from(f);
        }
    }
}

/// Region maps (file or URL).
pub fn region_map(data: &[u8]) {
    let _ = warren::regionmap::RegionMap::parse(data);
}

/// The first HTTP request head on the relay's DERP port.
pub fn http_head(data: &[u8]) {
    warren_relay::fuzzing::http_head(data);
}

/// A visitor's path and `Range` header as a static-file target reads them: the first line is
/// the path, the second the header. A decoded path never climbs out of the root, and a range
/// stays inside the file.
pub fn static_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(2, '\n');
    let path = lines.next().unwrap_or_default();
    if let Some(p) = warren::services::files::decode_path(path) {
        assert!(p.components().all(|c| matches!(c, std::path::Component::Normal(_))), "{p:?} from {path:?}");
    }
    let len = data.len() as u64;
    if let warren::services::files::Range::Satisfiable(a, b) =
        warren::services::files::parse_range(lines.next().unwrap_or_default(), len)
    {
        assert!(a < b && b <= len, "{a}..{b} of {len}");
    }
}

/// `node.toml` and the saved services file, and each service's target and mount.
pub fn node_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(f) = warren_common::config::parse_toml::<warren::config::NodeFile>(text) {
        let _ = f.check();
    }
    if let Ok(spec) = serde_json::from_str::<warren::services::ServiceSpec>(text) {
        let _ = spec.check();
    }
    let _ = warren::services::Target::parse(text);
    let _ = warren::services::Target::parse_tcp(text);
    let _ = warren::services::clean_mount(text);
}

/// A PROXY protocol header (v1 or v2) from a load balancer, as the relay reads it: never longer
/// than its bounds, and a complete header is still the same header with more bytes after it.
pub fn proxy_header(data: &[u8]) {
    use warren_common::proxy_protocol::{parse, MAX_HEADER};
    if let Ok(Some((header, len))) = parse(data) {
        assert!(len <= data.len() && len <= MAX_HEADER);
        let mut longer = data[..len].to_vec();
        longer.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(parse(&longer).ok().flatten(), Some((header, len)));
        assert!(matches!(parse(&data[..len - 1]), Ok(None)), "a header cut short is never complete");
    }
}

/// A proxy's answer to CONNECT, and proxy URLs and `NO_PROXY` lists from operators.
pub fn proxy_answer(data: &[u8]) {
    match warren_common::proxy::parse_answer(data) {
        Ok(Some(a)) => assert!(a.head_len <= data.len()),
        Ok(None) => assert!(data.len() < warren_common::proxy::MAX_ANSWER),
        Err(_) => {}
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = warren_common::proxy::Proxy::parse(&text) {
        let shown = p.to_string();
        assert!(shown.starts_with("http://"), "{shown}");
    }
    let (list, host) = text.split_once('\n').unwrap_or((&text, "example.com"));
    let _ = warren_common::proxy::no_proxy_matches(list, host);
}
