"""PacketView against scapy's dissection, crafted bad packets for every drop reason, and fuzzing."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packet_strategies import FIELDS, Built, scapy_fields, scapy_packets
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.packet import Raw

from netsim.core.packet import MAX_EXTENSION_HEADERS, REASONS, PacketView
from netsim.errors import BadPacket, LocalProtocolError

BUFFER_KINDS: list[Callable[[bytes], Any]] = [
    bytes,
    bytearray,
    memoryview,
    lambda b: memoryview(bytearray(b)),
]


def fields(view: PacketView) -> dict[str, Any]:
    return {name: getattr(view, name) for name in FIELDS}


# -- the scapy oracle --------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(scapy_packets(), st.binary(max_size=24), st.sampled_from(range(len(BUFFER_KINDS))))
def test_fields_equal_scapy_dissection(built: Built, trailer: bytes, kind: int) -> None:
    """Every field equals scapy's reading, for every buffer type, with link padding after the packet."""
    expected = scapy_fields(built.data)
    buf = BUFFER_KINDS[kind](built.data + trailer)
    view = PacketView.parse_untrusted(buf)
    assert fields(view) == expected, built.desc
    assert view.buffer is buf  # no copy
    assert str(view.src_address) == str(view.src_address.__class__(expected["src"]))
    assert view.five_tuple() == (
        expected["version"],
        expected["protocol"],
        expected["src"],
        expected["dst"],
        expected["sport"],
        expected["dport"],
    )
    hash(view.five_tuple())


@settings(max_examples=200)
@given(scapy_packets(), scapy_packets())
def test_fast_path_and_reused_view_equal_general_path(first: Built, second: Built) -> None:
    """The inlined fast paths agree with the general parser, and a reused view keeps nothing stale."""
    reused = PacketView.parse_untrusted(first.data)
    reused.load_untrusted(second.data)
    general = PacketView()
    general._load(second.data, False)
    assert fields(reused) == fields(general) == fields(PacketView.parse_untrusted(second.data)), second.desc


def test_addresses_are_bytes_and_ipaddress_objects() -> None:
    v = PacketView.parse_untrusted(bytes(IP(src="192.0.2.1", dst="198.51.100.7") / UDP(sport=5, dport=53)))
    assert (v.src, v.dst) == (bytes([192, 0, 2, 1]), bytes([198, 51, 100, 7]))
    assert str(v.src_address) == "192.0.2.1" and str(v.dst_address) == "198.51.100.7"
    v6 = PacketView.parse_untrusted(bytes(IPv6(src="2001:db8::1", dst="fd00::2") / TCP()))
    assert str(v6.src_address) == "2001:db8::1" and len(v6.dst) == 16
    assert "2001:db8::1" in repr(v6) and repr(PacketView()) == "PacketView(<not loaded>)"


# -- every drop reason, crafted ----------------------------------------------------------------------------


def v4(total: int | None = None, ihl: int = 5, frag: int = 0, proto: int = 6, l4: bytes = b"") -> bytes:
    """A raw IPv4 packet with arbitrary (possibly lying) header fields."""
    opts = b"\x01" * (max(ihl, 5) * 4 - 20)
    body = opts + l4
    if total is None:
        total = 20 + len(body)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0, b"\x0a\0\0\1", b"\x0a\0\0\2")
    return hdr + body


TCP20 = bytes(TCP(sport=1, dport=2))
MF = 0x2000

CRAFTED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("bad_version", b"\x50" + bytes(40)),
    ("bad_version", b"\x00"),
    ("truncated", b"\x45" + bytes(18)),
    ("truncated", bytes(IPv6())[:39]),
    ("bad_ihl", v4(ihl=4, l4=TCP20)),
    ("bad_ihl", v4(ihl=0, l4=TCP20)),
    ("total_below_header", v4(total=19, l4=TCP20)),
    ("total_below_header", v4(total=0, l4=TCP20)),
    ("header_exceeds_total", v4(total=30, ihl=10, l4=TCP20)),
    ("total_exceeds_buffer", v4(total=100, l4=TCP20)),
    ("total_exceeds_buffer", bytes(IPv6(plen=100) / UDP())),
    ("l4_truncated", v4(l4=TCP20[:19])),
    ("l4_truncated", v4(proto=6)),  # goProbe#279: "index out of range [20] with length 20"
    ("l4_truncated", v4(proto=17, l4=b"\x00\x35")),  # nebula#1107: firewall panic on a 22-byte packet
    ("l4_truncated", v4(l4=bytes(UDP())[:7], proto=17)),
    ("l4_truncated", v4(l4=bytes(ICMP())[:7], proto=1)),
    ("l4_truncated", v4(l4=TCP20[:12] + b"\x40" + TCP20[13:])),  # data offset 4
    ("l4_truncated", v4(l4=TCP20[:12] + b"\xf0" + TCP20[13:])),  # data offset 60 > 20 bytes present
    ("l4_truncated", bytes(IPv6(nh=58, plen=4) / Raw(b"\x80\0\0\0"))),
    ("l4_truncated", bytes(IPv6(plen=15) / IPv6ExtHdrDestOpt(nh=17) / Raw(b"1234567"))),
    ("tiny_fragment", v4(frag=MF, l4=TCP20 + bytes(59))),
    ("tiny_fragment", bytes(IPv6() / IPv6ExtHdrFragment(m=1, nh=6) / TCP() / Raw(bytes(59)))),
    ("low_offset_fragment", v4(frag=1, l4=bytes(100))),  # RFC 1858 §4: offset 1 overwrites TCP flags
    ("low_offset_fragment", v4(frag=9, l4=bytes(100))),
    ("low_offset_fragment", bytes(IPv6() / IPv6ExtHdrFragment(offset=9, nh=6) / Raw(bytes(100)))),
    ("ext_header_chain", bytes(IPv6(nh=60, plen=6)) + b"\x11\x00\x01\x04\x00\x00"),  # 6 of 8 header bytes
    ("ext_header_chain", bytes(IPv6(plen=8) / IPv6ExtHdrDestOpt(len=1, nh=17) / Raw(bytes(8)))),
    ("ext_header_chain", bytes(IPv6() / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / UDP())),
    ("ext_header_chain", bytes(IPv6() / IPv6ExtHdrFragment() / IPv6ExtHdrFragment() / UDP())),
]
# Too many extension headers: MAX + 1 Destination Options headers before UDP.
_chain = IPv6()
for _ in range(MAX_EXTENSION_HEADERS + 1):
    _chain = _chain / IPv6ExtHdrDestOpt()
CRAFTED.append(("ext_header_chain", bytes(_chain / UDP())))


@pytest.mark.reliability("B1", "B2", "B3", "B4", "B5")
@pytest.mark.parametrize(("reason", "data"), CRAFTED, ids=[f"{r}-{i}" for i, (r, _) in enumerate(CRAFTED)])
@pytest.mark.parametrize("kind", range(len(BUFFER_KINDS)))
def test_crafted_bad_packet_raises_reason(reason: str, data: bytes, kind: int) -> None:
    with pytest.raises(BadPacket) as info:
        PacketView.parse_untrusted(BUFFER_KINDS[kind](data))
    assert info.value.reason == reason
    # The general path gives the same verdict as the fast path.
    with pytest.raises(BadPacket) as info2:
        PacketView()._load(data, False)
    assert info2.value.reason == reason


def test_every_reason_is_exercised() -> None:
    assert {r for r, _ in CRAFTED} == set(REASONS)


def test_boundaries_just_inside_the_limits_parse() -> None:
    """Each crafted reject has an accepted neighbour one byte or one unit away."""
    assert PacketView.parse_untrusted(v4(frag=MF, l4=TCP20 + bytes(60))).more_fragments
    assert PacketView.parse_untrusted(v4(frag=10, l4=bytes(8))).fragment_offset == 80
    assert PacketView.parse_untrusted(v4(ihl=15, l4=TCP20)).l4_offset == 60
    chain = IPv6()
    for _ in range(MAX_EXTENSION_HEADERS):
        chain = chain / IPv6ExtHdrDestOpt()
    assert PacketView.parse_untrusted(bytes(chain / UDP(dport=53))).dport == 53
    assert PacketView.parse_untrusted(bytes(IPv6(nh=59))).protocol == 59  # empty payload, No Next Header
    assert PacketView.parse_untrusted(v4(proto=47)).protocol == 47  # no L4 bytes at all for an opaque protocol


# -- IPv6 extension-header policy --------------------------------------------------------------------------


@pytest.mark.reliability("B4")
def test_ports_never_read_at_byte_40_behind_extension_headers() -> None:
    pkt = IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt() / TCP(sport=1111, dport=2222)
    v = PacketView.parse_untrusted(bytes(pkt))
    assert (v.protocol, v.sport, v.dport, v.l4_offset) == (6, 1111, 2222, 40 + 8 + 8 + 8)
    assert v.next_header == 0


@pytest.mark.parametrize("nh", [50, 51, 59, 135, 253])
def test_opaque_next_headers_have_no_ports(nh: int) -> None:
    v = PacketView.parse_untrusted(bytes(IPv6() / IPv6ExtHdrDestOpt(nh=nh) / Raw(bytes(UDP(sport=7, dport=9)))))
    assert (v.protocol, v.sport, v.dport, v.l4_offset) == (nh, 0, 0, 48)


def test_ah_is_opaque() -> None:
    v = PacketView.parse_untrusted(bytes(IPv6() / AH(nh=17) / UDP(sport=7, dport=9)))
    assert (v.protocol, v.sport, v.dport) == (51, 0, 0)


@pytest.mark.reliability("B4")
def test_ipv6_later_fragment_has_no_ports_and_stops_the_walk() -> None:
    v = PacketView.parse_untrusted(bytes(IPv6() / IPv6ExtHdrFragment(offset=10, nh=6, id=77) / Raw(bytes(64))))
    assert (v.is_fragment, v.fragment_offset, v.protocol, v.sport, v.identification) == (True, 80, 6, 0, 77)


def test_ipv6_atomic_fragment_is_not_a_fragment() -> None:
    v = PacketView.parse_untrusted(bytes(IPv6() / IPv6ExtHdrFragment(id=5) / UDP(dport=53)))
    assert (v.is_fragment, v.dport, v.identification) == (False, 53, 5)


# -- ICMP errors and the quoted packet ---------------------------------------------------------------------


def test_icmpv4_error_quoted_packet() -> None:
    inner = IPerror(src="10.0.0.2", dst="192.0.2.9") / UDPerror(sport=4000, dport=53)
    outer = PacketView.parse_untrusted(bytearray(bytes(IP() / ICMP(type=3, code=3) / inner)))
    assert outer.is_icmp_error and outer.quoted_packet_offset() == 28
    q = outer.quoted_packet_untrusted()
    assert (str(q.src_address), str(q.dst_address), q.protocol, q.sport, q.dport) == (
        "10.0.0.2",
        "192.0.2.9",
        17,
        4000,
        53,
    )


def test_quoted_packet_may_be_truncated_after_8_l4_bytes() -> None:
    """RFC 792 quotes the IP header plus 64 bits; the claimed total length exceeds what is quoted."""
    full = bytes(IPerror(src="10.0.0.2", dst="192.0.2.9") / TCPerror(sport=4000, dport=443) / Raw(bytes(100)))
    outer = PacketView.parse_untrusted(bytes(IP() / ICMP(type=11) / Raw(full[:28])))
    q = outer.quoted_packet_untrusted()
    assert (q.sport, q.dport, q.tcp_flags, q.total_length) == (4000, 443, 0, len(full))
    with pytest.raises(BadPacket) as info:
        PacketView.parse_untrusted(bytes(IP() / ICMP(type=11) / Raw(full[:27]))).quoted_packet_untrusted()
    assert info.value.reason == "l4_truncated"
    with pytest.raises(BadPacket) as info:
        PacketView.parse_untrusted(bytes(IP() / ICMP(type=11) / Raw(full[:12]))).quoted_packet_untrusted()
    assert info.value.reason == "truncated"


def test_icmpv6_packet_too_big_quoted_packet() -> None:
    inner = IPerror6(src="2001:db8::5", dst="fd00::1") / TCPerror(sport=443, dport=50000)
    outer = PacketView.parse_untrusted(bytes(IPv6() / ICMPv6PacketTooBig(mtu=1280) / inner))
    assert outer.is_icmp_error and outer.icmp_type == 2
    q = outer.quoted_packet_untrusted()
    assert (q.version, str(q.src_address), q.sport, q.dport) == (6, "2001:db8::5", 443, 50000)


def test_quoted_offset_of_non_error_is_misuse() -> None:
    v = PacketView.parse_untrusted(bytes(IPv6() / ICMPv6EchoRequest(id=9)))
    assert not v.is_icmp_error and v.icmp_id == 9
    with pytest.raises(LocalProtocolError, match="is_icmp_error"):
        v.quoted_packet_offset()


# -- fuzzing: nothing but BadPacket, and sane fields on success --------------------------------------------


def check_invariants(view: PacketView, n: int) -> None:
    assert view.version in (4, 6)
    assert view.l4_offset <= view.total_length <= n
    assert len(view.src) == len(view.dst) == (4 if view.version == 4 else 16)
    assert 0 <= view.sport <= 65535 and 0 <= view.dport <= 65535
    if view.fragment_offset:
        assert view.sport == view.dport == 0 and view.fragment_offset >= 80


@pytest.mark.reliability("B1")
@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_bad_packet(data: bytes) -> None:
    for parse in (PacketView.parse_untrusted, PacketView.parse_quoted_untrusted):
        try:
            view = parse(data)
        except BadPacket as e:
            assert e.reason in REASONS
        else:
            if parse is PacketView.parse_untrusted:
                check_invariants(view, len(data))


@pytest.mark.reliability("B1")
@settings(max_examples=400)
@given(scapy_packets(allow_fragments=False), st.data())
def test_mutated_real_packets_raise_only_bad_packet(built: Built, data: st.DataObject) -> None:
    """Corrupt header bytes of real packets so the fuzzing reaches the deep checks, not just the first."""
    buf = bytearray(built.data)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, min(len(buf), 80) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    for candidate in (buf, buf[:cut]):
        general = PacketView()
        try:
            general._load(candidate, False)
        except BadPacket as e:
            general_result: object = e.reason
        else:
            general_result = fields(general)
        try:
            view = PacketView.parse_untrusted(candidate)
        except BadPacket as e:
            assert e.reason in REASONS
            assert e.reason == general_result
        else:
            assert fields(view) == general_result  # the fast path agrees with the general one
            check_invariants(view, len(candidate))
            if view.is_icmp_error:
                try:
                    view.quoted_packet_untrusted()
                except BadPacket as e:
                    assert e.reason in REASONS


@settings(max_examples=100)
@given(scapy_packets())
def test_a_successful_load_sets_every_slot(built: Built) -> None:
    """parse_untrusted skips __init__, so every slot must be written by the load itself."""
    view = PacketView.parse_untrusted(built.data)
    for slot in PacketView.__slots__:
        getattr(view, slot)  # AttributeError if a path forgot one
    general = PacketView.__new__(PacketView)
    general._load(built.data, False)
    for slot in PacketView.__slots__:
        getattr(general, slot)


@pytest.mark.reliability("B1")
@settings(max_examples=100)
@given(scapy_packets())
def test_every_proper_prefix_is_rejected_as_short(built: Built) -> None:
    """Fed byte by byte: a packet cut anywhere before its total length never parses."""
    data = built.data
    total = PacketView.parse_untrusted(data).total_length
    for cut in range(total):
        with pytest.raises(BadPacket) as info:
            PacketView.parse_untrusted(data[:cut])
        assert info.value.reason in ("empty", "truncated", "total_exceeds_buffer"), (cut, built.desc)
