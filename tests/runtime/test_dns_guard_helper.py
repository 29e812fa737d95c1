"""Forged DNS answers through the in-memory tunnel teach the helper nothing (issue 11 item 4, reliability S9).

The in-memory VPN server pushes each answer through the tunnel to the client, as a server forwarding a datagram
from the internet would; the app's query (when there is one) went the other way first. Under the route
mechanism a learned bypassed name becomes an excluded route the provider applies (what would leave en0); under
the NAT mechanism the helper's NAT sends the packet to ``MemoryBypassTransport`` (en0 in memory). For every
forgery neither happens and the probe comes back through the tunnel; for the real answer (positive control) it
does.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP

from netsim.core.ledger import Ledger, LedgerSnapshot
from netsim.core.nat import NatConfig, NatTable
from netsim.core.policy import PolicyEngine, parse_policy
from netsim.core.routes import RouteKind
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
from netsim.core.wireguard.keys import PrivateKey
from netsim.runtime.bypass import BypassSink, NatBypass
from netsim.runtime.helper import Helper
from netsim.testing.memory_bypass import MemoryBypassTransport, RecordingSink
from netsim.testing.memory_tunnel import FakeNetwork, MemoryTunnel, icmp_echo, memory_tunnel

POLICY = (Path(__file__).resolve().parents[2] / "examples" / "policy.toml").read_text()
CLIENT, EN0 = "10.66.0.2", "192.168.1.10"
RESOLVER, ELSEWHERE = "203.0.113.53", "203.0.113.99"
TARGET = "198.51.100.77"
DOMAIN = "isp.lab.test"  # bypassed by the example policy's domain rule
PORT, ID = 33333, 0x4242


def _query(name: str, dst: str = RESOLVER) -> bytes:
    return bytes(IP(src=CLIENT, dst=dst) / UDP(sport=PORT, dport=53) / DNS(id=ID, rd=1, qd=DNSQR(qname=name)))


def _answer(question: str, addr: str, src: str = RESOLVER, ttl: int = 86400) -> bytes:
    dns = DNS(id=ID, qr=1, aa=1, qd=DNSQR(qname=question), an=DNSRR(rrname=question, type="A", ttl=ttl, rdata=addr))
    return bytes(IP(src=src, dst=CLIENT) / UDP(sport=53, dport=PORT) / dns)


# case -> (query the app sent or None, the answer that comes back, what it names, refusal reason or None)
CASES: dict[str, tuple[bytes | None, bytes, str, str | None]] = {
    "unsolicited": (None, _answer(DOMAIN, TARGET), TARGET, "unsolicited"),
    "question_mismatch": (_query("www.lab.test"), _answer(DOMAIN, TARGET), TARGET, "question_mismatch"),
    "wrong_source": (_query(DOMAIN), _answer(DOMAIN, TARGET, src=ELSEWHERE), TARGET, "wrong_source"),
    "own_resolver": (_query(DOMAIN), _answer(DOMAIN, RESOLVER), RESOLVER, "own_address"),
    "own_server": (_query(DOMAIN), _answer(DOMAIN, "192.0.2.2"), "192.0.2.2", "own_address"),
    "control": (_query(DOMAIN), _answer(DOMAIN, TARGET), TARGET, None),
}


def _server_push(t: MemoryTunnel, packet: bytes) -> None:
    """The in-memory VPN server sends ``packet`` to the client through the tunnel."""
    dev = t.server.device
    bufs, sizes, addrs = [bytearray(2048)], [0], [None]
    dev.encapsulate([packet], trio.current_time(), bufs, sizes, addrs)  # type: ignore[arg-type]
    assert sizes[0] and addrs[0] is not None
    t.server.transport.send(memoryview(bufs[0])[: sizes[0]], addrs[0])


async def _send(t: MemoryTunnel, packets: list[bytes], reach_server: int) -> None:
    """Inject what apps send; wait until ``reach_server`` of them got to the in-memory server (which ignores DNS)."""
    ignored = t.server.ignored
    t.tun.inject(packets)
    with trio.fail_after(10):
        while t.server.ignored < ignored + reach_server:
            await trio.sleep(0.001)


async def _written(t: MemoryTunnel) -> list[bytes]:
    with trio.fail_after(10):
        while not (got := t.tun.take_written()):
            await trio.sleep(0.001)
    return got


def _run(mech: str, case: str) -> dict[str, Any]:
    query, answer, named, _ = CASES[case]
    rec: dict[str, Any] = {}

    async def main() -> None:
        en0 = MemoryBypassTransport()

        def nat_bypass(sink: BypassSink, ledger: Ledger) -> NatBypass:
            return NatBypass(NatTable(NatConfig(external_v4=EN0)), en0, sink=sink, ledger=ledger)

        async with memory_tunnel(nat_bypass=nat_bypass if mech == "nat" else None) as t:
            t.helper.policy = PolicyEngine(parse_policy(POLICY.replace('mechanism = "nat"', f'mechanism = "{mech}"')))
            if query is not None:
                await _send(t, [query], reach_server=1)  # the app asks; the in-memory internet has no resolver
            _server_push(t, answer)
            rec["delivered"] = [IP(p)[UDP].sport for p in await _written(t)]  # the app gets the answer anyway
            await trio.sleep(0.1)
            applied = t.launcher.hosts[-1].configurator.applied
            assert applied is not None
            rec["excluded"] = {str(r.network) for r in applied.routes if r.kind is RouteKind.EXCLUDED}
            # the app now talks to the address the answer named
            replies = await t.exchange([icmp_echo(CLIENT, named, 1)], timeout=2.0)
            rec["echoed"] = [str(ip_address(IP(p).src)) for p in replies]
            rec["en0"] = [IP(p).dst for p in en0.sent]
            rec["stats"] = t.helper.stats_json()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return rec


@pytest.mark.reliability("S9")
@pytest.mark.parametrize("mech", ["route", "nat"])
@pytest.mark.parametrize("case", list(CASES))
def test_forged_answer_teaches_nothing_and_the_real_one_does(mech: str, case: str) -> None:
    _, _, named, reason = CASES[case]
    r = _run(mech, case)
    assert r["delivered"] == [53]
    dns = r["stats"]["policy"]["dns"]
    if reason is None:  # positive control: learned, and the next packet leaves by "en0"
        assert dns["learned"] == 1
        if mech == "route":
            assert f"{named}/32" in r["excluded"] and r["stats"]["settings_pushed"] == 1
        else:
            assert r["en0"] == [named] and r["echoed"] == []  # NATed out of en0, not into the tunnel
        guard = r["stats"]["dns_guard"]
        assert guard["matched"] == 1 and guard["ttl_capped"] == 1 and not any(guard["refused"].values())
        return
    assert f"{named}/32" not in r["excluded"] and r["stats"]["settings_pushed"] == 0
    assert r["en0"] == []  # nothing in clear
    assert r["echoed"] == [named]  # the probe went through the tunnel and the server answered
    assert r["stats"]["policy"]["rule_hits"]["direct-domain"] == 0
    assert dns["learned"] == 0
    guard = r["stats"]["dns_guard"]
    assert {k: v for k, v in guard["refused"].items() if v} == {reason: 1}
    assert guard["matched"] == (1 if reason == "own_address" else 0)
    assert LedgerSnapshot.from_json_untrusted(r["stats"]["ledger"]).check() == []


def test_queries_are_recorded_only_with_domain_rules_and_not_for_dropped_packets() -> None:
    """The hook costs nothing without domain rules; a query the policy drops never leaves, so is not awaited."""

    async def main() -> None:
        async with memory_tunnel() as t:
            t.helper.policy = PolicyEngine(parse_policy('default = "tunnel"\n'))
            await _send(t, [_query(DOMAIN)], reach_server=1)
            assert t.helper.dns_guard.statistics().queries == 0
            text = POLICY + '\n[[rule]]\nname = "no-dns-elsewhere"\naction = "drop"\ndst = ["203.0.113.99/32"]\n'
            t.helper.policy = PolicyEngine(parse_policy(text))
            await _send(t, [_query(DOMAIN, dst=ELSEWHERE), _query(DOMAIN)], reach_server=1)
            assert t.helper.stats_json()["verdicts"]["drop"] == 1
            s = t.helper.dns_guard.statistics()
            assert (s.queries, s.pending) == (1, 1)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_tunnel_own_addresses_are_protected() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            got = {str(ip_address(a)) for a in t.helper.dns_guard.protected if len(a) == 4}
            assert {"203.0.113.53", "192.0.2.2", "10.66.0.2"} <= got

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_nat_bypassed_resolver_answers_only_teach_when_asked() -> None:
    """A resolver the policy bypasses: the query leaves by the NAT, its answer comes back through the capture and
    is de-NATed to the app's own port, where it matches; a forgery sent to the same NAT port afterwards does not."""
    resolver = "198.51.100.53"  # not the tunnel's DNS server: reached by the bypass
    text = POLICY + f'\n[[rule]]\nname = "dns-direct"\naction = "bypass"\ndst = ["{resolver}/32"]\n'
    config = TunnelConfig(
        InterfaceConfig(private_key=PrivateKey.generate(), addresses=(ip_interface(f"{CLIENT}/32"),), mtu=1420),
        (
            PeerConfig(
                public_key=PrivateKey.generate().public_key(),
                endpoint=Endpoint("192.0.2.2", 51820),
                allowed_ips=(ip_network("0.0.0.0/0"),),
            ),
        ),
    )
    en0 = MemoryBypassTransport()
    helper = Helper(
        config,
        FakeNetwork().attach((EN0, 40000)),
        policy=PolicyEngine(parse_policy(text)),
        clock=lambda: 10.0,
        nat_bypass=lambda sink, ledger: NatBypass(
            NatTable(NatConfig(external_v4=EN0)), en0, sink=sink, ledger=ledger, clock=lambda: 10.0
        ),
    )
    nb = helper.nat_bypass
    assert nb is not None
    spy = RecordingSink(forward=helper)  # records, then the helper learns and delivers as before
    nb.sink = spy
    delivered = spy.delivered

    def capture(packet: bytes) -> None:
        en0.inject(packet)
        nb.receive(en0.recv_batch(nb._rx, nb._rx_sizes, nb._rx_flags), 10.0)

    assert helper._classify([memoryview(bytearray(_query(DOMAIN, dst=resolver)))], 10.0) == []  # NATed out
    out = IP(en0.sent[0])
    assert out.src == EN0 and out.dst == resolver
    dns = DNS(id=ID, qr=1, qd=DNSQR(qname=DOMAIN), an=DNSRR(rrname=DOMAIN, type="A", ttl=60, rdata=TARGET))
    capture(bytes(IP(src=resolver, dst=EN0) / UDP(sport=53, dport=out[UDP].sport) / dns))
    assert [IP(p)[UDP].dport for p in delivered] == [PORT]  # de-NATed back to the app's port
    guard = helper.dns_guard.statistics()
    assert guard.matched == 1 and helper.policy is not None and len(helper.policy.bindings) == 1
    forged = DNS(id=ID, qr=1, qd=DNSQR(qname=DOMAIN), an=DNSRR(rrname=DOMAIN, type="A", ttl=60, rdata="198.51.100.99"))
    capture(bytes(IP(src=resolver, dst=EN0) / UDP(sport=53, dport=out[UDP].sport) / forged))
    assert len(delivered) == 2 and helper.dns_guard.statistics().refused["unsolicited"] == 1
    assert len(helper.policy.bindings) == 1
