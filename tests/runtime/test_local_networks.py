"""exclude_local_networks without root: which connected prefixes count as local, and the memory backend's plan.

The lab test (real packets, TunnelCrack's public on-link /24) is tests/lab/test_local_networks_lab.py.
"""

from __future__ import annotations

import ipaddress

import pytest

from netsim.apple import IPv4Route, IPv4Settings, PacketTunnelNetworkSettings
from netsim.core.routes import RouteKind
from netsim.errors import LocalProtocolError
from netsim.runtime.netconfig import MemoryNetworkConfigurator, local_network_exclusions
from netsim.testing.memory_tun import MemoryTun

CONNECTED = [
    ipaddress.ip_interface(t)
    for t in (
        "192.168.1.10/24",
        "10.1.2.3/16",
        "172.20.0.5/24",
        "169.254.7.7/16",
        "fd00:6e73:1::10/64",
        "fe80::1/64",
        "203.0.113.77/24",  # a public /24 the network put on-link (TunnelCrack LocalNet): never local
        "2001:db8:51::9/64",
        "100.64.0.1/10",  # carrier-grade NAT space is the ISP's, not the Mac's LAN
        "192.168.1.11/24",  # a second address in the same LAN: one prefix
    )
]


@pytest.mark.reliability("K5")
def test_only_private_connected_prefixes_are_local() -> None:
    assert [str(n) for n in local_network_exclusions(CONNECTED)] == [
        "192.168.1.0/24",
        "10.1.0.0/16",
        "172.20.0.0/24",
        "169.254.0.0/16",
        "fd00:6e73:1::/64",
    ]


def _settings() -> PacketTunnelNetworkSettings:
    return PacketTunnelNetworkSettings(
        "192.0.2.2",
        ipv4_settings=IPv4Settings(["10.66.0.2"], ["255.255.255.255"], included_routes=[IPv4Route.default()]),
    )


def _excluded(c: MemoryNetworkConfigurator) -> list[str]:
    assert c.applied is not None
    return [str(r.network) for r in c.applied.routes if r.kind is RouteKind.EXCLUDED]


def test_memory_plan_excludes_the_lan_only_when_routes_are_enforced() -> None:
    plain = MemoryNetworkConfigurator(MemoryTun, connected=CONNECTED)
    plain.set_exclude_local_networks(True)  # without enforced routes the system table keeps the LAN direct
    plain.apply(_settings())
    assert "192.168.1.0/24" not in _excluded(plain) and plain.applied is not None
    assert plain.applied.local_networks == ()
    enforced = MemoryNetworkConfigurator(MemoryTun, connected=CONNECTED, enforce_routes=True)
    enforced.set_exclude_local_networks(True)
    enforced.apply(_settings())
    assert {"192.168.1.0/24", "fd00:6e73:1::/64"} <= set(_excluded(enforced))
    assert "203.0.113.0/24" not in _excluded(enforced)
    assert enforced.applied is not None and "10.1.0.0/16" in enforced.applied.local_networks
    with pytest.raises(LocalProtocolError, match="exclude_local_networks cannot change"):
        enforced.set_exclude_local_networks(False)
    for c in (plain, enforced):
        c.close()
