//! A whole conversation with the relay's core, scripted by bytes: the body of the fuzz target
//! `relay_conversation`, where single-frame targets cannot reach (state across frames).
//!
//! Four clients are logged in (keys 1 to 4; clients 3 and 4 have a small send budget and
//! inboxes hold four packets, so budgets and full queues are reached), a mesh sibling may hold
//! key 9, and nobody holds key 7. Each step of the script says what happens next:
//!
//! ```text
//! op = byte: kind = op % 8, client = op / 8 % 4
//! 0 raw   n(1) bytes(n)        bytes from the client, any DERP frames, split anywhere
//! 1 send  who(1) n(1) data(n)  a SendPacket
//! 2 drain                      the client's connection writes what its inbox holds
//! 3 wait  ms/8(1)              time passes; timeouts due fire
//! 4 leave                      the client disconnects and logs in again
//! 5 sibling what(1) who(1) n(1) data(n)   a frame from a sibling: watch, forward, close, ping
//! 6 link  what(1) who(1)       our link to the sibling learns a key is there or gone
//! 7 other what(1) who(1)       NotePreferred, FindPeer, Ping
//! ```
//!
//! After every step: every frame the relay wrote encodes and decodes back to itself; no client
//! got a packet nobody sent it, or more copies of one than were sent; the key table holds
//! exactly the four clients. Bytes are never trusted: a frame that does not decode ends that
//! client's connection, as the shell does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use warren_relay_proto::ws::Role;
use warren_relay_proto::{Frame, FrameDecoder, Framer, PublicKey, Transport};

use super::inbox::{Inbox, Item};
use super::router::{ClientHandle, Forward, Router, SiblingLink};
use super::session::ClientSession;
use super::sibling::{self, SiblingSession};
use super::{Ctx, Next};
use crate::config::ClientRate;
use crate::metrics::RelayMetrics;

const CLIENTS: usize = 4;
/// Keys a script can name: the four clients, the sibling's, nobody's.
const WHO: [u8; 6] = [1, 2, 3, 4, 9, 7];
/// Largest raw chunk or packet one step carries.
const MAX_CHUNK: usize = 256;

fn key(b: u8) -> PublicKey {
    PublicKey::from_bytes([b; 32])
}

struct Client {
    session: ClientSession,
    inbox: Arc<Inbox>,
    framer: Framer,
    conn_id: u64,
}

/// The script's reader: steps end where the bytes do.
struct Script<'a>(&'a [u8]);

impl<'a> Script<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn who(&mut self) -> PublicKey {
        key(WHO[usize::from(self.byte().unwrap_or(0)) % WHO.len()])
    }

    fn data(&mut self) -> Bytes {
        let n = usize::from(self.byte().unwrap_or(0)) % MAX_CHUNK;
        Bytes::copy_from_slice(self.bytes(n))
    }
}

struct World {
    router: Router,
    metrics: RelayMetrics,
    clients: Vec<Client>,
    sibling: SiblingSession,
    link: SiblingLink,
    link_rx: mpsc::Receiver<Forward>,
    now: Instant,
    next_conn: u64,
    /// (from, to, packet) -> copies sent / received.
    sent: HashMap<(PublicKey, PublicKey, Bytes), u32>,
    received: HashMap<(PublicKey, PublicKey, Bytes), u32>,
}

/// Runs one scripted conversation; panics if an invariant breaks.
pub(crate) fn run(script: &[u8], start: Instant) {
    let (tx, link_rx) = mpsc::channel(4);
    let mut w = World {
        router: Router::default(),
        metrics: RelayMetrics::default(),
        clients: Vec::new(),
        sibling: SiblingSession::new(1),
        link: SiblingLink { id: 1, tx },
        link_rx,
        now: start,
        next_conn: 1,
        sent: HashMap::new(),
        received: HashMap::new(),
    };
    for i in 0..CLIENTS {
        let c = w.login(i);
        w.clients.push(c);
    }
    let mut s = Script(script);
    while let Some(op) = s.byte() {
        let i = usize::from(op / 8) % CLIENTS;
        match op % 8 {
            0 => {
                let n = usize::from(s.byte().unwrap_or(0)) % MAX_CHUNK;
                let chunk = s.bytes(n);
                w.clients[i].framer.push_rx(chunk);
                w.read_frames(i);
            }
            1 => {
                let dst = s.who();
                let packet = s.data();
                w.client_frame(i, Frame::SendPacket { dst, packet });
            }
            2 => w.drain(i),
            3 => {
                w.now += Duration::from_millis(u64::from(s.byte().unwrap_or(0)) * 8);
                let now = w.now;
                for c in &mut w.clients {
                    if c.session.poll_timeout().is_some_and(|t| t <= now) {
                        c.session.handle_timeout(now);
                    }
                }
            }
            4 => w.leave(i),
            5 => w.sibling_frame(&mut s),
            6 => {
                let what = s.byte().unwrap_or(0);
                let peer = s.who();
                let frame = if what % 2 == 0 {
                    Frame::PeerPresent { peer, endpoint: None, flags: None }
                } else {
                    Frame::PeerGone { peer, reason: warren_relay_proto::PeerGoneReason::Disconnected }
                };
                sibling::on_link_frame(&w.router, &w.link, frame);
                // The link's writer takes what was forwarded to the sibling.
                while w.link_rx.try_recv().is_ok() {}
            }
            _ => {
                let what = s.byte().unwrap_or(0);
                let peer = s.who();
                let frame = match what % 3 {
                    0 => Frame::NotePreferred { preferred: what & 8 != 0 },
                    1 => Frame::FindPeer { peer },
                    _ => Frame::Ping([what; 8]),
                };
                w.client_frame(i, frame);
            }
        }
        w.check();
    }
    for i in 0..CLIENTS {
        w.drain(i);
    }
    w.check();
}

impl World {
    fn login(&mut self, i: usize) -> Client {
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let inbox = Arc::new(Inbox::new(4, 4096));
        let remote = SocketAddr::from(([127, 0, 0, 1], 1000 + conn_id as u16));
        let k = key(WHO[i]);
        self.router.register(k, ClientHandle { conn_id, remote, inbox: inbox.clone() });
        let budget = (i >= 2).then_some(ClientRate { bytes_per_second: 2000, burst_bytes: 1000 });
        Client {
            session: ClientSession::new(k, budget, self.now),
            inbox,
            framer: Framer::new(Role::Server, Transport::Derp, FrameDecoder::default()),
            conn_id,
        }
    }

    fn leave(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let ctx = Ctx { router: &self.router, metrics: &self.metrics };
        c.session.finish(c.conn_id, &c.inbox, ctx);
        assert_eq!(self.router.len(), CLIENTS - 1, "a finished client left the table");
        self.clients[i] = self.login(i);
    }

    /// Frames the client's bytes hold, as its connection reads them.
    fn read_frames(&mut self, i: usize) {
        loop {
            match self.clients[i].framer.poll_frame() {
                Ok(Some(frame)) => {
                    if !self.client_frame(i, frame) {
                        return;
                    }
                }
                Ok(None) => return,
                Err(_) => return self.leave(i),
            }
        }
    }

    /// A frame from client `i`; false if the connection closed.
    fn client_frame(&mut self, i: usize, frame: Frame) -> bool {
        let me = key(WHO[i]);
        if let Frame::SendPacket { dst, packet } = &frame {
            *self.sent.entry((me, *dst, packet.clone())).or_default() += 1;
        }
        let mut out = Vec::new();
        let now = self.now;
        let ctx = Ctx { router: &self.router, metrics: &self.metrics };
        let next = self.clients[i].session.handle_frame(frame, now, ctx, &mut out);
        self.written(i, out);
        if let Next::Close(_) = next {
            self.leave(i);
            return false;
        }
        true
    }

    /// Client `i`'s connection writes what its inbox holds.
    fn drain(&mut self, i: usize) {
        for _ in 0..64 {
            let Some(item) = self.clients[i].inbox.try_next() else { return };
            let mut out = Vec::new();
            let now = self.now;
            let ctx = Ctx { router: &self.router, metrics: &self.metrics };
            let c = &mut self.clients[i];
            let next = match item {
                Item::Control(ctl) => c.session.handle_control(ctl, &mut out),
                Item::Packet(p) => {
                    c.session.handle_packet(p, now, ctx, &mut out);
                    Next::Continue
                }
            };
            self.written(i, out);
            if let Next::Close(_) = next {
                return self.leave(i);
            }
        }
    }

    fn sibling_frame(&mut self, s: &mut Script<'_>) {
        let what = s.byte().unwrap_or(0);
        let peer = s.who();
        let frame = match what % 4 {
            0 => Frame::WatchConns,
            1 => {
                let src = key(s.byte().unwrap_or(0));
                let packet = s.data();
                *self.sent.entry((src, peer, packet.clone())).or_default() += 1;
                Frame::ForwardPacket { src, dst: peer, packet }
            }
            2 => Frame::ClosePeer { peer },
            _ => Frame::Ping([what; 8]),
        };
        let mut out = Vec::new();
        let now = self.now;
        let ctx = Ctx { router: &self.router, metrics: &self.metrics };
        self.sibling.handle_frame(frame, now, ctx, &mut out);
        if let Some(rx) = self.sibling.watching() {
            while let Ok(change) = rx.try_recv() {
                sibling::handle_presence(change, &mut out);
            }
        }
        for f in &out {
            round_trip(f);
        }
    }

    /// Checks what the relay wrote to client `i`.
    fn written(&mut self, i: usize, out: Vec<Frame>) {
        let me = key(WHO[i]);
        for f in out {
            round_trip(&f);
            if let Frame::RecvPacket { src, packet } = f {
                let id = (src, me, packet);
                let got = self.received.entry(id.clone()).or_default();
                *got += 1;
                let sent = self.sent.get(&id).copied().unwrap_or(0);
                assert!(*got <= sent, "client {i} got {got} copies of a packet sent {sent} times");
            }
        }
    }

    fn check(&self) {
        assert_eq!(self.router.len(), CLIENTS, "the table holds the clients logged in");
    }
}

/// `frame` as the relay writes it reads back as the same frame at the client.
fn round_trip(frame: &Frame) {
    let mut relay = Framer::new(Role::Server, Transport::Derp, FrameDecoder::default());
    relay.queue(frame);
    let mut client = Framer::new(Role::Client, Transport::Derp, FrameDecoder::default());
    while let Some(bytes) = relay.take_transmit(&mut rand_core::OsRng) {
        client.push_rx(&bytes);
    }
    match client.poll_frame() {
        Ok(Some(back)) => assert_eq!(&back, frame, "a frame the relay writes reads back the same"),
        other => panic!("the relay wrote {frame:?}, which reads back as {other:?}"),
    }
}
