"""excludeLocalNetworks under enforced routes, and TunnelCrack's LocalNet attack (reliability row K5).

The Mac's network puts a *public* /24 on-link: en0 also gets 203.0.113.77/24 and the `lan` host (the attacker on
the Mac's Wi-Fi) answers as 203.0.113.10, the address of the lab's web server. With enforced routes and
``exclude_local_networks`` the private LAN (192.168.1.0/24, fd00:6e73:1::/64) stays direct, as Apple keeps local
hosts direct, but the public on-link /24 goes through the tunnel: a ping to 203.0.113.10 must not appear on en0.
Without ``exclude_local_networks`` the LAN, too, goes through the tunnel. Positive control: with no tunnel the
same ping to 203.0.113.10 does leave en0 (to the attacker), so the setup and the capture see what they must.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.lab.addressing import ADDR
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tunnel import netsim_tunnel
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
PUBLIC_ONLINK = "203.0.113.77/24"
TARGETS = {"lan4": str(ADDR.lan_eth0_v4), "lan6": str(ADDR.lan_eth0_v6), "www4": str(ADDR.www_v4)}


async def _pings(lab: Lab, rec: dict[str, Any], phase: str, pcap_dir: Path) -> None:
    name = f"en0-{phase}"
    await trio.to_thread.run_sync(lambda: lab.capture("mac", "en0", name=name, path=pcap_dir / f"{name}.pcap"))
    answered = {}
    for key, dst in TARGETS.items():
        r = await lab.run("mac", ["ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "2", dst], check=False, timeout=15)
        answered[key] = r.returncode == 0
    await trio.to_thread.run_sync(lab.stop_capture, name)
    rec[phase] = {"answered": answered, "pcap": pcap_dir / f"{name}.pcap"}


async def _scenario(lab: Lab, rec: dict[str, Any], pcap_dir: Path) -> None:
    # the hostile network: a public /24 on-link, and the attacker answering as the web server
    await lab.run("mac", ["ip", "addr", "add", PUBLIC_ONLINK, "dev", "en0", "nodad"])
    await lab.run("lan", ["ip", "addr", "add", f"{ADDR.www_v4}/24", "dev", "eth0", "nodad"])
    await _pings(lab, rec, "no_tunnel", pcap_dir)
    protocol = {"enforce_routes": True, "exclude_local_networks": True}
    async with netsim_tunnel(lab, protocol=protocol) as t:
        rec["applied"] = t.session.applied_settings
        await _pings(lab, rec, "eln", pcap_dir)
    async with netsim_tunnel(lab, protocol={"enforce_routes": True}):
        await _pings(lab, rec, "no_eln", pcap_dir)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pcap_dir = tmp_path_factory.mktemp("eln")

    async def body(lab: Lab, rec: dict[str, Any]) -> None:
        await _scenario(lab, rec, pcap_dir)

    rec = run_lab_scenario(body, "wireguard-go", "nft", "ping")
    assert "error" not in rec, rec["error"]
    return rec


def _echo_requests_on_en0(pcap: Path) -> dict[str, int]:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    seen = dict.fromkeys(TARGETS, 0)
    by_dst = {dst: key for key, dst in TARGETS.items()}
    for pkt in read_pcap(pcap):
        if IP in pkt and ICMP in pkt and pkt[ICMP].type == 8 and pkt[IP].dst in by_dst:
            seen[by_dst[pkt[IP].dst]] += 1
        elif IPv6 in pkt and ICMPv6EchoRequest in pkt and pkt[IPv6].dst in by_dst:
            seen[by_dst[pkt[IPv6].dst]] += 1
    return seen


def test_positive_control_without_a_tunnel_the_public_onlink_host_is_reached_on_en0(scenario: dict[str, Any]) -> None:
    phase = scenario["no_tunnel"]
    assert _echo_requests_on_en0(phase["pcap"]) == {"lan4": 2, "lan6": 2, "www4": 2}
    assert phase["answered"] == {"lan4": True, "lan6": True, "www4": True}  # the attacker answers as www


@pytest.mark.reliability("K5")
def test_exclude_local_networks_keeps_the_private_lan_direct_and_tunnels_the_public_onlink_24(
    scenario: dict[str, Any],
) -> None:
    phase = scenario["eln"]
    assert _echo_requests_on_en0(phase["pcap"]) == {"lan4": 2, "lan6": 2, "www4": 0}
    assert phase["answered"] == {"lan4": True, "lan6": True, "www4": True}  # the real www, through the tunnel
    assert sorted(scenario["applied"]["local_networks"]) == sorted([str(ADDR.lan_net_v4), str(ADDR.lan_net_v6)]), (
        json.dumps(scenario["applied"])
    )


def test_enforced_routes_without_exclude_local_networks_tunnel_the_lan_too(scenario: dict[str, Any]) -> None:
    phase = scenario["no_eln"]
    assert _echo_requests_on_en0(phase["pcap"]) == {"lan4": 0, "lan6": 0, "www4": 0}
    assert phase["answered"]["www4"] is True


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
