"""Apple route resolution: precedence cases and a brute-force `ipaddress` oracle."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.routes import DuplicatePolicy, RouteKind, RouteTable, server_exclusion


def lan_table(**kwargs: object) -> RouteTable:
    t = RouteTable(**kwargs)  # type: ignore[arg-type]
    t.add_system_route("192.168.1.0/24", interface="en0", connected=True)
    t.add_system_route("0.0.0.0/0", interface="en0", gateway="192.168.1.1")
    t.add_system_route("fd00:1::/64", interface="en0", connected=True)
    t.add_system_route("::/0", interface="en0", gateway="fd00:1::1")
    return t


def kind(t: RouteTable, address: str) -> RouteKind | None:
    r = t.resolve(address)
    return None if r is None else r.kind


def test_default_included_keeps_lan_host_direct() -> None:
    t = lan_table()
    t.set_tunnel_routes(["0.0.0.0/0"], [])
    assert kind(t, "192.168.1.20") is RouteKind.CONNECTED
    assert kind(t, "8.8.8.8") is RouteKind.INCLUDED and t.via_tunnel("8.8.8.8")


def test_connected_network_wins_even_over_a_longer_included_route() -> None:
    t = lan_table()
    t.set_tunnel_routes(["192.168.1.128/25"], [])
    assert kind(t, "192.168.1.200") is RouteKind.CONNECTED
    t.enforce_routes = True  # NEVPNProtocol.enforceRoutes: tunnel routes beat the system table
    assert kind(t, "192.168.1.200") is RouteKind.INCLUDED


def test_excluded_host_inside_included_slash8() -> None:
    t = lan_table()
    t.set_tunnel_routes(["10.0.0.0/8"], ["10.1.2.3/32"])
    assert kind(t, "10.1.2.3") is RouteKind.EXCLUDED
    assert kind(t, "10.1.2.4") is RouteKind.INCLUDED
    assert kind(t, "11.0.0.1") is RouteKind.DEFAULT


def test_longest_prefix_decides_both_ways() -> None:
    t = lan_table()
    t.set_tunnel_routes(["10.1.0.0/16"], ["10.0.0.0/8"])
    assert kind(t, "10.1.9.9") is RouteKind.INCLUDED
    assert kind(t, "10.2.9.9") is RouteKind.EXCLUDED


def test_exact_duplicate_follows_policy() -> None:
    t = lan_table()
    t.set_tunnel_routes(["10.0.0.0/8"], ["10.0.0.0/8"])
    assert kind(t, "10.0.0.1") is RouteKind.EXCLUDED
    t = lan_table(duplicate_policy=DuplicatePolicy.INCLUDED_WINS)
    t.set_tunnel_routes(["10.0.0.0/8"], ["10.0.0.0/8"])
    assert kind(t, "10.0.0.1") is RouteKind.INCLUDED
    assert [r.kind for r in t.tunnel_routes()] == [RouteKind.INCLUDED]


def test_server_auto_exclusion_beats_included_duplicates() -> None:
    for policy in DuplicatePolicy:
        t = lan_table(duplicate_policy=policy)
        t.set_tunnel_routes(["0.0.0.0/0", "203.0.113.5/32"], [], tunnel_remote_address="203.0.113.5")
        assert kind(t, "203.0.113.5") is RouteKind.SERVER and not t.via_tunnel("203.0.113.5")
        assert t.via_tunnel("203.0.113.6")
    assert server_exclusion("127.0.0.1") is None and server_exclusion("::") is None
    assert server_exclusion("2001:db8::5") == ipaddress.ip_network("2001:db8::5/128")


def test_ipv6() -> None:
    t = lan_table()
    t.set_tunnel_routes(["::/0"], ["2001:db8:5::/48"], tunnel_remote_address="2001:db8::1")
    assert kind(t, "fd00:1::99") is RouteKind.CONNECTED
    assert kind(t, "2001:db8:5::1") is RouteKind.EXCLUDED
    assert kind(t, "2001:db8::1") is RouteKind.SERVER
    assert kind(t, "2001:db8:6::1") is RouteKind.INCLUDED
    assert t.resolve(ipaddress.ip_address("2001:db8:6::1").packed) == t.resolve("2001:db8:6::1")


def test_clear_returns_to_system_table() -> None:
    t = lan_table()
    t.set_tunnel_routes(["0.0.0.0/0"], [])
    t.clear_tunnel_routes()
    assert kind(t, "8.8.8.8") is RouteKind.DEFAULT and t.tunnel_routes() == []


def test_no_default_means_unreachable() -> None:
    t = RouteTable()
    assert t.resolve("8.8.8.8") is None


prefixes = st.builds(
    lambda a, n: ipaddress.ip_network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)


def oracle(connected: Any, included: Any, excluded: Any, server: Any, policy: Any, address: str) -> RouteKind:
    """Apple's rules written the slow, obvious way over `ipaddress`."""
    addr = ipaddress.ip_address(address)
    if any(addr in n for n in connected):
        return RouteKind.CONNECTED
    if server is not None and server_exclusion(str(server)) is not None and addr == server:
        return RouteKind.SERVER
    best = -1
    winner = None
    for kind_, nets in ((RouteKind.INCLUDED, included), (RouteKind.EXCLUDED, excluded)):
        for n in nets:
            if addr in n:
                tie_goes_here = (kind_ is RouteKind.EXCLUDED) == (policy is DuplicatePolicy.EXCLUDED_WINS)
                if n.prefixlen > best or (n.prefixlen == best and tie_goes_here):
                    best, winner = n.prefixlen, kind_
    return winner or RouteKind.DEFAULT


@settings(max_examples=300)
@given(
    st.lists(prefixes.filter(lambda n: n.prefixlen > 0), max_size=3),
    st.lists(prefixes, max_size=6),
    st.lists(prefixes, max_size=6),
    st.one_of(st.none(), st.integers(2**24, 2**31).map(ipaddress.IPv4Address)),
    st.sampled_from(DuplicatePolicy),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20),
)
def test_matches_brute_force_oracle(connected, included, excluded, server, policy, addresses) -> None:  # type: ignore[no-untyped-def]
    t = RouteTable(duplicate_policy=policy)
    for n in connected:
        t.add_system_route(n, interface="en0", connected=True)
    t.add_system_route("0.0.0.0/0", interface="en0", gateway="192.0.2.1")
    t.set_tunnel_routes(included, excluded, None if server is None else str(server))
    # Probe the random addresses plus every prefix boundary the tables contain.
    probes = [str(ipaddress.IPv4Address(a)) for a in addresses]
    for n in [*included, *excluded, *connected]:
        probes += [str(n.network_address), str(n.broadcast_address)]
    for address in probes:
        assert kind(t, address) == oracle(connected, included, excluded, server, policy, address), address
