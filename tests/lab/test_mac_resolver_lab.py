"""The simulated Mac's own resolver in the lab (netsim.runtime.resolver, docs/dns.md; reliability row K3).

One lab, one scenario (module-scoped), every lookup a unique name so the captures tell the phases apart:

0. no tunnel: a lookup from ``mac`` goes to the ISP router's resolver on en0 (positive control: the en0
   capture sees DNS by name);
1. netsim's provider connected (default route): the lookup goes into the tunnel (on the utun and on the server's
   wg0 capture, to the tunnel's resolver) and never appears on en0 as DNS;
2. that provider SIGKILLed: its tunnel.json is left behind, stale; a lookup goes to the ISP resolver, and no
   query goes to the tunnel's resolver address on en0 (on main the stale resolv.conf sent it there in clear).
   Positive control: the same query sent straight to the tunnel resolver's address *is* seen on en0;
3. a split-DNS provider (``matchDomains = ["corp.lab.test"]``, no default route): names under corp.lab.test go
   into the tunnel, the rest to the ISP resolver on en0;
4. after that tunnel stopped: tunnel.json is gone and every lookup uses the ISP resolver again.
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tunnel import netsim_tunnel
from netsim.runtime.resolver import TUNNEL_FILE, read_stats
from netsim.testing.fixtures import assert_root_unchanged, root_snapshot
from netsim.testing.require import require_binary, require_root, require_tun

pytestmark = [pytest.mark.lab, pytest.mark.tun, pytest.mark.timeout(300)]

SPLIT_PROVIDER = f"{Path(__file__).parent}/split_dns_provider.py:SplitDnsProvider"
TAG = secrets.token_hex(3)


def _name(phase: str, domain: str = "lab.test") -> str:
    return f"k3-{phase}-{TAG}.{domain}"


async def _dig(lab: Lab, name: str, server: str | None = None, *, tcp: bool = False) -> str:
    """Look ``name`` up from mac (through resolv.conf = the Mac's resolver, or ``@server``); its DNS status."""
    argv = ["dig", "+tries=1", "+time=3", "+noall", "+comments", name, "A"]
    if server is not None:
        argv.insert(1, f"@{server}")
    if tcp:
        argv.insert(1, "+tcp")
    r = await lab.run("mac", argv, check=False, timeout=15)
    m = re.search(r"status: (\w+)", r.stdout.decode(errors="replace"))
    return m.group(1) if m else f"rc={r.returncode}"


def _queries(path: Path) -> list[tuple[str, str]]:
    """(destination address, question name) of every DNS query in a pcap."""
    out = []
    for pkt in read_pcap(path):
        if UDP in pkt and pkt[UDP].dport == 53 and DNS in pkt and pkt[DNS].qr == 0 and DNSQR in pkt:
            ip = pkt[IP] if IP in pkt else pkt[IPv6]
            out.append((str(ip.dst), pkt[DNSQR].qname.decode(errors="replace").rstrip(".")))
    return out


def _keep(lab: Lab, name: str, as_name: str) -> None:
    assert lab.pcap_dir is not None
    src = lab.pcap_dir / f"{name}.pcap"
    if src.exists():
        shutil.copy(src, lab.pcap_dir / f"{as_name}.pcap")


async def _wait(cond: Any, timeout: float = 10.0) -> bool:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.05)
        return True
    return False


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_root()
    require_tun()
    require_binary("wireguard-go", "wg", "ip", "nft", "tcpdump", "dig")
    before = root_snapshot()
    started = time.monotonic()
    rec: dict[str, Any] = {}
    with Lab(pcap_dir=tmp_path_factory.mktemp("mac-resolver")) as lab:
        state = lab.dns_state_dir

        async def main() -> None:
            rec["control"] = await _dig(lab, _name("control"))
            rec["control_v6_tcp"] = await _dig(lab, _name("control-v6-tcp"), "::1", tcp=True)  # [::1]:53, TCP
            async with netsim_tunnel(lab) as t:
                rec["tunnel_file"] = (state / TUNNEL_FILE).read_text()
                rec["connected"] = await _dig(lab, _name("connected"))
                rec["connected_tcp"] = await _dig(lab, _name("connected-tcp"), tcp=True)
                pid = t.provider_pid
                t.signal_provider(signal.SIGKILL)
                rec["provider_gone"] = await _wait(lambda: t.provider_pid != pid)
                rec["utun_gone"] = await _wait(lambda: not lab.links("mac", "tun"))
                rec["stale_file_left"] = (state / TUNNEL_FILE).exists()
                rec["crashed"] = await _dig(lab, _name("crashed"))
                rec["crashed_direct"] = await _dig(lab, _name("crashed-direct"), str(lab.addr.dns_v4))
                await trio.sleep(0.3)  # the daemon's stats file follows within its poll interval
                rec["stats_crashed"] = read_stats(state).get("counters", {})
            _keep(lab, "vpn-wg", "vpn-wg-default")
            async with netsim_tunnel(lab, provider=SPLIT_PROVIDER) as t:
                rec["split_file"] = (state / TUNNEL_FILE).read_text()
                rec["split_in"] = await _dig(lab, _name("split-in", "corp.lab.test"))
                rec["split_out"] = await _dig(lab, _name("split-out"))
            _keep(lab, "vpn-wg", "vpn-wg-split")
            rec["stopped_file_left"] = (state / TUNNEL_FILE).exists()
            rec["stopped"] = await _dig(lab, _name("stopped", "corp.lab.test"))
            await trio.sleep(0.3)  # the daemon's stats file follows within its poll interval
            rec["stats"] = read_stats(state).get("counters", {})

        trio.run(main)
        lab.stop_capture("mac-en0")
        assert lab.pcap_dir is not None
        rec["en0"] = _queries(lab.pcap_dir / "mac-en0.pcap")
        rec["wg_default"] = _queries(lab.pcap_dir / "vpn-wg-default.pcap")
        rec["wg_split"] = _queries(lab.pcap_dir / "vpn-wg-split.pcap")
        rec["addr"] = lab.addr
        rec["seconds"] = time.monotonic() - started
        yield rec
    assert_root_unchanged(before)


def _to(queries: list[tuple[str, str]], name: str) -> set[str]:
    return {dst for dst, qname in queries if qname == name}


def test_control_without_tunnel_goes_to_the_isp_resolver_on_en0(scenario: dict[str, Any]) -> None:
    assert scenario["control"] == "NXDOMAIN"
    assert _to(scenario["en0"], _name("control")) == {str(scenario["addr"].isp_lan_v4)}
    assert scenario["control_v6_tcp"] == "NXDOMAIN"  # the daemon's other listener, over TCP
    assert _to(scenario["en0"], _name("control-v6-tcp")) == {str(scenario["addr"].isp_lan_v4)}


@pytest.mark.reliability("K3")
def test_connected_tunnel_lookups_go_through_the_tunnel_only(scenario: dict[str, Any]) -> None:
    assert '"interface": "utun' in scenario["tunnel_file"] and '"claims_default_route": true' in scenario["tunnel_file"]
    assert scenario["connected"] == "NXDOMAIN"  # answered by the tunnel's resolver (the lab's internet DNS)
    assert _to(scenario["wg_default"], _name("connected")) == {str(scenario["addr"].dns_v4)}
    assert _to(scenario["en0"], _name("connected")) == set()  # not on en0 as DNS (only inside WireGuard)
    assert scenario["connected_tcp"] == "NXDOMAIN"  # a TCP client: forwarded the same way
    assert _to(scenario["wg_default"], _name("connected-tcp")) == {str(scenario["addr"].dns_v4)}
    assert _to(scenario["en0"], _name("connected-tcp")) == set()


@pytest.mark.reliability("K3")
def test_after_a_provider_crash_no_query_goes_to_the_tunnel_resolver_on_en0(scenario: dict[str, Any]) -> None:
    addr = scenario["addr"]
    assert scenario["provider_gone"] and scenario["utun_gone"], scenario
    assert scenario["stale_file_left"]  # the crashed provider's tunnel.json: the daemon must ignore it
    assert scenario["crashed"] == "NXDOMAIN"
    assert _to(scenario["en0"], _name("crashed")) == {str(addr.isp_lan_v4)}  # the system resolver again
    assert scenario["stats_crashed"].get("tunnel_stale", 0) >= 1
    # positive control: a query to the tunnel resolver's address after the crash is seen on en0 in clear
    assert scenario["crashed_direct"] == "NXDOMAIN"
    assert _to(scenario["en0"], _name("crashed-direct")) == {str(addr.dns_v4)}
    # and, apart from that control, no query to the tunnel's resolvers ever left by en0
    tunnel_dns = {str(addr.dns_v4), str(addr.dns_v6)}
    leaked = [(d, q) for d, q in scenario["en0"] if d in tunnel_dns and q != _name("crashed-direct")]
    assert leaked == []


@pytest.mark.reliability("K3")
def test_split_dns_sends_only_match_domains_into_the_tunnel(scenario: dict[str, Any]) -> None:
    addr = scenario["addr"]
    assert '"match_domains": ["corp.lab.test"]' in scenario["split_file"]
    assert '"claims_default_route": false' in scenario["split_file"]
    assert scenario["split_in"] == "NXDOMAIN" and scenario["split_out"] == "NXDOMAIN"
    assert _to(scenario["wg_split"], _name("split-in", "corp.lab.test")) == {str(addr.dns_v4)}
    assert _to(scenario["en0"], _name("split-in", "corp.lab.test")) == set()
    assert _to(scenario["en0"], _name("split-out")) == {str(addr.isp_lan_v4)}
    assert _to(scenario["wg_split"], _name("split-out")) == set()


def test_after_stop_lookups_use_the_system_resolver(scenario: dict[str, Any]) -> None:
    assert not scenario["stopped_file_left"]
    assert scenario["stopped"] == "NXDOMAIN"
    assert _to(scenario["en0"], _name("stopped", "corp.lab.test")) == {str(scenario["addr"].isp_lan_v4)}
    stats = scenario["stats"]
    assert stats["via_tunnel"] >= 2 and stats["via_system"] >= 4 and stats.get("servfail", 0) == 0, stats


def test_scenario_is_fast(scenario: dict[str, Any]) -> None:
    assert scenario["seconds"] < 60, scenario["seconds"]
