"""WireGuard wire formats (whitepaper §5.4.2-§5.4.7): four message types, all little-endian.

=====  ============================================================  =========
type   layout after ``type u8 | reserved 3 zero bytes``             size
=====  ============================================================  =========
1      sender u32, ephemeral 32, static 32+16, timestamp 12+16,      148
       mac1 16, mac2 16
2      sender u32, receiver u32, ephemeral 32, empty 0+16,           92
       mac1 16, mac2 16
3      receiver u32, nonce 24, cookie 16+16                          64
4      receiver u32, counter u64, encrypted packet (>= 16 tag)       32 + n*16
=====  ============================================================  =========

The first four bytes are read as one little-endian u32 (type in the low byte, reserved bytes zero), the same
trick wireguard-go uses, so a non-zero reserved byte is rejected as a bad type.
"""

from __future__ import annotations

import struct

__all__ = [
    "COOKIE_REPLY",
    "COOKIE_REPLY_SIZE",
    "INITIATION",
    "INITIATION_SIZE",
    "MSG_COOKIE_REPLY",
    "MSG_INITIATION",
    "MSG_RESPONSE",
    "MSG_TRANSPORT",
    "RESPONSE",
    "RESPONSE_SIZE",
    "TRANSPORT_HEADER",
    "TRANSPORT_HEADER_SIZE",
    "TRANSPORT_MIN_SIZE",
    "U32",
]

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = 32  # header + Poly1305 tag of an empty (keepalive) payload

U32 = struct.Struct("<I")
# type|reserved as one u32, sender, ephemeral, encrypted static, encrypted timestamp, mac1, mac2
INITIATION = struct.Struct("<II32s48s28s16s16s")
# type, sender, receiver, ephemeral, encrypted nothing, mac1, mac2
RESPONSE = struct.Struct("<III32s16s16s16s")
# type, receiver, nonce, encrypted cookie
COOKIE_REPLY = struct.Struct("<II24s32s")
# type, receiver, counter
TRANSPORT_HEADER = struct.Struct("<IIQ")

assert INITIATION.size == INITIATION_SIZE
assert RESPONSE.size == RESPONSE_SIZE
assert COOKIE_REPLY.size == COOKIE_REPLY_SIZE
assert TRANSPORT_HEADER.size == TRANSPORT_HEADER_SIZE
