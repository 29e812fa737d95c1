"""The Internet checksum: full computation (RFC 1071) and in-place incremental rewrites (RFC 1624).

Theory of operation
-------------------
The Internet checksum is the one's complement of the one's complement sum of 16-bit big-endian words. Because
``2**16 ≡ 1 (mod 0xFFFF)``, a buffer read as one big-endian integer ``N`` satisfies ``N ≡ Σ words (mod
0xFFFF)``, so the whole sum is ``int.from_bytes(buf) % 0xFFFF``: two C loops, no Python per-word loop. The
only subtlety of one's complement arithmetic is its two zeros: a sum of data that is not all zero is never
+0, so the residue 0 stands for 0xFFFF and the checksum ``(-N) % 0xFFFF`` lies in ``0..0xFFFE``. An all-zero
input gives 0xFFFF (no IP packet is all zero).

RFC 1624 eq. 3, ``HC' = ~(~HC + ~m + m')``, becomes ``HC' = (HC + m - m') % 0xFFFF`` in that arithmetic, for a
16-bit word and equally for a 32- or 128-bit field read as one integer (it is a sum of words). It keeps the
stored checksum equal to what a full recomputation gives (and keeps a wrong checksum exactly as wrong, which
is what a router must do). Fields must start at an even offset from the start of the checksummed data; all IP,
TCP, UDP and ICMP fields used here do.

UDP over IPv4 may carry checksum 0 meaning "none" (RFC 768): rewrites leave it 0, and a computed 0 is sent as
0xFFFF. IPv6 UDP checksums are mandatory (RFC 8200 §8.1) and are always updated. ICMPv4 has no pseudo-header;
ICMPv6 has one (RFC 4443 §2.3). Non-first fragments carry no transport header, so an address rewrite touches
only the IPv4 header checksum there.

The ``rewrite_*`` helpers change a packet in place through a loaded `PacketView` whose buffer is writable
(``bytearray`` or a writable ``memoryview``) and update the view's cached fields to match. They also work
on a quoted packet inside an ICMP error (`PacketView.quoted_packet_untrusted`); the caller then fixes the outer
ICMP checksum with `update_checksum_field` over the quote's bytes before and after.

With the native accelerator (`netsim.accel`, docs/native.md) the full sums are one C loop (``fold16``: the sum
folded to 16 bits, 0 exactly for all-zero data, so every result here is the same as the pure-Python one).
"""

from __future__ import annotations

import struct

from netsim import accel
from netsim.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Buffer, PacketView
from netsim.errors import BadPacket, LocalProtocolError

__all__ = [
    "checksum_offset",
    "compute_ipv4_header_checksum",
    "compute_l4_checksum",
    "fill_checksums",
    "incremental_update",
    "internet_checksum",
    "ones_complement_sum",
    "pseudo_header_sum",
    "rewrite_address",
    "rewrite_icmp_id",
    "rewrite_port",
    "update_checksum_field",
    "verify_ipv4_header_checksum",
    "verify_l4_checksum",
]

_U16 = struct.Struct("!H")
_U16_unpack = _U16.unpack_from
_U16_pack = _U16.pack_into
_M = 0xFFFF
_ADDRESS_OFFSET = {(True, True): 12, (True, False): 16, (False, True): 8, (False, False): 24}
# the accelerator's folded sum (None: pure Python); tests set it to None to compare both paths in one process
_fold16 = accel.native.fold16 if accel.native is not None else None


def ones_complement_sum(data: Buffer) -> int:
    """Sum of ``data`` as 16-bit big-endian words (odd length zero-padded, RFC 1071 §4.1), modulo 0xFFFF.

    The result is a residue in ``0..0xFFFE``; add residues with ``+`` and reduce with ``% 0xFFFF``.
    """
    if _fold16 is not None:
        return int(_fold16(data)) % _M
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    return n % _M


def internet_checksum(data: Buffer, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data`` plus an optional pre-summed ``initial`` (e.g. `pseudo_header_sum`).

    To get the value to store, the checksum field inside ``data`` must be zero. A buffer whose stored
    checksum is right gives 0 here (unless the data is all zero).
    """
    if _fold16 is not None:
        n: int = _fold16(data)  # congruent to the big-endian integer below, and 0 exactly when it is
        if n == 0 and initial == 0:
            return 0xFFFF
        return (-(n + initial)) % _M
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    if n == 0 and initial == 0:
        return 0xFFFF
    return (-(n + initial)) % _M


def _checksum_without_field(region: Buffer, field: int, initial: int) -> int:
    """`internet_checksum` of ``region`` as if its 16-bit checksum at ``field`` were zero (no copy)."""
    if _fold16 is not None and 0 <= field <= len(region) - 2:
        s: int = _fold16(region, field)  # the two bytes at `field` read as zero; 0 when all the rest is zero
        if s == 0 and initial == 0:
            return 0xFFFF
        return (-(s + initial)) % _M
    n = int.from_bytes(region, "big")
    size = len(region)
    if size & 1:
        n <<= 8
        size += 1
    stored: int = _U16_unpack(region, field)[0]
    n -= stored << (8 * (size - field - 2))
    if n == 0 and initial == 0:
        return 0xFFFF  # all-zero data (an empty ICMP echo with id 0): RFC 1071 gives 0xFFFF
    return (-(n + initial)) % _M


def incremental_update(checksum: int, old: int, new: int) -> int:
    """RFC 1624 eq. 3 for one field: ``old`` and ``new`` are the field's value as a big-endian integer.

    Works for a 16-bit word, a 32-bit IPv4 address or a 128-bit IPv6 address alike (see the module docstring).
    """
    return (checksum + old - new) % _M


def update_checksum_field(buf: Buffer, csum_offset: int, old: Buffer, new: Buffer) -> None:
    """Update the 16-bit checksum stored at ``buf[csum_offset]`` for an even-aligned field ``old`` -> ``new``."""
    (cs,) = _U16_unpack(buf, csum_offset)
    _U16_pack(buf, csum_offset, (cs + int.from_bytes(old, "big") - int.from_bytes(new, "big")) % _M)


def pseudo_header_sum(src: Buffer, dst: Buffer, protocol: int, length: int) -> int:
    """Residue of the TCP/UDP/ICMPv6 pseudo-header (RFC 9293 §3.1, RFC 768, RFC 8200 §8.1)."""
    return (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + protocol + length) % _M


def checksum_offset(view: PacketView) -> int | None:
    """Offset in ``view.buffer`` of the transport checksum, or None (non-first fragment, other protocol)."""
    if view.fragment_offset:
        return None
    proto = view.protocol
    if proto == PROTO_TCP:
        return view.l4_offset + 16
    if proto == PROTO_UDP:
        return view.l4_offset + 6
    if (proto == PROTO_ICMP and view.version == 4) or (proto == PROTO_ICMPV6 and view.version == 6):
        return view.l4_offset + 2
    return None


def _has_pseudo_header(view: PacketView) -> bool:
    return view.protocol != PROTO_ICMP or view.version != 4


def compute_ipv4_header_checksum(buf: Buffer, header_length: int = 20) -> int:
    """The IPv4 header checksum (RFC 791 §3.1) of ``buf[:header_length]``, ignoring the stored one."""
    return _checksum_without_field(memoryview(buf)[:header_length], 10, 0)


def verify_ipv4_header_checksum(buf: Buffer, header_length: int = 20) -> bool:
    """True when the stored IPv4 header checksum is right."""
    (stored,) = _U16_unpack(buf, 10)
    return bool(stored == compute_ipv4_header_checksum(buf, header_length))


def compute_l4_checksum(view: PacketView) -> int:
    """The transport checksum the packet should carry (stored one ignored), computed in full.

    Only meaningful for a whole (unfragmented) packet: the checksum covers the reassembled datagram. A UDP
    result of 0 is returned as 0xFFFF (RFC 768).

    Raises:
        LocalProtocolError: the packet is a fragment or has no TCP/UDP/ICMP checksum.
    """
    off = checksum_offset(view)
    if off is None or view.is_fragment:
        raise LocalProtocolError(
            f"no transport checksum to compute for protocol {view.protocol} "
            f"(fragment={view.is_fragment}); only whole TCP/UDP/ICMP/ICMPv6 packets have one"
        )
    buf = view.buffer
    l4 = view.l4_offset
    total = view.total_length
    initial = 0
    if _has_pseudo_header(view):
        initial = pseudo_header_sum(view.src, view.dst, view.protocol, total - l4)
    cs = _checksum_without_field(memoryview(buf)[l4:total], off - l4, initial)
    if cs == 0 and view.protocol == PROTO_UDP:
        return 0xFFFF
    return cs


def verify_l4_checksum(view: PacketView) -> bool:
    """True when the stored transport checksum is right (IPv4 UDP checksum 0, "none", counts as right).

    A receiver's check (RFC 1071 §2, RFC 1624 §3): both one's-complement zeros are right, so a computed 0x0000
    stored as 0xFFFF verifies (the kernel's ``skb_checksum_help`` stores TCP's zero that way, its software TSO
    stores 0x0000). Over all-zero data (an ICMPv4 echo with id, sequence and data 0) only 0xFFFF is right. A UDP
    checksum of 0 over IPv6 is wrong (RFC 8200 §8.1).
    """
    off = checksum_offset(view)
    if off is None or view.is_fragment:
        raise LocalProtocolError(f"no transport checksum to verify for protocol {view.protocol}")
    (stored,) = _U16_unpack(view.buffer, off)
    if stored == 0 and view.protocol == PROTO_UDP:
        return view.version == 4
    computed = compute_l4_checksum(view)
    return stored == computed or (computed == 0 and stored == _M)


def fill_checksums(buf: bytearray | memoryview) -> PacketView:
    """Compute and store the IPv4 header checksum and the transport checksum of a freshly built packet.

    For packet builders (examples, a provider answering pings): build the bytes with zero checksums, call
    this, send. Fragments get only the IPv4 header checksum. Returns the parsed view.

    Raises:
        LocalProtocolError: ``buf`` is not a valid packet (the builder has a bug); the message has the reason.
    """
    try:
        view = PacketView.parse_untrusted(buf)
    except BadPacket as e:
        raise LocalProtocolError(f"fill_checksums() was given a malformed packet: {e}") from e
    if view.version == 4:
        _U16_pack(buf, 10, compute_ipv4_header_checksum(buf, view.l4_offset))
    off = checksum_offset(view)
    if off is not None and not view.is_fragment:
        _U16_pack(buf, off, compute_l4_checksum(view))
    return view


def _update_l4(view: PacketView, delta: int, in_pseudo_header: bool) -> None:
    """Apply ``delta`` = old - new (field values as integers) to the transport checksum (RFC 1624 eq. 3).

    Honours IPv4 UDP's "no checksum" zero and sends a computed UDP 0 as 0xFFFF (RFC 768).
    """
    if view.fragment_offset:
        return  # non-first fragment: no transport header here
    proto = view.protocol
    version = view.version
    if proto == PROTO_TCP:
        off = view.l4_offset + 16
    elif proto == PROTO_UDP:
        off = view.l4_offset + 6
    elif proto == PROTO_ICMPV6 and version == 6:
        off = view.l4_offset + 2
    elif proto == PROTO_ICMP and version == 4:
        if in_pseudo_header:
            return  # ICMPv4 has no pseudo-header (RFC 792)
        off = view.l4_offset + 2
    else:
        return
    buf = view.buffer
    if off + 2 > len(buf):
        return  # a quoted packet whose quote ends before its checksum
    (cs,) = _U16_unpack(buf, off)
    if proto == PROTO_UDP:
        if cs == 0 and version == 4:
            return  # RFC 768: no checksum stays no checksum
        _U16_pack(buf, off, (cs + delta) % _M or 0xFFFF)
        return
    cs = (cs + delta) % _M
    if cs == 0 and proto == PROTO_ICMP:
        # ICMPv4 has no pseudo-header, so its data can be all zero (an empty echo reply with id and seq 0),
        # whose checksum is 0xFFFF, not 0: the one case eq. 3 cannot tell apart. Recompute it.
        l4 = view.l4_offset
        cs = _checksum_without_field(memoryview(buf)[l4 : min(view.total_length, len(buf))], off - l4, 0)
    _U16_pack(buf, off, cs)


def rewrite_address(view: PacketView, new: bytes, *, source: bool) -> None:
    """Replace the source (``source=True``) or destination address in place, fixing every checksum.

    Updates the IPv4 header checksum and the TCP/UDP/ICMPv6 pseudo-header checksum (RFC 1624), and
    ``view.src``/``view.dst``. With an IPv6 Routing header the pseudo-header uses the final destination (RFC
    8200 §8.1), which this does not look for: rewrite only source addresses of such packets.

    Raises:
        LocalProtocolError: ``new`` has the wrong length for the packet's version.
    """
    v4 = view.version == 4
    size = 4 if v4 else 16
    if len(new) != size:
        raise LocalProtocolError(f"IPv{view.version} address must be {size} bytes, got {len(new)}")
    new = bytes(new)
    buf = view.buffer
    pos = _ADDRESS_OFFSET[v4, source]  # RFC 791 §3.1 / RFC 8200 §3
    delta = int.from_bytes(buf[pos : pos + size], "big") - int.from_bytes(new, "big")
    buf[pos : pos + size] = new  # type: ignore[index]
    if v4:
        (cs,) = _U16_unpack(buf, 10)
        _U16_pack(buf, 10, (cs + delta) % _M)
    _update_l4(view, delta, True)
    if source:
        view.src = new
    else:
        view.dst = new


def rewrite_port(view: PacketView, new: int, *, source: bool) -> None:
    """Replace the TCP/UDP source or destination port in place, fixing the transport checksum.

    Raises:
        LocalProtocolError: not a TCP/UDP packet with its header present, or ``new`` not in 0..65535.
    """
    if (view.protocol != PROTO_TCP and view.protocol != PROTO_UDP) or view.fragment_offset:
        raise LocalProtocolError(f"no ports to rewrite (protocol {view.protocol}, non-first fragment?)")
    if not 0 <= new <= 0xFFFF:
        raise LocalProtocolError(f"port must be 0..65535, got {new}")
    pos = view.l4_offset if source else view.l4_offset + 2
    buf = view.buffer
    (old,) = _U16_unpack(buf, pos)
    _U16_pack(buf, pos, new)
    _update_l4(view, old - new, False)
    if source:
        view.sport = new
    else:
        view.dport = new


def rewrite_icmp_id(view: PacketView, new: int) -> None:
    """Replace the ICMP/ICMPv6 echo identifier in place, fixing the ICMP checksum.

    Raises:
        LocalProtocolError: not an ICMP/ICMPv6 echo request or reply, or ``new`` not in 0..65535.
    """
    is_echo = (view.protocol == PROTO_ICMP and view.version == 4 and view.icmp_type in (0, 8)) or (
        view.protocol == PROTO_ICMPV6 and view.version == 6 and view.icmp_type in (128, 129)
    )
    if not is_echo or view.fragment_offset:
        raise LocalProtocolError(f"not an ICMP echo message (protocol {view.protocol}, type {view.icmp_type})")
    if not 0 <= new <= 0xFFFF:
        raise LocalProtocolError(f"ICMP id must be 0..65535, got {new}")
    pos = view.l4_offset + 4
    buf = view.buffer
    (old,) = _U16_unpack(buf, pos)
    _U16_pack(buf, pos, new)
    _update_l4(view, old - new, False)
    view.icmp_id = new
