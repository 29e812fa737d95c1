"""Corrupted persisted state on a real lab (row F14): the Mac's resolver with a garbled ``tunnel.json`` and a tunnel
started over a garbled claim file.

1. control: with no tunnel.json a lookup goes to the ISP resolver on en0 (the en0 capture sees it by name);
2. a garbled tunnel.json (a tunnel's DNS settings the daemon cannot read): the lookup gets SERVFAIL and never
   appears on en0. Before the fix the daemon ignored the file and asked the ISP resolver in the clear;
3. the file removed: lookups reach the ISP resolver again (the daemon was not stuck);
4. a garbled ``/run/netsim/tunnels/<mac>.lock`` left behind: the next tunnel still starts and carries traffic.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import UDP

from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tunnel import netsim_tunnel, udp_echo_argv
from netsim.runtime.netconfig import TUNNEL_LOCK_DIR
from netsim.runtime.resolver import TUNNEL_FILE, read_stats, write_state_file
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
TAG = secrets.token_hex(3)


def _name(phase: str) -> str:
    return f"f14-{phase}-{TAG}.lab.test"


async def _dig(lab: Lab, name: str) -> str:
    r = await lab.run("mac", ["dig", "+tries=1", "+time=3", "+noall", "+comments", name, "A"], check=False, timeout=15)
    m = re.search(r"status: (\w+)", r.stdout.decode(errors="replace"))
    return m.group(1) if m else f"rc={r.returncode}"


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    state = lab.dns_state_dir
    rec["control"] = await _dig(lab, _name("control"))
    write_state_file(state / TUNNEL_FILE, '{"version": 1, "kind": "tunnel", "servers": ["10.66')  # truncated
    rec["corrupt"] = await _dig(lab, _name("corrupt"))
    (state / TUNNEL_FILE).write_bytes(b"\xff\xfe\x00 not json")
    rec["garbage"] = await _dig(lab, _name("garbage"))
    (state / TUNNEL_FILE).unlink()
    rec["removed"] = await _dig(lab, _name("removed"))
    await trio.sleep(0.3)  # the daemon's stats file follows within its poll interval
    rec["stats"] = read_stats(state).get("counters", {})
    lock = TUNNEL_LOCK_DIR / f"{lab.netns('mac')}.lock"  # this run's own name
    lock.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    lock.write_bytes(b"\xff\xfe\xc2\xb2 garbage")
    async with netsim_tunnel(lab) as t:
        rec["tunnel_probe"] = (await t.run_probe("udp", udp_echo_argv(str(lab.addr.www_v4)))).returncode
    rec["lock_left"] = lock.exists()
    lab.stop_capture("mac-en0")
    assert lab.pcap_dir is not None
    rec["en0"] = [
        pkt[DNSQR].qname.decode(errors="replace").rstrip(".")
        for pkt in read_pcap(Path(lab.pcap_dir) / "mac-en0.pcap")
        if UDP in pkt and pkt[UDP].dport == 53 and DNS in pkt and pkt[DNS].qr == 0 and DNSQR in pkt
    ]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rec = run_lab_scenario(
        _scenario, "wireguard-go", "nft", "dig", "tcpdump", pcap_dir=tmp_path_factory.mktemp("corrupt-state")
    )
    assert "error" not in rec, rec["error"]
    return rec


@pytest.mark.reliability("F14")
def test_a_garbled_tunnel_json_fails_closed_and_nothing_reaches_the_isp_resolver(scenario: dict[str, Any]) -> None:
    assert scenario["control"] == "NXDOMAIN" and _name("control") in scenario["en0"]  # the positive control
    assert scenario["corrupt"] == "SERVFAIL" and scenario["garbage"] == "SERVFAIL"
    assert _name("corrupt") not in scenario["en0"] and _name("garbage") not in scenario["en0"]
    assert scenario["stats"].get("servfail_tunnel_state_corrupt", 0) == 2
    assert scenario["removed"] == "NXDOMAIN" and _name("removed") in scenario["en0"]  # not stuck


@pytest.mark.reliability("F14")
def test_a_garbled_tunnel_claim_does_not_stop_the_next_tunnel(scenario: dict[str, Any]) -> None:
    assert scenario["tunnel_probe"] == 0
    assert not scenario["lock_left"]  # the tunnel took the claim over and released it
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
