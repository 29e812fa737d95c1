"""DNS response parser: dnslib-built messages, compression loops, truncation and fuzzing (only BadPacket escapes)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from dnslib import AAAA, CNAME, QTYPE, RR, TXT, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.dns import (
    TYPE_A,
    TYPE_CNAME,
    bindings_from_response,
    parse_dns_response_untrusted,
)
from netsim.errors import BadPacket


def _response(qname: str, records: list[RR], qtype: str = "A", rcode: int = 0) -> bytes:
    msg = DNSRecord(DNSHeader(id=0x1234, qr=1, aa=1, ra=1, rcode=rcode), q=DNSQuestion(qname, getattr(QTYPE, qtype)))
    for rr in records:
        msg.add_answer(rr)
    return bytes(msg.pack())


def _chain_response() -> bytes:
    return _response(
        "WWW.Video.Lab.Test",
        [
            RR("www.video.lab.test", QTYPE.CNAME, rdata=CNAME("edge.cdn.test"), ttl=300),
            RR("edge.cdn.test", QTYPE.CNAME, rdata=CNAME("node7.cdn.test"), ttl=120),
            RR("node7.cdn.test", QTYPE.A, rdata=A("198.51.100.7"), ttl=600),
            RR("node7.cdn.test", QTYPE.A, rdata=A("198.51.100.8"), ttl=30),
            RR("node7.cdn.test", QTYPE.TXT, rdata=TXT("ignored"), ttl=30),
            RR("bank.test", QTYPE.A, rdata=A("203.0.113.66"), ttl=600),  # off the chain: must be ignored
        ],
    )


def test_parse_dnslib_chain_with_compression() -> None:
    wire = _chain_response()
    assert b"\xc0" in wire  # dnslib compresses repeated names, so pointers are exercised
    resp = parse_dns_response_untrusted(wire)
    assert resp.id == 0x1234 and resp.rcode == 0 and resp.question == "www.video.lab.test"
    kinds = [(r.name, r.rtype, r.ttl, r.data) for r in resp.answers]
    assert kinds == [
        ("www.video.lab.test", TYPE_CNAME, 300, "edge.cdn.test"),
        ("edge.cdn.test", TYPE_CNAME, 120, "node7.cdn.test"),
        ("node7.cdn.test", TYPE_A, 600, bytes([198, 51, 100, 7])),
        ("node7.cdn.test", TYPE_A, 30, bytes([198, 51, 100, 8])),
        ("bank.test", TYPE_A, 600, bytes([203, 0, 113, 66])),
    ]


def test_bindings_follow_chain_with_min_ttl_and_ignore_off_chain_records() -> None:
    got = sorted(bindings_from_response(parse_dns_response_untrusted(_chain_response())))
    a7, a8 = bytes([198, 51, 100, 7]), bytes([198, 51, 100, 8])
    assert got == sorted(
        [
            ("www.video.lab.test", a7, 120),
            ("edge.cdn.test", a7, 120),
            ("node7.cdn.test", a7, 120),
            ("www.video.lab.test", a8, 30),
            ("edge.cdn.test", a8, 30),
            ("node7.cdn.test", a8, 30),
        ]
    )
    assert all(addr != bytes([203, 0, 113, 66]) for _, addr, _ in got)


def test_aaaa_and_nxdomain() -> None:
    wire = _response("v6.test", [RR("v6.test", QTYPE.AAAA, rdata=AAAA("2001:db8::7"), ttl=60)], "AAAA")
    got = bindings_from_response(parse_dns_response_untrusted(wire))
    assert got == [("v6.test", ipaddress.IPv6Address("2001:db8::7").packed, 60)]
    nx = _response("v6.test", [RR("v6.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=60)], rcode=3)
    assert bindings_from_response(parse_dns_response_untrusted(nx)) == []


def test_ttl_with_top_bit_reads_as_zero() -> None:
    wire = bytearray(_response("t.test", [RR("t.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=60)]))
    ttl_at = len(wire) - 4 - 2 - 4  # rdata(4) rdlength(2) ttl(4)
    struct.pack_into("!I", wire, ttl_at, 0x80000001)
    assert parse_dns_response_untrusted(wire).answers[0].ttl == 0  # RFC 2181 §8


def test_cname_loop_in_records_terminates() -> None:
    wire = _response(
        "a.test",
        [
            RR("a.test", QTYPE.CNAME, rdata=CNAME("b.test"), ttl=60),
            RR("b.test", QTYPE.CNAME, rdata=CNAME("a.test"), ttl=60),
        ],
    )
    assert bindings_from_response(parse_dns_response_untrusted(wire)) == []


def _header(qd: int = 1, an: int = 0, flags: int = 0x8180) -> bytes:
    return struct.pack("!HHHHHH", 1, flags, qd, an, 0, 0)


@pytest.mark.parametrize(
    ("name_bytes", "reason"),
    [
        (b"\xc0\x0c", "dns_pointer_loop"),  # pointer to itself
        (b"\xc0\x20", "dns_pointer_loop"),  # forward pointer
        (b"\x01a\xc0\x0c", "dns_pointer_loop"),  # label then pointer back to the start: a cycle
        (b"\x80a", "dns_bad_label"),  # reserved label type
        (b"\x3fab", "dns_truncated"),  # a 63-byte label in a short message
        (b"\x03a.b\x00", "dns_bad_label"),  # a label holding a dot
        (
            b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x00",
            "dns_name_too_long",
        ),
    ],
)
def test_bad_question_names(name_bytes: bytes, reason: str) -> None:
    wire = _header() + name_bytes + b"\x00\x01\x00\x01" + b"\x00" * 16
    with pytest.raises(BadPacket) as info:
        parse_dns_response_untrusted(wire)
    assert info.value.reason == reason


def test_header_checks() -> None:
    good_q = b"\x01a\x00\x00\x01\x00\x01"
    for wire, reason in [
        (b"\x00" * 11, "dns_truncated"),
        (_header(flags=0x0100) + good_q, "dns_not_response"),
        (_header(qd=2) + good_q, "dns_bad_question"),
        (_header(an=1000) + good_q, "dns_too_many_records"),
        (_header(an=1) + good_q, "dns_truncated"),
    ]:
        with pytest.raises(BadPacket) as info:
            parse_dns_response_untrusted(wire)
        assert info.value.reason == reason


def test_bad_rdata_lengths() -> None:
    good = bytearray(_response("t.test", [RR("t.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=60)]))
    bad = good[:-6] + b"\x00\x03" + good[-4:-1]  # A record with a 3-byte rdata
    with pytest.raises(BadPacket) as info:
        parse_dns_response_untrusted(bad)
    assert info.value.reason == "dns_bad_rdata"


def test_every_truncation_is_a_bad_packet_and_trailing_bytes_are_ignored() -> None:
    wire = _chain_response()
    full = parse_dns_response_untrusted(wire)
    assert parse_dns_response_untrusted(wire + b"\x00garbage") == full
    for cut in range(len(wire)):
        with pytest.raises(BadPacket):
            parse_dns_response_untrusted(wire[:cut])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_only_bad_packet(data: bytes) -> None:
    try:
        parse_dns_response_untrusted(data)
    except BadPacket:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_mutated_valid_message_only_bad_packet(edits: list[tuple[int, int]]) -> None:
    wire = bytearray(_chain_response())
    for pos, value in edits:
        wire[pos % len(wire)] = value
    try:
        resp = parse_dns_response_untrusted(wire)
    except BadPacket:
        return
    for name, addr, ttl in bindings_from_response(resp):
        assert len(addr) in (4, 16) and 0 <= ttl <= 0x7FFFFFFF and len(name) <= 255
