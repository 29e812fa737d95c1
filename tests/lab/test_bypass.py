"""Bypass proven on the wire (root tier): the same policy under the route and the NAT mechanism, in one lab.

The scenario is examples/bypass_tunnel.py's (so the example is what CI runs): a policy that tunnels everything but
an internet host (203.0.113.20), TCP port 8080 and the domain ``isp.lab.test``, and drops UDP port 9. For each
mechanism a fresh tunnel (server, helper, provider) comes up in the shared lab with a capture on ``mac/en0``; the
flows run; the tunnel goes down. ``/whoami`` answers with the client address the server saw: the ISP's WAN
address (198.51.100.2) for traffic that left by en0 and the home router, the VPN server's (192.0.2.2) for
tunnelled traffic, en0's own address for traffic that stayed in the home.
"""

from __future__ import annotations

import importlib.util
import json
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.core.ledger import LedgerSnapshot
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.testing.fixtures import run_captured_tunnel, run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(400)]

_spec = importlib.util.spec_from_file_location(
    "bypass_tunnel_example", Path(__file__).resolve().parents[2] / "examples" / "bypass_tunnel.py"
)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

MECHANISMS = ("route", "nat")
ISP_WAN, VPN_WAN, EN0 = "198.51.100.2", "192.0.2.2", "192.168.1.10"
ISP_WAN6, EN0_V6 = "2001:db8:51::2", "fd00:6e73:1::10"
NAT_PORTS = range(61000, 62000)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pcap_dir = tmp_path_factory.mktemp("bypass-pcap")

    async def main(lab: Lab, rec: dict[str, Any]) -> None:
        await trio.to_thread.run_sync(example.prepare_lab, lab)
        for mech in MECHANISMS:
            text, _ = example.load_policy(example.POLICY, mech)
            pcap = pcap_dir / f"{mech}-en0.pcap"
            await run_captured_tunnel(lab, rec, mech, example.run_flows, pcap=pcap, policy=text)
            # what the helper's NAT set up in the Mac's namespace must be gone once it stopped
            tables = await lab.run("mac", ["nft", "list", "tables"], check=False)
            ports = await lab.run("mac", ["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"], check=False)
            rec[f"{mech}_after"] = (tables.stdout.decode(), ports.stdout.decode().strip())

    rec = run_lab_scenario(main, "wireguard-go", "wg", "ip", "nft", "tcpdump", "curl", "ping")
    rec["pcap_dir"] = pcap_dir
    for mech in MECHANISMS:  # the measured comparison (docs/bypass.md), visible with -s
        if mech in rec:
            r = rec[mech]
            print(f"[bypass {mech}] rtt={json.dumps(r.get('rtt'))} rate={json.dumps(r.get('rate'))}")
            print(f"[bypass {mech}] iperf={json.dumps(r.get('iperf'))}")
            print(f"[bypass {mech}] helper.bypass={json.dumps(r['helper'].get('bypass'))}")
    return rec


def _get(scenario: dict[str, Any], mech: str) -> dict[str, Any]:
    if mech not in scenario:
        pytest.fail(f"the {mech} phase did not complete: {scenario.get('error', 'no error recorded')}")
    return scenario[mech]  # type: ignore[no-any-return]


@pytest.mark.parametrize("mech", MECHANISMS)
def test_bypassed_host_flows_succeed_via_en0(scenario: dict[str, Any], mech: str) -> None:
    r = _get(scenario, mech)
    assert r["direct_http"] == f"direct {ISP_WAN}"  # left by en0 and the home router's NAT
    assert r["direct_udp"]["received"] == r["direct_udp"]["sent"] > 0
    assert r["direct_ping"]["received"] == 3
    assert r["direct6_http"] == f"direct {ISP_WAN6}"  # IPv6 too (the home router's NAT66)
    assert r["direct6_ping"]["received"] == 3


@pytest.mark.parametrize("mech", MECHANISMS)
def test_port_and_domain_rules(scenario: dict[str, Any], mech: str) -> None:
    """NAT honours the port and domain rules. Routes cannot express a port, so the helper tunnels that traffic;
    the domain becomes host routes as its answers arrive (pushed to the provider before the app sees them)."""
    r = _get(scenario, mech)
    assert r["domain_http"] == f"isp {EN0}"  # the router's own address: straight across the LAN
    if mech == "nat":
        assert r["port_http"] == f"www8080 {ISP_WAN}"
    else:
        assert r["port_http"] == f"www8080 {VPN_WAN}"
        assert r["port_read"] > 0  # the provider read them: they reached the helper and went through the tunnel
        assert r["helper"]["settings_pushed"] >= 1
    assert r["domain_udp"]["received"] == r["domain_udp"]["sent"]
    assert r["domain_ping"]["received"] == 3


@pytest.mark.parametrize("mech", MECHANISMS)
def test_other_traffic_is_tunnelled(scenario: dict[str, Any], mech: str) -> None:
    r = _get(scenario, mech)
    assert r["tunnel_http"] == f"inet {VPN_WAN}"
    assert r["tunnel_udp"]["received"] == r["tunnel_udp"]["sent"]
    assert r["tunnel_ping"]["received"] == 3


@pytest.mark.parametrize("mech", MECHANISMS)
def test_lan_host_stays_direct(scenario: dict[str, Any], mech: str) -> None:
    """Apple: connected networks win over the tunnel's routes; the provider never sees LAN packets."""
    r = _get(scenario, mech)
    assert r["lan_http"] == f"lan {EN0}"
    assert r["lan_ping"]["received"] == 3
    assert r["lan_read"] == 0


@pytest.mark.parametrize("mech", MECHANISMS)
def test_provider_ledger_shows_the_mechanism(scenario: dict[str, Any], mech: str) -> None:
    r = _get(scenario, mech)
    h = r["helper"]
    if mech == "route":
        assert r["direct_read"] == 0  # the kernel sent them out of en0 before the utun
        assert h["policy"]["rule_hits"]["direct-host"] == 0
        assert h["bypass"] is None
        assert h["bypass_tunnelled"] > 0  # port/domain verdicts the route mechanism cannot carry out
    else:
        assert r["direct_read"] > 0  # read from the utun by the provider ...
        assert h["policy"]["rule_hits"]["direct-host"] >= r["direct_read"]  # ... bypassed by the helper ...
        b = h["bypass"]
        assert b["sent"] >= r["direct_read"] and b["nat"]["translated_in"] > 0
        assert b["delivered"] > 0  # ... and the replies written back through the provider
        ipc_in = r["provider"]["ledger"]["stages"]["ipc_in"]
        assert ipc_in["forwarded"] >= b["delivered"]


@pytest.mark.parametrize("mech", MECHANISMS)
def test_drop_rule_drops_with_its_name(scenario: dict[str, Any], mech: str) -> None:
    r = _get(scenario, mech)
    assert r["drop_udp"]["received"] == 0
    dropped = dict(r["helper"]["ledger"]["stages"]["ipc_in"]["dropped"])
    assert dropped.get("policy_drop:no-discard", 0) >= r["drop_udp"]["sent"]
    assert r["helper"]["policy"]["rule_hits"]["no-discard"] >= r["drop_udp"]["sent"]


@pytest.mark.parametrize("mech", MECHANISMS)
def test_ledgers_balance(scenario: dict[str, Any], mech: str) -> None:
    r = _get(scenario, mech)
    for side in ("helper", "provider"):
        ledger = LedgerSnapshot.from_json_untrusted(r[side]["ledger"])
        assert [str(i) for i in ledger.check()] == []


@pytest.mark.parametrize("mech", MECHANISMS)
def test_downloads_are_intact(scenario: dict[str, Any], mech: str) -> None:
    """A 4 MB transfer per path, sha256-checked; with NAT, the port-8080 one runs through the helper's NAT."""
    r = _get(scenario, mech)
    for path, result in r["rate"].items():
        assert result["sha256"] == r["expected_sha256"], (path, result)
    if mech == "nat":
        # the transfer took the NAT both ways: its ACKs were bypassed, its data segments de-NATed and delivered
        assert r["helper"]["policy"]["rule_hits"]["direct-port"] > 500
        assert r["helper"]["bypass"]["delivered"] > 500


def _en0_flows(scenario: dict[str, Any], mech: str) -> tuple[dict[str, int], list[str]]:
    """Sort every packet of the en0 capture into a kind; anything unexpected goes to the second list."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RS, IPv6

    kinds: dict[str, int] = {}
    other: list[str] = []
    lan = ip_address("192.168.1.0")

    def add(kind: str) -> None:
        kinds[kind] = kinds.get(kind, 0) + 1

    for pkt in read_pcap(scenario[f"{mech}_pcap"]):
        if IP in pkt:
            ip = pkt[IP]
            remote = ip.dst if ip.src == EN0 else ip.src if ip.dst == EN0 else None
            if remote is None:
                if ip.proto == 2 and ip.dst.startswith("224.0.0."):
                    continue  # IGMP
                other.append(pkt.summary())
                continue
            local_port = (ip[TCP].sport if ip.src == EN0 else ip[TCP].dport) if TCP in ip else None
            if UDP in ip and remote == VPN_WAN and 51820 in (ip[UDP].sport, ip[UDP].dport):
                add("wireguard")
            elif ip_address(remote).packed[:3] == lan.packed[:3]:
                add("lan")
            elif remote == example.DIRECT_V4:
                add("direct-" + ("tcp" if TCP in ip else "udp" if UDP in ip else "icmp" if ICMP in ip else "?"))
                if mech == "nat":
                    if UDP in ip:
                        port = ip[UDP].sport if ip.src == EN0 else ip[UDP].dport
                    elif ICMP in ip:
                        port = ip[ICMP].id
                    else:
                        port = local_port
                    if port not in NAT_PORTS:
                        other.append("direct flow outside the NAT range: " + pkt.summary())
            elif remote == "203.0.113.10" and TCP in ip and example.PORT in (ip[TCP].sport, ip[TCP].dport):
                add("port")
                if local_port not in NAT_PORTS:
                    other.append("port flow outside the NAT range: " + pkt.summary())
            elif remote == ISP_WAN:
                add("domain")
            else:
                other.append(pkt.summary())
        elif IPv6 in pkt:
            ip6 = pkt[IPv6]
            if ip6.dst.startswith("ff02:") or ICMPv6ND_NS in ip6 or ICMPv6ND_NA in ip6 or ICMPv6ND_RS in ip6:
                continue
            remote = ip6.dst if ip6.src == EN0_V6 else ip6.src if ip6.dst == EN0_V6 else None
            if remote == example.DIRECT_V6:
                add("direct6")
                if mech == "nat":
                    if TCP in ip6:
                        port = ip6[TCP].sport if ip6.src == EN0_V6 else ip6[TCP].dport
                    elif ICMPv6EchoRequest in ip6 or ICMPv6EchoReply in ip6:
                        port = ip6.payload.id
                    else:
                        port = None
                    if port not in NAT_PORTS:
                        other.append("IPv6 direct flow outside the NAT range: " + pkt.summary())
            elif remote is not None and remote.startswith("fd00:6e73:1:"):
                add("lan")
            else:
                other.append(pkt.summary())
    return kinds, other


@pytest.mark.reliability("K6")
@pytest.mark.parametrize("mech", MECHANISMS)
def test_en0_capture_shows_bypass_in_clear_and_the_rest_as_wireguard(scenario: dict[str, Any], mech: str) -> None:
    _get(scenario, mech)
    kinds, other = _en0_flows(scenario, mech)
    assert other == [], other[:10]  # no tunnelled flow, no tunnel address, nothing else in clear
    assert kinds.get("wireguard", 0) > 100
    assert kinds.get("lan", 0) > 0
    for k in ("direct-tcp", "direct-udp", "direct-icmp", "direct6"):
        assert kinds.get(k, 0) > 0, (k, kinds)
    assert kinds.get("domain", 0) > 0
    if mech == "nat":
        assert kinds.get("port", 0) > 100
    else:
        assert "port" not in kinds  # tunnelled: only WireGuard on the wire


def test_helper_removes_its_host_rules_on_exit(scenario: dict[str, Any]) -> None:
    _get(scenario, "nat")
    tables, reserved = scenario["nat_after"]
    assert "netsim_bypass" not in tables
    assert reserved == ""  # the reservation of 61000-61999 was undone


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == []
    assert scenario["root_changed"] is None
