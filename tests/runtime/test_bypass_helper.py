"""The helper's side of the bypass mechanisms, in memory: NAT hook, route exclusions, DNS learning, DROP names."""

from __future__ import annotations

from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from netsim.core.ledger import Ledger
from netsim.core.nat import NatConfig, NatTable
from netsim.core.policy import PolicyEngine, parse_policy
from netsim.core.routes import RouteKind
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
from netsim.core.wireguard.keys import PrivateKey
from netsim.errors import ConfigError
from netsim.runtime.bypass import NatBypass
from netsim.runtime.forwarding import settings_from_payload
from netsim.runtime.helper import Helper
from netsim.testing.memory_bypass import MemoryBypassTransport, RecordingSink
from netsim.testing.memory_tunnel import FakeNetwork, MemoryTunnel, memory_tunnel

POLICY = (Path(__file__).resolve().parents[2] / "examples" / "policy.toml").read_text()
CLIENT, EN0 = "10.66.0.2", "192.168.1.10"


def _helper(mechanism: str, nat_bypass: Any = None) -> Helper:
    text = POLICY.replace('mechanism = "nat"', f'mechanism = "{mechanism}"')
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
    return Helper(
        config,
        FakeNetwork().attach(("192.168.1.10", 40000)),
        policy=PolicyEngine(parse_policy(text)),
        clock=lambda: 10.0,
        nat_bypass=nat_bypass,
    )


def _pkts() -> list[memoryview]:
    raw = [
        IP(src=CLIENT, dst="203.0.113.20") / TCP(sport=40001, dport=80, flags="S"),  # direct-host
        IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40002, dport=8080, flags="S"),  # direct-port
        IP(src=CLIENT, dst="203.0.113.10") / TCP(sport=40003, dport=80, flags="S"),  # default: tunnel
        IP(src=CLIENT, dst="203.0.113.10") / UDP(sport=40004, dport=9) / Raw(b"x"),  # no-discard
    ]
    return [memoryview(bytearray(bytes(p))) for p in raw]


def _nat_helper() -> tuple[Helper, MemoryBypassTransport]:
    tr = MemoryBypassTransport()
    helper = _helper(
        "nat",
        lambda sink, ledger: NatBypass(
            NatTable(NatConfig(external_v4=EN0)), tr, sink=sink, ledger=ledger, clock=lambda: 10.0
        ),
    )
    assert helper.nat_bypass is not None and helper.nat_bypass.ledger is helper.ledger
    return helper, tr


def test_nat_mechanism_bypasses_host_and_port_tunnels_the_rest_and_names_drops() -> None:
    helper, tr = _nat_helper()
    keep = helper._classify(_pkts(), 10.0)
    assert [IP(bytes(p)).dport for p in keep] == [80]  # only the default-tunnel packet goes to WireGuard
    assert [IP(p).dst for p in tr.sent] == ["203.0.113.20", "203.0.113.10"]
    assert all(IP(p).src == EN0 for p in tr.sent)
    stats = helper.statistics()
    assert stats.verdicts == {"tunnel": 1, "bypass": 2, "drop": 1} and stats.bypass_tunnelled == 0
    assert stats.ledger["ipc_in"].dropped_for("policy_drop:no-discard") == 1
    assert stats.ledger["nat_out"].forwarded == 2
    js = helper.stats_json()
    assert js["policy"]["rule_hits"] == {"direct-host": 1, "direct-port": 1, "direct-domain": 0, "no-discard": 1}
    assert js["bypass"]["sent"] == 2
    assert helper.settings["excluded_routes"] == []


def test_route_mechanism_excludes_prefixes_and_tunnels_what_routes_cannot_express() -> None:
    helper = _helper("route")
    assert helper.settings["excluded_routes"] == ["203.0.113.20/32", "2001:db8:113::20/128"]
    # the domain rule compiles too (to host routes, as its names resolve): only the port rule cannot
    assert [u[1] for u in helper.settings["bypass_unsupported"]] == ["direct-port"]
    keep = helper._classify(_pkts(), 10.0)
    # direct-host only reaches the helper if the route is missing; like direct-port it then stays in the tunnel
    assert sorted(IP(bytes(p)).dport for p in keep) == [80, 80, 8080]
    assert helper.statistics().verdicts == {"tunnel": 1, "bypass": 2, "drop": 1}
    assert helper.statistics().bypass_tunnelled == 2
    assert helper.statistics().ledger["bypass"].read == 0
    settings = settings_from_payload({**helper.settings, "server": "192.0.2.2"})
    assert settings.ipv4_settings is not None and settings.ipv4_settings.excluded_routes is not None
    assert [(r.destination_address, r.subnet_mask) for r in settings.ipv4_settings.excluded_routes] == [
        ("203.0.113.20", "255.255.255.255")
    ]


def test_helper_hands_its_parsed_packets_to_the_nat_in_its_own_buffer() -> None:
    """Parse once: the NAT rewrites each BYPASS packet in the helper's (writable) receive buffer and sends that;
    the tunnelled packet is left alone."""
    helper, tr = _nat_helper()
    pkts = _pkts()
    before = [bytes(p) for p in pkts]
    keep = helper._classify(pkts, 10.0)
    assert [bytes(p) for p in keep] == [before[2]]
    assert [bytes(pkts[0]), bytes(pkts[1])] == tr.sent  # what went out is the helper's buffer, NATed in place
    assert all(IP(p).src == EN0 for p in tr.sent)
    assert helper.statistics().ledger["bypass"].forwarded == 2


@pytest.mark.parametrize("wrong", ["sink", "ledger"])
def test_nat_bypass_factory_must_use_the_helpers_sink_and_ledger(wrong: str) -> None:
    """The misuse check of ``Helper(nat_bypass=factory)``: a NAT built to deliver or count elsewhere is refused at
    construction (its replies would bypass the helper's ledger)."""

    def factory(sink: Any, ledger: Any) -> NatBypass:
        return NatBypass(
            NatTable(NatConfig(external_v4=EN0)),
            MemoryBypassTransport(),
            sink=RecordingSink() if wrong == "sink" else sink,
            ledger=Ledger("elsewhere") if wrong == "ledger" else ledger,
        )

    with pytest.raises(ConfigError, match="sink and ledger"):
        _helper("nat", factory)


def _dns_reply(name: str, addr: str) -> bytes:
    dns = DNS(id=1, qr=1, qd=DNSQR(qname=name), an=DNSRR(rrname=name, type="A", ttl=60, rdata=addr))
    return bytes(IP(src="203.0.113.53", dst=CLIENT) / UDP(sport=53, dport=33333) / dns)


def _dns_query(name: str) -> bytes:
    """The query `_dns_reply` answers: only answers to queries the client sent teach bindings (DnsGuard)."""
    return bytes(
        IP(src=CLIENT, dst="203.0.113.53") / UDP(sport=33333, dport=53) / DNS(id=1, rd=1, qd=DNSQR(qname=name))
    )


async def _ask(t: MemoryTunnel, name: str) -> None:
    """An app in the Mac sends the query through the tunnel (the in-memory server ignores it)."""
    ignored = t.server.ignored
    t.tun.inject([_dns_query(name)])
    with trio.fail_after(10):
        while t.server.ignored == ignored:
            await trio.sleep(0.001)


def test_dns_answers_teach_the_domain_rule_before_the_app_sees_them() -> None:
    helper, tr = _nat_helper()
    target = IP(src=CLIENT, dst="198.51.100.2") / TCP(sport=40010, dport=80, flags="S")
    assert helper._classify([memoryview(bytearray(bytes(target)))], 10.0) != []  # unknown yet: tunnelled
    helper._classify([memoryview(bytearray(_dns_query("isp.lab.test")))], 10.0)  # the app asks (tunnelled)
    assert helper.deliver_bypass([_dns_reply("isp.lab.test", "198.51.100.2")]) == "no_provider"  # learned anyway
    assert helper._classify([memoryview(bytearray(bytes(target)))], 11.0) == []  # now the domain rule bypasses it
    assert IP(tr.sent[-1]).dst == "198.51.100.2"
    js = helper.stats_json()
    assert js["policy"]["rule_hits"]["direct-domain"] == 1
    assert js["policy"]["dns"]["responses_seen"] == 1


def test_capture_replies_reach_the_provider_through_the_helper() -> None:
    helper, tr = _nat_helper()
    helper._classify(_pkts()[:1], 10.0)
    out = IP(tr.sent[0])
    reply = IP(src="203.0.113.20", dst=EN0) / TCP(sport=80, dport=out[TCP].sport, flags="SA", ack=1)
    assert helper.nat_bypass is not None
    spy = RecordingSink()
    helper.nat_bypass.sink = spy
    delivered = [spy.delivered]
    tr.inject(bytes(reply))
    nb = helper.nat_bypass
    nb.receive(tr.recv_batch(nb._rx, nb._rx_sizes, nb._rx_flags), 10.5)
    assert [IP(p).dst for p in delivered[0]] == [CLIENT]
    assert ip_address(IP(delivered[0][0]).src) == ip_address("203.0.113.20")


def test_no_provider_drops_are_counted_in_the_helper_ledger() -> None:
    helper, tr = _nat_helper()
    helper._classify(_pkts()[:1], 10.0)
    out = IP(tr.sent[0])
    tr.inject(bytes(IP(src="203.0.113.20", dst=EN0) / TCP(sport=80, dport=out[TCP].sport, flags="SA")))
    nb = helper.nat_bypass
    assert nb is not None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(nb.run)
            await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert helper.statistics().ledger["nat_in"].dropped_for("no_provider") == 1
    # (ipc_in is not balanced here: the test calls _classify without _outbound's read count)
    assert [i for i in helper.ledger.check() if i.stage in ("bypass", "nat_out", "nat_in")] == []


def _server_push(t: MemoryTunnel, packet: bytes) -> None:
    """The in-memory VPN server sends ``packet`` to the client through the tunnel."""
    dev = t.server.device
    bufs, sizes, addrs = [bytearray(2048)], [0], [None]
    dev.encapsulate([packet], trio.current_time(), bufs, sizes, addrs)  # type: ignore[arg-type]
    assert sizes[0] and addrs[0] is not None
    t.server.transport.send(memoryview(bufs[0])[: sizes[0]], addrs[0])


def test_route_mechanism_adds_host_routes_for_bypassed_domains_before_the_answer() -> None:
    """A DNS answer for a bypassed name: new SETTINGS with its host route reach the provider, and are applied,
    before the answer itself is written to the utun (so the app's first SYN already takes the route)."""
    seen: dict[str, object] = {}

    async def main() -> None:
        async with memory_tunnel() as t:
            t.helper.policy = PolicyEngine(parse_policy(POLICY.replace('mechanism = "nat"', 'mechanism = "route"')))
            host = t.launcher.hosts[-1]
            applied_before = t.provider.statistics().settings_applied
            await _ask(t, "isp.lab.test")
            _server_push(t, _dns_reply("isp.lab.test", "198.51.100.2"))
            with trio.fail_after(10):
                while not (got := t.tun.take_written()):
                    await trio.sleep(0.001)
            # the moment the answer is in the utun, the new route is already applied
            seen["applied"] = t.provider.statistics().settings_applied - applied_before
            applied = host.configurator.applied
            assert applied is not None
            seen["excluded"] = {str(r.network) for r in applied.routes if r.kind is RouteKind.EXCLUDED}
            seen["answer"] = [IP(p)[UDP].sport for p in got]
            seen["pushed"] = t.helper.stats_json()["settings_pushed"]
            # the same answer again teaches nothing new: no second push
            await _ask(t, "isp.lab.test")
            _server_push(t, _dns_reply("isp.lab.test", "198.51.100.2"))
            with trio.fail_after(10):
                while not t.tun.take_written():
                    await trio.sleep(0.001)
            seen["pushed_again"] = t.helper.stats_json()["settings_pushed"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen["applied"] == 1
    assert {"203.0.113.20/32", "198.51.100.2/32"} <= seen["excluded"]  # type: ignore[operator]
    assert seen["answer"] == [53]
    assert seen["pushed"] == 1 and seen["pushed_again"] == 1


def test_nat_flow_stays_on_the_bypass_when_its_dns_binding_expires() -> None:
    helper, tr = _nat_helper()
    helper._classify([memoryview(bytearray(_dns_query("isp.lab.test")))], 10.0)
    helper.deliver_bypass([_dns_reply("isp.lab.test", "198.51.100.2")])  # learned at t=10 with TTL 60

    def pkt(sport: int, flags: str) -> list[memoryview]:
        p = IP(src=CLIENT, dst="198.51.100.2") / TCP(sport=sport, dport=80, flags=flags)
        return [memoryview(bytearray(bytes(p)))]

    assert helper._classify(pkt(40020, "S"), 10.0) == []  # the domain rule bypasses the new flow
    # t=100: the binding expired, the verdict is TUNNEL again, but the NAT carries this flow (mapping live)
    assert helper._classify(pkt(40020, "A"), 100.0) == []
    assert len(helper._classify(pkt(40021, "S"), 100.0)) == 1  # a new flow follows the verdict: tunnel
    assert helper.statistics().bypass_sticky == 1
    assert [IP(p)[TCP].sport for p in tr.sent][1] == IP(tr.sent[0])[TCP].sport  # same external port
