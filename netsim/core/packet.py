"""Zero-copy, bounds-checked view of one IPv4 or IPv6 packet (the hot path's only parser).

Theory of operation
-------------------
`PacketView.load_untrusted` validates a bare IP packet (no link header) in one pass and stores every field in
a slot, so a caller that needs only the 5-tuple pays for the parse once and reads ints afterwards. Fields are
read eagerly because measurement said so: the headers must be read anyway to validate lengths and fragments,
and a slot read is cheaper than a lazy property (``docs/packet.md`` has the numbers). Two paths, in the
wireguard-go manner of a fast structure checked against a slow reference:

* the fast path (IPv4 without options or IPv6 without extension headers, unfragmented TCP/UDP/ICMP with sane
  lengths -- nearly all traffic) reads IP and transport header with a single `struct.Struct.unpack_from`;
* the general path handles everything else (options, extension headers, fragments, other protocols) and every
  error: one unpack for the IP header, a bounded extension-header walk, one for the transport header.

The tests check that both paths give identical results on real and on corrupted packets.

The view keeps a reference to the caller's buffer and never copies it; ``src``/``dst`` are small ``bytes``
objects (4 or 16 bytes, hashable, usable as dict keys) produced by the same unpack. `src_address` and
`dst_address` build `ipaddress` objects on demand; the hot path never needs them.

The view caches what it read: after the buffer is changed by anything other than the rewrite helpers of
`netsim.core.checksum` (which keep the view in step), call `load_untrusted` again.

Drop reasons
------------
`BadPacket.reason` is one of these tokens (also in `REASONS`); callers use them as drop-counter names. A
packet with several faults reports the first one checked, in about this order.

``empty``
    Zero-length buffer (a zero-length read must be a counted drop, never a spin; awl PR #258).
``bad_version``
    Version nibble is neither 4 nor 6.
``truncated``
    Shorter than the fixed header (20 bytes for IPv4, 40 for IPv6).
``bad_ihl``
    IPv4 IHL < 5 (RFC 791 §3.1).
``total_below_header``
    IPv4 total length < 20, the minimum header.
``header_exceeds_total``
    IPv4 IHL*4 > total length.
``total_exceeds_buffer``
    IPv4 total length, or 40 + IPv6 payload length, is larger than the buffer. Trailing bytes beyond the
    total (link padding) are allowed and ignored.
``ext_header_chain``
    IPv6 extension-header chain is truncated, longer than `MAX_EXTENSION_HEADERS`, has a Hop-by-Hop header
    that is not first (RFC 8200 §4.1), or two Fragment headers.
``tiny_fragment``
    A first fragment (offset 0, more-fragments set) that carries fewer than `MIN_FRAGMENT_L4_BYTES` bytes
    after the IP header chain (RFC 1858 §3 tiny-fragment attack; RFC 8200 §4.5 wants the whole header chain
    in the first fragment).
``low_offset_fragment``
    A later fragment with offset below `MIN_FRAGMENT_L4_BYTES` bytes: it could overwrite the transport header
    of the first one (RFC 1858 §4 overlapping-fragment attack; the bound is Tailscale's ``minFragBlks``).
``l4_truncated``
    Unfragmented packet or first fragment whose transport header is short: TCP < 20 bytes or data offset < 5
    or beyond the packet, UDP < 8, ICMP/ICMPv6 < 8.

IPv6 extension-header policy
----------------------------
Walked (RFC 8200 §4): Hop-by-Hop (0, only as the first header), Routing (43), Fragment (44) and Destination
Options (60), at most `MAX_EXTENSION_HEADERS` of them, each bounds-checked against the payload. The Fragment
header gets the same RFC 1858 bounds as IPv4; after a Fragment header with a non-zero offset the walk stops
(what follows is fragment data) and ``protocol`` is that header's next-header value, with no ports.
Anything else ends the walk and is the transport: TCP, UDP and ICMPv6 are parsed; AH (51), ESP (50), No Next
Header (59), Mobility and every unknown value are *opaque*: ``protocol`` is that value, ``l4_offset`` points at
it, ports and ICMP fields are 0. Ports are never read at byte 40 when extension headers precede the transport.
Jumbograms (RFC 2675, payload length 0 plus a Hop-by-Hop option) are not supported: a TUN MTU never needs them.

Other choices: IPv4 options are skipped unparsed (IHL covers them). Header checksums are not verified here
(the kernel verified them, and the NAT fixes them incrementally; see `netsim.core.checksum`). The UDP length
field is not cross-checked against the IP length.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from netsim.errors import BadPacket, LocalProtocolError

__all__ = [
    "ICMPV6_ERROR_TYPES",
    "ICMP_ERROR_TYPES",
    "MAX_EXTENSION_HEADERS",
    "MIN_FRAGMENT_L4_BYTES",
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "PROTO_TCP",
    "PROTO_UDP",
    "REASONS",
    "Buffer",
    "FiveTuple",
    "PacketView",
]

Buffer = bytes | bytearray | memoryview
"""Any contiguous byte buffer; a memoryview must have format ``B`` (what slicing a bytes-like object gives)."""

FiveTuple = tuple[int, int, bytes, bytes, int, int]
"""``(version, protocol, src, dst, sport, dport)``; addresses are raw 4- or 16-byte ``bytes``."""

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58

MAX_EXTENSION_HEADERS: Final = 8
"""Upper bound on walked IPv6 extension headers; real traffic carries 0-2 (RFC 7045 lets nodes limit the walk)."""

MIN_FRAGMENT_L4_BYTES: Final = 80
"""RFC 1858 bound, as Tailscale's ``minFragBlks = (60 + 20) / 8`` blocks: room for any TCP header plus slack."""

ICMP_ERROR_TYPES: Final = frozenset({3, 4, 5, 11, 12})
"""ICMPv4 messages that quote the offending datagram (RFC 792): unreachable, source quench, redirect, time
exceeded, parameter problem -- the set Linux conntrack relates to a flow (``nf_conntrack_proto_icmp.c``)."""

ICMPV6_ERROR_TYPES: Final = frozenset({1, 2, 3, 4})
"""ICMPv6 error messages (RFC 4443 §2.1: types 0-127): unreachable, packet too big, time exceeded, param problem."""

REASONS: Final = (
    "empty",
    "bad_version",
    "truncated",
    "bad_ihl",
    "total_below_header",
    "header_exceeds_total",
    "total_exceeds_buffer",
    "ext_header_chain",
    "tiny_fragment",
    "low_offset_fragment",
    "l4_truncated",
)
"""Every `BadPacket.reason` this module raises, in check order (handy to pre-create drop counters)."""

# RFC 791 §3.1: ver/ihl, tos, total length, id, flags/fragment offset, ttl, protocol, checksum, src, dst.
_V4 = struct.Struct("!BBHHHBBH4s4s")
# RFC 8200 §3: ver/tc/flow label, payload length, next header, hop limit, src, dst.
_V6 = struct.Struct("!IHBB16s16s")
_EXT = struct.Struct("!BB")  # RFC 8200 §4.3-4.6: next header, hdr ext len (8-octet units, excluding the first 8)
_FRAG6 = struct.Struct("!BxHI")  # RFC 8200 §4.5: next header, reserved, offset/res/M, identification
_TCP = struct.Struct("!HH8xBB")  # RFC 9293 §3.1: ports, seq, ack, data offset byte, flags byte
_PORTS = struct.Struct("!HH")  # RFC 768: ports
_ICMP = struct.Struct("!BB2xH")  # RFC 792 / RFC 4443: type, code, checksum, echo identifier
_V4_unpack = _V4.unpack_from
# Fast paths: IP header without options + the first 14 transport bytes in one unpack. Transport words: TCP/UDP
# ports, or ICMP type<<8|code and checksum; then the ICMP echo identifier; TCP data offset byte and flags.
_V4_FAST = struct.Struct("!2xHHHBB2x4s4sHHH6xBB").unpack_from
_V6_FAST = struct.Struct("!4xHBB16s16sHHH6xBB").unpack_from
_V6_unpack = _V6.unpack_from
_TCP_unpack = _TCP.unpack_from
_PORTS_unpack = _PORTS.unpack_from

_IPV6_EXT: Final = frozenset({0, 43, 44, 60})
_ECHO_V4: Final = frozenset({0, 8})  # echo reply, echo request (RFC 792)
_ECHO_V6: Final = frozenset({128, 129})  # echo request, echo reply (RFC 4443 §4)
_MIN_FRAG: Final = MIN_FRAGMENT_L4_BYTES


class PacketView:
    """Validated header fields of one IP packet over the caller's buffer (no copy).

    Build one with `parse_untrusted`, or keep one per batch slot and refill it with `load_untrusted` so the hot
    path allocates nothing but the two address ``bytes``.

    Attributes:
        buffer: the buffer the view reads (the caller's object, not a copy).
        version: 4 or 6.
        l4_offset: offset of the transport header (or of the fragment data / opaque header); equals
            `header_length`.
        total_length: IPv4 total length; IPv6 40 + payload length. Bytes beyond it are ignored.
        ttl: IPv4 TTL or IPv6 hop limit (also readable as `hop_limit`).
        protocol: transport protocol after the extension-header walk (6, 17, 1, 58, or an opaque value).
        src, dst: raw source and destination addresses, ``bytes`` of length 4 or 16.
        sport, dport: TCP/UDP ports; 0 for other protocols and for non-first fragments.
        tcp_flags: TCP flags byte (FIN=0x01 ... CWR=0x80); 0 if not TCP.
        icmp_type, icmp_code: ICMP/ICMPv6 type and code; 0 if not ICMP (or a non-first fragment).
        icmp_id: echo identifier for ICMP/ICMPv6 echo request/reply, else 0.
        identification: IPv4 identification, or the IPv6 Fragment header's identification (else 0).
        more_fragments, dont_fragment: the IPv4 MF and DF flags (IPv6: the M flag; DF always False).
        fragment_offset: fragment offset in bytes.
    """

    __slots__ = (
        "buffer",
        "dont_fragment",
        "dport",
        "dst",
        "fragment_offset",
        "icmp_code",
        "icmp_id",
        "icmp_type",
        "identification",
        "l4_offset",
        "more_fragments",
        "protocol",
        "sport",
        "src",
        "tcp_flags",
        "total_length",
        "ttl",
        "version",
    )

    buffer: Buffer
    version: int
    l4_offset: int
    total_length: int
    ttl: int
    protocol: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    tcp_flags: int
    icmp_type: int
    icmp_code: int
    icmp_id: int
    identification: int
    more_fragments: bool
    dont_fragment: bool
    fragment_offset: int

    def __init__(self) -> None:
        """An empty view (version 0) ready for `load_untrusted`; use `parse_untrusted` for a one-off."""
        self.buffer = b""
        self.version = self.l4_offset = self.total_length = self.ttl = self.protocol = 0
        self.src = self.dst = b""
        self.sport = self.dport = self.tcp_flags = self.icmp_type = self.icmp_code = self.icmp_id = 0
        self.identification = self.fragment_offset = 0
        self.more_fragments = self.dont_fragment = False

    @classmethod
    def parse_untrusted(cls, buf: Buffer) -> PacketView:
        """Validate ``buf`` as a bare IP packet and return a new view over it.

        Raises:
            BadPacket: with one of the `REASONS`; the only exception this raises for any input bytes.
        """
        view = cls.__new__(cls)  # skip __init__'s defaults: a successful load sets every slot
        view.load_untrusted(buf)
        return view

    @classmethod
    def parse_quoted_untrusted(cls, buf: Buffer) -> PacketView:
        """Parse the original packet quoted inside an ICMP error (RFC 792; RFC 4443 §3).

        The quote is usually cut short, so the claimed total length may exceed ``buf``: only the IP header
        chain and the first 8 transport bytes (ports, or ICMP type/code/id) must be present. ``tcp_flags`` is 0
        when the quote ends before it. Fragment-size checks are skipped (the quote is truncated by design).

        Raises:
            BadPacket: as `parse_untrusted`, except that ``total_exceeds_buffer`` and ``tiny_fragment`` are not
                raised; ``truncated`` also means the quote ends inside the IPv4 header.
        """
        view = cls.__new__(cls)
        view._load(buf, True)
        return view

    def load_untrusted(self, buf: Buffer) -> None:
        """Refill this view from ``buf`` in place (no allocation besides the address ``bytes``).

        On `BadPacket` the view's fields are unspecified until the next successful load.

        Raises:
            BadPacket: with one of the `REASONS`.
        """
        # Fast paths for the common cases -- IPv4 without options or IPv6 without extension headers,
        # unfragmented TCP, UDP or ICMP with valid lengths -- read IP and transport header in one unpack and
        # are inlined, because every Python call costs ~50-100 ns here. Anything else, including every error,
        # goes to the general path, which re-checks from scratch; tests assert the two always agree.
        n = len(buf)
        if n >= 34 and buf[0] == 0x45:
            total, ident, frag, ttl, proto, src, dst, w0, w1, w2, doff, flags = _V4_FAST(buf)
            if (
                28 <= total <= n
                and not frag & 0x3FFF
                and (
                    proto == 17
                    or proto == 1
                    or (proto == 6 and total >= 40 and doff >= 80 and (doff >> 4) << 2 <= total - 20)
                )
            ):
                self.buffer = buf
                self.version = 4
                self.l4_offset = 20
                self.total_length = total
                self.ttl = ttl
                self.protocol = proto
                self.src = src
                self.dst = dst
                self.identification = ident
                self.fragment_offset = 0
                self.more_fragments = False
                self.dont_fragment = frag & 0x4000 != 0
                if proto == 1:
                    itype = w0 >> 8
                    self.icmp_type = itype
                    self.icmp_code = w0 & 0xFF
                    self.icmp_id = w2 if itype == 8 or itype == 0 else 0
                    self.sport = self.dport = self.tcp_flags = 0
                else:
                    self.sport = w0
                    self.dport = w1
                    self.tcp_flags = flags if proto == 6 else 0
                    self.icmp_type = self.icmp_code = self.icmp_id = 0
                return
        elif n >= 54 and buf[0] >> 4 == 6:
            plen, nh, hlim, src, dst, w0, w1, w2, doff, flags = _V6_FAST(buf)
            if 8 <= plen <= n - 40 and (
                nh == 17 or nh == 58 or (nh == 6 and plen >= 20 and doff >= 80 and (doff >> 4) << 2 <= plen)
            ):
                self.buffer = buf
                self.version = 6
                self.l4_offset = 40
                self.total_length = 40 + plen
                self.ttl = hlim
                self.protocol = nh
                self.src = src
                self.dst = dst
                self.identification = self.fragment_offset = 0
                self.more_fragments = self.dont_fragment = False
                if nh == 58:
                    itype = w0 >> 8
                    self.icmp_type = itype
                    self.icmp_code = w0 & 0xFF
                    self.icmp_id = w2 if itype == 128 or itype == 129 else 0
                    self.sport = self.dport = self.tcp_flags = 0
                else:
                    self.sport = w0
                    self.dport = w1
                    self.tcp_flags = flags if nh == 6 else 0
                    self.icmp_type = self.icmp_code = self.icmp_id = 0
                return
        self._load(buf, False)

    def _load(self, buf: Buffer, quoted: bool) -> None:
        """The general path: every IP version, option, fragment and protocol, and every error."""
        n = len(buf)
        if n == 0:
            raise BadPacket("empty")
        version = buf[0] >> 4
        self.buffer = buf
        if version == 4:
            self._load4(buf, n, quoted)
        elif version == 6:
            self._load6(buf, n, quoted)
        else:
            raise BadPacket("bad_version", f"version nibble {version}")

    def _load4(self, buf: Buffer, n: int, quoted: bool) -> None:
        # RFC 791 §3.1 header layout; sanity checks as Tailscale decode4 plus the IHL lower bound (B9).
        if n < 20:
            raise BadPacket("truncated", f"{n} bytes < 20-byte IPv4 header")
        vihl, _tos, total, ident, frag, ttl, proto, _csum, src, dst = _V4_unpack(buf)
        hl = (vihl & 0x0F) << 2
        if hl < 20:
            raise BadPacket("bad_ihl", f"IHL {hl >> 2} < 5")
        if total < 20:
            raise BadPacket("total_below_header", f"total length {total} < 20")
        if hl > total:
            raise BadPacket("header_exceeds_total", f"header {hl} > total length {total}")
        end = total
        if total > n:
            if not quoted:
                raise BadPacket("total_exceeds_buffer", f"total length {total} > {n} bytes")
            end = n
            if hl > n:
                raise BadPacket("truncated", f"quoted header {hl} > {n} bytes")
        self.version = 4
        self.l4_offset = hl
        self.total_length = total
        self.ttl = ttl
        self.protocol = proto
        self.src = src
        self.dst = dst
        self.identification = ident
        self.dont_fragment = bool(frag & 0x4000)
        mf = bool(frag & 0x2000)
        self.more_fragments = mf
        offset = (frag & 0x1FFF) << 3
        self.fragment_offset = offset
        if offset:
            if offset < _MIN_FRAG:
                raise BadPacket("low_offset_fragment", f"offset {offset} < {_MIN_FRAG}")
            self._no_l4()
            return
        if mf and not quoted and total - hl < _MIN_FRAG:
            raise BadPacket("tiny_fragment", f"first fragment has {total - hl} L4 bytes < {_MIN_FRAG}")
        self._load_l4(buf, hl, end, proto, quoted)

    def _load6(self, buf: Buffer, n: int, quoted: bool) -> None:
        if n < 40:
            raise BadPacket("truncated", f"{n} bytes < 40-byte IPv6 header")
        _vtf, plen, nh, hlim, src, dst = _V6_unpack(buf)
        total = 40 + plen
        end = total
        if total > n:
            if not quoted:
                raise BadPacket("total_exceeds_buffer", f"40 + payload length {plen} > {n} bytes")
            end = n
        self.version = 6
        self.total_length = total
        self.ttl = hlim
        self.src = src
        self.dst = dst
        self.dont_fragment = self.more_fragments = False
        self.fragment_offset = self.identification = 0
        off = 40
        if nh in _IPV6_EXT:
            # RFC 8200 §4: bounded walk of the headers that may precede the transport header.
            count = 0
            seen_frag = False
            while nh in _IPV6_EXT:
                if count == MAX_EXTENSION_HEADERS:
                    raise BadPacket("ext_header_chain", f"more than {MAX_EXTENSION_HEADERS} extension headers")
                count += 1
                if off + 8 > end:
                    raise BadPacket("ext_header_chain", f"extension header {nh} at {off} truncated")
                if nh == 44:
                    if seen_frag:
                        raise BadPacket("ext_header_chain", "two Fragment headers")
                    seen_frag = True
                    nh, fo_m, ident = _FRAG6.unpack_from(buf, off)
                    off += 8
                    offset = fo_m & 0xFFF8
                    self.identification = ident
                    self.fragment_offset = offset
                    self.more_fragments = bool(fo_m & 1)
                    if offset:
                        # A later fragment: the rest is fragment data, never a header to read.
                        if offset < _MIN_FRAG:
                            raise BadPacket("low_offset_fragment", f"offset {offset} < {_MIN_FRAG}")
                        self.protocol = nh
                        self.l4_offset = off
                        self._no_l4()
                        return
                else:
                    if nh == 0 and off != 40:
                        raise BadPacket("ext_header_chain", "Hop-by-Hop header not first (RFC 8200 §4.1)")
                    nnh, hlen = _EXT.unpack_from(buf, off)
                    off += (hlen + 1) << 3
                    if off > end:
                        raise BadPacket("ext_header_chain", f"extension header {nh} runs past the packet")
                    nh = nnh
            if self.more_fragments and not quoted and total - off < _MIN_FRAG:
                raise BadPacket("tiny_fragment", f"first fragment has {total - off} L4 bytes < {_MIN_FRAG}")
        self.protocol = nh
        self.l4_offset = off
        self._load_l4(buf, off, end, nh, quoted)

    def _load_l4(self, buf: Buffer, off: int, end: int, proto: int, quoted: bool) -> None:
        l4len = end - off
        icmp_proto = PROTO_ICMP if self.version == 4 else PROTO_ICMPV6
        if proto == PROTO_TCP:
            if quoted and l4len < 20:
                if l4len < 8:
                    raise BadPacket("l4_truncated", f"quoted TCP {l4len} bytes < 8")
                self.sport, self.dport = _PORTS_unpack(buf, off)
                flags = 0
            else:
                if l4len < 20:
                    raise BadPacket("l4_truncated", f"TCP {l4len} bytes < 20")
                self.sport, self.dport, doff, flags = _TCP_unpack(buf, off)
                doff = (doff >> 4) << 2
                if doff < 20 or (doff > l4len and not quoted):
                    raise BadPacket("l4_truncated", f"TCP data offset {doff} bytes outside 20..{l4len}")
            self.tcp_flags = flags
            self.icmp_type = self.icmp_code = self.icmp_id = 0
        elif proto == PROTO_UDP:
            if l4len < 8:
                raise BadPacket("l4_truncated", f"UDP {l4len} bytes < 8")
            self.sport, self.dport = _PORTS_unpack(buf, off)
            self.tcp_flags = self.icmp_type = self.icmp_code = self.icmp_id = 0
        elif proto == icmp_proto:
            if l4len < 8:
                raise BadPacket("l4_truncated", f"ICMP {l4len} bytes < 8")
            itype, self.icmp_code, ident = _ICMP.unpack_from(buf, off)
            self.icmp_type = itype
            self.icmp_id = ident if itype in (_ECHO_V4 if proto == PROTO_ICMP else _ECHO_V6) else 0
            self.sport = self.dport = self.tcp_flags = 0
        else:
            self._no_l4()

    def _no_l4(self) -> None:
        self.sport = self.dport = self.tcp_flags = self.icmp_type = self.icmp_code = self.icmp_id = 0

    # -- derived fields (cheap, computed on access) ---------------------------------------------------------

    @property
    def header_length(self) -> int:
        """Bytes before the transport header: IPv4 IHL*4; IPv6 40 + walked extension headers."""
        return self.l4_offset

    @property
    def hop_limit(self) -> int:
        """IPv6 hop limit (the same slot as `ttl`)."""
        return self.ttl

    @property
    def payload_length(self) -> int:
        """IPv6 payload length field (``total_length - 40``); for IPv4, ``total_length - header_length``."""
        return self.total_length - (40 if self.version == 6 else self.l4_offset)

    @property
    def next_header(self) -> int:
        """IPv6 next-header field of the fixed header (read from `buffer`); for IPv4, `protocol`."""
        return self.buffer[6] if self.version == 6 else self.protocol

    @property
    def is_fragment(self) -> bool:
        """More-fragments set or a non-zero offset (an IPv6 atomic fragment, RFC 6946, is not a fragment)."""
        return self.more_fragments or self.fragment_offset != 0

    @property
    def is_icmp_error(self) -> bool:
        """An ICMP/ICMPv6 error quoting the offending packet (see `ICMP_ERROR_TYPES`, `ICMPV6_ERROR_TYPES`)."""
        if self.fragment_offset:
            return False
        if self.protocol == PROTO_ICMP and self.version == 4:
            return self.icmp_type in ICMP_ERROR_TYPES
        if self.protocol == PROTO_ICMPV6 and self.version == 6:
            return self.icmp_type in ICMPV6_ERROR_TYPES
        return False

    @property
    def src_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """Source address as an `ipaddress` object (built on each access; not for the hot path)."""
        return ipaddress.ip_address(self.src)

    @property
    def dst_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """Destination address as an `ipaddress` object (built on each access; not for the hot path)."""
        return ipaddress.ip_address(self.dst)

    def five_tuple(self) -> FiveTuple:
        """``(version, protocol, src, dst, sport, dport)``: hashable, cheap (one tuple of cached slots).

        ICMP echo flows have ports 0 here; a NAT keys them by `icmp_id` in addition.
        """
        return (self.version, self.protocol, self.src, self.dst, self.sport, self.dport)

    def quoted_packet_offset(self) -> int:
        """Offset in `buffer` of the IP header quoted by this ICMP error (RFC 792; RFC 4443 §2.1).

        The quote spans ``buffer[offset:total_length]``; parse it with `parse_quoted_untrusted`, which
        bounds-checks it. The offset itself is always within the packet (ICMP length >= 8 was checked).

        Raises:
            LocalProtocolError: the packet is not an ICMP error (check `is_icmp_error` first).
        """
        if not self.is_icmp_error:
            raise LocalProtocolError(
                f"not an ICMP error message (protocol {self.protocol}, type {self.icmp_type}); "
                "check is_icmp_error before asking for the quoted packet"
            )
        return self.l4_offset + 8

    def quoted_packet_untrusted(self) -> PacketView:
        """Parse the packet this ICMP error quotes, as a view over a memoryview slice of `buffer` (no copy).

        Raises:
            LocalProtocolError: the packet is not an ICMP error.
            BadPacket: the quoted packet does not parse (see `parse_quoted_untrusted`).
        """
        start = self.quoted_packet_offset()
        return PacketView.parse_quoted_untrusted(memoryview(self.buffer)[start : self.total_length])

    def __repr__(self) -> str:
        if self.version == 0:
            return "PacketView(<not loaded>)"
        frag = f" frag@{self.fragment_offset}" if self.is_fragment else ""
        return (
            f"PacketView(v{self.version} proto={self.protocol} {self.src_address}:{self.sport} -> "
            f"{self.dst_address}:{self.dport} len={self.total_length}{frag})"
        )
