"""Validation of the NETunnelNetworkSettings mirrors: every bad field fails with code 1 and names itself."""

from __future__ import annotations

import copy
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.apple import (
    DNSSettings,
    IPv4Route,
    IPv4Settings,
    IPv6Route,
    IPv6Settings,
    PacketTunnelNetworkSettings,
    ProxyServer,
    ProxySettings,
    TunnelProviderError,
    TunnelProviderErrorCode,
)


def good() -> PacketTunnelNetworkSettings:
    s = PacketTunnelNetworkSettings(tunnel_remote_address="203.0.113.5")
    s.ipv4_settings = IPv4Settings(["10.8.0.2"], ["255.255.255.0"])
    s.ipv4_settings.included_routes = [IPv4Route.default()]
    s.ipv4_settings.excluded_routes = [IPv4Route("192.168.1.0", "255.255.255.0")]
    s.ipv6_settings = IPv6Settings(["fd00:8::2"], [64])
    s.ipv6_settings.included_routes = [IPv6Route.default()]
    s.dns_settings = DNSSettings(["10.8.0.1"], search_domains=["corp.example"], match_domains=[""])
    s.mtu = 1420
    return s


def test_good_settings_validate() -> None:
    good().validate()


def test_defaults_mirror_apple() -> None:
    assert (IPv4Route.default().destination_address, IPv4Route.default().subnet_mask) == ("0.0.0.0", "0.0.0.0")
    assert (IPv6Route.default().destination_address, IPv6Route.default().network_prefix_length) == ("::", 0)
    assert DNSSettings(["1.1.1.1"]).match_domains_no_search is False


def mutate(path: str, value: object) -> PacketTunnelNetworkSettings:
    s = good()
    target: object = s
    *parts, last = path.split(".")
    for part in parts:
        if part.endswith("]"):
            name, index = part[:-1].split("[")
            target = getattr(target, name)[int(index)]
        else:
            target = getattr(target, part)
    setattr(target, last, value)
    return s


BAD = [
    ("tunnel_remote_address", "vpn.example.com", "tunnel_remote_address"),
    ("ipv4_settings.addresses", ["10.8.0.300"], "ipv4_settings.addresses[0]"),
    ("ipv4_settings.addresses", [], "ipv4_settings.addresses"),
    ("ipv4_settings.subnet_masks", ["255.255.255.0", "255.0.0.0"], "ipv4_settings.subnet_masks"),
    ("ipv4_settings.subnet_masks", ["255.0.255.0"], "ipv4_settings.subnet_masks[0]"),
    ("ipv4_settings.included_routes", [IPv6Route.default()], "ipv4_settings.included_routes[0]"),
    ("ipv4_settings.excluded_routes", [IPv4Route("fd00::", "255.0.0.0")], "excluded_routes[0].destination_address"),
    ("ipv4_settings.excluded_routes", [IPv4Route("10.0.0.0", "255.255.0.255")], "excluded_routes[0].subnet_mask"),
    ("ipv6_settings.addresses", ["10.0.0.1"], "ipv6_settings.addresses[0]"),
    ("ipv6_settings.network_prefix_lengths", [64, 64], "ipv6_settings.network_prefix_lengths"),
    ("ipv6_settings.network_prefix_lengths", [129], "ipv6_settings.network_prefix_lengths[0]"),
    ("ipv6_settings.included_routes", [IPv4Route.default()], "ipv6_settings.included_routes[0]"),
    ("ipv6_settings.included_routes", [IPv6Route("::", -1)], "included_routes[0].network_prefix_length"),
    ("mtu", 1279, "mtu"),  # IPv6 configured: RFC 8200 minimum 1280
    ("mtu", 65536, "mtu"),
    ("mtu", True, "mtu"),
    ("tunnel_overhead_bytes", -1, "tunnel_overhead_bytes"),
    ("dns_settings.servers", [], "dns_settings.servers"),
    ("dns_settings.servers", ["dns.example"], "dns_settings.servers[0]"),
    ("dns_settings.search_domains", ["bad domain"], "dns_settings.search_domains[0]"),
    ("dns_settings.match_domains", "corp.example", "dns_settings.match_domains"),
    ("proxy_settings", ProxySettings(http_enabled=True), "proxy_settings.http_server"),
    ("proxy_settings", ProxySettings(https_server=ProxyServer("proxy", 0)), "proxy_settings.https_server.port"),
]


@pytest.mark.parametrize(("path", "value", "named"), BAD)
def test_bad_field_fails_with_code_1_naming_field_and_value(path: str, value: object, named: str) -> None:
    s = mutate(path, value)
    with pytest.raises(TunnelProviderError) as info:
        s.validate()
    assert info.value.code is TunnelProviderErrorCode.NETWORK_SETTINGS_INVALID
    assert info.value.domain == "NETunnelProviderErrorDomain"
    assert named in str(info.value)
    shown = value[0] if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | int) else value
    if isinstance(shown, str | int):
        assert repr(shown) in str(info.value)


def test_ipv4_only_allows_small_mtu() -> None:
    s = good()
    s.ipv6_settings = None
    s.mtu = 576
    s.validate()
    s.mtu = 67
    with pytest.raises(TunnelProviderError, match="mtu: 67"):
        s.validate()


def test_effective_mtu_prefers_mtu_then_overhead() -> None:
    s = good()
    assert s.effective_mtu(1500) == 1420
    s.mtu = None
    s.tunnel_overhead_bytes = 80
    assert s.effective_mtu(1500) == 1420
    s.tunnel_overhead_bytes = None
    assert s.effective_mtu(1500) == 1500
    s.tunnel_overhead_bytes = 400  # 1100 < 1280 with IPv6 configured
    with pytest.raises(TunnelProviderError, match="tunnel_overhead_bytes 400"):
        s.effective_mtu(1500)


@pytest.mark.parametrize(
    ("path", "route", "named", "hint"),
    [
        ("ipv4_settings.excluded_routes", IPv4Route("10.1.2.3", "255.255.0.0"), "excluded_routes[0]", "10.1.0.0"),
        ("ipv4_settings.included_routes", IPv4Route("10.0.0.1", "255.0.0.0"), "included_routes[0]", "10.0.0.0"),
        ("ipv6_settings.excluded_routes", IPv6Route("fd00::1", 8), "excluded_routes[0]", "fd00::"),
        ("ipv6_settings.included_routes", IPv6Route("2001:db8::1", 32), "included_routes[0]", "2001:db8::"),
    ],
)
def test_route_with_host_bits_is_rejected(path: str, route: IPv4Route | IPv6Route, named: str, hint: str) -> None:
    # Issue 13: 10.1.2.3/16 was silently widened to 10.1.0.0/16. Rejected instead (docs/apple-mapping.md, routes).
    s = mutate(path, [route])
    with pytest.raises(TunnelProviderError, match="host bits") as info:
        s.validate()
    assert info.value.code is TunnelProviderErrorCode.NETWORK_SETTINGS_INVALID
    assert named in str(info.value) and repr(route.destination_address) in str(info.value)
    assert f"use {hint!r}" in str(info.value)
    with pytest.raises(TunnelProviderError, match="host bits"):
        route.network()


def test_routes_without_host_bits_convert() -> None:
    assert IPv4Route("10.0.0.0", "255.0.0.0").network() == ipaddress.ip_network("10.0.0.0/8")
    assert IPv4Route("10.1.2.3", "255.255.255.255").network() == ipaddress.ip_network("10.1.2.3/32")
    assert IPv6Route("fd00::", 8).network() == ipaddress.ip_network("fd00::/8")


def test_to_dict_is_a_deep_copy() -> None:
    s = good()
    d = s.to_dict()
    assert d["ipv4_settings"]["included_routes"][0]["subnet_mask"] == "0.0.0.0"
    s.ipv4_settings.addresses.append("10.8.0.3")  # type: ignore[union-attr]
    assert d["ipv4_settings"]["addresses"] == ["10.8.0.2"]
    assert copy.deepcopy(s) == s


@settings(max_examples=300)
@given(st.integers(0, 0xFFFFFFFF))
def test_netmask_acceptance_matches_contiguity(mask: int) -> None:
    text = str(ipaddress.IPv4Address(mask))
    contiguous = bin(mask)[2:].zfill(32).find("01") == -1
    s = PacketTunnelNetworkSettings("203.0.113.5", ipv4_settings=IPv4Settings(["10.0.0.1"], [text]))
    if contiguous:
        s.validate()
        assert s.ipv4_settings is not None
        assert s.ipv4_settings.interfaces()[0].network.prefixlen == bin(mask).count("1")
    else:
        with pytest.raises(TunnelProviderError, match="contiguous"):
            s.validate()
