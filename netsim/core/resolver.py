"""Apple's DNS resolver selection for the simulated Mac, as data in and a decision out (sans-IO).

Theory of operation. macOS keeps one *system* resolver configuration (the primary interface's servers: in the lab
the ISP router's) and, while a packet tunnel is up, the tunnel's ``NEDNSSettings``. For each query it picks the
resolver by name, not by the routing table:

* the tunnel claims the default route, or its match domains contain ``""``: the tunnel's servers answer
  everything ("If the VPN is the default route, the servers become the default resolver and ``matchDomains`` is
  ignored"; ``""`` makes the tunnel resolver the default domain: Apple's ``NEDNSSettings.matchDomains``);
* otherwise (split tunnel with specific match domains, *split DNS*): names equal to or under a match domain go
  to the tunnel's servers, everything else to the system resolver;
* tunnel DNS without any ``matchDomains``: Apple does not document this case for a split tunnel; netsim keeps
  the no-leak reading `netsim.runtime.netconfig.resolver_config` already uses (the tunnel servers answer
  everything, as with ``[""]``);
* no tunnel DNS: the system resolver.

Queries for the tunnel's servers must leave only through the tunnel's interface (Apple scopes those resolvers
to the utun). The daemon (`netsim.runtime.resolver`) tells `select_upstream` whether the tunnel it knows of is
still alive (its utun exists and its provider runs). A *stale* tunnel (the provider crashed and left its state
file) is ignored, as macOS restores the system resolver when the tunnel goes away, with one exception: names
under a stale split tunnel's specific match domains get no upstream (the daemon answers SERVFAIL) rather than
being sent in the clear to the ISP resolver, since those private names are only meaningful inside the tunnel.

The state lives in two JSON files written by other processes (`SystemDns`, `TunnelDns`); their parsers treat the
bytes as untrusted: size-capped, every field type-checked, addresses and names validated, counts bounded. The
only exception they raise is :class:`ResolverStateError`, whose ``reason`` names the drop counter.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from netsim.core.dns import normalize_name
from netsim.errors import NetsimError

__all__ = [
    "MAX_STATE_BYTES",
    "ResolverState",
    "ResolverStateError",
    "SystemDns",
    "TunnelDns",
    "Upstream",
    "name_matches",
    "select_upstream",
]

#: The largest state file read; anything longer is refused unread (untrusted input is bounded).
MAX_STATE_BYTES = 64 * 1024
_MAX_SERVERS = 16
_MAX_DOMAINS = 64
_MAX_PID = 1 << 22  # Linux PID_MAX_LIMIT
_IFNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")  # IFNAMSIZ - 1, no slash or space
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_VERSION = 1


class ResolverStateError(NetsimError, ValueError):
    """A state file did not parse or validate. ``reason`` is a short token used as a drop-counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _servers(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > _MAX_SERVERS:
        raise ResolverStateError("state_bad_servers", f"{field} must be a list of at most {_MAX_SERVERS} addresses")
    out = []
    for item in value:
        if not isinstance(item, str) or len(item) > 64:
            raise ResolverStateError("state_bad_servers", f"{field}: not an address string")
        try:
            addr = ipaddress.ip_address(item)
        except ValueError:
            raise ResolverStateError("state_bad_servers", f"{field}: {item[:64]!r} is not an IP address") from None
        if addr.is_unspecified or addr.is_multicast:
            raise ResolverStateError("state_bad_servers", f"{field}: {addr} cannot be a resolver")
        out.append(str(addr))
    return tuple(out)


def _domain(item: Any, field: str, *, allow_root: bool) -> str:
    if not isinstance(item, str) or len(item) > 254:
        raise ResolverStateError("state_bad_domain", f"{field}: not a domain string")
    name = normalize_name(item)
    if name == "":
        if allow_root:
            return ""
        raise ResolverStateError("state_bad_domain", f"{field}: empty domain")
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ResolverStateError("state_bad_domain", f"{field}: {item[:64]!r} is not a domain name")
    return name


def _domains(value: Any, field: str, *, allow_root: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > _MAX_DOMAINS:
        raise ResolverStateError("state_bad_domain", f"{field} must be a list of at most {_MAX_DOMAINS} domains")
    out: list[str] = []
    for item in value:
        d = _domain(item, field, allow_root=allow_root)
        if d not in out:
            out.append(d)
    return tuple(out)


def _load(data: bytes | str, kind: str) -> dict[str, Any]:
    if len(data) > MAX_STATE_BYTES:
        raise ResolverStateError("state_too_big", f"{kind}: {len(data)} bytes > {MAX_STATE_BYTES}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ResolverStateError("state_bad_json", f"{kind}: {exc}") from None
    if not isinstance(obj, dict):
        raise ResolverStateError("state_bad_json", f"{kind}: not a JSON object")
    if obj.get("version") != _VERSION:
        raise ResolverStateError("state_bad_version", f"{kind}: version {obj.get('version')!r} is not {_VERSION}")
    if obj.get("kind") != kind:
        raise ResolverStateError("state_bad_kind", f"expected kind {kind!r}, got {obj.get('kind')!r}")
    return obj


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ResolverStateError("state_bad_field", f"{field} must be true or false")
    return value


@dataclass(frozen=True, slots=True)
class SystemDns:
    """The Mac's own resolvers (the primary interface's: in the lab the ISP router's), from ``system.json``."""

    servers: tuple[str, ...]
    search: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {"version": _VERSION, "kind": "system", "servers": list(self.servers), "search": list(self.search)}
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> SystemDns:
        """Parse untrusted ``system.json`` bytes. Raises `ResolverStateError` only."""
        obj = _load(data, "system")
        return cls(_servers(obj.get("servers"), "servers"), _domains(obj.get("search", []), "search"))


@dataclass(frozen=True, slots=True)
class TunnelDns:
    """A running tunnel's ``NEDNSSettings`` as the configurator applied them, from ``tunnel.json``.

    Attributes:
        servers: the tunnel's resolvers (reached only through ``interface``).
        match_domains: Apple's ``matchDomains`` (normalized; ``""`` is the default domain).
        match_domains_no_search: Apple's ``matchDomainsNoSearch`` (recorded; the search list is not modelled).
        search_domains: ``searchDomains`` plus ``domainName`` (recorded; see docs/dns.md).
        interface: the utun the tunnel's packets use.
        owner_pid: the provider process; when it is gone the tunnel is stale.
        claims_default_route: the tunnel's settings include a default route (Apple: servers become the default).
    """

    servers: tuple[str, ...]
    interface: str
    owner_pid: int
    match_domains: tuple[str, ...] = ()
    match_domains_no_search: bool = False
    search_domains: tuple[str, ...] = ()
    claims_default_route: bool = False

    @property
    def default_resolver(self) -> bool:
        """True when every query goes to this tunnel's servers (default route claimed, ``""``, no match domains)."""
        return self.claims_default_route or not self.match_domains or "" in self.match_domains

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _VERSION,
                "kind": "tunnel",
                "servers": list(self.servers),
                "match_domains": list(self.match_domains),
                "match_domains_no_search": self.match_domains_no_search,
                "search_domains": list(self.search_domains),
                "interface": self.interface,
                "owner_pid": self.owner_pid,
                "claims_default_route": self.claims_default_route,
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> TunnelDns:
        """Parse untrusted ``tunnel.json`` bytes. Raises `ResolverStateError` only."""
        obj = _load(data, "tunnel")
        iface = obj.get("interface")
        if not isinstance(iface, str) or not _IFNAME.match(iface):
            raise ResolverStateError("state_bad_field", "interface must be an interface name")
        pid = obj.get("owner_pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= _MAX_PID:
            raise ResolverStateError("state_bad_field", "owner_pid must be a process id")
        return cls(
            servers=_servers(obj.get("servers"), "servers"),
            interface=iface,
            owner_pid=pid,
            match_domains=_domains(obj.get("match_domains", []), "match_domains", allow_root=True),
            match_domains_no_search=_bool(obj.get("match_domains_no_search", False), "match_domains_no_search"),
            search_domains=_domains(obj.get("search_domains", []), "search_domains"),
            claims_default_route=_bool(obj.get("claims_default_route", False), "claims_default_route"),
        )


@dataclass(frozen=True, slots=True)
class ResolverState:
    """Everything the Mac's resolver selection depends on."""

    system: SystemDns | None = None
    tunnel: TunnelDns | None = None


class Upstream(NamedTuple):
    """Where one query goes. ``servers == ()`` means no usable resolver: answer SERVFAIL.

    ``via_tunnel`` is True when the decision belongs to the tunnel (its servers, through ``interface``; or
    refused because the tunnel is stale).
    """

    servers: tuple[str, ...]
    via_tunnel: bool
    interface: str | None = None


def name_matches(qname: str, domain: str) -> bool:
    """True when ``qname`` is ``domain`` or under it; ``""`` matches every name (case-insensitive, RFC 4343)."""
    name = normalize_name(qname)
    d = normalize_name(domain)
    return d == "" or name == d or name.endswith("." + d)


def select_upstream(state: ResolverState, qname: str, *, tunnel_alive: bool = True) -> Upstream:
    """Apple's resolver choice for ``qname`` (module docstring): the tunnel's servers or the system's."""
    system = Upstream(state.system.servers if state.system else (), False, None)
    tunnel = state.tunnel
    if tunnel is None or not tunnel.servers:
        return system
    wants_tunnel = tunnel.default_resolver or any(name_matches(qname, d) for d in tunnel.match_domains)
    if not wants_tunnel:
        return system
    if tunnel_alive:
        return Upstream(tunnel.servers, True, tunnel.interface)
    if tunnel.default_resolver:
        return system  # the tunnel is gone: macOS restores the system resolver
    return Upstream((), True, tunnel.interface)  # a private name of a dead split tunnel: never in the clear
