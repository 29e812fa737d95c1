"""Internet checksum: full computation against a per-word reference and scapy, incremental rewrites against
full recomputation."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packet_strategies import Built, scapy_packets
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.packet import NoPayload, Raw

from netsim.core.checksum import (
    checksum_offset,
    compute_ipv4_header_checksum,
    compute_l4_checksum,
    fill_checksums,
    incremental_update,
    internet_checksum,
    ones_complement_sum,
    pseudo_header_sum,
    rewrite_address,
    rewrite_icmp_id,
    rewrite_port,
    update_checksum_field,
    verify_ipv4_header_checksum,
    verify_l4_checksum,
)
from netsim.core.packet import PacketView
from netsim.errors import LocalProtocolError


def reference_checksum(data: bytes) -> int:
    """RFC 1071 §4.1, word by word, end-around carry: deliberately slow and obvious."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_full_checksum_equals_reference(data: bytes) -> None:
    assert internet_checksum(data) == reference_checksum(data)
    assert internet_checksum(memoryview(bytearray(data))) == reference_checksum(data)


@settings(max_examples=300)
@given(st.binary(min_size=2, max_size=200).filter(any), st.data())
def test_incremental_update_equals_full_recomputation(data: bytes, draw: st.DataObject) -> None:
    """RFC 1624: a stored checksum updated for a changed 16/32/128-bit field equals a recomputation."""
    buf = bytearray(data) + b"\0\0"  # checksum field at the end (even offset if data is even-length)
    if len(data) % 2:
        buf = bytearray(data) + b"\0\0\0"
    cs_off = len(buf) - 2
    struct.pack_into("!H", buf, cs_off, internet_checksum(buf))
    width = draw.draw(st.sampled_from([2, 4, 16]))
    if cs_off < width:
        return
    pos = draw.draw(st.integers(0, (cs_off - width) // 2)) * 2
    new = draw.draw(st.binary(min_size=width, max_size=width))
    update_checksum_field(buf, cs_off, buf[pos : pos + width], new)
    buf[pos : pos + width] = new
    (stored,) = struct.unpack_from("!H", buf, cs_off)
    body = bytes(buf[:cs_off]) + b"\0\0"
    if any(body):
        assert stored == internet_checksum(body)
        assert internet_checksum(buf) == 0  # a correct checksum makes the whole sum verify


def test_incremental_update_scalar() -> None:
    data = bytearray(b"\x45\x00\x00\x54\x12\x34")
    cs = internet_checksum(data)
    new = incremental_update(cs, 0x1234, 0xBEEF)
    data[4:6] = b"\xbe\xef"
    assert new == internet_checksum(data)
    assert ones_complement_sum(b"\xff\xff") == 0 and ones_complement_sum(b"\x00\x01\x00") == 1


def scapy_with_checksums(data: bytes) -> bytes:
    """scapy's own checksums for the same bytes: re-dissect, drop the checksum fields, rebuild."""
    pkt = IP(data) if data[0] >> 4 == 4 else IPv6(data)
    layer = pkt
    while not isinstance(layer, NoPayload):
        name = type(layer).__name__
        if name.endswith(("error", "error6")):
            break  # the quote inside an ICMP error keeps its bytes
        if type(layer) in (IP, TCP, UDP, ICMP):
            del layer.chksum
        elif name.startswith("ICMPv6"):
            del layer.cksum
        layer = layer.payload
    return bytes(pkt)


@settings(max_examples=250)
@given(scapy_packets(allow_fragments=False, allow_routing=False))
def test_fill_checksums_equals_scapy(built: Built) -> None:
    expected = scapy_with_checksums(built.data)
    view = PacketView.parse_untrusted(expected)
    buf = bytearray(expected)
    if view.version == 4:
        buf[10:12] = b"\0\0"
    off = checksum_offset(view)
    if off is not None:
        buf[off : off + 2] = b"\0\0"
    fill_checksums(buf)
    assert bytes(buf) == expected, built.desc
    if view.version == 4:
        assert verify_ipv4_header_checksum(buf, view.header_length)
    if off is not None:
        assert verify_l4_checksum(PacketView.parse_untrusted(buf))
        buf[-1] ^= 0x01 if len(buf) > view.l4_offset + 8 else 0
        if buf[-1] != expected[-1]:
            assert not verify_l4_checksum(PacketView.parse_untrusted(buf))


@settings(max_examples=250)
@given(scapy_packets(allow_routing=False), st.data())
def test_rewrites_equal_full_recomputation(built: Built, draw: st.DataObject) -> None:
    """NAT rewrites of address, port and ICMP id keep every checksum equal to scapy's full recomputation."""
    original = scapy_with_checksums(built.data)
    buf = bytearray(original)
    view = PacketView.parse_untrusted(buf)
    size = 4 if view.version == 4 else 16
    udp_none = False
    if view.protocol == 17 and view.version == 4 and not view.fragment_offset and draw.draw(st.booleans()):
        buf[view.l4_offset + 6 : view.l4_offset + 8] = b"\0\0"  # RFC 768: no checksum
        udp_none = True
    source = draw.draw(st.booleans())
    new_addr = draw.draw(st.binary(min_size=size, max_size=size))
    rewrite_address(view, new_addr, source=source)
    assert (view.src if source else view.dst) == new_addr
    if view.protocol in (6, 17) and not view.fragment_offset:
        new_port = draw.draw(st.integers(0, 65535))
        rewrite_port(view, new_port, source=not source)
        assert (view.dport if source else view.sport) == new_port
    echo4 = view.protocol == 1 and view.version == 4 and view.icmp_type in (0, 8)
    echo6 = view.protocol == 58 and view.version == 6 and view.icmp_type in (128, 129)
    if (echo4 or echo6) and not view.fragment_offset:
        rewrite_icmp_id(view, draw.draw(st.integers(0, 65535)))
    assert fields_of(PacketView.parse_untrusted(buf)) == fields_of(view)
    if view.version == 4:
        assert verify_ipv4_header_checksum(buf, view.header_length)
    if udp_none:
        assert buf[view.l4_offset + 6 : view.l4_offset + 8] == b"\0\0"
        return
    if view.is_fragment:
        return  # the transport checksum covers the reassembled datagram; nothing to recompute here
    assert bytes(buf) == scapy_with_checksums(bytes(buf)), built.desc


def fields_of(v: PacketView) -> tuple[object, ...]:
    return (v.src, v.dst, v.sport, v.dport, v.icmp_id, v.protocol)


def test_udp_computed_zero_is_sent_as_ffff() -> None:
    """RFC 768: find a payload whose UDP checksum computes to 0 and check it is stored as 0xFFFF."""
    base = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"\0\0")
    buf = bytearray(bytes(base))
    view = PacketView.parse_untrusted(buf)
    buf[26:28] = b"\0\0"
    want = compute_l4_checksum(view)  # checksum with a zero payload word
    # Put the checksum value into the payload word: the sum then becomes 0xFFFF, i.e. a computed 0.
    buf[28:30] = struct.pack("!H", want)
    buf[26:28] = b"\0\0"
    assert compute_l4_checksum(view) == 0xFFFF
    fill_checksums(buf)
    assert buf[26:28] == b"\xff\xff" and verify_l4_checksum(PacketView.parse_untrusted(buf))
    assert bytes(buf) == scapy_with_checksums(bytes(buf))  # scapy also sends 0xFFFF


def _with_zero_checksum(pkt: bytes, csum_at: int, word_at: int) -> bytearray:
    """``pkt`` with the payload word at ``word_at`` set so that its transport checksum computes to 0x0000."""
    buf = bytearray(pkt)
    buf[word_at : word_at + 2] = b"\0\0"
    buf[csum_at : csum_at + 2] = b"\0\0"
    want = compute_l4_checksum(PacketView.parse_untrusted(buf))
    buf[word_at : word_at + 2] = struct.pack("!H", want)
    return buf


def test_both_ones_complement_zeros_verify() -> None:
    """Regression: a TCP checksum that computes to 0 may be stored as 0x0000 or 0xFFFF (RFC 1624 §3); the
    kernel's skb_checksum_help stores 0xFFFF, and verify_l4_checksum used to reject it."""
    tcp = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="A") / Raw(b"\0\0ab"))
    buf = _with_zero_checksum(tcp, 36, 40)
    view = PacketView.parse_untrusted(buf)
    assert compute_l4_checksum(view) == 0
    for stored, ok in ((b"\0\0", True), (b"\xff\xff", True), (b"\0\1", False), (b"\xff\xfe", False)):
        buf[36:38] = stored
        assert verify_l4_checksum(view) is ok, stored
    # UDP: 0 means "no checksum" over IPv4 and is wrong over IPv6 (RFC 8200 §8.1), whatever the data sums to
    udp6 = bytearray(bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2) / Raw(b"\0\0")))
    udp6[46:48] = b"\0\0"
    assert not verify_l4_checksum(PacketView.parse_untrusted(udp6))
    # all-zero ICMPv4 data: only 0xFFFF is right
    echo = bytearray(bytes(ICMP(type=0, code=0, id=0, seq=0)))
    icmp = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=1) / Raw(bytes(echo))))
    icmp[22:24] = b"\xff\xff"
    assert verify_l4_checksum(PacketView.parse_untrusted(icmp))
    icmp[22:24] = b"\0\0"
    assert not verify_l4_checksum(PacketView.parse_untrusted(icmp))


def test_pseudo_header_sum_matches_definition() -> None:
    src, dst = ipaddress.IPv6Address("2001:db8::1").packed, ipaddress.IPv6Address("fd00::2").packed
    manual = src + dst + struct.pack("!IxxxB", 20, 6)
    assert (-(pseudo_header_sum(src, dst, 6, 20))) % 0xFFFF == internet_checksum(manual)


def test_icmpv4_has_no_pseudo_header_and_icmpv6_has_one() -> None:
    buf4 = bytearray(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, id=7)))
    before = bytes(buf4[22:24])
    rewrite_address(PacketView.parse_untrusted(buf4), b"\x0a\0\0\x09", source=True)
    assert bytes(buf4[22:24]) == before and verify_ipv4_header_checksum(buf4)
    buf6 = bytearray(bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=7)))
    v6 = PacketView.parse_untrusted(buf6)
    rewrite_address(v6, bytes(15) + b"\x09", source=True)
    assert verify_l4_checksum(v6)


def test_quoted_packet_rewrite_recipe() -> None:
    """The NAT recipe for ICMP errors: rewrite the quote in place, then fix the outer ICMP checksum."""
    inner = IPerror(src="192.168.1.10", dst="198.51.100.1") / UDPerror(sport=5000, dport=53)
    buf = bytearray(bytes(IP(src="198.51.100.1", dst="203.0.113.5") / ICMP(type=3, code=3) / inner))
    outer = PacketView.parse_untrusted(buf)
    start = outer.quoted_packet_offset()
    before = bytes(buf[start : outer.total_length])
    quoted = outer.quoted_packet_untrusted()
    rewrite_address(quoted, bytes([10, 0, 0, 2]), source=True)
    rewrite_port(quoted, 40000, source=True)
    update_checksum_field(buf, outer.l4_offset + 2, before, buf[start : outer.total_length])
    assert verify_l4_checksum(PacketView.parse_untrusted(buf))
    assert verify_ipv4_header_checksum(buf[start:])
    assert bytes(buf) == scapy_with_checksums(bytes(buf))


def test_misuse_is_reported() -> None:
    v = PacketView.parse_untrusted(bytearray(bytes(IP() / ICMP(type=3) / IPerror() / UDPerror())))
    with pytest.raises(LocalProtocolError):
        rewrite_port(v, 1, source=True)
    with pytest.raises(LocalProtocolError):
        rewrite_icmp_id(v, 1)
    with pytest.raises(LocalProtocolError):
        rewrite_address(v, bytes(16), source=True)
    frag = PacketView.parse_untrusted(bytes(IP(frag=20, proto=6) / Raw(bytes(40))))
    with pytest.raises(LocalProtocolError):
        compute_l4_checksum(frag)
    u = PacketView.parse_untrusted(bytearray(bytes(IP() / UDP())))
    with pytest.raises(LocalProtocolError):
        rewrite_port(u, 70000, source=True)
    with pytest.raises(LocalProtocolError, match="total_exceeds_buffer"):
        fill_checksums(bytearray(bytes(IP() / UDP()))[:-1])
    assert compute_ipv4_header_checksum(bytes(IP())) == struct.unpack_from("!H", bytes(IP()), 10)[0]
