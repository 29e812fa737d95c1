"""Every lab namespace resolves with the lab's resolv.conf, and the lab's servers never query the host's resolver
(issue 14: the isp/inet HTTP servers' PTR lookups went to the host's resolver, stopped only by "network
unreachable").

The check is on the wire: a capture on ``any`` in each namespace while an HTTP server of `netsim.lab.services`
binds there (http.server's ``server_bind`` makes a PTR query for its own address). Every DNS query seen must go
to one of the lab's resolvers, and at least one must be seen (a query the kernel refused to route, as the host's
resolver is from ``inet``, leaves no packet: that must fail the test too).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from netsim.lab import ROLES, Lab, read_pcap
from netsim.testing.fixtures import checked_lab
from netsim.testing.require import require_binary, require_root

pytestmark = pytest.mark.lab

PORT = 8089


def _gate() -> None:
    require_root()
    require_binary("ip", "nft", "tcpdump")


@pytest.fixture(scope="module")
def bare_lab() -> Iterator[Lab]:
    _gate()
    with checked_lab(services=False) as lab:
        yield lab


def _server_address(lab: Lab, role: str) -> str:
    a = lab.addr
    return str(
        {"mac": a.mac_en0_v4, "isp": a.isp_wan_v4, "vpn": a.vpn_wan_v4, "inet": a.www_v4, "lan": a.lan_eth0_v4}[role]
    )


@pytest.mark.parametrize("role", ROLES)
def test_namespace_sees_the_labs_resolv_conf(bare_lab: Lab, role: str) -> None:
    seen = bare_lab.run_sync(role, ["cat", "/etc/resolv.conf"]).stdout.decode()
    assert seen == bare_lab.resolv_conf(role)
    assert f"# written by netsim lab {bare_lab.run_id}" in seen


@pytest.mark.parametrize("role", ROLES)
def test_server_lookups_stay_in_the_lab(bare_lab: Lab, role: str, tmp_path: Path) -> None:
    lab = bare_lab
    resolvers = {str(x) for x in (lab.addr.isp_lan_v4, lab.addr.isp_lan_v6, lab.addr.dns_v4, lab.addr.dns_v6)}
    cap = lab.capture(role, "any", name=f"dns-{role}", path=tmp_path / f"{role}.pcap")
    http = f"{_server_address(lab, role)}:{PORT}"
    argv = [sys.executable, "-m", "netsim.lab.services", "--label", role, "--http", http]
    server = lab.spawn(role, argv, name=f"resolver-http-{role}")
    try:
        server.wait_output_sync(r"^READY$", timeout=30.0)
    finally:
        server.stop_sync()
    stats = lab.stop_capture(cap.name)
    assert stats.complete, stats.describe()
    queries = []
    for pkt in read_pcap(stats.path):
        if UDP in pkt and pkt[UDP].dport == 53:
            ip = pkt[IP] if IP in pkt else pkt[IPv6]
            queries.append(str(ip.dst))
    assert queries, f"{role}: the HTTP server's PTR lookup sent no DNS query (unroutable resolver?)"
    assert set(queries) <= resolvers, f"{role}: DNS queries to {sorted(set(queries) - resolvers)}, not the lab's"
