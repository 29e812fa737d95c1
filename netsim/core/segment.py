"""TCP segmentation of GSO super-packets (sans-IO): what a NIC's TSO would have done, for the utun's MTU.

Also the TUN offload pieces (docs/helper.md, TUN offloads): the virtio_net_hdr of a TUN opened with
``IFF_VNET_HDR`` (`parse_vnet_header_untrusted`), software GSO of the super-packets it reads
(`split_gso_untrusted`) and TCP coalescing for its writes (`coalesce_tcp`, GRO on writes).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from netsim.core.checksum import compute_ipv4_header_checksum, compute_l4_checksum
from netsim.core.packet import Buffer, PacketView
from netsim.errors import BadPacket, ConfigError

__all__ = [
    "GRO_MIN",
    "MAX_GSO_SEGMENTS",
    "MIN_GSO_SIZE",
    "VNET_F_DATA_VALID",
    "VNET_F_NEEDS_CSUM",
    "VNET_GSO_ECN",
    "VNET_GSO_NONE",
    "VNET_GSO_TCPV4",
    "VNET_GSO_TCPV6",
    "VNET_GSO_UDP",
    "VNET_GSO_UDP_L4",
    "VNET_HDR_SIZE",
    "VNET_PLAIN",
    "VNET_REASONS",
    "VnetHeader",
    "coalesce_tcp",
    "complete_checksum",
    "parse_vnet_header_untrusted",
    "segment_tcp",
    "split_gso_untrusted",
]

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


# ---------------------------------------------------------------------------------------------------------------
# TUN offloads: the virtio_net_hdr a TUN opened with IFF_VNET_HDR puts in front of every packet, software GSO for
# the super-packets it hands out (TSO/USO), and TCP coalescing for writes (GRO on writes). Linux
# include/uapi/linux/virtio_net.h (struct virtio_net_hdr, legacy layout: host byte order), the kernel's
# virtio_net_hdr_to_skb() for what a write may carry, and wireguard-go's tun/offload_linux.go for the same job.
# ---------------------------------------------------------------------------------------------------------------

VNET_HDR_SIZE = 10
_VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_F_NEEDS_CSUM = 1  # the L4 checksum is partial: the pseudo-header sum at csum_start + csum_offset
VNET_F_DATA_VALID = 2  # the checksum was verified (receive side)
VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_UDP, VNET_GSO_TCPV6, VNET_GSO_UDP_L4 = 0, 1, 3, 4, 5
VNET_GSO_ECN = 0x80  # TCP with ECN: the super-packet's CWR goes on the first segment only
MAX_GSO_SEGMENTS = 256  # a 64 KiB super-packet at the smallest MSS we split (256 B): bounded work per read
MIN_GSO_SIZE = 256
#: Drop reasons of `parse_vnet_header_untrusted` and `split_gso_untrusted` (``BadPacket.reason``).
VNET_REASONS = ("vnet_truncated", "vnet_bad_flags", "vnet_bad_gso_type", "vnet_bad_csum", "vnet_bad_gso")
_KNOWN_GSO = frozenset({VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_UDP_L4})
_M = 0xFFFF
_TCP, _UDP = 6, 17
_U32 = struct.Struct("!I")


class VnetHeader(NamedTuple):
    """One parsed ``struct virtio_net_hdr`` (10 bytes; see `parse_vnet_header_untrusted`)."""

    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int

    def pack(self) -> bytes:
        """The 10 header bytes (host byte order, as the legacy TUN layout has them)."""
        return _VNET.pack(*self)


VNET_PLAIN = VnetHeader(0, VNET_GSO_NONE, 0, 0, 0, 0).pack()  # a whole packet, checksums already filled


def parse_vnet_header_untrusted(data: Buffer, max_gso_size: int = 0xFFFF) -> VnetHeader:
    """Parse and check the virtio_net_hdr at the start of ``data`` (a TUN read: header, then the packet).

    Checked, bounded (each failure is one `BadPacket` reason of `VNET_REASONS`): at least 10 bytes; only the
    NEEDS_CSUM and DATA_VALID flag bits; a GSO type of none, TCPv4, TCPv6 or UDP_L4 (ECN only with TCP); with
    NEEDS_CSUM the 2-byte checksum field inside the packet; a GSO packet needs NEEDS_CSUM (the kernel always
    sets it: a super-packet's checksums are never filled), a ``gso_size`` of `MIN_GSO_SIZE`..``max_gso_size``
    and at most `MAX_GSO_SEGMENTS` segments.
    """
    n = len(data)
    if n < VNET_HDR_SIZE:
        raise BadPacket("vnet_truncated", f"{n} bytes, a virtio_net_hdr is {VNET_HDR_SIZE}")
    hdr = VnetHeader._make(_VNET.unpack_from(data))
    length = n - VNET_HDR_SIZE
    if hdr.flags & ~(VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID):
        raise BadPacket("vnet_bad_flags", f"flags {hdr.flags:#x}")
    base = hdr.gso_type & ~VNET_GSO_ECN
    if base not in _KNOWN_GSO or (hdr.gso_type & VNET_GSO_ECN and base not in (VNET_GSO_TCPV4, VNET_GSO_TCPV6)):
        raise BadPacket("vnet_bad_gso_type", f"gso_type {hdr.gso_type:#x}")
    if hdr.flags & VNET_F_NEEDS_CSUM and hdr.csum_start + hdr.csum_offset + 2 > length:
        raise BadPacket("vnet_bad_csum", f"checksum at {hdr.csum_start}+{hdr.csum_offset} beyond {length} bytes")
    if base != VNET_GSO_NONE:
        if not hdr.flags & VNET_F_NEEDS_CSUM:
            raise BadPacket("vnet_bad_csum", "a GSO packet without NEEDS_CSUM")
        if not MIN_GSO_SIZE <= hdr.gso_size <= max_gso_size:
            raise BadPacket("vnet_bad_gso", f"gso_size {hdr.gso_size} outside {MIN_GSO_SIZE}..{max_gso_size}")
        if (length - hdr.csum_start) // hdr.gso_size >= MAX_GSO_SEGMENTS:
            raise BadPacket("vnet_bad_gso", f"more than {MAX_GSO_SEGMENTS} segments of {hdr.gso_size} bytes")
    return hdr


def _fill(buf: bytearray, start: int, offset: int, initial: int, udp: bool) -> None:
    """Store the checksum over ``buf[start:]`` (field at ``start + offset`` zero) plus ``initial``.

    A computed 0 stays 0x0000 for TCP, as `segment_tcp` and the kernel's own software TSO (``gso_make_checksum``)
    store it, and is sent as 0xFFFF for UDP, whose 0 means "no checksum" (RFC 768).
    """
    n = int.from_bytes(memoryview(buf)[start:], "big")
    if (len(buf) - start) & 1:
        n <<= 8
    cs = (-(n + initial)) % _M
    _U16.pack_into(buf, start + offset, cs or (_M if udp else 0))


def complete_checksum(pkt: bytearray, csum_start: int, csum_offset: int) -> None:
    """Finish a NEEDS_CSUM packet in place: the field holds the pseudo-header sum; store the full checksum.

    What the kernel's ``skb_checksum_help`` does for a device without checksum offload (0 is sent as 0xFFFF).
    """
    n = int.from_bytes(memoryview(pkt)[csum_start:], "big")
    if (len(pkt) - csum_start) & 1:
        n <<= 8
    _U16.pack_into(pkt, csum_start + csum_offset, ((-n) % _M) or _M)


def split_gso_untrusted(data: Buffer, hdr: VnetHeader, out: list[bytes]) -> int:
    """Append the wire packets (``bytes``) of one TUN read (the packet after its parsed `VnetHeader`) to ``out``.

    A packet without GSO is appended as is, or with its checksum completed when NEEDS_CSUM is set. A TCP
    super-packet (TSO) becomes ``gso_size``-byte segments, a UDP_L4 one (USO) ``gso_size``-byte datagrams, each
    with its own lengths and full checksums (`segment_tcp`'s rules: sequence numbers advance, FIN/PSH on the last
    segment, CWR on the first, IPv4 identifications count up). The transport header starts at ``csum_start`` (the
    kernel says where; IPv6 extension headers before it are repeated in every segment). Returns how many packets
    were appended.

    Raises:
        BadPacket: ``vnet_bad_gso`` (the packet does not match its GSO type: version, protocol, header offsets).
    """
    base = hdr.gso_type & ~VNET_GSO_ECN
    if base == VNET_GSO_NONE:
        if hdr.flags & VNET_F_NEEDS_CSUM:
            pkt = bytearray(data)
            complete_checksum(pkt, hdr.csum_start, hdr.csum_offset)
            out.append(bytes(pkt))
        else:
            out.append(data if isinstance(data, bytes) else bytes(data))
        return 1
    buf = memoryview(data)
    total = len(buf)
    l4 = hdr.csum_start
    version = buf[0] >> 4 if total else 0
    if (
        (base == VNET_GSO_TCPV4 and (version != 4 or buf[0] & 0x0F != l4 // 4 or l4 & 3 or buf[9] != _TCP))
        or (base == VNET_GSO_TCPV6 and (version != 6 or l4 < 40))
        or (base == VNET_GSO_UDP_L4 and version not in (4, 6))
        or l4 < 20
    ):
        raise BadPacket("vnet_bad_gso", f"gso_type {hdr.gso_type} does not match the packet")
    if base == VNET_GSO_UDP_L4:
        if hdr.csum_offset != 6 or total < l4 + 8:
            raise BadPacket("vnet_bad_gso", "UDP_L4 checksum is not at UDP's")
        hlen = l4 + 8
    else:
        if hdr.csum_offset != 16 or total < l4 + 20:
            raise BadPacket("vnet_bad_gso", "TCP checksum is not at TCP's")
        hlen = l4 + ((buf[l4 + 12] >> 4) << 2)
        if hlen < l4 + 20 or hlen > total:
            raise BadPacket("vnet_bad_gso", "TCP data offset outside the packet")
    mss = hdr.gso_size
    v4 = version == 4
    if v4:
        addrs = int.from_bytes(buf[12:20], "big")
        ident = _U16.unpack_from(buf, 4)[0]
    else:
        addrs = int.from_bytes(buf[8:40], "big")
        ident = 0
    proto = _UDP if base == VNET_GSO_UDP_L4 else _TCP
    head = bytearray(buf[:hlen])
    _U16.pack_into(head, l4 + hdr.csum_offset, 0)
    if v4:
        _U16.pack_into(head, 10, 0)
    tcp = proto == _TCP
    if tcp:
        (seq,) = _U32.unpack_from(buf, l4 + 4)
        flags = buf[l4 + 13]
    start = hlen
    count = 0
    while start < total:
        end = min(start + mss, total)
        seg = head + buf[start:end]
        n = len(seg)
        if tcp:
            _U32.pack_into(seg, l4 + 4, (seq + start - hlen) & 0xFFFFFFFF)
            f = flags
            if end < total:
                f &= ~0x09  # FIN, PSH only on the last segment
            if count:
                f &= ~0x80  # CWR only on the first (RFC 3168 §6.1.2)
            seg[l4 + 13] = f
        else:
            _U16.pack_into(seg, l4 + 4, n - l4)
        if v4:
            _U16.pack_into(seg, 2, n)
            _U16.pack_into(seg, 4, (ident + count) & _M)
            _U16.pack_into(seg, 10, (-int.from_bytes(memoryview(seg)[:l4], "big")) % _M)
        else:
            _U16.pack_into(seg, 4, n - 40)
        _fill(seg, l4, hdr.csum_offset, (addrs + proto + n - l4) % _M, not tcp)
        out.append(bytes(seg))
        count += 1
        start = end
    return count


GRO_MIN = 256  # smaller packets are written as they are (an ACK is 52 bytes)
_GRO_MIN = GRO_MIN
_V4_FLOW = struct.Struct("!BBHHHBBH8s")  # version/IHL, TOS, total, id, flags/frag, TTL, protocol, csum, addresses
_TCP_FLOW = struct.Struct("!4sIIBBH")  # ports, seq, ack, data offset, flags, window


def coalesce_tcp(packets: Sequence[Buffer], max_size: int = 0xFFFF) -> list[list[Buffer]]:
    """Group packets for GRO on writes: each item is one TUN write (a vnet header first, then buffers to join).

    Consecutive TCP segments of one flow merge into one super-packet (Linux ``tcp_gro_receive``'s rules): IPv4
    without options and with DF, or IPv6 without extension headers; same addresses, ports, TOS/traffic class,
    TTL/hop limit, ack number, window and TCP options (bytes after the 20-byte header); only ACK set (PSH allowed
    on the last); the sequence number continues the previous segment; every segment but the last has the first
    one's payload size; at most ``max_size`` bytes and `MAX_GSO_SEGMENTS` segments. Anything else is written on
    its own after a plain header (`VNET_PLAIN`). The merged packet carries NEEDS_CSUM with the pseudo-header sum
    in the TCP checksum field (what the kernel's own TSO output carries), so the segments' own checksums are not
    checked again: they were authenticated by the tunnel (WireGuard's AEAD) before they got here.

    The packets are trusted (already validated by the caller); buffers are referenced, not copied.
    """
    out: list[list[Buffer]] = []
    i = 0
    n = len(packets)
    while i < n:
        first = packets[i]
        key = _gro_key(first, _GRO_MIN)
        if key is None:
            out.append([VNET_PLAIN, first])
            i += 1
            continue
        l4, hlen, seq, mss = key[0], key[1], key[2], key[3]
        size = len(first)
        nxt = (seq + mss) & 0xFFFFFFFF
        j = i + 1
        last_psh = first[l4 + 13] & 0x08
        while j < n and not last_psh and j - i < MAX_GSO_SEGMENTS:
            other = packets[j]
            k = _gro_key(other, 41)  # a short last segment may join
            if k is None or k[4] != key[4] or k[2] != nxt or k[3] > mss or size + k[3] > max_size:
                break
            if bytes(memoryview(other)[l4 + 20 : hlen]) != bytes(memoryview(first)[l4 + 20 : hlen]):
                break  # TCP options differ (e.g. a new timestamp)
            size += k[3]
            nxt = (nxt + k[3]) & 0xFFFFFFFF
            last_psh = other[l4 + 13] & 0x08
            j += 1
            if k[3] < mss:
                break  # a short segment ends the super-packet
        if j - i == 1:
            out.append([VNET_PLAIN, first])
            i += 1
            continue
        head = bytearray(memoryview(first)[:hlen])
        v4 = l4 == 20
        if v4:
            _U16.pack_into(head, 2, size)
            _U16.pack_into(head, 10, 0)
            _U16.pack_into(head, 10, (-int.from_bytes(head[:20], "big")) % _M)
            pseudo = (int.from_bytes(head[12:20], "big") + _TCP + size - 20) % _M
        else:
            _U16.pack_into(head, 4, size - 40)
            pseudo = (int.from_bytes(head[8:40], "big") + _TCP + size - 40) % _M
        head[l4 + 13] |= last_psh
        _U16.pack_into(head, l4 + 16, pseudo or _M)
        gso = VNET_GSO_TCPV4 if v4 else VNET_GSO_TCPV6
        vnet = VnetHeader(VNET_F_NEEDS_CSUM, gso, hlen, mss, l4, 16).pack()
        out.append([vnet, head, *(memoryview(p)[hlen:] for p in packets[i:j])])
        i = j
    return out


def _gro_key(pkt: Buffer, minimum: int) -> tuple[int, int, int, int, tuple[object, ...]] | None:
    """``(l4 offset, header length, seq, payload size, flow identity)`` of a mergeable TCP segment of at least
    ``minimum`` bytes, else None."""
    n = len(pkt)
    if n < minimum:
        return None  # pure ACKs and small segments: nothing worth merging, one cheap test
    b0 = pkt[0]
    if b0 == 0x45:
        _, tos, total, _, frag, ttl, proto, _, addrs = _V4_FLOW.unpack_from(pkt)
        if proto != _TCP or frag != 0x4000 or total != n:
            return None
        l4 = 20
        ident: tuple[object, ...] = (4, tos, ttl, addrs)
    elif b0 >> 4 == 6 and n >= 60:
        if pkt[6] != _TCP or _U16.unpack_from(pkt, 4)[0] + 40 != n:
            return None
        l4 = 40
        ident = (6, bytes(memoryview(pkt)[:4]), pkt[7], bytes(memoryview(pkt)[8:40]))
    else:
        return None
    ports, seq, ack, off, flags, window = _TCP_FLOW.unpack_from(pkt, l4)
    hlen = l4 + ((off >> 4) << 2)
    if flags & ~0x08 != 0x10 or hlen < l4 + 20 or hlen >= n:  # ACK (and PSH) only, with payload
        return None
    return l4, hlen, seq, n - hlen, (*ident, ports, ack, window, hlen)
