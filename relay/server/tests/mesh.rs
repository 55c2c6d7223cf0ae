//! Relays of one region meshed on loopback: presence, forwarding, refusal of a wrong mesh key,
//! and clients moving off a draining relay.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{recv_until, start_relay, Relay};
use rand_core::OsRng;
use warren_common::testing::free_tcp_port;
use warren_relay_client::{ConnectOptions, DerpClient};
use warren_relay_proto::handshake::ClientInfo;
use warren_relay_proto::{Frame, PeerGoneReason, PublicKey, SecretKey, Transport};

const MESH_KEY: &str = "test-region-mesh-key-0123456789";

/// Starts `n` relays sharing one dev CA (state dir) and mesh key, each listing all of them,
/// itself included, as peers.
async fn region(n: usize, state: &Path) -> Vec<Relay> {
    let ports: Vec<u16> = (0..n).map(|_| free_tcp_port()).collect();
    let peers: Vec<String> = ports.iter().map(|p| format!("https://localhost:{p}")).collect();
    let mut relays = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let peers = peers.clone();
        let relay = start_relay(|f| {
            f.listen = Some(format!("127.0.0.1:{port}"));
            f.state_dir = Some(state.to_path_buf());
            f.key_file = Some(state.join(format!("relay-{i}.key")));
            f.mesh.key = Some(MESH_KEY.into());
            f.mesh.peers = peers;
            f.mesh.ca_file = Some(state.join("dev-ca.pem"));
        })
        .await;
        relays.push(relay);
    }
    relays
}

/// Waits until `cond` holds, polling, within `limit`.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn expect_packet(c: &mut DerpClient, from: PublicKey, body: &[u8]) {
    let f = recv_until(c, |f| matches!(f, Frame::RecvPacket { .. })).await;
    let Frame::RecvPacket { src, packet } = f else { unreachable!() };
    assert_eq!((src, &packet[..]), (from, body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_forward_to_each_others_clients() {
    let state = tempfile::tempdir().expect("tempdir");
    let relays = region(3, state.path()).await;
    for r in &relays {
        // Each lists all three; the link to itself is recognised by its key and dropped.
        eventually(Duration::from_secs(10), "mesh links", || r.server.mesh_link_count() == 2).await;
    }
    let mut a = relays[0].client(Transport::Derp).await;
    let mut b = relays[1].client(Transport::WebSocket).await;
    let mut c = relays[2].client(Transport::Derp).await;
    for r in &relays {
        eventually(Duration::from_secs(5), "presence", || r.server.mesh_remote_count() == 2).await;
    }
    let (ka, kb, kc) = (a.public_key(), b.public_key(), c.public_key());
    a.send_packet(kb, b"a to b").await.expect("send");
    b.send_packet(kc, b"b to c").await.expect("send");
    c.send_packet(ka, b"c to a").await.expect("send");
    expect_packet(&mut b, ka, b"a to b").await;
    expect_packet(&mut c, kb, b"b to c").await;
    expect_packet(&mut a, kc, b"c to a").await;

    // Not held anywhere in the region: PeerGone(not here), as without a mesh.
    let absent = SecretKey::generate(&mut OsRng).public_key();
    a.send_packet(absent, b"?").await.expect("send");
    let f = recv_until(&mut a, |f| matches!(f, Frame::PeerGone { .. })).await;
    assert_eq!(f, Frame::PeerGone { peer: absent, reason: PeerGoneReason::NotHere });

    // FindPeer answers for the whole region: a sibling's client is present, a stranger is not.
    for (peer, present) in [(kc, true), (absent, false), (ka, true)] {
        a.send(&Frame::FindPeer { peer }).await.expect("find");
        let f = recv_until(&mut a, |f| matches!(f, Frame::PeerPresence { .. })).await;
        assert_eq!(f, Frame::PeerPresence { peer, present });
    }

    // When b leaves, the siblings forget it.
    b.close().await.expect("close");
    for r in [&relays[0], &relays[2]] {
        eventually(Duration::from_secs(5), "departure", || r.server.mesh_remote_count() == 1).await;
    }
    for r in relays {
        r.server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_mesh_key_is_refused_and_ordinary_clients_cannot_watch() {
    let relay = start_relay(|f| f.mesh.key = Some(MESH_KEY.into())).await;
    let opts = ConnectOptions {
        info: ClientInfo { mesh_key: "not-the-region-mesh-key-000".into(), ..ClientInfo::node() },
        ..relay.opts(Transport::Derp)
    };
    let key = SecretKey::generate(&mut OsRng);
    let mut impostor = DerpClient::connect(&relay.url(), &key, &opts).await.expect("login completes");
    let f = recv_until(&mut impostor, |f| matches!(f, Frame::Health { .. })).await;
    assert_eq!(f, Frame::Health { problem: "mesh key refused".into() });
    assert!(impostor.recv().await.is_err(), "closed after the refusal");
    assert_eq!(relay.metric("relay_handshake_failures_total{reason=\"bad_mesh_key\"}").await, 1.0);

    let mut plain = relay.client(Transport::Derp).await;
    plain.send(&Frame::WatchConns).await.expect("send");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if plain.recv().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok(),
        "an ordinary client asking to watch is closed"
    );

    // The right key gets a snapshot of who is here.
    let mut other = relay.client(Transport::Derp).await;
    let opts = ConnectOptions { info: ClientInfo { mesh_key: MESH_KEY.into(), ..ClientInfo::node() }, ..opts };
    let mut sibling = DerpClient::connect(&relay.url(), &SecretKey::generate(&mut OsRng), &opts).await.expect("login");
    sibling.send(&Frame::WatchConns).await.expect("watch");
    let okey = other.public_key();
    recv_until(&mut sibling, |f| matches!(f, Frame::PeerPresent { peer, .. } if *peer == okey)).await;
    // A forwarded packet reaches the local client, with the original sender.
    let src = SecretKey::generate(&mut OsRng).public_key();
    sibling
        .send(&Frame::ForwardPacket { src, dst: okey, packet: bytes::Bytes::from_static(b"via mesh") })
        .await
        .expect("forward");
    expect_packet(&mut other, src, b"via mesh").await;
    other.close().await.expect("close");
    recv_until(&mut sibling, |f| matches!(f, Frame::PeerGone { peer, .. } if *peer == okey)).await;
    relay.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_draining_relay_move_and_others_lose_nothing() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut relays = region(2, state.path()).await;
    for r in &relays {
        eventually(Duration::from_secs(10), "mesh links", || r.server.mesh_link_count() == 1).await;
    }
    let survivor = relays.pop().expect("two relays");
    let draining = relays.pop().expect("two relays");
    let mover_key = SecretKey::generate(&mut OsRng);
    let mut mover = draining.client_with_key(&mover_key).await;
    let mut c = survivor.client(Transport::Derp).await;
    let mut d = survivor.client(Transport::Derp).await;
    eventually(Duration::from_secs(5), "presence", || survivor.server.mesh_remote_count() == 1).await;
    let (kc, kd) = (c.public_key(), d.public_key());

    // c streams to d on the surviving relay throughout the drain.
    let sender = tokio::spawn(async move {
        for i in 0u32..400 {
            c.send_packet(kd, &i.to_be_bytes()).await.expect("send");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        c
    });
    let receiver = tokio::spawn(async move {
        for i in 0u32..400 {
            let (src, p) = tokio::time::timeout(Duration::from_secs(5), d.recv_packet())
                .await
                .expect("no packet lost or stalled")
                .expect("recv");
            assert_eq!((src, &p[..]), (kc, &i.to_be_bytes()[..]), "in order, none lost");
        }
        d
    });
    let drain = tokio::spawn(draining.server.shutdown());
    let f = recv_until(&mut mover, |f| matches!(f, Frame::Restarting { .. })).await;
    let told = Instant::now();
    assert!(matches!(f, Frame::Restarting { .. }));
    drop(mover);
    let mut moved = survivor.client_with_key(&mover_key).await;
    let mut c = sender.await.expect("sender");
    let _d = receiver.await.expect("receiver");
    c.send_packet(mover_key.public_key(), b"welcome").await.expect("send");
    expect_packet(&mut moved, kc, b"welcome").await;
    eprintln!("client moved to the sibling and got traffic {:?} after Restarting", told.elapsed());
    drain.await.expect("drained");
    survivor.server.shutdown().await;
}
