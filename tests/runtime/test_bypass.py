"""NatBypass over the in-memory transport: NAT out, replies back, offload fix-ups, batching, timers; the BPF filter
against a reference interpreter; the route mechanism's compile step."""

from __future__ import annotations

import struct
from pathlib import Path

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import NoPayload, Raw

from netsim.core.bpf import capture_filter
from netsim.core.ledger import Ledger
from netsim.core.nat import NatConfig, NatTable
from netsim.core.packet import Buffer, PacketView
from netsim.core.policy import Mechanism, parse_policy, route_exclusions_payload
from netsim.core.segment import segment_tcp
from netsim.runtime.bypass import NatBypass
from netsim.runtime.bypass_host import host_ruleset
from netsim.testing.memory_bypass import MemoryBypassTransport, RecordingSink
from netsim.transports.raw import FLAG_CSUM_NOT_READY, FLAG_GSO_TCP

EXT4, EXT6 = "192.168.1.10", "fd00:6e73:1::10"
INT4, INT6 = "10.66.0.2", "fd00:66::2"
WWW4, WWW6 = "203.0.113.10", "2001:db8:113::10"
PORTS = (61000, 61999)
POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"


def _nat() -> NatTable:
    return NatTable(NatConfig(external_v4=EXT4, external_v6=EXT6, port_range=PORTS))


def _bypass(clock: list[float] | None = None, **kw: object) -> tuple[NatBypass, MemoryBypassTransport, list[bytes]]:
    tr = MemoryBypassTransport()
    sink = RecordingSink()
    now = clock if clock is not None else [100.0]
    nb = NatBypass(_nat(), tr, sink=sink, ledger=Ledger("helper"), clock=lambda: now[0], **kw)  # type: ignore[arg-type]
    return nb, tr, sink.delivered


def _valid(pkt: bytes) -> bool:
    """scapy's full recomputation agrees with every checksum in ``pkt`` (the oracle)."""
    p = IP(pkt) if pkt[0] >> 4 == 4 else IPv6(pkt)
    layer = p
    while not isinstance(layer, Raw | NoPayload):
        for fd in layer.fields_desc:
            if fd.name in ("chksum", "cksum"):
                setattr(layer, fd.name, None)
        layer = layer.payload
    return bytes(p) == pkt


def _out_packets() -> list[bytes]:
    return [
        bytes(IP(src=INT4, dst=WWW4) / UDP(sport=5555, dport=7) / Raw(b"hello")),
        bytes(IP(src=INT4, dst=WWW4) / TCP(sport=4444, dport=80, flags="S", seq=1000)),
        bytes(IP(src=INT4, dst=WWW4) / ICMP(id=77, seq=1) / Raw(b"ping")),
        bytes(IPv6(src=INT6, dst=WWW6) / UDP(sport=5556, dport=7) / Raw(b"six")),
        bytes(IPv6(src=INT6, dst=WWW6) / ICMPv6EchoRequest(id=78, seq=2) / Raw(b"p6")),
    ]


def test_outbound_is_rewritten_to_en0_with_valid_checksums() -> None:
    nb, tr, _ = _bypass()
    pkts = _out_packets()
    nb.send_batch([memoryview(bytearray(p)) for p in pkts])
    assert len(tr.sent) == len(pkts)
    for orig, sent in zip(pkts, tr.sent, strict=True):
        assert _valid(sent), sent.hex()
        p = IP(sent) if sent[0] >> 4 == 4 else IPv6(sent)
        assert p.src == (EXT4 if p.version == 4 else EXT6)
        o = IP(orig) if orig[0] >> 4 == 4 else IPv6(orig)
        assert p.dst == o.dst
        ident = p[UDP].sport if UDP in p else p[TCP].sport if TCP in p else (p[ICMP].id if ICMP in p else p.id)
        assert PORTS[0] <= ident <= PORTS[1]
    st_ = nb.statistics()
    assert st_.sent == len(pkts) and st_.nat.translated_out == len(pkts)
    assert nb.ledger.check() == []


def test_caller_buffers_are_not_modified() -> None:
    nb, _, _ = _bypass()
    pkts = [bytearray(p) for p in _out_packets()]
    before = [bytes(p) for p in pkts]
    nb.send_batch([memoryview(p) for p in pkts])
    assert [bytes(p) for p in pkts] == before


def test_send_view_rewrites_the_parsed_packet_in_place() -> None:
    """The helper's path: the packet is parsed once (by the caller) and NATed in the caller's writable buffer,
    which then holds exactly what went out; the same bytes as the copying `send_batch` path."""
    nb, tr, _ = _bypass()
    ref, ref_tr, _ = _bypass()
    pkts = _out_packets()
    ref.send_batch(pkts)
    view = PacketView()
    bufs = [bytearray(p) for p in pkts]
    for buf in bufs:
        view.load_untrusted(memoryview(buf))
        nb.send_view(view, 100.0)
    nb.rearm()
    assert tr.sent == ref_tr.sent
    assert [bytes(b) for b in bufs] == tr.sent  # rewritten where it lay: no copy
    assert all(_valid(p) for p in tr.sent)
    assert nb.statistics().sent == len(pkts) and nb.ledger.check() == []


def test_send_view_copies_a_read_only_buffer() -> None:
    nb, tr, _ = _bypass()
    pkt = _out_packets()[0]
    nb.send_view(PacketView.parse_untrusted(pkt), 100.0)
    assert pkt == _out_packets()[0]  # bytes cannot change; the NAT worked on its own copy
    assert len(tr.sent) == 1 and IP(tr.sent[0]).src == EXT4 and _valid(tr.sent[0])


def test_dns_replies_reach_the_sink_with_the_nats_parse_before_delivery() -> None:
    tr = MemoryBypassTransport()
    order: list[str] = []

    class Sink(RecordingSink):
        def bypass_deliver(self, packets: list[Buffer]) -> str | None:
            order.append("deliver")
            return super().bypass_deliver(packets)

        def bypass_dns_reply(self, view: PacketView, now: float) -> None:
            order.append(f"dns {view.sport}->{view.dport} {IP(bytes(view.buffer[: view.total_length])).dst}")
            super().bypass_dns_reply(view, now)

    sink = Sink()
    nb = NatBypass(_nat(), tr, sink=sink, ledger=Ledger("helper"), clock=lambda: 100.0)
    nb.send_batch(
        [
            bytes(IP(src=INT4, dst=WWW4) / UDP(sport=5353, dport=53) / Raw(b"q")),
            bytes(IP(src=INT4, dst=WWW4) / UDP(sport=5354, dport=7) / Raw(b"e")),
        ]
    )
    for sent in tr.sent:
        p = IP(sent)
        tr.inject(bytes(IP(src=p.dst, dst=p.src) / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / Raw(b"a")))
    nb.receive(tr.recv_batch(nb._rx, nb._rx_sizes, nb._rx_flags), 100.5)
    assert order == [f"dns 53->5353 {INT4}", "deliver"]  # de-NATed already, one DNS call, then one batch
    assert sink.dns_replies == 1 and sink.batches == [2]


def _reply_for(sent: bytes) -> bytes:
    p = IP(sent) if sent[0] >> 4 == 4 else IPv6(sent)
    if p.version == 4:
        if UDP in p:
            return bytes(IP(src=p.dst, dst=p.src) / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / Raw(b"hello"))
        if TCP in p:
            return bytes(
                IP(src=p.dst, dst=p.src) / TCP(sport=p[TCP].dport, dport=p[TCP].sport, flags="SA", ack=p[TCP].seq + 1)
            )
        return bytes(IP(src=p.dst, dst=p.src) / ICMP(type=0, id=p[ICMP].id, seq=p[ICMP].seq) / Raw(b"ping"))
    if UDP in p:
        return bytes(IPv6(src=p.dst, dst=p.src) / UDP(sport=p[UDP].dport, dport=p[UDP].sport) / Raw(b"six"))
    req = p[ICMPv6EchoRequest]
    return bytes(IPv6(src=p.dst, dst=p.src) / ICMPv6EchoReply(id=req.id, seq=req.seq) / Raw(b"p6"))


def test_replies_come_back_de_natted_in_one_batch() -> None:
    nb, tr, got = _bypass()
    pkts = _out_packets()
    nb.send_batch(pkts)
    for sent in tr.sent:
        tr.inject(_reply_for(sent))
    n = tr.recv_batch(nb._rx, nb._rx_sizes, nb._rx_flags)
    nb.receive(n, 100.5)
    assert len(got) == len(pkts)
    for orig, back in zip(pkts, got, strict=True):
        assert _valid(back)
        o = IP(orig) if orig[0] >> 4 == 4 else IPv6(orig)
        b = IP(back) if back[0] >> 4 == 4 else IPv6(back)
        assert (b.src, b.dst) == (o.dst, o.src)
    assert nb.statistics().batches_delivered == 1
    assert nb.ledger.check() == []


def test_partial_checksum_is_completed_only_when_flagged() -> None:
    nb, tr, got = _bypass()
    nb.send_batch([_out_packets()[0]])
    reply = bytearray(_reply_for(tr.sent[0]))
    struct.pack_into("!H", reply, 26, 0x1234)  # a partial (offloaded) UDP checksum: garbage until completed
    tr.inject(bytes(reply), FLAG_CSUM_NOT_READY)
    tr.inject(bytes(reply), 0)  # same bytes, not flagged: a genuinely bad checksum stays bad (router rule)
    nb.receive(tr.recv_batch(nb._rx, nb._rx_sizes, nb._rx_flags), 100.5)
    assert _valid(got[0]) and not _valid(got[1])
    assert nb.statistics().checksums_completed == 1


def test_unsolicited_and_filtered_replies_are_counted_drops() -> None:
    nb, tr, got = _bypass()
    nb.send_batch([_out_packets()[0]])
    sent = IP(tr.sent[0])
    tr.inject(bytes(IP(src=WWW4, dst=EXT4) / UDP(sport=7, dport=61999) / Raw(b"x")))  # no such mapping
    tr.inject(bytes(IP(src="198.51.100.9", dst=EXT4) / UDP(sport=7, dport=sent[UDP].sport) / Raw(b"x")))
    tr.inject(b"\x45garbage")
    nb.receive(tr.recv_batch(nb._rx, nb._rx_sizes, nb._rx_flags), 100.5)
    assert got == []
    drops = dict(nb.statistics().receive_drops)
    assert drops == {"nat_no_mapping": 1, "nat_filtered": 1, "malformed": 1}
    assert nb.ledger.check() == []


def test_no_provider_is_counted() -> None:
    nb, tr, _ = _bypass()
    nb.sink = RecordingSink(reply="no_provider")
    nb.send_batch([_out_packets()[0]])
    tr.inject(_reply_for(tr.sent[0]))
    nb.receive(tr.recv_batch(nb._rx, nb._rx_sizes, nb._rx_flags), 100.5)
    assert dict(nb.statistics().receive_drops) == {"no_provider": 1}


def test_send_failure_and_unsupported_are_counted() -> None:
    nb, tr, _ = _bypass()
    tr.fail_with = "raw_error"
    nb.send_batch([_out_packets()[0], bytes(IP(src=INT4, dst=WWW4, proto=47) / Raw(b"gre!" * 4)), b"\x00\x01"])
    assert dict(nb.statistics().send_drops) == {"raw_error": 1, "nat_unsupported_protocol": 1, "malformed": 1}
    assert nb.ledger.check() == []


def _superpacket(payload: bytes, v6: bool = False, flags: str = "PA") -> bytes:
    tcp = TCP(sport=80, dport=61000, flags=flags, seq=4_294_967_000, ack=5, options=[("Timestamp", (1, 2))])
    ip = IPv6(src=WWW6, dst=INT6) if v6 else IP(src=WWW4, dst=INT4, id=65530)
    return bytes(ip / tcp / Raw(payload))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 9000),
    max_size=st.integers(576, 1500),
    v6=st.booleans(),
    fin=st.booleans(),
)
def test_segment_tcp_is_a_lossless_resegmentation(size: int, max_size: int, v6: bool, fin: bool) -> None:
    payload = bytes(i * 7 % 251 for i in range(size))
    pkt = bytearray(_superpacket(payload, v6, "FPA" if fin else "PA"))
    segs = segment_tcp(PacketView.parse_untrusted(pkt), max_size)
    orig = IPv6(bytes(pkt)) if v6 else IP(bytes(pkt))
    data = b""
    seq = 4_294_967_000
    for i, s in enumerate(segs):
        assert len(s) <= max_size
        assert _valid(bytes(s))
        p = IP(bytes(s)) if not v6 else IPv6(bytes(s))
        assert p[TCP].seq == seq % 2**32
        last = i == len(segs) - 1
        assert bool(p[TCP].flags & 0x01) == (fin and last)
        assert bool(p[TCP].flags & 0x08) == last
        assert p[TCP].options == orig[TCP].options
        body = bytes(p[TCP].payload)
        seq += len(body)
        data += body
    assert data == payload


def test_gso_superpacket_is_delivered_as_mtu_segments() -> None:
    nb, tr, got = _bypass(max_packet=1420)
    nb.send_batch([bytes(IP(src=INT4, dst=WWW4) / TCP(sport=4444, dport=80, flags="S"))])
    port = IP(tr.sent[0])[TCP].sport
    big = bytearray(bytes(IP(src=WWW4, dst=EXT4) / TCP(sport=80, dport=port, flags="A") / Raw(b"z" * 20000)))
    struct.pack_into("!H", big, 36, 0)  # partial checksum, as a GSO skb carries it
    tr.inject(bytes(big), FLAG_CSUM_NOT_READY | FLAG_GSO_TCP)
    nb.receive(tr.recv_batch(nb._rx, nb._rx_sizes, nb._rx_flags), 100.5)
    assert len(got) == 15 and all(len(p) <= 1420 and _valid(p) for p in got)
    assert b"".join(bytes(IP(p)[TCP].payload) for p in got) == b"z" * 20000
    s = nb.statistics()
    assert (s.superpackets, s.segments_out, s.delivered) == (1, 15, 1)
    assert nb.ledger.check() == []


def test_capture_loop_batches_and_expires_mappings() -> None:
    nb, tr, got = _bypass()
    nb.clock = trio.current_time

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(nb.run)
            nb.send_batch(_out_packets()[:1])
            for _ in range(5):
                tr.inject(_reply_for(tr.sent[0]))
            await trio.sleep(0.001)
            assert len(got) == 5 and nb.statistics().wakeups == 1  # one wakeup, one delivery for the batch
            assert nb.statistics().batches_delivered == 1
            await trio.sleep(121)  # UDP mapping timeout is 120 s (RFC 4787 REQ-5): the loop's timer expires it
            assert nb.statistics().nat.expired == 1 and len(nb.nat) == 0
            tr.inject(_reply_for(tr.sent[0]))
            await trio.sleep(0.001)
            assert dict(nb.statistics().receive_drops) == {"nat_no_mapping": 1}
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_capture_loop_receives_then_fires_due_expiries_in_the_same_wakeup() -> None:
    """The one behaviour the shared driver changed: the NAT's hand-written loop either expired mappings (its
    deadline passed) or received frames (readable) per wakeup; `DatagramDriver` always drains what is ready, with
    ``now``, then fires the timers that are due, in that one wakeup. A reply for a live mapping that is ready when
    another mapping's expiry falls due is delivered, and the expiry happens, in one wakeup."""
    nb, tr, got = _bypass()
    nb.clock = trio.current_time
    clock = trio.testing.MockClock()
    udp_a, _, _, udp_b, _ = _out_packets()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(nb.run)
            nb.send_batch([udp_a])  # mapping A: UDP, 120 s (RFC 4787 REQ-5)
            clock.jump(100)
            nb.send_batch([udp_b])  # mapping B: due at 220 s
            await trio.testing.wait_all_tasks_blocked()
            before = nb.statistics().wakeups
            clock.jump(21)  # A is due now ...
            tr.inject(_reply_for(tr.sent[1]))  # ... and B's reply is ready: one wakeup sees both
            await trio.testing.wait_all_tasks_blocked()
            st_ = nb.statistics()
            assert st_.wakeups == before + 1
            assert len(got) == 1 and st_.delivered == 1  # received first, with the wakeup's `now` ...
            assert st_.nat.expired == 1 and len(nb.nat) == 1  # ... then the due expiry, same wakeup
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    assert nb.ledger.check() == []


# ------------------------------------------------------------------------------------------------ BPF oracle
def _run_bpf(program: bytes, pkt: bytes, proto: int, pkttype: int) -> int:
    """A reference classic-BPF interpreter (the subset capture_filter uses): returns the accept length."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    a = x = 0
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x06:
            return int(k)
        if code == 0xB1:
            x = 4 * (pkt[k] & 0x0F)
            continue
        if cls == 0x00:
            mode, size = code & 0xE0, code & 0x18
            if mode == 0x20 and k >= 0xFFFFF000:
                a = {0: proto, 4: pkttype}[k - 0xFFFFF000]
                continue
            off = k + (x if mode == 0x40 else 0)
            width = {0x00: 4, 0x08: 2, 0x10: 1}[size]
            if off + width > len(pkt):
                return 0  # out of bounds: the kernel rejects the packet
            a = int.from_bytes(pkt[off : off + width], "big")
            continue
        op = code & 0xF0
        taken = {0x10: a == k, 0x20: a > k, 0x30: a >= k, 0x40: bool(a & k)}[op]
        pc += jt if taken else jf


def _expect(pkt: bytes, pkttype: int) -> bool:
    if pkttype != 0:
        return False
    if pkt[0] >> 4 == 4:
        p = IP(pkt)
        if p.dst != EXT4 or p.frag:
            return False
        if TCP in p or UDP in p:
            return bool(PORTS[0] <= p.dport <= PORTS[1])
        if ICMP in p:
            t = p[ICMP].type
            return (t == 0 and PORTS[0] <= p[ICMP].id <= PORTS[1]) or t in (3, 11, 12)
        return False
    q = IPv6(pkt)
    if q.dst != EXT6:
        return False
    if q.nh in (6, 17):
        return bool(PORTS[0] <= q.payload.dport <= PORTS[1])
    if q.nh == 58:
        t = pkt[40]
        return (t == 129 and PORTS[0] <= int.from_bytes(pkt[44:46], "big") <= PORTS[1]) or 1 <= t <= 4
    return False


_dst4 = st.sampled_from([EXT4, "192.168.1.11", "10.66.0.2"])
_dst6 = st.sampled_from([EXT6, "fd00:6e73:1::11", "2001:db8::1"])
_port = st.one_of(st.integers(60990, 62010), st.integers(0, 65535))


@st.composite
def _packets(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["tcp4", "udp4", "icmp4", "frag4", "gre4", "tcp6", "udp6", "icmp6"]))
    port = draw(_port)
    if kind.endswith("4"):
        ip = IP(src=WWW4, dst=draw(_dst4), ihl=draw(st.sampled_from([None, 6])))
        if ip.ihl == 6:
            ip.options = [b"\x01\x01\x01\x01"]  # four NOPs: a header with options
        if kind == "tcp4":
            return bytes(ip / TCP(dport=port))
        if kind == "udp4":
            return bytes(ip / UDP(dport=port))
        if kind == "icmp4":
            return bytes(ip / ICMP(type=draw(st.sampled_from([0, 3, 5, 8, 11, 12])), id=port))
        if kind == "frag4":
            ip.frag = draw(st.integers(1, 100))
            return bytes(ip / Raw(struct.pack("!HH", 80, port) + b"x" * 12))
        return bytes(IP(src=WWW4, dst=draw(_dst4), proto=47) / Raw(b"gre!" * 4))
    ip6 = IPv6(src=WWW6, dst=draw(_dst6))
    if kind == "tcp6":
        return bytes(ip6 / TCP(dport=port))
    if kind == "udp6":
        return bytes(ip6 / UDP(dport=port))
    t = draw(st.sampled_from([1, 2, 3, 4, 128, 129, 135, 136]))
    return bytes(ip6 / Raw(bytes([t, 0, 0, 0]) + struct.pack("!HH", port, 1)))


@settings(max_examples=400, deadline=None)
@given(pkt=_packets(), pkttype=st.sampled_from([0, 0, 0, 3, 4]))
def test_capture_filter_matches_its_specification(pkt: bytes, pkttype: int) -> None:
    program = capture_filter(bytes(IP(dst=EXT4))[16:20], bytes(IPv6(dst=EXT6))[24:40], PORTS)
    proto = 0x0800 if pkt[0] >> 4 == 4 else 0x86DD
    assert (_run_bpf(program, pkt, proto, pkttype) > 0) == _expect(pkt, pkttype)


def test_capture_filter_without_a_family_rejects_it() -> None:
    program = capture_filter(None, bytes(IPv6(dst=EXT6))[24:40], PORTS)
    pkt = bytes(IP(src=WWW4, dst=EXT4) / UDP(dport=61000))
    assert _run_bpf(program, pkt, 0x0800, 0) == 0


# ------------------------------------------------------------------------------------------------ route compile
def test_example_policy_route_mechanism_excludes_only_the_host() -> None:
    policy = parse_policy(POLICY.read_text(), source=str(POLICY))
    assert policy.mechanism is Mechanism.NAT
    assert route_exclusions_payload(policy) == {"excluded_routes": [], "bypass_unsupported": []}
    route = parse_policy(POLICY.read_text().replace('mechanism = "nat"', 'mechanism = "route"'))
    payload = route_exclusions_payload(route)
    assert payload["excluded_routes"] == ["203.0.113.20/32", "2001:db8:113::20/128"]
    assert [u[1] for u in payload["bypass_unsupported"]] == ["direct-port", "direct-domain"]


def test_host_ruleset_names_the_range_and_interface() -> None:
    text = host_ruleset("en0", PORTS, EXT4, None)
    assert 'iifname "en0" ip daddr 192.168.1.10 meta l4proto { tcp, udp } th dport 61000-61999 drop' in text
    assert "ip6" not in text
