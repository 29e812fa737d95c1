"""Hypothesis strategies building real packets with scapy, and scapy's dissection as the field oracle.

Shared by the tests/core packet and checksum tests (not a test module itself).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, IPOption_NOP, IPOption_Router_Alert, UDPerror, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    TCPerror,
    fragment6,
)
from scapy.packet import Packet, Raw

_EXT6 = (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment)

v4_addr = st.integers(1, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
v6_addr = st.integers(1, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))
port = st.integers(0, 65535)


@dataclass
class Built:
    """A packet built by scapy, lazily: scapy's fragmenters use the global `random`, which hypothesis forbids
    inside strategies, so the bytes are made on first use in the test body."""

    make: Callable[[], Packet]
    desc: str
    _data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = bytes(self.make())
        return self._data


def _l4(draw: Any, version: int, kind: str) -> Packet:
    if kind == "tcp":
        opts = draw(st.sampled_from([[], [("MSS", 1460)], [("NOP", None), ("WScale", 7), ("SAckOK", b"")]]))
        return TCP(sport=draw(port), dport=draw(port), flags=draw(st.integers(0, 255)), options=opts)
    if kind == "udp":
        return UDP(sport=draw(port), dport=draw(port))
    if kind == "echo":
        ident = draw(port)
        if version == 4:
            return ICMP(type=draw(st.sampled_from([0, 8])), id=ident, seq=draw(port))
        cls = draw(st.sampled_from([ICMPv6EchoRequest, ICMPv6EchoReply]))
        return cls(id=ident, seq=draw(port))
    if kind == "error":
        if version == 4:
            inner = IPerror(src=draw(v4_addr), dst=draw(v4_addr)) / UDPerror(sport=draw(port), dport=draw(port))
            return ICMP(type=draw(st.sampled_from([3, 11, 12])), code=draw(st.integers(0, 15))) / inner
        cls = draw(st.sampled_from([ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded]))
        inner6 = IPerror6(src=draw(v6_addr), dst=draw(v6_addr)) / TCPerror(sport=draw(port), dport=draw(port))
        return cls() / inner6
    # opaque for netsim: GRE (47) on either version, ESP (50) / AH (51) / No Next Header (59) on IPv6
    return Raw(b"\x00" * draw(st.integers(0, 16)))


@st.composite
def scapy_packets(draw: Any, *, allow_fragments: bool = True, allow_routing: bool = True) -> Built:
    """Valid packets of every shape netsim claims to parse (never one netsim must reject)."""
    version = draw(st.sampled_from([4, 6]))
    kind = draw(st.sampled_from(["tcp", "udp", "echo", "error", "opaque"]))
    payload = Raw(bytes(i & 0xFF for i in range(draw(st.integers(0, 1400)))))
    l4 = _l4(draw, version, kind)
    frag_size = draw(st.sampled_from([0, 0, 96, 256, 600])) if allow_fragments else 0
    pick = draw(st.integers(0, 20))
    if version == 4:
        n_opts = draw(st.integers(0, 3))
        opts = [IPOption_Router_Alert()] * (n_opts > 1) + [IPOption_NOP()] * n_opts
        proto = {"opaque": 47}.get(kind)
        ip = IP(
            src=draw(v4_addr),
            dst=draw(v4_addr),
            ttl=draw(st.integers(0, 255)),
            id=draw(port),
            flags=draw(st.sampled_from([0, "DF"])) if not frag_size else 0,
            options=opts,
        )
        if proto is not None:
            ip.proto = proto
        pkt = ip / l4 / payload
        desc = f"v4 {kind} opts={n_opts}"
        if frag_size:
            desc += f" frag {frag_size} #{pick}"
            return Built(lambda: _pick(fragment(pkt, fragsize=frag_size), pick, pkt), desc)
    else:
        exts = draw(st.lists(st.sampled_from(["hbh", "rt", "dst"]), max_size=3, unique=True))
        if not allow_routing and "rt" in exts:
            exts.remove("rt")
        if "hbh" in exts:  # RFC 8200 §4.1: Hop-by-Hop only right after the IPv6 header
            exts.remove("hbh")
            exts.insert(0, "hbh")
        ip6: Packet = IPv6(
            src=draw(v6_addr), dst=draw(v6_addr), hlim=draw(st.integers(0, 255)), fl=draw(st.integers(0, 2**20 - 1))
        )
        for e in exts:
            ip6 = ip6 / {"hbh": IPv6ExtHdrHopByHop, "rt": IPv6ExtHdrRouting, "dst": IPv6ExtHdrDestOpt}[e]()
        atomic = draw(st.booleans()) if not frag_size else False
        if frag_size or atomic:
            ip6 = ip6 / IPv6ExtHdrFragment(id=draw(st.integers(0, 2**32 - 1)))
        if kind == "opaque":
            nh = draw(st.sampled_from([47, 50, 51, 59]))
            last = ip6.lastlayer()
            last.nh = nh
        pkt = ip6 / l4 / payload
        desc = f"v6 {kind} exts={exts} atomic={atomic}"
        if frag_size:
            desc += f" frag {frag_size + 200} #{pick}"
            return Built(lambda: _pick(fragment6(pkt, frag_size + 200), pick, pkt), desc)
    return Built(lambda: pkt, desc)


def _pick(frags: list[Packet], pick: int, whole: Packet) -> Packet:
    return frags[pick % len(frags)] if frags else whole  # scapy's fragment() of an empty payload is []


def scapy_fields(data: bytes) -> dict[str, Any]:
    """What scapy's dissection says each PacketView field should be (netsim's policy applied on top)."""
    exp: dict[str, Any] = {}
    l4: Packet | None
    if data[0] >> 4 == 4:
        p = IP(data)
        exp.update(
            version=4,
            header_length=p.ihl * 4,
            total_length=p.len,
            payload_length=p.len - p.ihl * 4,
            ttl=p.ttl,
            protocol=p.proto,
            next_header=p.proto,
            src=ipaddress.IPv4Address(p.src).packed,
            dst=ipaddress.IPv4Address(p.dst).packed,
            identification=p.id,
            dont_fragment=bool(p.flags.DF),
            more_fragments=bool(p.flags.MF),
            fragment_offset=p.frag * 8,
        )
        l4 = p.payload if p.frag == 0 else None
    else:
        p6 = IPv6(data)
        exp.update(
            version=6,
            total_length=40 + p6.plen,
            payload_length=p6.plen,
            ttl=p6.hlim,
            next_header=p6.nh,
            src=ipaddress.IPv6Address(p6.src).packed,
            dst=ipaddress.IPv6Address(p6.dst).packed,
            identification=0,
            dont_fragment=False,
            more_fragments=False,
            fragment_offset=0,
        )
        off, proto, layer = 40, p6.nh, p6.payload
        l4 = None
        while True:
            if isinstance(layer, IPv6ExtHdrFragment):
                off += 8
                proto = layer.nh
                exp.update(identification=layer.id, more_fragments=bool(layer.m), fragment_offset=layer.offset * 8)
                if layer.offset:
                    break
            elif isinstance(layer, _EXT6):
                off += (layer.len + 1) * 8
                proto = layer.nh
            else:
                l4 = layer
                break
            layer = layer.payload
        exp.update(header_length=off, protocol=proto)
    exp["l4_offset"] = exp["header_length"]
    exp["hop_limit"] = exp["ttl"]
    exp["is_fragment"] = exp["more_fragments"] or exp["fragment_offset"] != 0
    sport = dport = flags = itype = icode = ident = 0
    is_error = False
    if l4 is not None:
        if isinstance(l4, TCP) and exp["protocol"] == 6:
            sport, dport, flags = l4.sport, l4.dport, int(l4.flags)
        elif isinstance(l4, UDP) and exp["protocol"] == 17:
            sport, dport = l4.sport, l4.dport
        elif isinstance(l4, ICMP) and exp["protocol"] == 1:
            itype, icode = l4.type, l4.code
            ident = l4.id if itype in (0, 8) else 0
            is_error = itype in (3, 4, 5, 11, 12)
        elif exp["protocol"] == 58 and exp["version"] == 6:
            itype, icode = l4.type, l4.code
            ident = l4.id if itype in (128, 129) else 0
            is_error = itype in (1, 2, 3, 4)
    exp.update(
        sport=sport,
        dport=dport,
        tcp_flags=flags,
        icmp_type=itype,
        icmp_code=icode,
        icmp_id=ident,
        is_icmp_error=is_error,
    )
    return exp


FIELDS = (
    "version",
    "header_length",
    "total_length",
    "payload_length",
    "ttl",
    "hop_limit",
    "protocol",
    "next_header",
    "l4_offset",
    "src",
    "dst",
    "sport",
    "dport",
    "tcp_flags",
    "icmp_type",
    "icmp_code",
    "icmp_id",
    "is_icmp_error",
    "identification",
    "is_fragment",
    "more_fragments",
    "dont_fragment",
    "fragment_offset",
)
