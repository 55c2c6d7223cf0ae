#!/usr/bin/env python3
"""Independent NaCl-box check for the DERP handshake, using PyNaCl (libsodium).

Usage:
  nacl_box.py seal             print hex(nonce | box) of the fixed ClientInfo vector
  nacl_box.py open HEX         open hex(nonce | box) sealed server->client, print the plaintext

Fixed inputs: client secret = bytes 0..31, server secret = bytes 32..63, nonce = bytes 64..87.
"""
import sys

from nacl.public import Box, PrivateKey

CLIENT = PrivateKey(bytes(range(0, 32)))
SERVER = PrivateKey(bytes(range(32, 64)))
NONCE = bytes(range(64, 88))
MESSAGE = b'{"version":2,"CanAckPings":true}'


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "seal":
        sealed = Box(CLIENT, SERVER.public_key).encrypt(MESSAGE, NONCE)
        print(bytes(sealed).hex())
        print(bytes(CLIENT.public_key).hex())
        print(bytes(SERVER.public_key).hex())
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "open":
        plain = Box(CLIENT, SERVER.public_key).decrypt(bytes.fromhex(sys.argv[2]))
        print(plain.decode())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
