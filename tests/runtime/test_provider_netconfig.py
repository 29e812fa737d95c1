"""Pure parts of netconfig: Apple's DNS semantics, the route plan, the memory backend, safety checks."""

from __future__ import annotations

import pytest

from netsim.apple import (
    DNSSettings,
    IPv4Route,
    IPv4Settings,
    IPv6Route,
    IPv6Settings,
    PacketTunnelNetworkSettings,
    TunnelProviderError,
)
from netsim.core.routes import DuplicatePolicy, RouteKind
from netsim.errors import LabError, LocalProtocolError
from netsim.runtime.netconfig import (
    KernelNetworkConfigurator,
    MemoryNetworkConfigurator,
    resolver_config,
    tunnel_route_table,
)
from netsim.testing.memory_tun import MemoryTun


def test_split_dns_only_for_specific_match_domains_without_default_route() -> None:
    dns = DNSSettings(["10.8.0.1"], search_domains=["corp.example"], match_domains=["corp.example", "lab.test"])
    split = resolver_config(dns, claims_default_route=False)
    assert split.split and split.search == ("corp.example", "lab.test")
    assert split.servers_for("git.corp.example") == ("10.8.0.1",)
    assert split.servers_for("LAB.TEST.") == ("10.8.0.1",)
    assert split.servers_for("notcorp.example") == () and split.servers_for("example.com") == ()
    # Apple: with the default route claimed, the tunnel servers become the default resolver.
    assert not resolver_config(dns, claims_default_route=True).split
    # [""] makes the tunnel resolver the default too (WireGuardKit's choice).
    everything = resolver_config(DNSSettings(["10.8.0.1"], match_domains=[""]), claims_default_route=False)
    assert not everything.split and everything.servers_for("example.com") == ("10.8.0.1",)
    nosearch = DNSSettings(["10.8.0.1"], domain_name="vpn.example", match_domains=["a.example"])
    nosearch.match_domains_no_search = True
    assert resolver_config(nosearch, claims_default_route=False).search == ("vpn.example",)


def test_resolv_conf_rendering_caps_servers_at_three() -> None:
    dns = DNSSettings(["10.8.0.1", "10.8.0.2", "fd00::53", "10.8.0.4"], search_domains=["a.example"])
    text = resolver_config(dns, claims_default_route=True).render()
    assert text.count("\nnameserver ") == 3 and "ignores (MAXNS=3): 10.8.0.4" in text
    assert text.endswith("search a.example\n")


def test_route_plan_mixes_families_and_adds_the_server() -> None:
    s = PacketTunnelNetworkSettings("2001:db8::1")
    s.ipv4_settings = IPv4Settings(
        ["10.8.0.2"], ["255.255.255.0"], included_routes=[IPv4Route("10.0.0.0", "255.0.0.0")]
    )
    s.ipv6_settings = IPv6Settings(["fd00::2"], [64], included_routes=[IPv6Route.default()],
                                   excluded_routes=[IPv6Route("2001:db8:5::", 48)])  # fmt: skip
    routes = [(str(r.network), r.kind) for r in tunnel_route_table(s).tunnel_routes()]
    assert routes == [
        ("10.0.0.0/8", RouteKind.INCLUDED),  # host bits are refused (tests/core/test_apple_settings.py)
        ("::/0", RouteKind.INCLUDED),
        ("2001:db8::1/128", RouteKind.SERVER),
        ("2001:db8:5::/48", RouteKind.EXCLUDED),
    ]
    table = tunnel_route_table(s, duplicate_policy=DuplicatePolicy.INCLUDED_WINS, enforce_routes=True)
    assert table.enforce_routes and table.duplicate_policy is DuplicatePolicy.INCLUDED_WINS


def test_memory_configurator_creates_one_device_and_records_history() -> None:
    made: list[MemoryTun] = []

    def factory(name: str, mtu: int) -> MemoryTun:
        made.append(MemoryTun(name, mtu))
        return made[-1]

    c = MemoryNetworkConfigurator(factory, physical_mtu=1500)
    s = PacketTunnelNetworkSettings("203.0.113.5", tunnel_overhead_bytes=60)
    s.ipv4_settings = IPv4Settings(["10.8.0.2"], ["255.255.255.255"], included_routes=[IPv4Route.default()])
    s.dns_settings = DNSSettings(["10.8.0.1"], match_domains=["corp.example"])
    assert c.apply(s) is made[0] and made[0].mtu == 1440
    assert c.applied is not None and c.applied.addresses == ("10.8.0.2/32",)
    assert c.applied.resolver is not None and not c.applied.resolver.split  # default route claimed
    assert c.apply(None) is made[0] and c.applied is None
    assert c.apply(s) is made[0] and len(made) == 1
    assert [h is None for h in c.history] == [False, True, False]
    s.tunnel_overhead_bytes = 1500
    with pytest.raises(TunnelProviderError, match="tunnel_overhead_bytes 1500"):
        c.apply(s)
    c.close()
    assert c.device is None


def test_kernel_configurator_refuses_foreign_namespaces() -> None:
    with pytest.raises(LabError, match="netsim-"):
        KernelNetworkConfigurator("default")
    c = KernelNetworkConfigurator("netsim-nosuch-mac", inside=True)
    with pytest.raises(TunnelProviderError, match="not in namespace"):
        c.apply(PacketTunnelNetworkSettings("203.0.113.5", ipv4_settings=IPv4Settings(["10.0.0.1"], ["255.0.0.0"])))
    c.close()


def test_enforce_routes_is_fixed_while_settings_are_applied() -> None:
    c = MemoryNetworkConfigurator(MemoryTun)
    c.set_enforce_routes(True)  # before any settings: taken
    s = PacketTunnelNetworkSettings("203.0.113.5", ipv4_settings=IPv4Settings(["10.8.0.2"], ["255.255.255.255"]))
    c.apply(s)
    assert c.applied is not None and c.applied.enforce_routes
    c.set_enforce_routes(True)  # the same value: fine
    with pytest.raises(LocalProtocolError, match="enforce_routes cannot change"):
        c.set_enforce_routes(False)
    assert c.enforce_routes
    c.apply(None)
    c.set_enforce_routes(False)  # cleared: may change again
    assert not c.enforce_routes
    c.close()
