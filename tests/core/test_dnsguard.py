"""DnsGuard: only answers to queries the client sent teach bindings (issue 11 item 4, reliability S9).

Each field of the match is varied alone; expiry, the table bound, the TTL cap and the tunnel's own addresses are
checked directly; a hypothesis state machine drives the guard and a deliberately slow reference (a list scanned
in full) with the same random queries and answers and compares every verdict and counter.
"""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import AAAA, EDNS0, QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.dns import DNS_MAX_TTL, DnsQuery, parse_dns_query_untrusted
from netsim.core.dnsguard import REFUSALS, DnsGuard
from netsim.core.policy import Action, DnsBindings, PolicyEngine, parse_policy
from netsim.errors import BadPacket, ConfigError

CLIENT = ipaddress.ip_address("10.66.0.2").packed
OTHER_CLIENT = ipaddress.ip_address("10.66.0.3").packed
RESOLVER = ipaddress.ip_address("203.0.113.53").packed
OTHER = ipaddress.ip_address("203.0.113.99").packed
TARGET = ipaddress.ip_address("198.51.100.2").packed

pytestmark = pytest.mark.reliability("S9")


def query(name: str = "isp.lab.test", ident: int = 0x1234, qtype: str = "A", qclass: int = 1) -> bytes:
    q = DNSRecord(DNSHeader(id=ident, qr=0, rd=1), q=DNSQuestion(name, getattr(QTYPE, qtype), qclass))
    return bytes(q.pack())


def answer(
    name: str = "isp.lab.test",
    addr: str = "198.51.100.2",
    ident: int = 0x1234,
    ttl: int = 60,
    qtype: str = "A",
    qclass: int = 1,
    extra: tuple[str, ...] = (),
) -> bytes:
    msg = DNSRecord(DNSHeader(id=ident, qr=1, aa=1, rd=1, ra=1), q=DNSQuestion(name, getattr(QTYPE, qtype), qclass))
    for a in (addr, *extra):
        rdata = AAAA(list(ipaddress.ip_address(a).packed)) if ":" in a else A(a)
        msg.add_answer(RR(name, QTYPE.AAAA if ":" in a else QTYPE.A, rdata=rdata, ttl=ttl))
    return bytes(msg.pack())


def asked(guard: DnsGuard, *, now: float = 0.0, **kw: object) -> DnsGuard:
    assert guard.record_query_untrusted(CLIENT, 40000, RESOLVER, query(**kw), now)  # type: ignore[arg-type]
    return guard


def refused(guard: DnsGuard) -> dict[str, int]:
    return {k: v for k, v in guard.statistics().refused.items() if v}


# -- the query parser -------------------------------------------------------------------------------------------
def test_query_parser_reads_id_and_question() -> None:
    assert parse_dns_query_untrusted(query("WWW.Lab.Test.", 7, "AAAA")) == DnsQuery(7, "www.lab.test", 28, 1)
    edns = DNSRecord(DNSHeader(id=9), q=DNSQuestion("a.test"))
    edns.add_ar(EDNS0(udp_len=1232))
    assert parse_dns_query_untrusted(bytes(edns.pack())).question == "a.test"  # the OPT record does not matter


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (answer(), "dns_not_query"),  # QR set
        (b"\x00\x01\x28\x00\x00\x01" + bytes(6) + b"\x00\x00\x01\x00\x01", "dns_not_query"),  # OPCODE 5 (UPDATE)
        (b"\x00\x01\x01\x00\x00\x02" + bytes(6), "dns_bad_question"),
        (b"\x00\x01\x01\x00", "dns_truncated"),
        (query()[:-2], "dns_truncated"),
    ],
)
def test_query_parser_refuses_what_is_not_a_standard_query(wire: bytes, reason: str) -> None:
    with pytest.raises(BadPacket) as info:
        parse_dns_query_untrusted(wire)
    assert info.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_query_parser_raises_only_badpacket(data: bytes) -> None:
    try:
        parse_dns_query_untrusted(data)
    except BadPacket:
        pass


# -- matching -------------------------------------------------------------------------------------------------
def test_matched_answer_is_learned_once() -> None:
    g = asked(DnsGuard())
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(), 1.0) == [("isp.lab.test", TARGET, 60.0)]
    # consumed: the same answer again (a replay, or a forgery that lost the race) teaches nothing
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(), 1.5) == []
    s = g.statistics()
    assert (s.queries, s.answers, s.matched, s.pending) == (1, 2, 1, 0)
    assert refused(g) == {"unsolicited": 1}


def test_question_name_matches_case_insensitively() -> None:
    """Resolvers echo the question as asked; 0x20 mixed case (a forgery defence) must still match."""
    g = asked(DnsGuard(), name="IsP.LaB.tEsT")
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer("isp.lab.test"), 1.0) != []


@pytest.mark.parametrize(
    ("resolver", "client", "port", "wire", "reason"),
    [
        (RESOLVER, CLIENT, 40000, answer(ident=0x4321), "unsolicited"),
        (RESOLVER, CLIENT, 40001, answer(), "unsolicited"),
        (RESOLVER, OTHER_CLIENT, 40000, answer(), "unsolicited"),
        (OTHER, CLIENT, 40000, answer(), "wrong_source"),
        (RESOLVER, CLIENT, 40000, answer(name="bank.lab.test"), "question_mismatch"),
        (RESOLVER, CLIENT, 40000, answer(qtype="AAAA", addr="2001:db8::1"), "question_mismatch"),
        (RESOLVER, CLIENT, 40000, answer(qclass=3), "question_mismatch"),  # CHAOS
    ],
)
def test_each_field_of_the_match(resolver: bytes, client: bytes, port: int, wire: bytes, reason: str) -> None:
    g = asked(DnsGuard())
    assert g.accept_response_untrusted(resolver, client, port, wire, 1.0) == []
    assert refused(g) == {reason: 1}
    # a mismatch does not consume the query: the real answer still teaches
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(), 2.0) != []


def test_no_query_at_all_is_unsolicited() -> None:
    g = DnsGuard()
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(), 0.0) == []
    assert refused(g) == {"unsolicited": 1}


def test_malformed_answer_raises_badpacket_and_is_counted() -> None:
    g = asked(DnsGuard())
    with pytest.raises(BadPacket):
        g.accept_response_untrusted(RESOLVER, CLIENT, 40000, b"\x12\x34\x81", 1.0)
    assert refused(g) == {"malformed": 1}
    assert g.statistics().pending == 1


def test_bad_queries_are_counted_not_tracked() -> None:
    g = DnsGuard()
    assert not g.record_query_untrusted(CLIENT, 40000, RESOLVER, b"junk", 0.0)
    s = g.statistics()
    assert (s.queries, s.bad_queries, s.pending) == (0, 1, 0)


# -- expiry, bound ----------------------------------------------------------------------------------------------
def test_answer_after_the_timeout_is_expired_and_the_timer_drops_the_rest() -> None:
    g = DnsGuard(query_timeout=5.0)
    asked(g, now=0.0)
    asked(g, now=1.0, ident=2)
    assert g.get_timer() == 5.0
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(), 5.0) == []  # at the deadline: too late
    assert refused(g) == {"expired": 1}
    assert g.get_timer() == 6.0
    assert g.handle_timer(6.0) == 1 and len(g) == 0 and g.get_timer() is None
    assert g.statistics().timed_out == 1
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(ident=2), 6.5) == []
    assert refused(g) == {"expired": 1, "unsolicited": 1}


def test_a_retry_refreshes_its_query() -> None:
    g = DnsGuard(query_timeout=5.0)
    asked(g, now=0.0)
    asked(g, now=4.0)  # the stub resolver retries with the same id and port
    assert len(g) == 1 and g.get_timer() == 9.0
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(), 8.0) != []


def test_table_is_bounded_and_drops_the_oldest() -> None:
    g = DnsGuard(max_pending=3)
    for ident in range(5):
        asked(g, ident=ident, now=float(ident) / 10)
    s = g.statistics()
    assert (s.pending, s.evicted) == (3, 2)
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(ident=0), 1.0) == []
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(ident=4), 1.0) != []
    assert refused(g) == {"unsolicited": 1}
    assert g._by_id.keys() == {(CLIENT, 40000, 2), (CLIENT, 40000, 3)}  # the indexes follow the table


def test_flood_of_queries_stays_bounded() -> None:
    g = DnsGuard(max_pending=64)
    for i in range(5000):
        g.record_query_untrusted(CLIENT, 1024 + i % 60000, RESOLVER, query(ident=i & 0xFFFF), i * 1e-4)
    assert len(g) == 64 and len(g._by_id) == 64 and len(g._by_src) == 64


# -- what a matched answer may teach ----------------------------------------------------------------------------
def test_ttl_is_capped() -> None:
    g = asked(DnsGuard())
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, answer(ttl=86400), 1.0) == [
        ("isp.lab.test", TARGET, DNS_MAX_TTL)
    ]
    assert g.statistics().ttl_capped == 1
    assert DNS_MAX_TTL <= 3600


def test_own_addresses_are_never_learned() -> None:
    g = DnsGuard(["203.0.113.53", "2001:db8:113::53", "192.0.2.2", "10.66.0.2"])
    asked(g)
    wire = answer(addr="203.0.113.53", extra=("192.0.2.2", "10.66.0.2", "198.51.100.2"))
    assert g.accept_response_untrusted(RESOLVER, CLIENT, 40000, wire, 1.0) == [("isp.lab.test", TARGET, 60.0)]
    assert refused(g) == {"own_address": 3}
    asked(g, qtype="AAAA")
    wire = answer(qtype="AAAA", addr="2001:db8:113::53", extra=("::ffff:192.0.2.2", "2001:db8::7"))
    got = g.accept_response_untrusted(RESOLVER, CLIENT, 40000, wire, 1.0)
    assert got == [("isp.lab.test", ipaddress.ip_address("2001:db8::7").packed, 60.0)]
    assert refused(g) == {"own_address": 5}  # the IPv4-mapped form of an own address too


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigError):
        DnsGuard(["not-an-address"])
    with pytest.raises(ConfigError):
        DnsGuard(max_pending=0)
    with pytest.raises(ConfigError):
        DnsGuard(query_timeout=0)


def test_policy_engine_learns_through_the_guard_only() -> None:
    engine = PolicyEngine(parse_policy('default = "tunnel"\n[[rule]]\naction = "bypass"\ndomain = ["isp.lab.test"]\n'))
    g = DnsGuard()
    kw = {"guard": g, "resolver": RESOLVER, "client": CLIENT, "client_port": 40000}
    assert engine.learn_dns_response_untrusted(answer(), 0.0, **kw) == 0  # type: ignore[arg-type]
    assert engine.classify_fields(TARGET, 6, 80, 1.0).rule_name == "default"
    asked(g)
    assert engine.learn_dns_response_untrusted(answer(ttl=86400), 0.5, **kw) == 1  # type: ignore[arg-type]
    assert engine.classify_fields(TARGET, 6, 80, 1.0).action is Action.BYPASS
    assert engine.classify_fields(TARGET, 6, 80, 0.5 + DNS_MAX_TTL).rule_name == "default"  # capped TTL over
    with pytest.raises(BadPacket):
        engine.learn_dns_response_untrusted(b"\x00", 1.0, **kw)  # type: ignore[arg-type]
    d = engine.statistics().dns
    assert (d.responses, d.bad_responses) == (3, 1)
    assert DnsBindings().max_ttl == DNS_MAX_TTL  # direct learning is capped the same way


# -- the guard against a slow reference ------------------------------------------------------------------------
class Reference:
    """The same rules, written the obvious way: a list of outstanding queries, scanned in full."""

    def __init__(self, max_pending: int, timeout: float) -> None:
        self.max_pending, self.timeout = max_pending, timeout
        self.pending: list[tuple[tuple[bytes, int, int, bytes, str], float]] = []
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.evicted = self.timed_out = 0

    def record(self, key: tuple[bytes, int, int, bytes, str], now: float) -> None:
        live = [(k, e) for k, e in self.pending if e > now]
        self.timed_out += len(self.pending) - len(live)
        self.pending = [(k, e) for k, e in live if k != key]
        if len(self.pending) == len(live) and len(self.pending) >= self.max_pending:
            self.pending.pop(0)
            self.evicted += 1
        self.pending.append((key, now + self.timeout))

    def answer(self, key: tuple[bytes, int, int, bytes, str], now: float) -> bool:
        for i, (k, e) in enumerate(self.pending):
            if k == key:
                del self.pending[i]
                if e <= now:
                    self.refused["expired"] += 1
                    return False
                return True
        if any(k[:4] == key[:4] for k, _ in self.pending):
            self.refused["question_mismatch"] += 1
        elif any(k[:3] == key[:3] for k, _ in self.pending):
            self.refused["wrong_source"] += 1
        else:
            self.refused["unsolicited"] += 1
        return False


_ops = st.lists(
    st.tuples(
        st.sampled_from(["query", "answer"]),
        st.sampled_from([CLIENT, OTHER_CLIENT]),
        st.sampled_from([40000, 40001]),
        st.integers(0, 2),
        st.sampled_from([RESOLVER, OTHER]),
        st.sampled_from(["a.test", "b.test"]),
        st.floats(0, 3),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_ops, st.integers(1, 5))
def test_guard_agrees_with_the_reference(ops: list[tuple[str, bytes, int, int, bytes, str, float]], cap: int) -> None:
    g = DnsGuard(max_pending=cap, query_timeout=4.0)
    ref = Reference(cap, 4.0)
    now = 0.0
    for kind, client, port, ident, resolver, name, dt in ops:
        now += dt
        key = (client, port, ident, resolver, name)
        if kind == "query":
            g.record_query_untrusted(client, port, resolver, query(name, ident), now)
            ref.record(key, now)
        else:
            got = g.accept_response_untrusted(resolver, client, port, answer(name, ident=ident), now)
            assert bool(got) == ref.answer(key, now)
        s = g.statistics()
        assert s.refused == ref.refused
        assert (s.pending, s.evicted, s.timed_out) == (len(ref.pending), ref.evicted, ref.timed_out)
