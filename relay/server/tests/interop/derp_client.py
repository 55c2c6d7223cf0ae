#!/usr/bin/env python3
"""An independent DERP v2 client, written from the published protocol description only.

It shares no code with Warren: frames, the NaCl box handshake (PyNaCl) and WebSocket framing
are implemented here from the specification. Two clients log in, exchange packets, ping the
relay and probe an absent key.

usage: derp_client.py --port PORT --ca CA_PEM [--host HOST] [--websocket] [--fast-start]
prints "OK ..." and exits 0 on success; exits 1 with a message on any failure.
"""
import argparse
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys

from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"DERP\xf0\x9f\x94\x91"
SERVER_KEY, CLIENT_INFO, SERVER_INFO, SEND_PACKET, RECV_PACKET = 1, 2, 3, 4, 5
KEEP_ALIVE, PEER_GONE, PING, PONG = 6, 8, 0x12, 0x13
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Fail(Exception):
    pass


class Conn:
    def __init__(self, host, port, ca, websocket, fast_start):
        ctx = ssl.create_default_context(cafile=ca)
        raw = socket.create_connection((host, port), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.websocket = websocket
        self.stream = b""  # DERP bytes received, not yet parsed
        self.raw = b""  # socket bytes not yet unwrapped (WebSocket)
        req = "GET /derp HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\n" % (host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        if websocket:
            req += "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Protocol: derp\r\n" % key
        else:
            req += "Upgrade: DERP\r\n"
            if fast_start:
                req += "Derp-Fast-Start: 1\r\n"
        self.sock.sendall((req + "\r\n").encode())
        self.header_key = None
        if websocket or not fast_start:
            head = self._read_head()
            lines = head.split("\r\n")
            if not lines[0].startswith("HTTP/1.1 101"):
                raise Fail("upgrade refused: " + lines[0])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    n, v = line.split(":", 1)
                    headers[n.strip().lower()] = v.strip()
            if websocket:
                want = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
                if headers.get("sec-websocket-accept") != want:
                    raise Fail("bad Sec-WebSocket-Accept")
                if headers.get("sec-websocket-protocol") != "derp":
                    raise Fail("subprotocol not echoed")
            else:
                self.header_key = headers.get("derp-public-key")

    def _read_head(self):
        while b"\r\n\r\n" not in self.raw:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise Fail("closed during HTTP response")
            self.raw += chunk
        head, self.raw = self.raw.split(b"\r\n\r\n", 1)
        if not self.websocket:
            self.stream, self.raw = self.raw, b""
        return head.decode("latin-1")

    # --- transport -------------------------------------------------------------------
    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Fail("connection closed")
        if not self.websocket:
            self.stream += chunk
            return
        self.raw += chunk
        while True:  # unwrap every complete WebSocket frame
            if len(self.raw) < 2:
                return
            b0, b1 = self.raw[0], self.raw[1]
            if b1 & 0x80:
                raise Fail("server frames must not be masked")
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if len(self.raw) < 4:
                    return
                n, pos = struct.unpack(">H", self.raw[2:4])[0], 4
            elif n == 127:
                if len(self.raw) < 10:
                    return
                n, pos = struct.unpack(">Q", self.raw[2:10])[0], 10
            if len(self.raw) < pos + n:
                return
            payload, self.raw = self.raw[pos:pos + n], self.raw[pos + n:]
            opcode = b0 & 0x0F
            if opcode in (0, 1, 2):
                self.stream += payload
            elif opcode == 9:
                self._ws_send(0xA, payload)
            elif opcode == 8:
                raise Fail("websocket closed by server")

    def _ws_send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    # --- frames ----------------------------------------------------------------------
    def send_frame(self, ftype, payload):
        data = struct.pack(">BI", ftype, len(payload)) + payload
        if self.websocket:
            self._ws_send(2, data)
        else:
            self.sock.sendall(data)

    def recv_frame(self):
        while True:
            if len(self.stream) >= 5:
                ftype, n = struct.unpack(">BI", self.stream[:5])
                if len(self.stream) >= 5 + n:
                    payload, self.stream = self.stream[5:5 + n], self.stream[5 + n:]
                    return ftype, payload
            self._fill()

    def recv_skipping_keepalive(self):
        while True:
            ftype, payload = self.recv_frame()
            if ftype != KEEP_ALIVE:
                return ftype, payload


def login(args):
    conn = Conn(args.host, args.port, args.ca, args.websocket, args.fast_start)
    ftype, payload = conn.recv_frame()
    if ftype != SERVER_KEY or payload[:8] != MAGIC or len(payload) < 40:
        raise Fail("first frame is not a valid ServerKey")
    server_key = PublicKey(payload[8:40])
    if conn.header_key is not None and conn.header_key != payload[8:40].hex():
        raise Fail("Derp-Public-Key header does not match the ServerKey frame")
    me = PrivateKey.generate()
    info = json.dumps({"version": 2, "CanAckPings": True}).encode()
    sealed = Box(me, server_key).encrypt(info, os.urandom(24))  # nonce | box
    conn.send_frame(CLIENT_INFO, bytes(me.public_key) + bytes(sealed))
    ftype, payload = conn.recv_frame()
    if ftype != SERVER_INFO:
        raise Fail("expected ServerInfo, got frame type %d" % ftype)
    server_info = json.loads(Box(me, server_key).decrypt(payload))
    if server_info.get("version") != 2:
        raise Fail("unexpected ServerInfo %r" % server_info)
    return conn, me


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="localhost")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--websocket", action="store_true")
    ap.add_argument("--fast-start", action="store_true")
    args = ap.parse_args()
    try:
        a, akey = login(args)
        b, bkey = login(args)
        a.send_frame(SEND_PACKET, bytes(bkey.public_key) + b"hello from A")
        ftype, payload = b.recv_skipping_keepalive()
        if ftype != RECV_PACKET or payload[:32] != bytes(akey.public_key) or payload[32:] != b"hello from A":
            raise Fail("B did not receive A's packet intact")
        b.send_frame(SEND_PACKET, bytes(akey.public_key) + b"hello from B")
        ftype, payload = a.recv_skipping_keepalive()
        if ftype != RECV_PACKET or payload[:32] != bytes(bkey.public_key) or payload[32:] != b"hello from B":
            raise Fail("A did not receive B's packet intact")
        a.send_frame(PING, b"pingdata")
        ftype, payload = a.recv_skipping_keepalive()
        if (ftype, payload) != (PONG, b"pingdata"):
            raise Fail("no Pong for Ping")
        absent = bytes(PrivateKey.generate().public_key)
        a.send_frame(SEND_PACKET, absent + b"?")
        ftype, payload = a.recv_skipping_keepalive()
        if ftype != PEER_GONE or payload[:32] != absent or payload[32:33] != b"\x01":
            raise Fail("no PeerGone(not here) for an absent key")
    except (Fail, OSError, ValueError) as e:
        print("FAIL: %s" % e, file=sys.stderr)
        return 1
    mode = "websocket" if args.websocket else ("derp fast-start" if args.fast_start else "derp")
    print("OK %s: login, packets both ways, ping/pong, peer gone" % mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
