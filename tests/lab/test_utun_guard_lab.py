"""CVE-2019-14899 (reliability row K8): the tunnel's addresses answer nothing that arrives off the utun.

An attacker on the Mac's LAN (the ``lan`` host) sends SYN/ACKs to the tunnel's addresses (10.66.0.2,
fd00:66::2) through the Mac's en0, as in the CVE: a stack that accepts them answers with RSTs, and the RSTs
tell the attacker the tunnel's address and whether a connection exists. The Mac's en0 capture must show no packet
from a tunnel address; the guard's drop counters must have counted every probe. Positive control: the same
SYN/ACKs sent to the Mac's own en0 addresses draw one RST each, so the probe, the path and the capture work.

On the commit before the guard the tunnel addresses answered every probe with a RST out of en0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.lab.addressing import ADDR
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tunnel import TunnelPlan, netsim_tunnel
from netsim.runtime.netconfig import UTUN_GUARD_TABLE
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
N = 10

_ATTACK = """
import sys
from scapy.all import Ether, IP, IPv6, TCP, sendp
mac, targets, n = sys.argv[1], sys.argv[2:-1], int(sys.argv[-1])
frames = []
for k, pair in enumerate(targets):
    src, dst = pair.split(",")
    l3 = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
    frames += [Ether(dst=mac) / l3 / TCP(sport=80, dport=41000 + 100 * k + i, flags="SA", seq=1000, ack=2000)
               for i in range(n)]
sendp(frames, iface="eth0", verbose=False)
print(len(frames))
"""


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    plan = TunnelPlan()
    async with netsim_tunnel(lab, plan=plan) as t:
        mac = (await lab.run("mac", ["cat", "/sys/class/net/en0/address"])).stdout.decode().strip()
        a = lab.addr
        targets = [
            f"{a.lan_eth0_v4},{plan.client_v4}",
            f"{a.lan_eth0_v6},{plan.client_v6}",
            f"{a.lan_eth0_v4},{a.mac_en0_v4}",  # positive control: the Mac's own en0 address answers
            f"{a.lan_eth0_v6},{a.mac_en0_v6}",
        ]
        sent = await lab.run("lan", [sys.executable, "-c", _ATTACK, mac, *targets, str(N)], timeout=60)
        rec["sent"] = int(sent.stdout.strip())
        await trio.sleep(1.0)
        listed = await lab.run("mac", ["nft", "-j", "list", "table", "inet", UTUN_GUARD_TABLE], check=False)
        rec["guard_drops"] = sum(
            expr["counter"]["packets"]
            for item in (json.loads(listed.stdout)["nftables"] if listed.returncode == 0 else [])
            if "rule" in item
            for expr in item["rule"]["expr"]
            if "counter" in expr
        )
        rec["pcap"] = t.pcaps["mac-en0"]
        await trio.to_thread.run_sync(lab.stop_capture, "mac-en0")
    listed = await lab.run("mac", ["nft", "list", "tables"])
    rec["tables_after"] = listed.stdout.decode()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_lab_scenario(_scenario, "wireguard-go", "nft", pcap_dir=tmp_path_factory.mktemp("guard"))


def _rsts_from(pcap: Path, sources: set[str]) -> dict[str, int]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    seen = dict.fromkeys(sources, 0)
    for pkt in read_pcap(pcap):
        l3 = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        if l3 is None or TCP not in pkt or l3.src not in seen:
            continue
        if pkt[TCP].flags & 0x04:  # RST
            seen[l3.src] += 1
    return seen


@pytest.mark.reliability("K8")
def test_syn_ack_to_the_tunnel_address_from_the_lan_draws_no_rst_out_of_en0(scenario: dict[str, Any]) -> None:
    assert "error" not in scenario, scenario.get("error")
    assert scenario["sent"] == 4 * N
    a, plan = ADDR, TunnelPlan()
    rsts = _rsts_from(scenario["pcap"], {plan.client_v4, plan.client_v6, str(a.mac_en0_v4), str(a.mac_en0_v6)})
    assert rsts[str(a.mac_en0_v4)] == N and rsts[str(a.mac_en0_v6)] == N, rsts  # positive control
    assert rsts[plan.client_v4] == 0 and rsts[plan.client_v6] == 0, rsts
    assert scenario["guard_drops"] == 2 * N


def test_the_guard_goes_with_the_tunnel(scenario: dict[str, Any]) -> None:
    assert "error" not in scenario, scenario.get("error")
    assert UTUN_GUARD_TABLE not in scenario["tables_after"]
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
