"""TCP segmentation of GSO super-packets (sans-IO): what a NIC's TSO would have done, for the utun's MTU."""

from __future__ import annotations

import struct

from netsim.core.checksum import compute_ipv4_header_checksum, compute_l4_checksum
from netsim.core.packet import PacketView
from netsim.errors import ConfigError

__all__ = ["segment_tcp"]

_SEQ = struct.Struct("!I")
_U16 = struct.Struct("!H")


def segment_tcp(view: PacketView, max_size: int) -> list[bytearray]:
    """Cut a TCP packet longer than ``max_size`` into segments of at most ``max_size`` bytes, checksums filled.

    What a NIC does for TSO (and the kernel for GSO): every segment repeats the IP and TCP headers (options
    included), the sequence number advances by the payload already sent, FIN and PSH stay on the last segment
    and CWR on the first (RFC 3168 §6.1.2 sets CWR once); IPv4 identifications count up. A receiver accepts any
    segmentation (RFC 9293 §3.7), so this is transparent to the endpoints.

    Raises:
        ConfigError: ``max_size`` leaves no room for payload after the headers.
    """
    buf = view.buffer
    l4 = view.l4_offset
    hdr = l4 + ((buf[l4 + 12] >> 4) << 2)
    mss = max_size - hdr
    if mss < 8:
        raise ConfigError(f"max_size {max_size} leaves no room for TCP payload after {hdr} header bytes")
    total = view.total_length
    (seq,) = _SEQ.unpack_from(buf, l4 + 4)
    flags = buf[l4 + 13]
    ident = view.identification
    head = bytes(buf[:hdr])
    out: list[bytearray] = []
    start = hdr
    i = 0
    while start < total:
        end = min(start + mss, total)
        seg = bytearray(head)
        seg += buf[start:end]
        n = len(seg)
        _SEQ.pack_into(seg, l4 + 4, (seq + start - hdr) & 0xFFFFFFFF)
        f = flags
        if end < total:
            f &= ~0x09  # FIN, PSH only on the last segment
        if i:
            f &= ~0x80  # CWR only on the first
        seg[l4 + 13] = f
        if view.version == 4:
            _U16.pack_into(seg, 2, n)
            _U16.pack_into(seg, 4, (ident + i) & 0xFFFF)
            _U16.pack_into(seg, 10, 0)
            _U16.pack_into(seg, 10, compute_ipv4_header_checksum(seg, l4))
        else:
            _U16.pack_into(seg, 4, n - 40)
        seg_view = PacketView.parse_untrusted(seg)
        _U16.pack_into(seg, l4 + 16, compute_l4_checksum(seg_view))
        out.append(seg)
        start = end
        i += 1
    return out
