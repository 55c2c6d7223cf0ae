use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn k(b: u8) -> PublicKey {
    PublicKey::from_bytes([b; 32])
}

fn hex_of(f: &Frame) -> String {
    hex::encode(f.to_bytes())
}

/// One hex snapshot per frame type: header (type, u32 BE length) and payload layout.
#[test]
fn hex_snapshots() {
    let key_a = "aa".repeat(32);
    let key_b = "bb".repeat(32);
    let cases: Vec<(Frame, String)> = vec![
        (Frame::ServerKey { key: k(0xaa) }, format!("0100000028{}{key_a}", hex::encode(MAGIC))),
        (
            Frame::ClientInfo { key: k(0xaa), sealed: Bytes::from(vec![0x11; 40]) },
            format!("0200000048{key_a}{}", "11".repeat(40)),
        ),
        (Frame::ServerInfo { sealed: Bytes::from(vec![0x22; 40]) }, format!("0300000028{}", "22".repeat(40))),
        (Frame::SendPacket { dst: k(0xbb), packet: Bytes::from_static(b"hi") }, format!("0400000022{key_b}6869")),
        (Frame::RecvPacket { src: k(0xaa), packet: Bytes::from_static(b"hi") }, format!("0500000022{key_a}6869")),
        (Frame::KeepAlive, "0600000000".into()),
        (Frame::NotePreferred { preferred: true }, "070000000101".into()),
        (Frame::PeerGone { peer: k(0xaa), reason: PeerGoneReason::NotHere }, format!("0800000021{key_a}01")),
        (Frame::PeerPresent { peer: k(0xaa), endpoint: None, flags: None }, format!("0900000020{key_a}")),
        (
            Frame::PeerPresent {
                peer: k(0xaa),
                endpoint: Some("1.2.3.4:443".parse().expect("addr")),
                flags: Some(peer_present_flags::IS_REGULAR),
            },
            format!("0900000033{key_a}00000000000000000000ffff0102030401bb01"),
        ),
        (
            Frame::ForwardPacket { src: k(0xaa), dst: k(0xbb), packet: Bytes::from_static(b"x") },
            format!("0a00000041{key_a}{key_b}78"),
        ),
        (Frame::WatchConns, "1000000000".into()),
        (Frame::ClosePeer { peer: k(0xbb) }, format!("1100000020{key_b}")),
        (Frame::Ping(*b"01234567"), "12000000083031323334353637".into()),
        (Frame::Pong(*b"01234567"), "13000000083031323334353637".into()),
        (Frame::Health { problem: "dup".into() }, "1400000003647570".into()),
        (Frame::Restarting { reconnect_in_ms: 1000, try_for_ms: 60_000 }, "1500000008000003e80000ea60".into()),
        (Frame::FindPeer { peer: k(0xaa) }, format!("4000000020{key_a}")),
        (Frame::PeerPresence { peer: k(0xbb), present: true }, format!("4100000021{key_b}01")),
        (Frame::PeerPresence { peer: k(0xbb), present: false }, format!("4100000021{key_b}00")),
        (Frame::Unknown { frame_type: 0x7f, payload: Bytes::from_static(&[1, 2]) }, "7f000000020102".into()),
    ];
    for (frame, want) in cases {
        assert_eq!(hex_of(&frame), want, "{}", frame.name());
        let bytes = frame.to_bytes();
        assert_eq!(bytes.len(), frame.encoded_len(), "{}", frame.name());
        let mut buf = BytesMut::from(&bytes[..]);
        let got = FrameDecoder::default().decode(&mut buf).expect("decodes").expect("complete");
        assert_eq!(got, frame);
        assert!(buf.is_empty());
    }
}

#[test]
fn old_style_and_extended_frames_decode() {
    // PeerGone without a reason byte means "disconnected".
    let got = Frame::decode(frame_type::PEER_GONE, Bytes::from(vec![1; 32])).expect("ok");
    assert_eq!(got, Frame::PeerGone { peer: k(1), reason: PeerGoneReason::Disconnected });
    // ServerKey may carry bytes reserved for future use.
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&[2; 32]);
    p.extend_from_slice(b"future");
    assert_eq!(Frame::decode(frame_type::SERVER_KEY, Bytes::from(p)), Ok(Frame::ServerKey { key: k(2) }));
    // Ping with trailing bytes keeps its first 8.
    assert_eq!(Frame::decode(frame_type::PING, Bytes::from_static(b"0123456789")), Ok(Frame::Ping(*b"01234567")));
}

#[test]
fn short_and_bad_frames_are_errors() {
    assert!(Frame::decode(frame_type::SEND_PACKET, Bytes::from(vec![0; 31])).is_err());
    assert!(Frame::decode(frame_type::PING, Bytes::from(vec![0; 7])).is_err());
    assert!(Frame::decode(frame_type::RESTARTING, Bytes::from(vec![0; 4])).is_err());
    assert!(Frame::decode(frame_type::NOTE_PREFERRED, Bytes::new()).is_err());
    assert!(Frame::decode(frame_type::FIND_PEER, Bytes::from(vec![0; 31])).is_err());
    assert!(Frame::decode(frame_type::PEER_PRESENCE, Bytes::from(vec![0; 32])).is_err());
    let mut bad_magic = vec![0u8; 40];
    bad_magic[0] = b'X';
    assert!(Frame::decode(frame_type::SERVER_KEY, Bytes::from(bad_magic)).is_err());
    let big = Bytes::from(vec![0; 32 + MAX_PACKET_SIZE + 1]);
    assert_eq!(
        Frame::decode(frame_type::SEND_PACKET, big),
        Err(DecodeError::ProtocolViolation("packet larger than 64 KiB"))
    );
}

#[test]
fn decoder_waits_for_bytes_and_refuses_oversized_header() {
    let dec = FrameDecoder::default();
    let wire = Frame::Ping(*b"abcdefgh").to_bytes();
    let mut buf = BytesMut::new();
    for (i, b) in wire.iter().enumerate() {
        let want = if i < HEADER_LEN { HEADER_LEN - i } else { wire.len() - i };
        assert_eq!(dec.bytes_wanted(&buf), want);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[*b]);
    }
    assert_eq!(dec.decode(&mut buf), Ok(Some(Frame::Ping(*b"abcdefgh"))));
    // A header announcing 4 GiB is refused before any payload arrives.
    let mut huge = BytesMut::from(&[frame_type::SEND_PACKET, 0xff, 0xff, 0xff, 0xff][..]);
    assert!(matches!(dec.decode(&mut huge), Err(DecodeError::ProtocolViolation(_))));
}

#[test]
fn validate_refuses_oversized_packets() {
    let f = Frame::SendPacket { dst: k(1), packet: Bytes::from(vec![0; MAX_PACKET_SIZE + 1]) };
    assert!(matches!(f.validate(), Err(DecodeError::Misuse(_))));
    let ok = Frame::SendPacket { dst: k(1), packet: Bytes::from(vec![0; MAX_PACKET_SIZE]) };
    assert_eq!(ok.validate(), Ok(()));
}

fn arb_key() -> impl Strategy<Value = PublicKey> {
    any::<[u8; 32]>().prop_map(PublicKey::from_bytes)
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let ep = proptest::option::of(
        any::<std::net::SocketAddr>().prop_filter("not unspecified", |a| !(a.ip().is_unspecified() && a.port() == 0)),
    );
    prop_oneof![
        arb_key().prop_map(|key| Frame::ServerKey { key }),
        (arb_key(), arb_bytes(200)).prop_map(|(key, b)| {
            let mut v = vec![0u8; 40];
            v.extend_from_slice(&b);
            Frame::ClientInfo { key, sealed: Bytes::from(v) }
        }),
        arb_bytes(200).prop_map(|b| {
            let mut v = vec![1u8; 40];
            v.extend_from_slice(&b);
            Frame::ServerInfo { sealed: Bytes::from(v) }
        }),
        (arb_key(), arb_bytes(2000)).prop_map(|(dst, packet)| Frame::SendPacket { dst, packet }),
        (arb_key(), arb_bytes(2000)).prop_map(|(src, packet)| Frame::RecvPacket { src, packet }),
        Just(Frame::KeepAlive),
        any::<bool>().prop_map(|preferred| Frame::NotePreferred { preferred }),
        (arb_key(), any::<u8>()).prop_map(|(peer, r)| Frame::PeerGone { peer, reason: PeerGoneReason::from_byte(r) }),
        (arb_key(), ep, proptest::option::of(any::<u8>())).prop_map(|(peer, endpoint, flags)| {
            // Canonicalise v4-mapped v6 addresses the way the decoder reports them.
            let endpoint = endpoint.map(|a| match a.ip() {
                std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => std::net::SocketAddr::new(v4.into(), a.port()),
                    None => std::net::SocketAddr::new(v6.into(), a.port()),
                },
                _ => a,
            });
            Frame::PeerPresent { peer, endpoint, flags }
        }),
        (arb_key(), arb_key(), arb_bytes(2000)).prop_map(|(src, dst, packet)| Frame::ForwardPacket {
            src,
            dst,
            packet
        }),
        Just(Frame::WatchConns),
        arb_key().prop_map(|peer| Frame::ClosePeer { peer }),
        any::<[u8; 8]>().prop_map(Frame::Ping),
        any::<[u8; 8]>().prop_map(Frame::Pong),
        "[a-z ]{0,40}".prop_map(|problem| Frame::Health { problem }),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Frame::Restarting { reconnect_in_ms: a, try_for_ms: b }),
        arb_key().prop_map(|peer| Frame::FindPeer { peer }),
        (arb_key(), any::<bool>()).prop_map(|(peer, present)| Frame::PeerPresence { peer, present }),
        (0x42u8..=0xff, arb_bytes(100)).prop_map(|(frame_type, payload)| Frame::Unknown { frame_type, payload }),
    ]
}

proptest! {
    #[test]
    fn round_trip(frames in proptest::collection::vec(arb_frame(), 1..8)) {
        let mut wire = BytesMut::new();
        for f in &frames {
            let before = wire.len();
            f.encode(&mut wire);
            prop_assert_eq!(wire.len() - before, f.encoded_len());
        }
        let dec = FrameDecoder::default();
        let mut got = Vec::new();
        while let Some(f) = dec.decode(&mut wire).expect("valid stream") {
            got.push(f);
        }
        prop_assert_eq!(got, frames);
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn decode_never_panics_on_perturbed_frames(
        f in arb_frame(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
    ) {
        let mut bytes = f.to_bytes().to_vec();
        for (pos, x) in flips {
            let i = pos % bytes.len();
            bytes[i] ^= x;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let dec = FrameDecoder::default();
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
        prop_assert!(buf.len() <= before);
    }

    #[test]
    fn decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let dec = FrameDecoder::default();
        let mut buf = BytesMut::from(&bytes[..]);
        let mut steps = 0;
        while let Ok(Some(_)) = dec.decode(&mut buf) {
            steps += 1;
            prop_assert!(steps <= bytes.len(), "each frame consumes at least its header");
        }
    }
}
