"""Policy engine: hypothesis oracle against a brute-force ipaddress evaluation, DNS learning, atomic replace."""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass

import pytest
from dnslib import CNAME, QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from netsim.core.packet import PacketView
from netsim.core.policy import (
    Action,
    FlowFields,
    Policy,
    PolicyEngine,
    Rule,
)
from netsim.errors import BadPacket, ConfigError

# A small universe so that random rules overlap and random packets hit rule boundaries.
V4_PREFIXES = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.128/25",
    "10.1.2.3/32",
    "192.168.0.0/16",
    "192.168.1.0/24",
    "198.51.100.0/24",
]
V6_PREFIXES = ["::/0", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::7/128", "fd00::/8"]
NAMES = ["a.video.test", "b.video.test", "video.test", "x.cdn.test", "other.test"]
PATTERNS = ["*.video.test", "video.test", "a.video.test", "*.test", "*.cdn.test", "nothing.test"]
PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}


def _edge_addresses() -> list[str]:
    out: set[str] = set()
    for text in V4_PREFIXES + V6_PREFIXES:
        net = ipaddress.ip_network(text)
        for delta in (-1, 0, 1):
            for base in (int(net.network_address), int(net.broadcast_address)):
                value = base + delta
                if 0 <= value < 2**net.max_prefixlen:
                    out.add(str(ipaddress.ip_address(value) if net.version == 4 else ipaddress.IPv6Address(value)))
    return sorted(out)


ADDRESSES = _edge_addresses()


@st.composite
def rules(draw: st.DrawFn, index: int) -> Rule:
    dst = draw(st.lists(st.sampled_from(V4_PREFIXES + V6_PREFIXES), max_size=3, unique=True))
    domains = draw(st.lists(st.sampled_from(PATTERNS), max_size=2, unique=True))
    ports = tuple(
        sorted(
            (lo, lo + span)
            for lo, span in draw(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=2))
        )
    )
    if ports:
        protos = draw(st.sampled_from([None, frozenset({6}), frozenset({17}), frozenset({6, 17})]))
    else:
        protos = draw(
            st.sampled_from([None, frozenset({6}), frozenset({17}), frozenset({1}), frozenset({58}), frozenset({1, 6})])
        )
    return Rule(
        f"r{index}",
        draw(st.sampled_from(list(Action))),
        tuple(ipaddress.ip_network(d) for d in dst),
        tuple(domains),
        protos,
        ports,
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    n = draw(st.integers(0, 12))
    return Policy(tuple(draw(rules(i)) for i in range(n)), draw(st.sampled_from(list(Action))))


@dataclass
class Probe:
    dst: str
    proto: int
    dport: int | None


def probes(hot: list[str]) -> st.SearchStrategy[Probe]:
    """Probes at prefix edges, and often at the addresses that have DNS bindings (``hot``)."""
    where = st.sampled_from(ADDRESSES) if not hot else st.one_of(st.sampled_from(ADDRESSES), st.sampled_from(hot))
    return st.builds(Probe, where, st.sampled_from([6, 17, 1, 58, 47]), st.one_of(st.none(), st.integers(0, 140)))


def oracle(policy: Policy, probe: Probe, names: set[str]) -> tuple[Action, int]:
    """Brute force, written from the documented semantics with ipaddress and plain string tests."""
    addr = ipaddress.ip_address(probe.dst)
    for i, rule in enumerate(policy.rules):
        if rule.dst or rule.domains:
            by_prefix = any(addr.version == n.version and addr in n for n in rule.dst)
            by_name = any((n.endswith(p[1:]) if p.startswith("*.") else n == p) for p in rule.domains for n in names)
            if not (by_prefix or by_name):
                continue
        if rule.protos is not None and probe.proto not in rule.protos:
            continue
        if rule.ports:
            if probe.proto not in (6, 17) or probe.dport is None:
                continue
            if not any(lo <= probe.dport <= hi for lo, hi in rule.ports):
                continue
        return rule.action, i
    return policy.default, -1


@settings(max_examples=300, deadline=None)
@given(
    policies(),
    st.dictionaries(st.sampled_from(ADDRESSES), st.sets(st.sampled_from(NAMES), max_size=2), max_size=4),
    st.data(),
)
@pytest.mark.reliability("K6")
def test_classify_matches_bruteforce_oracle(policy: Policy, bound: dict[str, set[str]], data: st.DataObject) -> None:
    batch = data.draw(st.lists(probes(sorted(bound)), min_size=1, max_size=15))
    engine = PolicyEngine(policy)
    for addr, names in bound.items():
        for name in names:
            engine.learn_binding(name, addr, 300, now=0.0)
    for probe in batch:
        names = bound.get(probe.dst, set())
        want_action, want_index = oracle(policy, probe, names)
        packed = ipaddress.ip_address(probe.dst).packed
        got = engine.classify_fields(packed, probe.proto, probe.dport, now=1.0)
        assert (got.action, got.rule_index) == (want_action, want_index), (probe, names)
        explained = engine.explain(FlowFields(ipaddress.ip_address(probe.dst), probe.proto, probe.dport), now=1.0)
        assert explained.verdict == got
        assert [i for i, _, _ in explained.skipped] == list(range(want_index if want_index >= 0 else len(policy.rules)))
        # After every binding expired, domain-only matches are gone: the oracle without names must agree.
        late = engine.classify_fields(packed, probe.proto, probe.dport, now=10_000.0)
        assert (late.action, late.rule_index) == oracle(policy, probe, set())


def test_hit_counters_and_reasons() -> None:
    policy = Policy(
        (
            Rule("printer", Action.BYPASS, (ipaddress.ip_network("192.168.1.0/24"),)),
            Rule("nossh", Action.DROP, protos=frozenset({6}), ports=((22, 22),)),
        )
    )
    engine = PolicyEngine(policy)
    v = engine.classify_fields(bytes([10, 0, 0, 1]), 6, 22, 0.0)
    assert v.action is Action.DROP and v.reason == "policy_drop:nossh"
    assert engine.classify_fields(bytes([192, 168, 1, 9]), 6, 22, 0.0).reason == "policy_bypass:printer"
    assert engine.classify_fields(bytes([10, 0, 0, 1]), 17, 22, 0.0).reason == "policy_tunnel:default"
    stats = engine.statistics()
    assert stats.rule_hits == (("printer", 1), ("nossh", 1)) and stats.default_hits == 1 and stats.classified == 3
    assert dict(stats.by_action) == {"tunnel": 1, "bypass": 1, "drop": 1}


def test_classify_packet_views_including_fragments() -> None:
    policy = Policy(
        (
            Rule("web", Action.BYPASS, protos=frozenset({6}), ports=((443, 443),)),
            Rule("dns6", Action.DROP, (ipaddress.ip_network("2001:db8::/32"),), protos=frozenset({17})),
            Rule("ping", Action.BYPASS, protos=frozenset({1})),
        )
    )
    engine = PolicyEngine(policy)

    def verdict(pkt: object) -> str:
        view = PacketView.parse_untrusted(bytes(pkt))  # type: ignore[call-overload]
        got = engine.classify(view, 0.0)
        assert engine.explain(view, 0.0).verdict == got
        return got.rule_name

    assert verdict(IP(dst="203.0.113.1") / TCP(dport=443)) == "web"
    assert verdict(IPv6(dst="2001:db8::53") / UDP(dport=53)) == "dns6"
    assert verdict(IP(dst="203.0.113.1") / ICMP()) == "ping"
    later_fragment = IP(dst="203.0.113.1", proto=6, frag=100) / Raw(b"\x01\xbb" * 20)
    assert verdict(later_fragment) == "default"  # no ports in a later fragment: port rules never match


def _dns_answer(qname: str, records: list[RR]) -> bytes:
    msg = DNSRecord(DNSHeader(id=7, qr=1, ra=1), q=DNSQuestion(qname, QTYPE.A))
    for rr in records:
        msg.add_answer(rr)
    return bytes(msg.pack())


def test_domain_rule_learns_cname_chain_and_expires() -> None:
    policy = Policy((Rule("video", Action.BYPASS, domains=("*.video.lab.test",), protos=frozenset({6})),))
    engine = PolicyEngine(policy, min_ttl=10.0)
    target = bytes([198, 51, 100, 7])
    assert engine.classify_fields(target, 6, 443, 0.0).rule_name == "default"
    wire = _dns_answer(
        "www.video.lab.test",
        [
            RR("www.video.lab.test", QTYPE.CNAME, rdata=CNAME("edge.cdn.test"), ttl=300),
            RR("edge.cdn.test", QTYPE.A, rdata=A("198.51.100.7"), ttl=60),
        ],
    )
    assert engine.learn_dns_response_untrusted(wire, now=0.0) == 2
    assert engine.classify_fields(target, 6, 443, 1.0).rule_name == "video"
    assert engine.classify_fields(target, 17, 443, 1.0).rule_name == "default"
    why = engine.explain(FlowFields.parse("198.51.100.7", "tcp", 443), 1.0)
    assert why.rule is not None and "www.video.lab.test" in why.names
    assert engine.classify_fields(target, 6, 443, 60.0).rule_name == "default"  # TTL over
    assert engine.expire(60.0) == 2 and len(engine.bindings) == 0
    with pytest.raises(BadPacket):
        engine.learn_dns_response_untrusted(b"\x00\x07", now=0.0)
    assert engine.statistics().dns.bad_responses == 1


def test_binding_ttl_floor_and_cap_eviction() -> None:
    engine = PolicyEngine(max_bindings=3, min_ttl=30.0, max_ttl=100.0)
    engine.learn_binding("a.test", "192.0.2.1", 0, now=0.0)  # TTL 0 still lives min_ttl
    assert engine.bindings.names_for(bytes([192, 0, 2, 1]), 29.0) == ["a.test"]
    engine.learn_binding("b.test", "192.0.2.2", 10_000, now=0.0)  # capped at max_ttl
    assert engine.bindings.names_for(bytes([192, 0, 2, 2]), 100.0) == []
    engine.learn_binding("c.test", "192.0.2.3", 50, now=0.0)
    engine.learn_binding("d.test", "192.0.2.4", 50, now=1.0)  # full: evicts the soonest to expire (a.test)
    stats = engine.statistics().dns
    assert stats.bindings == 3 and stats.evicted == 1
    assert engine.bindings.names_for(bytes([192, 0, 2, 1]), 2.0) == []
    for i in range(1000):  # refreshes keep the expiry heap bounded
        engine.learn_binding("c.test", "192.0.2.3", 50 + i, now=1.0 + i / 1000)
    assert len(engine.bindings._heap) <= 2 * 3 + 64


@pytest.mark.reliability("F13")
def test_replace_is_atomic_and_keeps_bindings() -> None:
    addr = ipaddress.ip_network("203.0.113.0/24")
    old = Policy((Rule("old", Action.BYPASS, (addr,)),), default=Action.TUNNEL)
    new = Policy((Rule("new", Action.DROP, (addr,)), Rule("vid", Action.BYPASS, domains=("*.v.test",))))
    engine = PolicyEngine(old)
    engine.learn_binding("x.v.test", "192.0.2.9", 300, 0.0)
    dst = bytes([203, 0, 113, 5])
    seen: set[str] = set()
    stop = threading.Event()

    def classify_loop() -> None:
        while not stop.is_set():
            seen.add(engine.classify_fields(dst, 6, 80, 1.0).rule_name)

    worker = threading.Thread(target=classify_loop)
    worker.start()
    try:
        for i in range(400):
            engine.replace(new if i % 2 == 0 else old)
    finally:
        stop.set()
        worker.join()
    assert seen <= {"old", "new"} and seen  # never "default": old or new, never neither
    engine.replace(new)
    assert engine.classify_fields(bytes([192, 0, 2, 9]), 6, 80, 2.0).rule_name == "vid"  # bindings survived
    with pytest.raises(ConfigError):
        engine.replace([Rule("dup", Action.DROP), Rule("dup", Action.BYPASS)])
    assert engine.policy is new  # a failed replace leaves the old policy in force
    engine.replace([Rule("only", Action.DROP)])
    assert engine.policy.default is new.default and engine.statistics().replacements == 402


def test_rule_validation_messages() -> None:
    with pytest.raises(ConfigError, match="ports apply only to tcp/udp"):
        Rule("r", Action.BYPASS, protos=frozenset({1}), ports=((1, 2),))
    with pytest.raises(ConfigError, match="domain"):
        Rule("r", Action.BYPASS, domains=("bad domain",))
    with pytest.raises(ConfigError, match="port range"):
        Rule("r", Action.BYPASS, ports=((10, 5),))
    with pytest.raises(ConfigError, match="name"):
        Rule("", Action.BYPASS)


def test_explain_text_lists_earlier_rules() -> None:
    policy = Policy(
        (
            Rule("lan", Action.BYPASS, (ipaddress.ip_network("192.168.0.0/16"),)),
            Rule("udp-only", Action.DROP, protos=frozenset({17})),
            Rule("web", Action.BYPASS, protos=frozenset({6}), ports=((443, 443),)),
        )
    )
    text = str(PolicyEngine(policy).explain(FlowFields.parse("203.0.113.1", "tcp", 80), 0.0))
    assert text.splitlines()[0].startswith("TUNNEL: no rule matched 203.0.113.1 tcp")
    assert "203.0.113.1 not in 192.168.0.0/16" in text
    assert "protocol tcp not in udp" in text
    assert "port 80 not in 443" in text
    with pytest.raises(ConfigError, match="--dst"):
        FlowFields.parse("nope")
    with pytest.raises(ConfigError, match="--proto"):
        FlowFields.parse("192.0.2.1", "sctp-ish")


def test_names_per_address_are_capped() -> None:
    from netsim.core.policy import DnsBindings

    table = DnsBindings(max_names_per_address=4, min_ttl=0.0)
    addr = bytes([192, 0, 2, 1])
    for i in range(10):
        table.learn(f"n{i}.test", addr, 100 + i, now=0.0)
    assert table.names_for(addr, 1.0) == ["n6.test", "n7.test", "n8.test", "n9.test"]
    assert len(table) == 4 and table.statistics().evicted == 6
    assert table.expire(1000.0) == 4 and len(table) == 0 and table.get(addr) is None


def test_refreshed_binding_survives_its_stale_expiry() -> None:
    from netsim.core.policy import DnsBindings

    table = DnsBindings(min_ttl=0.0)
    addr = bytes([192, 0, 2, 1])
    table.learn("a.test", addr, 10, now=0.0)
    table.learn("a.test", addr, 100, now=0.0)  # the entry at t=10 is now stale
    table.learn("b.test", bytes([192, 0, 2, 2]), 20, now=0.0)
    assert table.expire(50.0) == 1  # only b.test
    assert table.names_for(addr, 50.0) == ["a.test"] and len(table) == 1
    assert table.expire(100.0) == 1 and len(table) == 0
