"""Bounds-checked DNS response parsing for learning name -> address bindings (sans-IO).

Theory of operation: the helper sees DNS answers on their way back to the apps. For domain rules
(``bypass *.video.test``) the policy needs to know which addresses those names resolved to. This module reads
one DNS message (RFC 1035 §4.1; the caller strips the 2-byte length prefix of DNS over TCP, RFC 1035 §4.2.2)
and reports the A/AAAA/CNAME records of its answer section. :func:`bindings_from_response` then keeps only the
records on the CNAME chain that starts at the question name (a bailiwick-style check: an answer for
``evil.test`` cannot smuggle in an address for ``bank.test``) and gives every name on the chain the final
addresses, with the smallest TTL seen along the way.

Everything here reads untrusted bytes: offsets are checked before each read, compression pointers must point
strictly backwards (so they cannot loop) and are capped in number, names are capped at 255 octets (RFC 1035
§3.1), and the only exception that escapes is :class:`~netsim.errors.BadPacket`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netsim.errors import BadPacket

__all__ = [
    "CLASS_IN",
    "DNS_MAX_TTL",
    "TYPE_A",
    "TYPE_AAAA",
    "TYPE_CNAME",
    "DnsQuery",
    "DnsRecord",
    "DnsResponse",
    "bindings_from_response",
    "normalize_name",
    "parse_dns_query_untrusted",
    "parse_dns_response_untrusted",
]

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
CLASS_IN = 1

#: The longest a binding learned from a DNS answer may live, in seconds, whatever TTL the answer claims. An hour
#: is above the TTLs that names worth a domain rule use in practice (CDNs answer with seconds to minutes, most
#: zones with at most an hour), so honest answers are unaffected, while a binding that should not exist (a
#: resolver that lied, a name that moved) stops steering new flows within the hour instead of a day or more.
DNS_MAX_TTL = 3600.0

_HEADER = struct.Struct("!HHHHHH")
_QTAIL = struct.Struct("!HH")
_RRTAIL = struct.Struct("!HHIH")

_MAX_NAME = 255  # RFC 1035 §3.1: a name is at most 255 octets on the wire
_MAX_POINTERS = 32  # more jumps than any sane encoder needs; backward-only pointers already forbid loops
_MAX_RECORDS = 256  # a 64 KiB message cannot usefully hold more answers than this
_MAX_CHAIN = 16  # CNAME chain depth followed by bindings_from_response


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """One answer-section record of a type the policy cares about.

    Attributes:
        name: owner name, lower case, no trailing dot.
        rtype: ``TYPE_A``, ``TYPE_AAAA`` or ``TYPE_CNAME``.
        ttl: seconds; values with the top bit set read as 0 (RFC 2181 §8).
        data: the 4- or 16-byte address for A/AAAA, the target name (normalized) for CNAME.
    """

    name: str
    rtype: int
    ttl: int
    data: bytes | str


@dataclass(frozen=True, slots=True)
class DnsResponse:
    """The parts of a DNS response needed to learn bindings."""

    id: int
    rcode: int
    question: str
    qtype: int
    answers: tuple[DnsRecord, ...]
    qclass: int = CLASS_IN


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """The parts of a DNS query needed to match its answer (RFC 5452 §3: id, question, addresses, ports)."""

    id: int
    question: str
    qtype: int
    qclass: int


def normalize_name(name: str) -> str:
    """Lower-case a name and drop the root dot; DNS names compare case-insensitively (RFC 4343)."""
    return name.rstrip(".").lower()


def _read_name(buf: memoryview, offset: int) -> tuple[str, int]:
    """Read a possibly compressed name at ``offset``; return it and the offset just past it in the record."""
    n = len(buf)
    labels: list[str] = []
    wire_len = 0
    end = -1  # offset after the name in the original position (set at the first pointer)
    jumps = 0
    pos = offset
    while True:
        if pos >= n:
            raise BadPacket("dns_truncated", f"name runs past the message end at {pos}")
        length = buf[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                raise BadPacket("dns_truncated", "compression pointer cut off")
            target = ((length & 0x3F) << 8) | buf[pos + 1]
            # RFC 1035 §4.1.4 points at an earlier occurrence; insisting on strictly backwards jumps makes loops
            # impossible, the jump cap bounds the work on long backward chains.
            if target >= pos:
                raise BadPacket("dns_pointer_loop", f"pointer at {pos} to {target} does not point backwards")
            jumps += 1
            if jumps > _MAX_POINTERS:
                raise BadPacket("dns_pointer_loop", "too many compression pointers")
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if kind != 0:
            raise BadPacket("dns_bad_label", f"reserved label type 0x{kind:02x} at {pos}")
        if length == 0:
            if end < 0:
                end = pos + 1
            break
        start = pos + 1
        stop = start + length
        if stop > n:
            raise BadPacket("dns_truncated", f"label at {pos} runs past the message end")
        wire_len += length + 1
        if wire_len + 1 > _MAX_NAME:
            raise BadPacket("dns_name_too_long", "name longer than 255 octets")
        raw = bytes(buf[start:stop])
        if b"." in raw:
            # A label holding a dot would read as two labels once joined: refuse rather than let "bank.test"
            # be spoofed by the single label "bank.test".
            raise BadPacket("dns_bad_label", "label contains a dot")
        labels.append(raw.decode("latin-1").lower())
        pos = stop
    return ".".join(labels), end


def parse_dns_response_untrusted(payload: bytes | bytearray | memoryview) -> DnsResponse:
    """Parse a DNS response message and return its question and its A/AAAA/CNAME answers.

    Records of other types and classes are skipped (their lengths still checked). Authority and additional
    sections are not read: addresses learned from them would not be answers to the question.

    Raises:
        BadPacket: the message is not a well-formed single-question response (reason names the problem).
    """
    buf = memoryview(payload)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    n = len(buf)
    if n < _HEADER.size:
        raise BadPacket("dns_truncated", f"{n} bytes is shorter than the 12-byte header")
    ident, flags, qdcount, ancount, _nscount, _arcount = _HEADER.unpack_from(buf, 0)
    if not flags & 0x8000:
        raise BadPacket("dns_not_response", "QR bit clear")
    if qdcount != 1:
        raise BadPacket("dns_bad_question", f"QDCOUNT is {qdcount}, expected 1")
    if ancount > _MAX_RECORDS:
        raise BadPacket("dns_too_many_records", f"ANCOUNT {ancount} > {_MAX_RECORDS}")
    question, pos = _read_name(buf, _HEADER.size)
    if pos + _QTAIL.size > n:
        raise BadPacket("dns_truncated", "question cut off")
    qtype, qclass = _QTAIL.unpack_from(buf, pos)
    pos += _QTAIL.size
    answers: list[DnsRecord] = []
    for _ in range(ancount):
        name, pos = _read_name(buf, pos)
        if pos + _RRTAIL.size > n:
            raise BadPacket("dns_truncated", "resource record header cut off")
        rtype, rclass, ttl, rdlength = _RRTAIL.unpack_from(buf, pos)
        pos += _RRTAIL.size
        rdata_end = pos + rdlength
        if rdata_end > n:
            raise BadPacket("dns_truncated", "rdata runs past the message end")
        if ttl & 0x80000000:
            ttl = 0  # RFC 2181 §8
        if rclass == CLASS_IN:
            if rtype == TYPE_A:
                if rdlength != 4:
                    raise BadPacket("dns_bad_rdata", f"A record with {rdlength}-byte rdata")
                answers.append(DnsRecord(name, rtype, ttl, bytes(buf[pos:rdata_end])))
            elif rtype == TYPE_AAAA:
                if rdlength != 16:
                    raise BadPacket("dns_bad_rdata", f"AAAA record with {rdlength}-byte rdata")
                answers.append(DnsRecord(name, rtype, ttl, bytes(buf[pos:rdata_end])))
            elif rtype == TYPE_CNAME:
                target, target_end = _read_name(buf, pos)
                if target_end != rdata_end:
                    raise BadPacket("dns_bad_rdata", "CNAME target does not fill its rdata")
                answers.append(DnsRecord(name, rtype, ttl, target))
        pos = rdata_end
    return DnsResponse(ident, flags & 0x000F, question, qtype, tuple(answers), qclass)


def parse_dns_query_untrusted(payload: bytes | bytearray | memoryview) -> DnsQuery:
    """Parse the header and the single question of a DNS query (QR clear, OPCODE 0 = QUERY, QDCOUNT 1).

    Only the question is read: what follows it (an EDNS OPT record, RFC 6891) does not take part in matching.

    Raises:
        BadPacket: not a well-formed standard query (reason names the problem).
    """
    buf = memoryview(payload)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    n = len(buf)
    if n < _HEADER.size:
        raise BadPacket("dns_truncated", f"{n} bytes is shorter than the 12-byte header")
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(buf, 0)
    if flags & 0x8000:
        raise BadPacket("dns_not_query", "QR bit set")
    if flags & 0x7800:
        raise BadPacket("dns_not_query", f"OPCODE {(flags >> 11) & 0xF} is not QUERY")
    if qdcount != 1:
        raise BadPacket("dns_bad_question", f"QDCOUNT is {qdcount}, expected 1")
    question, pos = _read_name(buf, _HEADER.size)
    if pos + _QTAIL.size > n:
        raise BadPacket("dns_truncated", "question cut off")
    qtype, qclass = _QTAIL.unpack_from(buf, pos)
    return DnsQuery(ident, question, qtype, qclass)


def bindings_from_response(response: DnsResponse) -> list[tuple[str, bytes, int]]:
    """Return ``(name, address, ttl)`` bindings on the CNAME chain that starts at the question.

    Every name on the chain (the question, each CNAME target) is bound to the addresses of the chain's end,
    with the smallest TTL along the path: the binding of ``www.a.test -> cdn.b.test -> 192.0.2.7`` is only
    as fresh as its weakest link. Records off the chain are ignored. A failed lookup (RCODE != 0) yields none.
    """
    if response.rcode != 0:
        return []
    cnames: dict[str, tuple[str, int]] = {}
    addresses: dict[str, list[tuple[bytes, int]]] = {}
    for rec in response.answers:
        if rec.rtype == TYPE_CNAME:
            assert isinstance(rec.data, str)
            cnames.setdefault(rec.name, (rec.data, rec.ttl))
        else:
            assert isinstance(rec.data, bytes)
            addresses.setdefault(rec.name, []).append((rec.data, rec.ttl))
    chain: list[str] = []
    name = response.question
    ttl_cap = 0xFFFFFFFF
    seen: set[str] = set()
    out: list[tuple[str, bytes, int]] = []
    while name not in seen and len(chain) < _MAX_CHAIN:
        seen.add(name)
        chain.append(name)
        for addr, ttl in addresses.get(name, ()):
            ttl_eff = min(ttl, ttl_cap)
            out.extend((owner, addr, ttl_eff) for owner in chain)
        nxt = cnames.get(name)
        if nxt is None:
            break
        name, cttl = nxt
        ttl_cap = min(ttl_cap, cttl)
    return out
