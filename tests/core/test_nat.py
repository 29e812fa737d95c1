"""NAT: rewrites checked against scapy's checksum recomputation, round trips, ICMP errors, timeouts, exhaustion."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6
from scapy.packet import Packet, Raw

from netsim.core.nat import NatConfig, NatTable
from netsim.core.packet import PacketView
from netsim.errors import ConfigError

EXT4 = "192.0.2.10"
EXT6 = "2001:db8:1::10"
IN4 = "10.66.0.2"
IN6 = "fd00:66::2"
REMOTE4 = "198.51.100.7"
REMOTE6 = "2001:db8:2::7"
LO, HI = 61000, 61999


def _table(**kw: object) -> NatTable:
    args: dict[str, object] = {"external_v4": EXT4, "external_v6": EXT6, "port_range": (LO, HI)}
    args.update(kw)
    return NatTable(NatConfig(**args))  # type: ignore[arg-type]


def _parse_scapy(buf: bytes | bytearray) -> Packet:
    return IP(bytes(buf)) if buf[0] >> 4 == 4 else IPv6(bytes(buf))


def _scapy_recomputed(buf: bytes | bytearray) -> bytes:
    """Clear every checksum field scapy knows and let it rebuild them."""
    pkt = _parse_scapy(buf)
    layer: Packet | None = pkt
    while layer is not None and not isinstance(layer, Raw):
        for fname in ("chksum", "cksum"):
            if fname in layer.fields:
                setattr(layer, fname, None)
        layer = layer.payload if layer.payload else None
    return bytes(pkt.__class__(bytes(pkt)))


def assert_checksums_valid(buf: bytes | bytearray) -> None:
    assert _scapy_recomputed(buf) == bytes(buf)


def _out(nat: NatTable, pkt: Packet, now: float = 0.0) -> tuple[bytearray, PacketView, str | None]:
    buf = bytearray(bytes(pkt))
    view = PacketView.parse_untrusted(buf)
    return buf, view, nat.translate_outbound(view, now)


def _in(nat: NatTable, pkt: Packet | bytes, now: float = 0.0) -> tuple[bytearray, PacketView, str | None]:
    buf = bytearray(bytes(pkt))
    view = PacketView.parse_untrusted(buf)
    return buf, view, nat.translate_inbound(view, now)


def _reply_to(buf: bytes | bytearray) -> Packet:
    """The reply a remote host would send to the translated packet ``buf``."""
    p = _parse_scapy(buf)
    ip_cls = IP if isinstance(p, IP) else IPv6
    l4 = p.payload
    if isinstance(l4, TCP):
        rl4: Packet = TCP(sport=l4.dport, dport=l4.sport, flags="SA", seq=7, ack=l4.seq + 1)
    elif isinstance(l4, UDP):
        rl4 = UDP(sport=l4.dport, dport=l4.sport)
    elif isinstance(l4, ICMP):
        rl4 = ICMP(type=0, id=l4.id, seq=l4.seq)
    else:
        rl4 = ICMPv6EchoReply(id=l4.id, seq=l4.seq)
    return ip_cls(src=p.dst, dst=p.src) / rl4 / Raw(b"reply-data")


@st.composite
def outbound_packets(draw: st.DrawFn) -> Packet:
    v6 = draw(st.booleans())
    src = str(ipaddress.ip_address(draw(st.integers(1, 2**16)) + int(ipaddress.ip_address(IN6 if v6 else IN4))))
    dst = REMOTE6 if v6 else REMOTE4
    ip_layer: Packet = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, id=draw(st.integers(0, 65535)))
    kind = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    port = draw(st.integers(1, 65535))
    payload = Raw(draw(st.binary(max_size=64)))
    if kind == "tcp":
        flags = draw(st.sampled_from(["S", "A", "PA", "FA"]))
        return ip_layer / TCP(sport=port, dport=draw(st.integers(1, 65535)), flags=flags) / payload
    if kind == "udp":
        return ip_layer / UDP(sport=port, dport=draw(st.integers(1, 65535))) / payload
    if v6:
        return ip_layer / ICMPv6EchoRequest(id=port, seq=3) / payload
    return ip_layer / ICMP(type=8, id=port, seq=3) / payload


@settings(max_examples=300, deadline=None)
@given(outbound_packets())
def test_round_trip_restores_tuple_and_checksums_match_scapy(pkt: Packet) -> None:
    nat = _table()
    orig = PacketView.parse_untrusted(bytes(pkt))
    buf, view, reason = _out(nat, pkt)
    assert reason is None
    assert_checksums_valid(buf)
    assert view.src == ipaddress.ip_address(EXT6 if orig.version == 6 else EXT4).packed
    port = view.icmp_id if orig.protocol in (1, 58) else view.sport
    assert LO <= port <= HI
    assert PacketView.parse_untrusted(buf).five_tuple() == view.five_tuple()  # the view was kept in step
    rbuf, rview, rreason = _in(nat, _reply_to(buf))
    assert rreason is None
    assert_checksums_valid(rbuf)
    assert rview.dst == orig.src
    if orig.protocol in (1, 58):
        assert rview.icmp_id == orig.icmp_id
    else:
        assert (rview.dport, rview.sport) == (orig.sport, orig.dport)


def test_udp_checksum_zero_stays_zero_on_ipv4() -> None:
    nat = _table()
    pkt = IP(src=IN4, dst=REMOTE4) / UDP(sport=5000, dport=53, chksum=0) / Raw(b"q")
    buf, _view, reason = _out(nat, pkt)
    assert reason is None and IP(bytes(buf))[UDP].chksum == 0
    rebuilt = IP(bytes(buf))
    del rebuilt.chksum
    assert IP(bytes(rebuilt)).chksum == IP(bytes(buf)).chksum


def test_endpoint_independent_mapping_and_distinct_ports() -> None:
    nat = _table()
    _b1, v1, _ = _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=5000, dport=53))
    _b2, v2, _ = _out(nat, IP(src=IN4, dst="203.0.113.9") / UDP(sport=5000, dport=123))
    _b3, v3, _ = _out(nat, IP(src="10.66.0.3", dst=REMOTE4) / UDP(sport=5000, dport=53))
    _b4, v4, _ = _out(nat, IP(src=IN4, dst=REMOTE4) / TCP(sport=5000, dport=53))
    assert v1.sport == v2.sport  # RFC 4787 REQ-1: same internal endpoint, same external port
    assert v3.sport != v1.sport
    assert len(nat) == 3 and v4.sport >= LO


def test_filtering_unknown_remote_and_unmapped_port() -> None:
    nat = _table()
    _buf, view, _ = _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=5000, dport=53))
    stranger = IP(src="203.0.113.99", dst=EXT4) / UDP(sport=53, dport=view.sport)
    assert _in(nat, stranger)[2] == "nat_filtered"
    wrong_port = IP(src=REMOTE4, dst=EXT4) / UDP(sport=54, dport=view.sport)
    assert _in(nat, wrong_port)[2] == "nat_filtered"
    assert _in(nat, IP(src=REMOTE4, dst=EXT4) / UDP(sport=53, dport=view.sport + 1))[2] == "nat_no_mapping"
    assert _in(nat, IP(src=REMOTE4, dst="192.0.2.11") / UDP(sport=53, dport=view.sport))[2] == "nat_not_for_us"
    drops = dict(nat.statistics().drops)
    assert drops["nat_filtered"] == 2 and drops["nat_no_mapping"] == 1 and drops["nat_not_for_us"] == 1


def _quote_error_v4(translated: bytes | bytearray, from_addr: str = "198.51.100.1") -> Packet:
    inner = IP(bytes(translated))
    return IP(src=from_addr, dst=inner.src) / ICMP(type=3, code=3) / inner


@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
def test_inbound_icmpv4_error_quoting_mapped_packet(proto: str) -> None:
    nat = _table()
    l4: Packet
    if proto == "udp":
        l4 = UDP(sport=5000, dport=9999) / Raw(b"x" * 20)
    elif proto == "tcp":
        l4 = TCP(sport=5000, dport=80, flags="S")
    else:
        l4 = ICMP(type=8, id=777, seq=1) / Raw(b"ping")
    original = IP(src=IN4, dst=REMOTE4, ttl=1) / l4
    buf, _view, _ = _out(nat, original)
    ebuf, _eview, reason = _in(nat, _quote_error_v4(buf))
    assert reason is None
    assert_checksums_valid(ebuf)
    err = IP(bytes(ebuf))
    assert err.dst == IN4
    assert err[ICMP].payload.src == IN4 and err[ICMP].payload.dst == REMOTE4
    quoted = PacketView.parse_quoted_untrusted(bytes(ebuf)[28:])
    orig_view = PacketView.parse_untrusted(bytes(original))
    assert quoted.five_tuple() == orig_view.five_tuple() and quoted.icmp_id == orig_view.icmp_id
    assert bytes(ebuf)[28:] == bytes(original)  # the whole quote is the original packet again, checksums too
    assert nat.statistics().icmp_errors_translated == 1


def test_inbound_icmpv4_error_with_short_quote() -> None:
    nat = _table()
    buf, _view, _ = _out(nat, IP(src=IN4, dst=REMOTE4) / TCP(sport=5000, dport=80, flags="S"))
    quote = bytes(buf)[:28]  # RFC 792: IP header + 64 bits of the datagram
    err = IP(src="198.51.100.1", dst=EXT4) / ICMP(type=11, code=0) / Raw(quote)
    ebuf, _, reason = _in(nat, err)
    assert reason is None
    outer = IP(bytes(ebuf))
    assert outer.dst == IN4
    again = IP(bytes(outer))
    del again.chksum, again[ICMP].chksum
    assert IP(bytes(again)).chksum == outer.chksum and IP(bytes(again))[ICMP].chksum == outer[ICMP].chksum
    inner = IP(bytes(ebuf)[28:] + b"\x00" * 12)  # pad so scapy can read the cut TCP header
    assert inner.src == IN4 and inner[TCP].sport == 5000


def test_inbound_icmpv6_packet_too_big() -> None:
    nat = _table()
    original = IPv6(src=IN6, dst=REMOTE6) / UDP(sport=4444, dport=443) / Raw(b"y" * 100)
    buf, _, _ = _out(nat, original)
    err = IPv6(src="2001:db8:9::1", dst=EXT6) / ICMPv6PacketTooBig(mtu=1280) / IPv6(bytes(buf))
    ebuf, _, reason = _in(nat, err)
    assert reason is None
    assert_checksums_valid(ebuf)
    assert IPv6(bytes(ebuf)).dst == IN6
    assert bytes(ebuf)[48:] == bytes(original)


def test_outbound_icmp_error_for_inbound_reply() -> None:
    """The tunnel-side host rejects a (de-NATed) reply with port unreachable: the error goes out NATed."""
    nat = _table()
    buf, view, _ = _out(nat, IPv6(src=IN6, dst=REMOTE6) / UDP(sport=4444, dport=443))
    rbuf, _, _ = _in(nat, _reply_to(buf))
    err = IPv6(src=IN6, dst=REMOTE6) / ICMPv6DestUnreach(code=4) / IPv6(bytes(rbuf))
    ebuf, _, reason = _out(nat, err)
    assert reason is None
    assert_checksums_valid(ebuf)
    pkt = IPv6(bytes(ebuf))
    assert pkt.src == EXT6
    inner = IPv6(bytes(ebuf)[48:])
    assert inner.dst == EXT6 and inner[UDP].dport == view.sport


def test_icmp_error_checks() -> None:
    nat = _table()
    buf, _, _ = _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=5000, dport=9999))
    forged = bytearray(buf)
    bad_remote = IP(bytes(forged))
    bad_remote.dst = "203.0.113.1"
    assert _in(nat, _quote_error_v4(bytes(bad_remote)))[2] == "nat_filtered"
    garbage = IP(src="198.51.100.1", dst=EXT4) / ICMP(type=3, code=3) / Raw(b"\x45\x00")
    assert _in(nat, garbage)[2] == "nat_bad_quote"
    unmapped = IP(src="192.0.2.10", dst=REMOTE4) / UDP(sport=61999, dport=9999)
    assert _in(nat, _quote_error_v4(bytes(unmapped)))[2] == "nat_no_mapping"


def test_udp_and_icmp_timeouts_and_refresh() -> None:
    nat = _table(udp_timeout=120.0, icmp_timeout=60.0)
    buf, view, _ = _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=5000, dport=53), now=0.0)
    port = view.sport
    assert _in(nat, _reply_to(buf), now=100.0)[2] is None  # inbound refreshes: deadline now 220
    assert _in(nat, _reply_to(buf), now=219.0)[2] is None
    assert nat.expire(300.0) == 0  # the deadline was pushed to 339
    assert len(nat) == 1
    assert _in(nat, _reply_to(buf), now=339.5)[2] == "nat_no_mapping"
    assert len(nat) == 0
    _ibuf, _iview, _ = _out(nat, IP(src=IN4, dst=REMOTE4) / ICMP(type=8, id=9), now=1000.0)
    assert nat.next_deadline() is not None
    assert nat.expire(1059.0) == 0 and len(nat) == 1
    assert nat.expire(1060.0) == 1 and len(nat) == 0
    # A released port goes to the back of the pool: the next mapping gets a different one.
    _, v2, _ = _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=5000, dport=53), now=2000.0)
    assert v2.sport != port


def _tcp(flags: str, outbound: bool, nat_port: int = 0) -> Packet:
    if outbound:
        return IP(src=IN4, dst=REMOTE4) / TCP(sport=40000, dport=443, flags=flags)
    return IP(src=REMOTE4, dst=EXT4) / TCP(sport=443, dport=nat_port, flags=flags)


def test_tcp_established_and_transitory_timeouts() -> None:
    nat = _table(tcp_established_timeout=7440.0, tcp_transitory_timeout=240.0)
    _, view, _ = _out(nat, _tcp("S", True), now=0.0)
    p = view.sport
    assert nat.expire(240.0) == 1  # SYN only: transitory
    _, view, _ = _out(nat, _tcp("S", True), now=1000.0)
    p = view.sport
    assert _in(nat, _tcp("SA", False, p), now=1001.0)[2] is None
    assert nat.mapping_for(4, 6, ipaddress.ip_address(IN4).packed, 40000, 1001.0).established  # type: ignore[union-attr]
    assert nat.expire(1001.0 + 3600.0) == 0 and len(nat) == 1  # established outlives 4 minutes
    _out(nat, _tcp("FA", True), now=5000.0)
    assert nat.expire(5000.0 + 241.0) == 0  # one FIN only: still established
    _in(nat, _tcp("FA", False, p), now=5300.0)
    assert nat.expire(5300.0 + 239.0) == 0
    assert nat.expire(5300.0 + 240.0) == 1  # FIN each way: transitory


def test_tcp_rst_makes_mapping_transitory_and_new_syn_restarts() -> None:
    nat = _table()
    _, view, _ = _out(nat, _tcp("S", True), now=0.0)
    p = view.sport
    _in(nat, _tcp("SA", False, p), now=0.0)
    _in(nat, _tcp("R", False, p), now=10.0)
    m = nat.mapping_for(4, 6, ipaddress.ip_address(IN4).packed, 40000, 10.0)
    assert m is not None and not m.established and m.expiry == 250.0
    _out(nat, _tcp("S", True), now=20.0)
    _in(nat, _tcp("SA", False, p), now=21.0)
    assert m.established


def test_port_exhaustion_table_cap_and_recovery() -> None:
    nat = _table(port_range=(62000, 62003), udp_timeout=30.0)
    ports = set()
    for i in range(4):
        _, v, r = _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=1000 + i, dport=53), now=0.0)
        assert r is None
        ports.add(v.sport)
    assert ports == {62000, 62001, 62002, 62003}  # never two mappings on one port
    assert _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=2000, dport=53), now=1.0)[2] == "nat_ports_exhausted"
    assert _out(nat, IP(src=IN4, dst=REMOTE4) / TCP(sport=2000, dport=53), now=1.0)[2] is None  # own pool
    assert _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=2000, dport=53), now=31.0)[2] is None  # expired ones freed
    small = _table(max_mappings=2)
    for i in range(2):
        assert _out(small, IP(src=IN4, dst=REMOTE4) / UDP(sport=1000 + i, dport=53))[2] is None
    assert _out(small, IP(src=IN4, dst=REMOTE4) / UDP(sport=3000, dport=53))[2] == "nat_table_full"
    assert dict(small.statistics().drops)["nat_table_full"] == 1


def test_unsupported_inputs() -> None:
    nat = NatTable(NatConfig(external_v4=EXT4))
    assert _out(nat, IPv6(src=IN6, dst=REMOTE6) / UDP(sport=1, dport=2))[2] == "nat_no_external_address"
    frag = IP(src=IN4, dst=REMOTE4, flags="MF") / UDP(sport=1, dport=2) / Raw(b"z" * 100)
    assert _out(nat, frag)[2] == "nat_fragment"
    assert _out(nat, IP(src=IN4, dst=REMOTE4, proto=47) / Raw(b"gre!" * 4))[2] == "nat_unsupported_protocol"
    assert _out(nat, IP(src=IN4, dst=REMOTE4) / ICMP(type=0, id=1))[2] == "nat_unsupported_protocol"


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="port_range"):
        NatConfig(port_range=(80, 90))
    with pytest.raises(ConfigError, match="IPv4"):
        NatConfig(external_v4="2001:db8::1")
    with pytest.raises(ConfigError, match="not an IP"):
        NatConfig(external_v6="nope")


_step = st.tuples(
    st.sampled_from(["out", "in", "tick"]),
    st.sampled_from([4, 6]),
    st.sampled_from([6, 17, 1]),
    st.integers(0, 5),  # internal host
    st.integers(0, 5),  # internal port / echo id
    st.integers(0, 200),  # seconds to advance
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_step, min_size=1, max_size=40))
def test_random_traffic_never_shares_an_external_port(steps: list[tuple[str, int, int, int, int, int]]) -> None:
    """Invariants under random flows and time: unique external ports in range, a consistent table, bounded size."""
    nat = _table(port_range=(61000, 61007), max_mappings=10, tcp_transitory_timeout=240.0)
    now = 0.0
    sent: list[bytearray] = []
    for op, version, proto, host, port, advance in steps:
        now += advance
        if op == "tick":
            nat.expire(now)
        elif op == "out":
            src = f"10.66.0.{host + 2}" if version == 4 else f"fd00:66::{host + 2:x}"
            dst = REMOTE4 if version == 4 else REMOTE6
            ip_layer = IP(src=src, dst=dst) if version == 4 else IPv6(src=src, dst=dst)
            if proto == 6:
                pkt = ip_layer / TCP(sport=1000 + port, dport=443, flags="S")
            elif proto == 17:
                pkt = ip_layer / UDP(sport=1000 + port, dport=53)
            else:
                pkt = ip_layer / (ICMP(type=8, id=port) if version == 4 else ICMPv6EchoRequest(id=port))
            buf, _, reason = _out(nat, pkt, now)
            assert reason in (None, "nat_table_full", "nat_ports_exhausted")
            if reason is None:
                assert_checksums_valid(buf)
                sent.append(buf)
        elif sent:
            buf = sent[(host * 6 + port) % len(sent)]
            reply = _reply_to(buf)
            rbuf, _rview, reason = _in(nat, reply, now)
            assert reason in (None, "nat_no_mapping")
            if reason is None:
                assert_checksums_valid(rbuf)
        live = list(nat._out.values())
        assert len(live) <= 10 and len(nat._in) == len(live)
        keys = [(m.version, m.kind, m.ext_port) for m in live]
        assert len(set(keys)) == len(keys)
        assert all(61000 <= m.ext_port <= 61007 for m in live)
        for m in live:
            assert nat._in[(m.version, m.kind, m.ext_port)] is m
            pool = nat._free[(m.version, m.kind)]
            assert m.ext_port not in pool


def test_pulled_timers_match_the_sans_io_core_contract() -> None:
    """`get_timer`/`handle_timer`, as the rest of the core: the deadline is the first mapping's expiry, calling
    `handle_timer` before it does nothing, at it releases the mapping, and an empty table has no timer."""
    nat = _table(udp_timeout=120.0)
    assert nat.get_timer() is None
    _out(nat, IP(src=IN4, dst=REMOTE4) / UDP(sport=5000, dport=53), now=10.0)
    assert nat.get_timer() == 130.0 == nat.next_deadline()
    nat.handle_timer(129.0)
    assert len(nat) == 1
    nat.handle_timer(130.0)
    assert len(nat) == 0 and nat.get_timer() is None
    assert nat.statistics().expired == 1
