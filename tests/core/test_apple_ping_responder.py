"""The example provider's reply builder, checked against scapy (checksums, swapped addresses and ports)."""

from __future__ import annotations

import importlib.util
import ipaddress
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

_spec = importlib.util.spec_from_file_location(
    "ping_responder_example", Path(__file__).resolve().parents[2] / "examples" / "ping_responder.py"
)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

V4, V6 = "10.66.0.1", "fd00:66::1"
VIRTUAL = {ipaddress.ip_address(V4).packed, ipaddress.ip_address(V6).packed}


def checksums_ok(raw: bytes) -> bool:
    """scapy recomputes every checksum when the fields are deleted; equal bytes mean ours were right."""
    pkt = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
    clone = pkt.copy()
    for layer in (IP, UDP, ICMP):
        if clone.haslayer(layer):
            del clone[layer].chksum
    if clone.haslayer(ICMPv6EchoReply):
        del clone[ICMPv6EchoReply].cksum
    if clone.haslayer(IPv6) and clone.haslayer(UDP):
        del clone[UDP].chksum
    return bytes(clone) == raw


@settings(max_examples=200)
@given(st.binary(max_size=64), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_icmp_echo_reply_v4(payload: bytes, ident: int, seq: int) -> None:
    req = bytes(IP(src="10.66.0.2", dst=V4, ttl=3) / ICMP(type=8, id=ident, seq=seq) / payload)
    reply = example.echo_reply(req, VIRTUAL, 7)
    assert reply is not None and checksums_ok(reply)
    pkt = IP(reply)
    assert (pkt.src, pkt.dst, pkt.ttl) == (V4, "10.66.0.2", 64)
    assert (pkt[ICMP].type, pkt[ICMP].id, pkt[ICMP].seq, bytes(pkt[ICMP].payload)) == (0, ident, seq, payload)


@settings(max_examples=200)
@given(st.binary(max_size=64), st.integers(0, 0xFFFF))
def test_icmpv6_echo_reply(payload: bytes, ident: int) -> None:
    req = bytes(IPv6(src="fd00:66::2", dst=V6) / ICMPv6EchoRequest(id=ident, seq=1, data=payload))
    reply = example.echo_reply(req, VIRTUAL, 7)
    assert reply is not None and checksums_ok(reply)
    pkt = IPv6(reply)
    assert (pkt.src, pkt.dst) == (V6, "fd00:66::2")
    assert pkt.haslayer(ICMPv6EchoReply) and pkt[ICMPv6EchoReply].id == ident and pkt[ICMPv6EchoReply].data == payload


@settings(max_examples=200)
@given(st.binary(max_size=64), st.integers(1, 0xFFFF), st.booleans())
def test_udp_echo_reply(payload: bytes, sport: int, v6: bool) -> None:
    if v6:
        req = bytes(IPv6(src="fd00:66::2", dst=V6) / UDP(sport=sport, dport=7) / payload)
    else:
        req = bytes(IP(src="10.66.0.2", dst=V4) / UDP(sport=sport, dport=7) / payload)
    reply = example.echo_reply(req, VIRTUAL, 7)
    assert reply is not None and checksums_ok(reply)
    pkt = IPv6(reply) if v6 else IP(reply)
    assert (pkt[UDP].sport, pkt[UDP].dport, bytes(pkt[UDP].payload)) == (7, sport, payload)


def test_everything_else_is_ignored() -> None:
    assert example.echo_reply(bytes(IP(dst="10.66.0.9") / ICMP()), VIRTUAL, 7) is None  # not a virtual address
    assert example.echo_reply(bytes(IP(dst=V4) / ICMP(type=0)), VIRTUAL, 7) is None  # a reply, not a request
    assert example.echo_reply(bytes(IP(dst=V4) / UDP(dport=53)), VIRTUAL, 7) is None
    assert example.echo_reply(b"\x45\x00", VIRTUAL, 7) is None  # malformed: no exception
    assert example.echo_reply(b"", VIRTUAL, 7) is None


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_garbage_never_raises(data: bytes) -> None:
    example.echo_reply(data, VIRTUAL, 7)
