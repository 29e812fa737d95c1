"""Apply PacketTunnelNetworkSettings to a network namespace: the utun stand-in, addresses, MTU, routes, DNS.

Routing design (policy routing, as wg-quick does on Linux). Apple's precedence (netsim.core.routes) maps onto
two ``ip rule`` entries and one dedicated table, per family:

=========  ==============================================  ===========================================
priority   rule                                            Apple layer
=========  ==============================================  ===========================================
0          ``lookup local``                                (kernel) the host's own addresses
P          ``lookup main suppress_prefixlength 0``         system table wins: connected networks and
                                                           other specific routes; the default is skipped
P+1        ``not fwmark M lookup T``                       included (dev utun) / excluded (via the
                                                           physical gateway) / server exclusion; LPM
32766      ``lookup main``                                 default route: the physical interface
=========  ==============================================  ===========================================

With ``enforce_routes`` the two netsim rules swap, so tunnel routes beat the system table (R47); then the LAN, too,
goes into the tunnel unless ``exclude_local_networks`` is set, which adds the physical interfaces' connected
*private* prefixes (`LOCAL_NETWORK_RANGES`: RFC 1918, 169.254/16, ULA; IPv6 link-local is on-link anyway) to
table T as on-link excluded routes (Apple: excludeLocalNetworks applies only with includeAllNetworks or
enforceRoutes, R43). A public prefix the network puts on-link is not excluded: that is TunnelCrack's LocalNet
attack (reliability row K5). Sockets marked
with ``bypass_fwmark`` (e.g. a helper's own UDP socket) skip the tunnel table, the Linux analogue of a provider's
own traffic bypassing its tunnel (F1). Table T holds exactly one route per prefix: the exact-duplicate winner
chosen by `DuplicatePolicy`. Excluded routes use the physical default route's gateway; with no gateway known they
become ``throw`` routes, which hand the lookup back to the main table (the same physical path). Behind every
excluded route through a link sits a ``throw`` route at `BACKSTOP_METRIC`: when the link goes down the kernel
deletes the first but not the second, so until the path monitor re-applies the settings the destination fails in
the main table instead of falling to the tunnel's default route (row F8: bypass flows fail, not reroute into the
tunnel). Re-applying
settings replaces routes in place and only then deletes stale ones, so traffic never falls out of the tunnel
during an update; ``None`` removes addresses, routes, rules and DNS but keeps the utun, as Apple keeps the
interface while the provider runs.

Per-app routing (Apple ``routingMethod == sourceApplication``, R5). Linux routes by the uid that owns a socket
(``ip rule uidrange``; ``FRA_UID_RANGE``, Linux 4.10), so netsim identifies an app by its uid (`AppRule.uid`).
With `set_routing_method` ``(SOURCE_APPLICATION, rules)`` the catch-all rule P+1 is replaced by one rule per
listed uid, ``uidrange U-U fwmark 0/M lookup T``: only those apps' sockets consult the tunnel table; every other
process keeps the physical path, exactly as a per-app VPN leaves unlisted apps alone. (``not fwmark`` cannot be
combined with ``uidrange``: the kernel's invert flag negates the whole rule, so "not marked" is written as "mark
bits of M all zero"; a socket whose mark shares bits with M therefore also skips the tunnel.) Rule P and the
table are unchanged, so connected networks still win and included/excluded routes mean the same for the
listed apps. ``DESTINATION_IP`` (and ``NETWORK_RULE``, which netsim does not model) keep the catch-all rule.

Ownership (one tunnel per namespace). The rules, table T and resolv.conf are per-namespace state, so at most one
configurator may own them. Before its first change a `KernelNetworkConfigurator` takes an exclusive ``flock`` on
``/run/netsim/tunnels/<ns>.lock`` (held for the configurator's life, released by the kernel if its process dies):
a second tunnel in the same namespace is refused with ``NETWORK_SETTINGS_FAILED`` naming the owner's pid, before
it touches anything, and its teardown removes nothing, because a configurator removes only state it installed
while holding the claim. Rules a dead owner left behind are replaced by the next owner. `MemoryNetworkConfigurator`
models the same rule with a shared `MemoryNamespace`.

The utun's addresses are reachable only through the utun (CVE-2019-14899, reliability row K8). Linux, like the
BSDs the CVE was found on, accepts a packet for any local address on any interface, so an attacker on the LAN
could send a SYN/ACK to the tunnel address through en0 and learn from the RST whether a connection exists. Apple's
stack scopes the tunnel's addresses to the utun; netsim installs the same scoping as its own nftables table
(`UTUN_GUARD_TABLE`, ``inet``, hook prerouting at raw priority): a packet addressed to one of the utun's addresses
that arrived on any interface but the utun or ``lo`` is counted and dropped. It is replaced with every address
change and removed with the addresses; `utun_guard_ruleset` renders it.

DNS goes to ``/etc/netns/<ns>/resolv.conf``, which ``ip netns exec`` bind-mounts over /etc/resolv.conf for
processes started in the namespace (written in place, so the bind mounts of running processes see it too). glibc
resolv.conf has no per-domain servers, so match domains cannot send one domain to the tunnel resolver and the
rest elsewhere: netsim always makes the tunnel servers the namespace's resolvers (the no-leak reading of
Apple's ``[""]`` and of "the VPN claims the default route"), appends match domains to ``search`` unless
``match_domains_no_search``, and records them in a comment. `ResolverConfig.servers_for` answers Apple's split
DNS question in code for tools that can act on it.

The Mac's own resolver (docs/dns.md). When the namespace runs netsim's resolver daemon (`netsim.runtime.resolver`:
the lab starts one in ``mac`` and writes ``/run/netsim/dns/<ns>/system.json``), resolv.conf is left alone (it names
the daemon, ``127.0.0.53``) and the DNS settings go to ``/run/netsim/dns/<ns>/tunnel.json`` instead (servers,
match domains, the utun, this process's pid), removed when the settings are cleared or the configurator closes.
The daemon then implements Apple's selection, split DNS included, and sends tunnel queries only through the utun;
a tunnel.json left by a crashed provider is ignored by the daemon (its pid is dead, its utun gone).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from netsim.apple.enums import RoutingMethod, TunnelProviderErrorCode
from netsim.apple.errors import TunnelProviderError
from netsim.apple.path import NWInterfaceType, NWPath, NWPathStatus
from netsim.apple.protocol import AppRule
from netsim.apple.settings import DNSSettings, PacketTunnelNetworkSettings
from netsim.core.dns import normalize_name
from netsim.core.killswitch import PRIVATE_PREFIXES, is_physical_interface, split_local_prefixes
from netsim.core.resolver import TunnelDns
from netsim.core.routes import DuplicatePolicy, Route, RouteKind, RouteTable
from netsim.errors import LabError, LocalProtocolError
from netsim.runtime.appid import app_rules_by_uid
from netsim.runtime.pathmonitor import EventSource
from netsim.runtime.resolver import DNS_STATE_DIR, SYSTEM_FILE, TUNNEL_FILE, write_state_file
from netsim.transports.base import PacketDevice
from netsim.transports.netns import require_lab_netns, run_netns_command
from netsim.transports.rtevents import RouteEvents

__all__ = [
    "BACKSTOP_METRIC",
    "BYPASS_FWMARK",
    "DEFAULT_PHYSICAL_MTU",
    "LOCAL_NETWORK_RANGES",
    "RULE_PRIORITY",
    "TUNNEL_LOCK_DIR",
    "TUNNEL_TABLE",
    "UTUN_GUARD_TABLE",
    "AppliedSettings",
    "KernelNetworkConfigurator",
    "MemoryNamespace",
    "MemoryNetworkConfigurator",
    "NetworkConfigurator",
    "ResolverConfig",
    "local_network_exclusions",
    "open_iproute",
    "resolver_config",
    "tunnel_owner",
    "tunnel_route_table",
    "utun_guard_ruleset",
]

TUNNEL_TABLE = 0x6E73  # 28275 ("ns"); one table per namespace, so a fixed id is safe
RULE_PRIORITY = 6100  # below the kernel's main (32766) and local (0) rules; P and P+1 are used
BYPASS_FWMARK = 0x6E73
#: Connected prefixes inside these count as the local network for ``exclude_local_networks`` (module docstring);
#: the kill switch exempts the same set (`netsim.core.killswitch.PRIVATE_PREFIXES`).
LOCAL_NETWORK_RANGES = PRIVATE_PREFIXES
UTUN_GUARD_TABLE = "netsim_utun_guard"  # inet; one per namespace, owned with the namespace's tunnel claim
DEFAULT_PHYSICAL_MTU = 1500
GLIBC_MAXNS = 3  # resolv.conf(5): at most three nameserver lines are used
TUNNEL_LOCK_DIR = Path("/run/netsim/tunnels")  # <ns>.lock: who owns a namespace's tunnel state (module docstring)
_MAIN = 254
_FIB_RULE_INVERT = 0x2  # <linux/fib_rules.h>
_RTN_UNICAST = 1
_ARPHRD_ETHER = 1  # <linux/if_arp.h>: the link types default_path maps to NWInterfaceType
_ARPHRD_LOOPBACK = 772
_RTN_THROW = 9
_RTPROT_STATIC = 4
BACKSTOP_METRIC = 0x7FFFFFFF
"""Metric of the ``throw`` route behind every excluded route through a link (module docstring, row F8): above
anything the kernel or netsim installs otherwise (IPv6's default metric is 1024)."""
_RT_SCOPE_LINK = 253


@dataclass(frozen=True)
class ResolverConfig:
    """What the namespace's resolver should look like for a `DNSSettings`, and Apple's split-DNS answer."""

    nameservers: tuple[str, ...]
    search: tuple[str, ...]
    match_domains: tuple[str, ...]
    split: bool  # True when Apple would send only match domains to the tunnel servers

    def servers_for(self, name: str) -> tuple[str, ...]:
        """Tunnel servers if Apple would send a query for ``name`` to them, else () (the system resolver)."""
        if not self.split:
            return self.nameservers
        labels = name.rstrip(".").lower()
        for domain in self.match_domains:
            d = domain.rstrip(".").lower()
            if labels == d or labels.endswith("." + d):
                return self.nameservers
        return ()

    def render(self) -> str:
        """The resolv.conf text netsim writes."""
        lines = ["# written by netsim from NEDNSSettings; restored when the tunnel settings are cleared"]
        if self.match_domains:
            shown = ", ".join(d or '""' for d in self.match_domains)
            lines.append(f"# match domains: {shown} (split DNS={self.split}; glibc cannot route per domain)")
        extra = self.nameservers[GLIBC_MAXNS:]
        if extra:
            lines.append(f"# further servers glibc ignores (MAXNS=3): {' '.join(extra)}")
        lines += [f"nameserver {s}" for s in self.nameservers[:GLIBC_MAXNS]]
        if self.search:
            lines.append("search " + " ".join(self.search))
        return "\n".join(lines) + "\n"


def resolver_config(dns: DNSSettings, *, claims_default_route: bool) -> ResolverConfig:
    """Apple's DNS semantics for ``dns`` (R39, R40): split only with specific match domains and no default route."""
    match = tuple(dns.match_domains or ())
    split = bool(match) and "" not in match and not claims_default_route
    search: list[str] = []
    for domain in [dns.domain_name or "", *(dns.search_domains or ())]:
        if domain and domain not in search:
            search.append(domain)
    if not dns.match_domains_no_search:
        search += [d for d in match if d and d not in search]
    return ResolverConfig(tuple(dns.servers), tuple(search), match, split)


def tunnel_route_table(
    settings: PacketTunnelNetworkSettings,
    *,
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.EXCLUDED_WINS,
    enforce_routes: bool = False,
    local_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> RouteTable:
    """The `RouteTable` model of ``settings`` (tunnel routes only; add system routes to resolve against).

    ``local_networks`` (from `local_network_exclusions`) become excluded routes too.
    """
    included: list[Any] = []
    excluded: list[Any] = []
    for family in (settings.ipv4_settings, settings.ipv6_settings):
        if family is not None:
            _, inc, exc = family._validate("settings")
            included += inc
            excluded += exc
    excluded += [n for n in local_networks if n not in excluded]
    table = RouteTable(duplicate_policy=duplicate_policy, enforce_routes=enforce_routes)
    table.set_tunnel_routes(included, excluded, settings.tunnel_remote_address)
    return table


def local_network_exclusions(
    connected: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The connected prefixes ``exclude_local_networks`` keeps off the tunnel: those inside `LOCAL_NETWORK_RANGES`.

    ``connected`` are the physical interfaces' addresses. IPv6 link-local is left out (the kernel scopes it to
    its link already), and so is any public prefix, however on-link (TunnelCrack LocalNet, row K5).
    """
    private, _ = split_local_prefixes(str(iface.network) for iface in connected)  # the kill switch's filter
    nets = (ipaddress.ip_network(text) for text in private)
    return tuple(net for net in nets if not (net.version == 6 and net.is_link_local))


def utun_guard_ruleset(device: str, addresses: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> str:
    """The nft script that scopes ``device``'s ``addresses`` to it (module docstring; CVE-2019-14899).

    It replaces the table atomically (``add`` + ``delete`` + the new table in one transaction), so re-applying
    settings never leaves a window without the guard. No addresses: the script only deletes the table.
    """
    if not device or any(c in device for c in '"\\ \n'):
        raise LocalProtocolError(f"bad device name {device!r}")
    head = f"add table inet {UTUN_GUARD_TABLE}\ndelete table inet {UTUN_GUARD_TABLE}\n"
    v4 = sorted({str(a.ip) for a in addresses if a.version == 4})
    v6 = sorted({str(a.ip) for a in addresses if a.version == 6 and not a.ip.is_link_local})
    if not v4 and not v6:
        return head
    lines = [
        f"table inet {UTUN_GUARD_TABLE} {{",
        "  chain prerouting {",
        "    type filter hook prerouting priority raw; policy accept;",
        f'    iifname {{ "lo", "{device}" }} accept',
    ]
    if v4:
        lines.append(f'    ip daddr {{ {", ".join(v4)} }} counter drop comment "utun address off the utun"')
    if v6:
        lines.append(f'    ip6 daddr {{ {", ".join(v6)} }} counter drop comment "utun address off the utun"')
    lines += ["  }", "}"]
    return head + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AppliedSettings:
    """What a configurator applied: the record a controller or test compares with the kernel."""

    device: str
    mtu: int
    addresses: tuple[str, ...]  # "address/prefixlen"
    routes: tuple[Route, ...]  # the dedicated table's entries (RouteTable.tunnel_routes order)
    resolver: ResolverConfig | None
    physical_interface: str | None = None
    gateways: dict[int, str] = field(default_factory=dict)  # IP version -> gateway used for excluded routes
    routing_method: RoutingMethod = RoutingMethod.DESTINATION_IP
    app_uids: tuple[int, ...] = ()  # SOURCE_APPLICATION: the uids routed into the tunnel (sorted)
    enforce_routes: bool = False  # tunnel routes beat the system table (NEVPNProtocol.enforceRoutes, R47)
    local_networks: tuple[str, ...] = ()  # exclude_local_networks: the connected private prefixes kept direct


def _app_uids(routing_method: RoutingMethod, app_rules: Sequence[AppRule] | None) -> tuple[int, ...] | None:
    """Sorted uids for per-app routing, or None when routing is by destination (validates the rules)."""
    if RoutingMethod(routing_method) is not RoutingMethod.SOURCE_APPLICATION:
        return None
    return tuple(sorted(app_rules_by_uid(app_rules)))


class NetworkConfigurator(Protocol):
    """Applies settings for a `PacketTunnelProvider` host; the kernel and in-memory backends implement it."""

    @property
    def device(self) -> PacketDevice | None:
        """The utun stand-in, once the first settings created it."""
        ...

    @property
    def applied(self) -> AppliedSettings | None:
        """What is currently applied (None when cleared)."""
        ...

    def apply(self, settings: PacketTunnelNetworkSettings | None) -> PacketDevice | None:
        """Apply validated ``settings`` (None clears them); return the device. Raises `TunnelProviderError`."""
        ...

    def close(self) -> None:
        """Remove everything applied and close the device; idempotent."""
        ...

    def set_routing_method(self, routing_method: RoutingMethod, app_rules: Sequence[AppRule] | None = None) -> None:
        """Route by destination (default) or only the listed apps' traffic (``SOURCE_APPLICATION``).

        Raises:
            ConfigError: ``SOURCE_APPLICATION`` with no rules, a rule without a uid, or a uid used twice.
        """
        ...

    def set_enforce_routes(self, enforce_routes: bool) -> None:
        """Let included/excluded routes win over the system table (Apple: ``NEVPNProtocol.enforceRoutes``).

        The provider host calls it with the protocol's value before the provider starts; it holds for the
        session, as Apple's protocol does.

        Raises:
            LocalProtocolError: a different value while settings are applied (reconnect to change it).
        """
        ...

    def path_events(self) -> EventSource | None:
        """A source of link/address/route events for the path monitor (`netsim.runtime.pathmonitor`), or None
        when this backend has no physical path to watch."""
        ...

    def physical_state(self) -> Any:
        """A comparable snapshot of the physical path (the main table's default routes)."""
        ...

    def default_path(self) -> NWPath:
        """The provider's `NWPath` now (Apple: ``NEProvider.defaultPath``): SATISFIED through the interface of
        the main table's default route, UNSATISFIED without one."""
        ...

    def reapply(self) -> None:
        """Apply the last settings again (after a path change: puts back what the kernel removed); no-op
        without settings. Raises `TunnelProviderError` like `apply`."""
        ...

    def set_exclude_local_networks(self, exclude_local_networks: bool) -> None:
        """Keep the connected private networks direct when routes are enforced (Apple:
        ``NEVPNProtocol.excludeLocalNetworks``, which applies only with ``enforceRoutes`` or
        ``includeAllNetworks``); set by the provider host before the provider starts, like `set_enforce_routes`.

        Raises:
            LocalProtocolError: a different value while settings are applied.
        """
        ...


def _enforce_routes_change(
    current: bool, wanted: bool, applied: AppliedSettings | None, name: str = "enforce_routes"
) -> bool:
    """The new value of a per-session routing flag, or `LocalProtocolError` when it would change under applied
    settings."""
    wanted = bool(wanted)
    if wanted != current and applied is not None:
        raise LocalProtocolError(
            f"{name} cannot change to {wanted} while settings are applied; "
            "set it on the TunnelProviderProtocol before starting the tunnel"
        )
    return wanted


def _addresses(settings: PacketTunnelNetworkSettings) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    if settings.ipv4_settings is not None:
        out += settings.ipv4_settings.interfaces()
    if settings.ipv6_settings is not None:
        out += settings.ipv6_settings.interfaces()
    return out


def _claims_default(routes: Sequence[Route]) -> bool:
    return any(r.kind is RouteKind.INCLUDED and r.network.prefixlen == 0 for r in routes)


def _busy(netns: str, owner: str) -> TunnelProviderError:
    return _failed(
        f"namespace {netns} already has a tunnel (owned by {owner}); netsim allows one tunnel per namespace "
        "(its ip rules, route table and resolv.conf): stop the running tunnel first. Nothing was changed."
    )


def tunnel_owner(netns: str, *, lock_dir: Path = TUNNEL_LOCK_DIR) -> int | None:
    """The pid of the live process whose configurator owns ``netns``'s tunnel state, else None.

    A read-only look at the claim file (it never takes the lock, so it cannot make a starting owner fail): for a
    clear early error before a second tunnel starts anything. The lock itself is the authority.
    """
    try:
        text = (lock_dir / f"{netns}.lock").read_text().strip()
    except (OSError, ValueError):  # ValueError: not UTF-8, a garbled claim file (row F14)
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 10):  # "²" is a digit to isdigit, not to int
        return None
    pid = int(text)
    return pid if Path(f"/proc/{pid}").exists() else None


class MemoryNamespace:
    """The in-memory stand-in for a namespace's tunnel state: who owns it (see the module docstring, Ownership).

    Configurators built with the same `MemoryNamespace` (one per simulated Mac) refuse a second tunnel as the
    kernel backend does.
    """

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.owner: object | None = None
        self.refused = 0  # second tunnels refused (plain counter)


class MemoryNetworkConfigurator:
    """The in-memory backend: creates a device through ``device_factory`` and records what was applied.

    Used with `netsim.testing.MemoryTun` so providers run without root; the route model is the same
    `RouteTable` the kernel backend installs, so route questions get the same answers. With a ``namespace``
    shared by several configurators, only one of them may apply settings at a time (the ownership rule).
    """

    def __init__(
        self,
        device_factory: Callable[[str, int], PacketDevice],
        *,
        physical_mtu: int = DEFAULT_PHYSICAL_MTU,
        device_name: str = "utun0",
        duplicate_policy: DuplicatePolicy = DuplicatePolicy.EXCLUDED_WINS,
        enforce_routes: bool = False,
        namespace: MemoryNamespace | None = None,
        connected: Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = (),
    ) -> None:
        self._factory = device_factory
        self.namespace = namespace
        self.physical_mtu = physical_mtu
        self.device_name = device_name
        self.duplicate_policy = duplicate_policy
        self.enforce_routes = enforce_routes
        self.exclude_local_networks = False
        self.connected = tuple(connected)  # the simulated physical interface's addresses (exclude_local_networks)
        self._device: PacketDevice | None = None
        self._applied: AppliedSettings | None = None
        self.routing_method = RoutingMethod.DESTINATION_IP
        self._uids: tuple[int, ...] | None = None
        self.history: list[AppliedSettings | None] = []
        self._path = NWPath(NWPathStatus.SATISFIED, interface_type=NWInterfaceType.WIFI, interface_name="en0")
        self._path_signals: list[_PathSignal] = []

    def set_routing_method(self, routing_method: RoutingMethod, app_rules: Sequence[AppRule] | None = None) -> None:
        self._uids = _app_uids(routing_method, app_rules)
        self.routing_method = RoutingMethod(routing_method)
        if self._applied is not None:
            self._applied = replace(self._applied, routing_method=self.routing_method, app_uids=self._uids or ())
            self.history.append(self._applied)

    def set_enforce_routes(self, enforce_routes: bool) -> None:
        """See `NetworkConfigurator.set_enforce_routes`."""
        self.enforce_routes = _enforce_routes_change(self.enforce_routes, enforce_routes, self._applied)

    def set_exclude_local_networks(self, exclude_local_networks: bool) -> None:
        """See `NetworkConfigurator.set_exclude_local_networks` (recorded: the memory Mac has no physical LAN)."""
        self.exclude_local_networks = _enforce_routes_change(
            self.exclude_local_networks, exclude_local_networks, self._applied, "exclude_local_networks"
        )

    def path_events(self) -> EventSource | None:
        """An event source that wakes the path monitor when `set_path` changes the simulated path; the caller
        closes it (as it closes `RouteEvents`)."""
        signal = _PathSignal()
        self._path_signals.append(signal)
        return signal

    def physical_state(self) -> Any:
        return (self.physical_mtu, self.connected, self._path)

    def default_path(self) -> NWPath:
        """The simulated path (`set_path`); by default SATISFIED on a Wi-Fi ``en0``."""
        return self._path

    def set_path(
        self,
        status: NWPathStatus = NWPathStatus.SATISFIED,
        *,
        interface_name: str | None = "en0",
        interface_type: NWInterfaceType | None = NWInterfaceType.WIFI,
        is_expensive: bool = False,
        is_constrained: bool = False,
    ) -> NWPath:
        """Simulate a path change: the provider host's path monitor sees it, updates ``default_path`` and calls
        ``default_path_did_change`` (and re-applies the settings, as after a real change). An UNSATISFIED or
        INVALID path has no interface. Returns the new path."""
        status = NWPathStatus(status)
        if status in (NWPathStatus.UNSATISFIED, NWPathStatus.INVALID):
            interface_name = interface_type = None
        self._path = NWPath(
            status,
            is_expensive=is_expensive,
            is_constrained=is_constrained,
            interface_type=None if interface_type is None else NWInterfaceType(interface_type),
            interface_name=interface_name,
        )
        self._path_signals = [s for s in self._path_signals if s.notify()]
        return self._path

    def reapply(self) -> None:
        """Nothing to put back in memory."""

    @property
    def device(self) -> PacketDevice | None:
        return self._device

    @property
    def applied(self) -> AppliedSettings | None:
        return self._applied

    def apply(self, settings: PacketTunnelNetworkSettings | None) -> PacketDevice | None:
        if settings is None:
            self._applied = None
        else:
            ns = self.namespace
            if ns is not None and ns.owner is not self:
                if ns.owner is not None:
                    ns.refused += 1
                    raise _busy(ns.name, f"configurator {id(ns.owner):#x}")
                ns.owner = self
            mtu = settings.effective_mtu(self.physical_mtu)
            if self._device is None:
                self._device = self._factory(self.device_name, mtu)
            local = (
                local_network_exclusions(self.connected) if self.exclude_local_networks and self.enforce_routes else ()
            )
            table = tunnel_route_table(
                settings,
                duplicate_policy=self.duplicate_policy,
                enforce_routes=self.enforce_routes,
                local_networks=local,
            )
            routes = tuple(table.tunnel_routes())
            dns = settings.dns_settings
            self._applied = AppliedSettings(
                device=self._device.name,
                mtu=mtu,
                addresses=tuple(str(i) for i in _addresses(settings)),
                routes=routes,
                resolver=None if dns is None else resolver_config(dns, claims_default_route=_claims_default(routes)),
                routing_method=self.routing_method,
                app_uids=self._uids or (),
                enforce_routes=self.enforce_routes,
                local_networks=tuple(str(n) for n in local),
            )
        self.history.append(self._applied)
        return self._device

    def close(self) -> None:
        self._applied = None
        self._path_signals = []  # the path monitor that waits on each closes it (never closed under a waiter)
        if self.namespace is not None and self.namespace.owner is self:
            self.namespace.owner = None
        if self._device is not None:
            self._device.close()
            self._device = None


class _PathSignal:
    """The memory backend's `EventSource`: a datagram socketpair whose one end `notify` writes (a path change)
    and whose other end the path monitor waits on, as it waits on netlink route events."""

    def __init__(self) -> None:
        self._writer, self._reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self._reader.recv(16)
            except (BlockingIOError, OSError):
                return n
            n += 1

    def notify(self) -> bool:
        """Wake the monitor; False once closed (the caller forgets this signal)."""
        try:
            self._writer.send(b"p")
        except BlockingIOError:
            return True  # already pending: the monitor looks again anyway
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._writer.close()
        self._reader.close()


def open_iproute(netns: str | None = None) -> Any:
    """A pyroute2 ``IPRoute`` whose netlink socket lives in ``netns`` (None: this thread's namespace).

    pyroute2 0.9 opens a namespace's socket by forking a child that setns()es and passes the fd back, then stops
    the child with SIGTERM. A forked child inherits Python-level signal handlers, and `netsim.lab.Lab` installs
    one that turns SIGTERM into KeyboardInterrupt: the child then escapes pyroute2's wrapper and goes on running
    a copy of the caller (a clone of the test process inside the lab namespace). So the SIGTERM disposition is
    reset to the default around the fork. (Creating ``IPRoute()`` in a setns()'d thread is no alternative: its
    socket is opened from pyroute2's own event-loop thread, in the root namespace.)
    """
    import signal
    import threading

    from pyroute2 import IPRoute

    if netns is None:
        return IPRoute()
    if threading.current_thread() is not threading.main_thread():
        return IPRoute(netns=netns)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return IPRoute(netns=netns)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failed(message: str) -> TunnelProviderError:
    return TunnelProviderError(TunnelProviderErrorCode.NETWORK_SETTINGS_FAILED, message)


class KernelNetworkConfigurator:
    """The real backend: a `TunDevice` and pyroute2 netlink calls in namespace ``netns`` (see module docstring).

    Args:
        netns: the namespace's name (must start with ``netsim-``); also names ``/etc/netns/<netns>/resolv.conf``.
        inside: True when the calling process already runs in ``netns`` (the provider host under
            ``ip netns exec``); checked against /run/netns so nothing is ever configured in the root namespace.
        table / rule_priority / bypass_fwmark: the policy-routing knobs above.
        device_name: TUN name; ``%d`` picks the lowest free number, like utun.
        resolv_conf: override the resolver file (tests).
        dns_state_dir: the namespace's resolver-daemon state (default ``/run/netsim/dns/<netns>``); with a
            ``system.json`` there, DNS settings go to its ``tunnel.json`` instead of resolv.conf (module docstring).
        lock_dir: where the namespace's ownership lock lives (module docstring, Ownership).
    """

    def __init__(
        self,
        netns: str,
        *,
        inside: bool = False,
        table: int = TUNNEL_TABLE,
        rule_priority: int = RULE_PRIORITY,
        bypass_fwmark: int | None = BYPASS_FWMARK,
        device_name: str = "utun%d",
        duplicate_policy: DuplicatePolicy = DuplicatePolicy.EXCLUDED_WINS,
        enforce_routes: bool = False,
        resolv_conf: Path | None = None,
        lock_dir: Path = TUNNEL_LOCK_DIR,
        dns_state_dir: Path | None = None,
    ) -> None:
        require_lab_netns(netns, "configure a tunnel")
        self.netns = netns
        self.inside = inside
        self.table = table
        self.rule_priority = rule_priority
        self.bypass_fwmark = bypass_fwmark
        self.device_name = device_name
        self.duplicate_policy = duplicate_policy
        self.enforce_routes = enforce_routes
        self.exclude_local_networks = False
        self.resolv_conf = resolv_conf or Path("/etc/netns") / netns / "resolv.conf"
        self.lock_path = lock_dir / f"{netns}.lock"
        self._lock_fd: int | None = None  # held: this configurator owns the namespace's tunnel state
        self._installed_rules: set[tuple[int, int, int, str | None]] = set()  # (family, priority, table, uids)
        self._saved_resolv: str | bool | None = False  # False: nothing saved yet; None: file did not exist
        self.dns_state_dir = dns_state_dir or DNS_STATE_DIR / netns
        self._wrote_tunnel_dns = False  # tunnel.json is ours to remove
        self._device: Any = None
        self._applied: AppliedSettings | None = None
        self._ipr: Any = None
        self.routing_method = RoutingMethod.DESTINATION_IP
        self._uids: tuple[int, ...] | None = None
        self._guard: str | None = None  # the utun guard script last installed (None: no table of ours)
        self._settings: PacketTunnelNetworkSettings | None = None  # the last settings applied (for reapply)

    def set_routing_method(self, routing_method: RoutingMethod, app_rules: Sequence[AppRule] | None = None) -> None:
        """See `NetworkConfigurator.set_routing_method`; takes effect at once when settings are applied.

        Raises:
            ConfigError: invalid rules (nothing is changed).
            TunnelProviderError: ``NETWORK_SETTINGS_FAILED`` if the kernel refused the new rules.
        """
        uids = _app_uids(routing_method, app_rules)
        self.routing_method = RoutingMethod(routing_method)
        self._uids = uids
        if self._applied is not None:
            try:
                self._sync_rules()
            except Exception as exc:
                raise _failed(f"installing per-app rules in {self.netns} failed: {exc}") from exc
            self._applied = replace(self._applied, routing_method=self.routing_method, app_uids=uids or ())

    def set_enforce_routes(self, enforce_routes: bool) -> None:
        """See `NetworkConfigurator.set_enforce_routes`; the rule order is chosen when settings are applied.

        Swapping the two rules under live settings would leave a moment with only one of them installed, so a
        change is refused while settings are applied (Apple, too, fixes the protocol for a session).
        """
        self.enforce_routes = _enforce_routes_change(self.enforce_routes, enforce_routes, self._applied)

    def set_exclude_local_networks(self, exclude_local_networks: bool) -> None:
        """See `NetworkConfigurator.set_exclude_local_networks`; the exclusions are read when settings are
        applied (module docstring)."""
        self.exclude_local_networks = _enforce_routes_change(
            self.exclude_local_networks, exclude_local_networks, self._applied, "exclude_local_networks"
        )

    def path_events(self) -> EventSource | None:
        """Route events of this namespace, when this process runs in it (the provider host does)."""
        return RouteEvents() if self.inside else None

    def default_path(self) -> NWPath:
        """SATISFIED through the interface of the main table's default route (IPv4's first, else IPv6's), or
        UNSATISFIED without one (`netsim.apple.path.NWInterfaceType` says how the type is chosen)."""
        ipr = self._iproute()
        _, _, _, oifs = self._physical()
        index = oifs.get(4) or oifs.get(6)
        if index is None:
            return NWPath(NWPathStatus.UNSATISFIED)
        links = ipr.get_links(index)
        if not links:
            return NWPath(NWPathStatus.UNSATISFIED)
        name = links[0].get("ifname")
        kind = links[0].get("ifi_type")
        if name == "lo" or kind == _ARPHRD_LOOPBACK:
            itype = NWInterfaceType.LOOPBACK
        elif kind == _ARPHRD_ETHER:
            itype = NWInterfaceType.WIRED_ETHERNET
        else:
            itype = NWInterfaceType.OTHER
        return NWPath(NWPathStatus.SATISFIED, interface_type=itype, interface_name=name)

    def physical_state(self) -> Any:
        """The main table's default routes: ``(gateways by IP version, interfaces by IP version)``."""
        _, _, gateways, oifs = self._physical()
        return tuple(sorted(gateways.items())), tuple(sorted(oifs.items()))

    def reapply(self) -> None:
        """Apply the last settings again: routes are replaced in place, and what the kernel dropped with a link
        (the server exclusion, excluded routes, local networks) comes back (`netsim.runtime.pathmonitor`)."""
        if self._settings is not None and self._applied is not None:
            self.apply(self._settings)

    def _local_networks(self) -> dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int]:
        """``exclude_local_networks``'s prefixes (only with enforced routes), each with its link's index."""
        if not (self.exclude_local_networks and self.enforce_routes):
            return {}
        ipr = self._iproute()
        names = {link["index"]: link.get("ifname") or "" for link in ipr.get_links()}
        own = self._device.name if self._device is not None else None
        found: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}
        for msg in ipr.get_addr():
            name = names.get(msg["index"], "")
            if name == own or not is_physical_interface(name):
                continue
            iface = ipaddress.ip_interface(f"{msg.get('address')}/{msg.get('prefixlen')}")
            for net in local_network_exclusions([iface]):
                found.setdefault(net, msg["index"])
        return found

    # -- ownership ------------------------------------------------------------------------------------------
    @property
    def owns_namespace(self) -> bool:
        """True while this configurator holds the namespace's tunnel claim (module docstring, Ownership)."""
        return self._lock_fd is not None

    def _claim(self) -> None:
        """Take the namespace's exclusive lock before any change, or raise ``NETWORK_SETTINGS_FAILED``.

        ``flock(2)`` locks die with their process, so a SIGKILLed owner never blocks the next tunnel. The file is
        unlinked on release; an fd locked on an already-unlinked file is detected by comparing inodes and retried.
        """
        if self._lock_fd is not None:
            return
        self.lock_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        for _ in range(8):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise _busy(self.netns, f"pid {owner}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)  # the previous owner unlinked it between our open and flock: take the new file
        raise _failed(f"could not claim {self.lock_path} (it keeps being replaced)")

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            if os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino:
                os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    # -- plumbing -------------------------------------------------------------------------------------------
    def _iproute(self) -> Any:
        if self._ipr is None:
            if self.inside:
                mine = os.stat("/proc/self/ns/net").st_ino
                target = Path("/run/netns") / self.netns
                if not target.exists() or os.stat(target).st_ino != mine:
                    raise LabError(
                        f"inside=True but this process is not in namespace {self.netns!r}; refusing to touch "
                        "another namespace's routes (start the provider with `ip netns exec`)"
                    )
                self._ipr = open_iproute(None)
            else:
                self._ipr = open_iproute(self.netns)
        return self._ipr

    @property
    def device(self) -> PacketDevice | None:
        return self._device  # type: ignore[no-any-return]

    @property
    def applied(self) -> AppliedSettings | None:
        return self._applied

    def _physical(self) -> tuple[str | None, int, dict[int, str], dict[int, int]]:
        """(name, mtu, gateways by IP version, oif by IP version) of the main table's default routes."""
        ipr = self._iproute()
        gateways: dict[int, str] = {}
        oifs: dict[int, int] = {}
        for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            for route in ipr.get_routes(family=family, table=_MAIN):
                if route.get("dst_len") == 0 and route.get("type") == _RTN_UNICAST and route.get("oif"):
                    oifs.setdefault(version, route.get("oif"))
                    if route.get("gateway"):
                        gateways.setdefault(version, route.get("gateway"))
        index = oifs.get(4) or oifs.get(6)
        if index is None:
            return None, DEFAULT_PHYSICAL_MTU, gateways, oifs
        link = ipr.get_links(index)[0]
        return link.get("ifname"), int(link.get("mtu")), gateways, oifs

    # -- apply ----------------------------------------------------------------------------------------------
    def apply(self, settings: PacketTunnelNetworkSettings | None) -> PacketDevice | None:
        try:
            if settings is None:
                self._clear(keep_device=True)
            else:
                self._apply(settings)
        except TunnelProviderError:
            raise
        except Exception as exc:  # netlink / OS errors: Apple reports networkSettingsFailed (code 3)
            raise _failed(f"applying settings to {self.netns} failed: {exc}") from exc
        return self.device

    def _apply(self, settings: PacketTunnelNetworkSettings) -> None:
        from netsim.transports.tun import TunDevice, tun_offload_from_env

        self._claim()  # before anything changes: a second tunnel in this namespace stops here
        ipr = self._iproute()
        phys_name, phys_mtu, gateways, oifs = self._physical()
        mtu = settings.effective_mtu(phys_mtu)
        if self._device is None:
            offload = tun_offload_from_env()  # NETSIM_TUN_OFFLOAD (docs/helper.md, TUN offloads); default off
            self._device = TunDevice.create(
                None if self.inside else self.netns,
                self.device_name,
                mtu=mtu,
                offload=offload is not None,
                offload_flags=offload or 0,
            )
        elif self._device.mtu != mtu:
            self._device.set_mtu(mtu)
        index = ipr.link_lookup(ifname=self._device.name)[0]

        # Addresses: add the new ones first, then remove stale ones (never leave the utun address-less).
        wanted = {str(i): i for i in _addresses(settings)}
        present = {}
        for msg in ipr.get_addr(index=index):
            addr = ipaddress.ip_interface(f"{msg.get('address')}/{msg.get('prefixlen')}")
            if not addr.ip.is_link_local:
                present[str(addr)] = addr
        for key, iface in wanted.items():
            if key not in present:
                ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        for key, iface in present.items():
            if key not in wanted:
                ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        self._sync_guard(utun_guard_ruleset(self._device.name, list(wanted.values())))

        local = self._local_networks()
        model = tunnel_route_table(
            settings,
            duplicate_policy=self.duplicate_policy,
            enforce_routes=self.enforce_routes,
            local_networks=tuple(local),
        )
        routes = model.tunnel_routes()
        self._sync_rules()
        desired: set[tuple[int, str, bool]] = set()  # (version, destination, is the throw backstop)
        for route in routes:
            net = route.network
            family = socket.AF_INET if net.version == 4 else socket.AF_INET6
            spec: dict[str, Any] = {"dst": str(net), "table": self.table, "family": family, "proto": _RTPROT_STATIC}
            if route.kind is RouteKind.INCLUDED:
                spec["oif"] = index
            elif net in local:  # a connected private network: on-link, as the main table has it
                spec.update(oif=local[net], scope=_RT_SCOPE_LINK)
            elif net.version in gateways and net.version in oifs:
                spec.update(gateway=gateways[net.version], oif=oifs[net.version])
            else:
                spec["type"] = "throw"
            ipr.route("replace", **spec)
            desired.add((net.version, str(net), False))
            if route.kind is not RouteKind.INCLUDED and "oif" in spec:
                # F8: the kernel deletes a route through a link that goes down, and until the path monitor has
                # re-applied the settings the destination would fall to the tunnel's default route. A throw
                # route at the highest metric stays behind it: the lookup goes back to the main table, which
                # without a default route fails (or, if the default moved, takes the new physical path).
                backstop = {"dst": str(net), "table": self.table, "family": family, "proto": _RTPROT_STATIC}
                ipr.route("replace", **backstop, type="throw", priority=BACKSTOP_METRIC)
                desired.add((net.version, str(net), True))
        for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            for msg in ipr.get_routes(family=family, table=self.table):
                dst = msg.get("dst") or ("0.0.0.0" if version == 4 else "::")
                is_backstop = msg.get("priority") == BACKSTOP_METRIC
                stale = (version, f"{dst}/{msg.get('dst_len')}", is_backstop)
                if stale not in desired:
                    extra = {"priority": BACKSTOP_METRIC} if is_backstop else {}
                    ipr.route(
                        "del",
                        dst=stale[1],
                        table=self.table,
                        family=family,
                        type=msg.get("type"),
                        scope=msg.get("scope"),  # an on-link local-network route is scope link
                        **extra,
                    )

        resolver = None
        if settings.dns_settings is not None:
            resolver = resolver_config(settings.dns_settings, claims_default_route=_claims_default(routes))
            if (self.dns_state_dir / SYSTEM_FILE).exists():
                self._write_tunnel_dns(settings.dns_settings, self._device.name, _claims_default(routes))
            else:
                self._remove_tunnel_dns()
                self._write_resolv(resolver.render())
        else:
            self._clear_dns()
        self._applied = AppliedSettings(
            device=self._device.name,
            mtu=mtu,
            addresses=tuple(wanted),
            routes=tuple(routes),
            resolver=resolver,
            physical_interface=phys_name,
            gateways=dict(gateways),
            routing_method=self.routing_method,
            app_uids=self._uids or (),
            enforce_routes=self.enforce_routes,
            local_networks=tuple(str(n) for n in local),
        )
        self._settings = settings

    def _rule_specs(self) -> list[dict[str, Any]]:
        first, second = self.rule_priority, self.rule_priority + 1
        main_prio, tunnel_prio = (second, first) if self.enforce_routes else (first, second)
        specs = []
        for family in (socket.AF_INET, socket.AF_INET6):
            specs.append({"family": family, "table": _MAIN, "priority": main_prio, "suppress_prefixlen": 0})
            base: dict[str, Any] = {"family": family, "table": self.table, "priority": tunnel_prio}
            if self._uids is None:
                tunnel = dict(base)
                if self.bypass_fwmark is not None:
                    tunnel.update(fwmark=self.bypass_fwmark, fwmask=0xFFFFFFFF, flags=_FIB_RULE_INVERT)
                specs.append(tunnel)
                continue
            for uid in self._uids:  # per-app: only these uids' sockets see the tunnel table (module docstring)
                tunnel = dict(base, uid_range=f"{uid}:{uid}")
                if self.bypass_fwmark is not None:
                    tunnel.update(fwmark=0, fwmask=self.bypass_fwmark)
                specs.append(tunnel)
        return specs

    def _our_rules(self) -> list[tuple[int, Any]]:
        """(family, rule message) of every installed rule at netsim's priorities and tables."""
        ipr = self._iproute()
        priorities = (self.rule_priority, self.rule_priority + 1)
        found: list[tuple[int, Any]] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for rule in ipr.get_rules(family=family):
                if rule.get("priority") in priorities and rule.get("table") in (_MAIN, self.table):
                    found.append((family, rule))
        return found

    def _delete_rule(self, family: int, rule: Any) -> None:
        # Name every selector the rule has, so the kernel deletes this rule and not a sibling at the same priority.
        spec: dict[str, Any] = {"family": family, "priority": rule.get("priority"), "table": rule.get("table")}
        for attr in ("uid_range", "fwmark", "fwmask"):
            value = rule.get(attr)
            if value is not None:
                spec[attr] = value
        self._iproute().rule("del", **spec)

    def _sync_rules(self) -> None:
        """Make the installed rules equal `_rule_specs`: stale rules go first, so no two rules are ambiguous."""
        wanted = {(s["family"], s["priority"], s["table"], s.get("uid_range")): s for s in self._rule_specs()}
        present = set()
        for family, rule in self._our_rules():
            key = (family, rule.get("priority"), rule.get("table"), rule.get("uid_range"))
            if key in wanted and key not in present:
                present.add(key)
            else:
                self._delete_rule(family, rule)
        ipr = self._iproute()
        for key, spec in wanted.items():
            if key not in present:
                ipr.rule("add", **spec)
        self._installed_rules = set(wanted)

    def _delete_rules(self) -> None:
        """Delete the rules this configurator installed (and only those: the ownership rule)."""
        for family, rule in self._our_rules():
            if (family, rule.get("priority"), rule.get("table"), rule.get("uid_range")) in self._installed_rules:
                self._delete_rule(family, rule)
        self._installed_rules = set()

    # -- CVE-2019-14899 guard --------------------------------------------------------------------------------
    def _nft(self, script: str) -> None:
        done = run_netns_command(None if self.inside else self.netns, ["nft", "-f", "-"], stdin=script, check=False)
        if done.returncode != 0:
            raise _failed(f"nft refused the utun guard in {self.netns}: {done.stderr[:300]}")

    def _sync_guard(self, script: str) -> None:
        if script != self._guard:
            self._nft(script)
            self._guard = script

    def _remove_guard(self) -> None:
        if self._guard is not None:
            self._nft(utun_guard_ruleset("utun", []))
            self._guard = None

    # -- DNS ------------------------------------------------------------------------------------------------
    def _write_resolv(self, text: str) -> None:
        path = self.resolv_conf
        if self._saved_resolv is False:
            self._saved_resolv = path.read_text() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:  # in place: running processes have this inode bind-mounted
            f.write(text)

    def _restore_resolv(self) -> None:
        saved, self._saved_resolv = self._saved_resolv, False
        if isinstance(saved, bool):
            return
        path = self.resolv_conf
        if saved is None:
            try:
                path.unlink()
            except OSError:  # bind-mounted somewhere (EBUSY): leave an empty file instead
                path.write_text("")
        else:
            with open(path, "w") as f:
                f.write(saved)

    def _write_tunnel_dns(self, dns: DNSSettings, device: str, claims_default_route: bool) -> None:
        """Hand the DNS settings to the namespace's resolver daemon (module docstring, the Mac's own resolver)."""
        self._restore_resolv()  # resolv.conf names the daemon; undo an earlier write of ours, if any
        search = [d for d in [dns.domain_name or "", *(dns.search_domains or ())] if d]
        state = TunnelDns(
            servers=tuple(dns.servers),
            interface=device,
            owner_pid=os.getpid(),
            match_domains=tuple(normalize_name(d) for d in dns.match_domains or ()),
            match_domains_no_search=bool(dns.match_domains_no_search),
            search_domains=tuple(dict.fromkeys(normalize_name(d) for d in search)),
            claims_default_route=claims_default_route,
        )
        TunnelDns.from_json(state.to_json())  # what the daemon would refuse, refuse here (ResolverStateError)
        write_state_file(self.dns_state_dir / TUNNEL_FILE, state.to_json())
        self._wrote_tunnel_dns = True

    def _remove_tunnel_dns(self) -> None:
        if not self._wrote_tunnel_dns:
            return
        self._wrote_tunnel_dns = False
        try:
            (self.dns_state_dir / TUNNEL_FILE).unlink()
        except FileNotFoundError:
            pass

    def _clear_dns(self) -> None:
        self._remove_tunnel_dns()
        self._restore_resolv()

    # -- teardown -------------------------------------------------------------------------------------------
    def _clear(self, *, keep_device: bool) -> None:
        if not self.owns_namespace:
            # Never claimed (e.g. refused as a second tunnel): nothing here is ours to remove.
            self._applied = None
            return
        if self._ipr is None and self._device is None:
            self._clear_dns()
            return
        ipr = self._iproute()
        self._delete_rules()
        self._flush_table()
        if self._device is not None:
            links = ipr.link_lookup(ifname=self._device.name)
            if links:
                for msg in ipr.get_addr(index=links[0]):
                    addr = ipaddress.ip_interface(f"{msg.get('address')}/{msg.get('prefixlen')}")
                    if not addr.ip.is_link_local:
                        ipr.addr("del", index=links[0], address=str(addr.ip), prefixlen=addr.network.prefixlen)
            if not keep_device:
                self._device.close()
                self._device = None
        # The guard goes last: the utun's addresses must be gone before they are reachable from en0 again (a
        # forged SYN/ACK to 10.66.0.2 drew a RST out of en0 in that window when the guard went first).
        self._remove_guard()
        self._clear_dns()
        self._applied = None
        self._settings = None

    def _flush_table(self) -> None:
        ipr = self._iproute()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, table=self.table):
                dst = msg.get("dst") or ("0.0.0.0" if family == socket.AF_INET else "::")
                backstop = {"priority": BACKSTOP_METRIC} if msg.get("priority") == BACKSTOP_METRIC else {}
                ipr.route(
                    "del",
                    dst=f"{dst}/{msg.get('dst_len')}",
                    table=self.table,
                    family=family,
                    type=msg.get("type"),
                    scope=msg.get("scope"),
                    **backstop,
                )

    def reclaim_abandoned(self) -> bool:
        """Remove the tunnel state a dead owner left in this namespace, as macOS tears down a crashed
        extension's utun and routes (issue 16, row F3); returns False, touching nothing, when a live owner holds
        the namespace's claim (module docstring, Ownership).

        A SIGKILLed provider host cannot clear its state: its utun goes with its fd, but its policy rules, the
        rest of its table (the server exclusion via en0), its utun guard and its ``tunnel.json`` stay until the
        next tunnel replaces them. The system side (`netsim.runtime.controller`) calls this after it reaped a
        host that went away without reporting its stop. The kill switch is not touched: it is the session's,
        and it fails closed (docs/kill-switch.md).
        """
        try:
            self._claim()
        except TunnelProviderError:
            return False
        try:
            for family, rule in self._our_rules():
                self._delete_rule(family, rule)
            self._flush_table()
            self._nft(utun_guard_ruleset("utun", []))
            with contextlib.suppress(FileNotFoundError):
                (self.dns_state_dir / TUNNEL_FILE).unlink()
        finally:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            self._release()
        return True

    def close(self) -> None:
        try:
            self._clear(keep_device=False)
        finally:
            if self._device is not None:
                self._device.close()
                self._device = None
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None
            self._release()
