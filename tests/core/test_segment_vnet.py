"""The TUN offload pieces of `netsim.core.segment`: the virtio_net_hdr parser, software GSO and GRO on writes.

Oracles: scapy for the fields and checksums of every segment; `segment_tcp` (the bypass path's segmenter) for
what a TCP super-packet must become; the round trip split -> coalesce gives the super-packet's bytes back.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from netsim.core.checksum import verify_ipv4_header_checksum, verify_l4_checksum
from netsim.core.packet import PacketView
from netsim.core.segment import (
    MAX_GSO_SEGMENTS,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_NONE,
    VNET_GSO_TCPV4,
    VNET_GSO_TCPV6,
    VNET_GSO_UDP_L4,
    VNET_HDR_SIZE,
    VNET_PLAIN,
    VNET_REASONS,
    VnetHeader,
    coalesce_tcp,
    parse_vnet_header_untrusted,
    segment_tcp,
    split_gso_untrusted,
)
from netsim.errors import BadPacket

SRC4, DST4, SRC6, DST6 = "10.66.1.2", "203.0.113.9", "fd00::2", "2001:db8::9"


def _partial(pkt: bytes, v6: bool, l4_csum: int) -> tuple[bytes, int]:
    """``pkt`` with its L4 checksum replaced by the pseudo-header sum, as a kernel hands a NEEDS_CSUM skb over."""
    view = PacketView.parse_untrusted(pkt)
    l4 = view.l4_offset
    buf = bytearray(pkt)
    addrs = int.from_bytes(buf[8:40] if v6 else buf[12:20], "big")
    pseudo = (addrs + view.protocol + len(buf) - l4) % 0xFFFF
    struct.pack_into("!H", buf, l4 + l4_csum, pseudo)
    return bytes(buf), l4


def _tcp_super(payload: bytes, v6: bool, flags: str = "PA") -> bytes:
    tcp = TCP(sport=40000, dport=5201, flags=flags, seq=4_294_960_000, ack=7, options=[("Timestamp", (5, 6))])
    ip = IPv6(src=SRC6, dst=DST6) if v6 else IP(src=SRC4, dst=DST4, id=65000, flags="DF")
    return bytes(ip / tcp / Raw(payload))


def _valid(seg: bytes) -> bool:
    view = PacketView.parse_untrusted(seg)
    ok = verify_l4_checksum(view)
    return ok and (view.version == 6 or verify_ipv4_header_checksum(seg))


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 40000), mss=st.integers(536, 1400), v6=st.booleans(), fin=st.booleans())
@example(size=2143, mss=714, v6=False, fin=False)  # regression: segment 3 sums to 0; TCP stores it as 0x0000
def test_a_tcp_super_packet_splits_as_segment_tcp_does(size: int, mss: int, v6: bool, fin: bool) -> None:
    payload = bytes(i * 13 % 251 for i in range(size))
    full = _tcp_super(payload, v6, "FPA" if fin else "PA")
    partial, l4 = _partial(full, v6, 16)
    hlen = l4 + 32
    hdr = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6 if v6 else VNET_GSO_TCPV4, hlen, mss, l4, 16)
    out: list[bytes] = []
    n = split_gso_untrusted(partial, hdr, out)
    assert n == len(out) == -(-size // mss)
    assert all(_valid(s) for s in out)
    expected = segment_tcp(PacketView.parse_untrusted(bytearray(full)), hlen + mss)
    assert out == [bytes(s) for s in expected]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 20000), mss=st.integers(256, 1400), v6=st.booleans())
def test_a_udp_super_packet_splits_into_datagrams(size: int, mss: int, v6: bool) -> None:
    payload = bytes(i * 3 % 256 for i in range(size))
    ip = IPv6(src=SRC6, dst=DST6) if v6 else IP(src=SRC4, dst=DST4, id=9)
    partial, l4 = _partial(bytes(ip / UDP(sport=5000, dport=53) / Raw(payload)), v6, 6)
    out: list[bytes] = []
    split_gso_untrusted(partial, VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_UDP_L4, l4 + 8, mss, l4, 6), out)
    assert all(_valid(s) for s in out)
    pkts = [IPv6(s) if v6 else IP(s) for s in out]
    assert b"".join(bytes(p[UDP].payload) for p in pkts) == payload
    assert all(p[UDP].len == len(p[UDP]) for p in pkts)


def test_a_single_packet_with_a_partial_checksum_is_completed() -> None:
    full = bytes(IP(src=SRC4, dst=DST4) / UDP(sport=1, dport=2) / Raw(b"abc"))
    partial, l4 = _partial(full, False, 6)
    out: list[bytes] = []
    split_gso_untrusted(partial, VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_NONE, 0, 0, l4, 6), out)
    assert out == [full]
    plain: list[bytes] = []
    split_gso_untrusted(full, parse_vnet_header_untrusted(VNET_PLAIN + full), plain)
    assert plain == [full]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_the_vnet_parser_and_splitter_refuse_garbage_with_named_reasons(data: bytes) -> None:
    try:
        hdr = parse_vnet_header_untrusted(data, 1420)
        split_gso_untrusted(memoryview(data)[VNET_HDR_SIZE:], hdr, [])
    except BadPacket as exc:
        assert exc.reason in VNET_REASONS


@settings(max_examples=200, deadline=None)
@given(
    flags=st.integers(0, 255),
    gso_type=st.integers(0, 255),
    gso_size=st.integers(0, 0xFFFF),
    csum_start=st.integers(0, 0xFFFF),
    csum_offset=st.integers(0, 0xFFFF),
    v6=st.booleans(),
)
def test_any_header_on_a_real_packet_is_split_or_refused(
    flags: int, gso_type: int, gso_size: int, csum_start: int, csum_offset: int, v6: bool
) -> None:
    """Arbitrary header fields in front of a real TCP packet: the result is segments or one named drop."""
    pkt = _tcp_super(b"x" * 3000, v6)
    raw = VnetHeader(flags, gso_type, 0, gso_size, csum_start, csum_offset).pack() + pkt
    try:
        hdr = parse_vnet_header_untrusted(raw, 1420)
        out: list[bytes] = []
        n = split_gso_untrusted(memoryview(raw)[VNET_HDR_SIZE:], hdr, out)
    except BadPacket as exc:
        assert exc.reason in VNET_REASONS
        return
    assert 1 <= n == len(out) <= MAX_GSO_SEGMENTS


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\x00" * 9, "vnet_truncated"),
        (VnetHeader(4, 0, 0, 0, 0, 0).pack(), "vnet_bad_flags"),
        (VnetHeader(0, 3, 0, 0, 0, 0).pack(), "vnet_bad_gso_type"),  # UFO: never enabled, never accepted
        (VnetHeader(0, VNET_GSO_NONE | 0x80, 0, 0, 0, 0).pack(), "vnet_bad_gso_type"),
        (VnetHeader(VNET_F_NEEDS_CSUM, 0, 0, 0, 100, 16).pack(), "vnet_bad_csum"),  # field beyond the packet
        (VnetHeader(0, VNET_GSO_TCPV4, 52, 1368, 20, 16).pack(), "vnet_bad_csum"),  # GSO without NEEDS_CSUM
        (VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 0, 20, 16).pack(), "vnet_bad_gso"),
        (VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1500, 20, 16).pack(), "vnet_bad_gso"),  # > MTU
    ],
)
def test_bad_headers_are_refused_by_name(header: bytes, reason: str) -> None:
    pkt = b"" if len(header) < VNET_HDR_SIZE else bytes(IP(src=SRC4, dst=DST4) / TCP() / Raw(b"y" * 40))
    with pytest.raises(BadPacket) as exc:
        parse_vnet_header_untrusted(header + pkt, 1420)
    assert exc.value.reason == reason


def test_a_header_that_does_not_match_its_packet_is_refused() -> None:
    pkt = _tcp_super(b"z" * 4000, v6=False)
    for hdr in (
        VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6, 52, 1368, 20, 16),  # v4 packet, v6 GSO type
        VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1368, 24, 16),  # transport not at IHL * 4
        VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 1368, 20, 6),  # checksum not at TCP's
    ):
        with pytest.raises(BadPacket) as exc:
            split_gso_untrusted(pkt, hdr, [])
        assert exc.value.reason == "vnet_bad_gso"


@settings(max_examples=40, deadline=None)
@given(size=st.integers(2000, 60000), mss=st.integers(536, 1400), v6=st.booleans())
def test_coalescing_the_segments_gives_the_super_packet_back(size: int, mss: int, v6: bool) -> None:
    payload = bytes(i * 11 % 256 for i in range(size))
    full = _tcp_super(payload, v6, "PA")
    partial, l4 = _partial(full, v6, 16)
    hdr = VnetHeader(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6 if v6 else VNET_GSO_TCPV4, l4 + 32, mss, l4, 16)
    segs: list[bytes] = []
    split_gso_untrusted(partial, hdr, segs)
    writes = coalesce_tcp(segs)
    assert len(writes) == 1  # one flow, contiguous, equal sizes: one write
    vnet, *parts = writes[0]
    assert parse_vnet_header_untrusted(bytes(vnet) + b"".join(parts)) == hdr
    merged = b"".join(parts)
    if not v6:  # the IPv4 identification is the first segment's; the rest equals the kernel's super-packet
        assert merged[:4] + merged[6:] == partial[:4] + partial[6:]
    else:
        assert merged == partial


def test_coalescing_stops_at_anything_that_is_not_the_next_segment_of_the_flow() -> None:
    def seg(seq: int, sport: int = 40000, flags: str = "A", size: int = 1000) -> bytes:
        tcp = TCP(sport=sport, dport=5201, flags=flags, seq=seq, ack=1, window=500)
        return bytes(IP(src=SRC4, dst=DST4, flags="DF") / tcp / Raw(b"q" * size))

    ack = bytes(IP(src=SRC4, dst=DST4, flags="DF") / TCP(sport=40000, dport=5201, flags="A", seq=0, ack=1))
    packets = [
        seg(0),
        seg(1000),
        seg(2000, flags="PA"),  # PSH ends a super-packet (it is kept on the merged one)
        seg(3000),
        seg(5000),  # a gap
        seg(6000, sport=40001),  # another flow
        ack,  # a pure ACK
        seg(7000, flags="FA"),  # FIN
    ]
    writes = coalesce_tcp(packets)
    assert [len(w) - 2 if len(w) > 2 else 1 for w in writes] == [3, 1, 1, 1, 1, 1]
    merged = IP(b"".join(bytes(p) for p in writes[0][1:]))
    assert merged[TCP].flags == "PA" and len(merged[TCP].payload) == 3000
    assert all(w[0] == VNET_PLAIN for w in writes[1:])
