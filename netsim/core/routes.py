"""Route table with Apple's packet-tunnel route resolution (sans-IO).

Theory of operation. Apple documents three layers (``Routing your VPN network traffic``, R49; Quinn, F7):

1. The system routing table supersedes included and excluded routes: routes to locally connected networks (and
   any other specific route the system holds) win, so with the default route claimed LAN hosts stay direct.
2. Included routes go to the TUN, excluded routes to the primary physical interface. Apple gives no precedence
   rule for overlaps; both are routing-table entries, so the longest prefix decides. For an *exact duplicate*
   prefix the winner is `DuplicatePolicy` (default: excluded wins, the fail-direct-for-what-you-excluded choice
   that also keeps the server auto-exclusion intact).
3. Whatever matches neither follows the system default route (the physical interface).

The tunnel server's address (``tunnelRemoteAddress``) is excluded automatically (R35) as a host route; it wins
over an included route of the same prefix under either policy, because Apple excludes it unconditionally.
Loopback, unspecified and multicast server addresses (WireGuardKit passes 127.0.0.1, Outline ``::``) are not
excluded: they are not a path to a server.

``enforce_routes`` (NEVPNProtocol, R47) swaps layers 1 and 2: included/excluded routes then win over the system
table. The kernel implementation in ``netsim.runtime.netconfig`` maps this model one to one onto Linux policy
routing, and the lab tests compare `RouteTable.resolve` with ``ip route get``.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from netsim.core.prefix import Network, PrefixTable, as_network

__all__ = ["DuplicatePolicy", "Route", "RouteKind", "RouteTable", "server_exclusion"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RouteKind(enum.Enum):
    """Where a route came from; decides which layer of the resolution it sits in."""

    CONNECTED = "connected"  # system table: a network on a local interface
    SYSTEM = "system"  # system table: any other specific (non-default) route
    DEFAULT = "default"  # system table: a default route (0.0.0.0/0 or ::/0)
    INCLUDED = "included"  # settings: to the TUN
    EXCLUDED = "excluded"  # settings: to the physical interface
    SERVER = "server"  # automatic exclusion of the tunnel server's address


class DuplicatePolicy(enum.Enum):
    """Which of an included and an excluded route with the *same* prefix wins (Apple leaves it undocumented)."""

    EXCLUDED_WINS = "excluded_wins"
    INCLUDED_WINS = "included_wins"


@dataclass(frozen=True, slots=True)
class Route:
    """One route of the model.

    Attributes:
        network: destination prefix.
        kind: its layer and origin.
        interface: device name for system routes (None for tunnel-settings routes, which the kernel layer binds).
        gateway: next hop for system routes, if any.
    """

    network: Network
    kind: RouteKind
    interface: str | None = None
    gateway: str | None = None

    @property
    def via_tunnel(self) -> bool:
        """True when traffic matching this route enters the tunnel (an included route)."""
        return self.kind is RouteKind.INCLUDED


def server_exclusion(tunnel_remote_address: str | None) -> Network | None:
    """The host route Apple excludes for the tunnel server, or None when the address is not a real server path."""
    if not tunnel_remote_address:
        return None
    try:
        address = ipaddress.ip_address(tunnel_remote_address)
    except ValueError:
        return None
    if address.is_loopback or address.is_unspecified or address.is_multicast:
        return None
    return ipaddress.ip_network(address)


def _packed(address: str | Address | bytes | bytearray | memoryview) -> bytes:
    if isinstance(address, bytes | bytearray | memoryview):
        raw = bytes(address)
        if len(raw) not in (4, 16):
            raise ValueError(f"an address must be 4 or 16 bytes, got {len(raw)}")
        return raw
    return ipaddress.ip_address(address).packed


class RouteTable:
    """System routes plus a tunnel's included/excluded routes, resolved as Apple does (see module docstring).

    Not a hot-path structure: it is rebuilt when settings change and used to plan kernel routes and to explain
    decisions. Lookups are a handful of dict probes (`netsim.core.prefix.PrefixTable`).
    """

    def __init__(
        self,
        *,
        duplicate_policy: DuplicatePolicy = DuplicatePolicy.EXCLUDED_WINS,
        enforce_routes: bool = False,
    ) -> None:
        self.duplicate_policy = duplicate_policy
        self.enforce_routes = enforce_routes
        self._specific: PrefixTable[Route] = PrefixTable()
        self._default: PrefixTable[Route] = PrefixTable()
        self._tunnel: PrefixTable[Route] = PrefixTable()

    # -- system table ---------------------------------------------------------------------------------------
    def add_system_route(
        self, network: Network | str, *, interface: str, gateway: str | None = None, connected: bool = False
    ) -> Route:
        """Record a route of the system (main) table; a /0 becomes the default route of its family."""
        net = as_network(network)
        if net.prefixlen == 0:
            route = Route(net, RouteKind.DEFAULT, interface, gateway)
            self._default.insert(net, route)
        else:
            route = Route(net, RouteKind.CONNECTED if connected else RouteKind.SYSTEM, interface, gateway)
            self._specific.insert(net, route)
        return route

    def system_routes(self) -> list[Route]:
        """Every system route, specific ones first."""
        return [r for _, r in self._specific.items()] + [r for _, r in self._default.items()]

    # -- tunnel routes --------------------------------------------------------------------------------------
    def set_tunnel_routes(
        self,
        included: Iterable[Network | str],
        excluded: Iterable[Network | str],
        tunnel_remote_address: str | None = None,
    ) -> None:
        """Replace the tunnel's routes (as ``set_tunnel_network_settings`` replaces the previous settings)."""
        table: PrefixTable[Route] = PrefixTable()
        first, second = (
            (RouteKind.INCLUDED, RouteKind.EXCLUDED)
            if self.duplicate_policy is DuplicatePolicy.EXCLUDED_WINS
            else (RouteKind.EXCLUDED, RouteKind.INCLUDED)
        )
        by_kind = {RouteKind.INCLUDED: included, RouteKind.EXCLUDED: excluded}
        for kind in (first, second):  # the later insert replaces an exact duplicate: it wins
            for network in by_kind[kind]:
                net = as_network(network)
                table.insert(net, Route(net, kind))
        server = server_exclusion(tunnel_remote_address)
        if server is not None:
            table.insert(server, Route(server, RouteKind.SERVER))
        self._tunnel = table

    def clear_tunnel_routes(self) -> None:
        """Drop every tunnel route (settings set to None)."""
        self._tunnel = PrefixTable()

    def tunnel_routes(self) -> list[Route]:
        """The effective tunnel routes, one per prefix, duplicates already resolved; sorted for stable output."""
        return sorted(
            (r for _, r in self._tunnel.items()),
            key=lambda r: (r.network.version, int(r.network.network_address), r.network.prefixlen),
        )

    # -- resolution -----------------------------------------------------------------------------------------
    def resolve(self, address: str | Address | bytes | bytearray | memoryview) -> Route | None:
        """The route Apple's rules pick for ``address``, or None when nothing (not even a default) matches."""
        raw = _packed(address)
        layers = (
            (self._tunnel, self._specific, self._default)
            if self.enforce_routes
            else (self._specific, self._tunnel, self._default)
        )
        for table in layers:
            route = table.lookup(raw)
            if route is not None:
                return route
        return None

    def via_tunnel(self, address: str | Address | bytes | bytearray | memoryview) -> bool:
        """True when ``address`` is routed into the tunnel."""
        route = self.resolve(address)
        return route is not None and route.via_tunnel
