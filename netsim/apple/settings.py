"""Tunnel network settings: the NETunnelNetworkSettings family as plain data, with validation.

Apple validates settings when ``setTunnelNetworkSettings`` is called and reports failure through the completion
handler (NETunnelProviderErrorDomain code 1, ``networkSettingsInvalid``). netsim does the same in `validate`,
called by ``PacketTunnelProvider.set_tunnel_network_settings``, and its message names the field path and the value
(``ipv4_settings.included_routes[2].subnet_mask: '255.0.255.0' is not a contiguous netmask``) so a user knows
what to fix. Construction never validates, exactly as Apple's initialisers do not.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from netsim.apple.enums import DNSProtocol, TunnelProviderErrorCode
from netsim.apple.errors import TunnelProviderError

__all__ = [
    "MAX_MTU",
    "MIN_IPV4_MTU",
    "MIN_IPV6_MTU",
    "DNSOverHTTPSSettings",
    "DNSOverTLSSettings",
    "DNSSettings",
    "IPv4Route",
    "IPv4Settings",
    "IPv6Route",
    "IPv6Settings",
    "PacketTunnelNetworkSettings",
    "ProxyServer",
    "ProxySettings",
    "TunnelNetworkSettings",
]

MIN_IPV4_MTU = 68  # RFC 791 §3.1: every IPv4 module must forward 68-octet datagrams
MIN_IPV6_MTU = 1280  # RFC 8200 §5: the IPv6 minimum link MTU
MAX_MTU = 65535  # IPv4 total length / IPv6 payload length are 16-bit fields

# RFC 1035 §2.3.4 / RFC 1123 §2.1: 253 characters, labels of 1..63 letters, digits, hyphens; underscores are
# tolerated because real search domains (e.g. _msdcs) use them.
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _invalid(path: str, value: object, why: str) -> TunnelProviderError:
    return TunnelProviderError(TunnelProviderErrorCode.NETWORK_SETTINGS_INVALID, f"{path}: {value!r} {why}")


def _ipv4(path: str, value: object) -> ipaddress.IPv4Address:
    if not isinstance(value, str):
        raise _invalid(path, value, "must be a dotted-decimal IPv4 address string")
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise _invalid(path, value, "is not a valid IPv4 address") from None


def _ipv6(path: str, value: object) -> ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise _invalid(path, value, "must be an IPv6 address string")
    try:
        return ipaddress.IPv6Address(value)
    except ValueError:
        raise _invalid(path, value, "is not a valid IPv6 address") from None


def _netmask(path: str, value: object) -> int:
    """Prefix length of a dotted-decimal IPv4 netmask; rejects non-contiguous masks such as 255.0.255.0."""
    mask = int(_ipv4(path, value))
    inverted = ~mask & 0xFFFFFFFF
    if inverted & (inverted + 1):
        raise _invalid(path, value, "is not a contiguous netmask (ones then zeros, e.g. 255.255.255.0)")
    return 32 - inverted.bit_length()


def _prefix_length(path: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise _invalid(path, value, f"must be an integer prefix length between 0 and {maximum}")
    return value


def _string_list(path: str, value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise _invalid(path, value, "must be a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _invalid(f"{path}[{i}]", item, "must be a string")
    return list(value)


def _domain(path: str, value: str, *, allow_empty: bool = False) -> None:
    if value == "" and allow_empty:
        return
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise _invalid(path, value, "is not a valid DNS domain name")


def _route_network(path: str, network: _Net, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> _Net:
    """``network`` if ``address`` is its network address; a route with host bits set is refused (issue 13)."""
    if network.network_address != address:
        raise _invalid(
            f"{path}.destination_address",
            str(address),
            f"has host bits set for prefix length {network.prefixlen}; use {str(network.network_address)!r} "
            f"(the network {network}) or a longer prefix",
        )
    return network


@dataclass
class IPv4Route:
    """Mirrors NEIPv4Route: a destination network for included or excluded routes (Apple: NEIPv4Settings.h).

    Differences from Apple: ``gateway_address`` is validated and kept, but a TUN is point-to-point, so netsim
    never installs it as a next hop (Apple: "If gatewayAddress is nil, the next hop is the TUN").
    ``destination_address`` must be the network address of ``subnet_mask`` (no host bits set): ``10.1.2.3`` with
    ``255.255.0.0`` is refused naming ``10.1.0.0``, where a silent widening would exclude (or include) a whole
    network the provider did not name (Apple, NEIPv4Route: "destinationAddress: The IPv4 address of the route's
    destination network"; https://developer.apple.com/documentation/networkextension/neipv4route).
    """

    destination_address: str
    subnet_mask: str
    gateway_address: str | None = None

    @classmethod
    def default(cls) -> IPv4Route:
        """The IPv4 default route, 0.0.0.0/0 (Apple: ``NEIPv4Route.default()``)."""
        return cls("0.0.0.0", "0.0.0.0")

    def network(self) -> ipaddress.IPv4Network:
        """The route as an `ipaddress.IPv4Network` (validates first)."""
        return self._validated("route")

    def _validated(self, path: str) -> ipaddress.IPv4Network:
        address = _ipv4(f"{path}.destination_address", self.destination_address)
        length = _netmask(f"{path}.subnet_mask", self.subnet_mask)
        if self.gateway_address is not None:
            _ipv4(f"{path}.gateway_address", self.gateway_address)
        return _route_network(path, ipaddress.IPv4Network((address, length), strict=False), address)


@dataclass
class IPv6Route:
    """Mirrors NEIPv6Route (Apple: NEIPv6Settings.h).

    Differences from Apple: as `IPv4Route` (gateway kept but never used as a next hop; a destination with host
    bits set is refused; https://developer.apple.com/documentation/networkextension/neipv6route).
    """

    destination_address: str
    network_prefix_length: int
    gateway_address: str | None = None

    @classmethod
    def default(cls) -> IPv6Route:
        """The IPv6 default route, ::/0 (Apple: ``NEIPv6Route.default()``)."""
        return cls("::", 0)

    def network(self) -> ipaddress.IPv6Network:
        """The route as an `ipaddress.IPv6Network` (validates first)."""
        return self._validated("route")

    def _validated(self, path: str) -> ipaddress.IPv6Network:
        address = _ipv6(f"{path}.destination_address", self.destination_address)
        length = _prefix_length(f"{path}.network_prefix_length", self.network_prefix_length, 128)
        if self.gateway_address is not None:
            _ipv6(f"{path}.gateway_address", self.gateway_address)
        return _route_network(path, ipaddress.IPv6Network((address, length), strict=False), address)


def _routes(path: str, routes: object, kind: type[IPv4Route] | type[IPv6Route]) -> list[Any]:
    if routes is None:
        return []
    if not isinstance(routes, Sequence) or isinstance(routes, str):
        raise _invalid(path, routes, f"must be a list of {kind.__name__} or None")
    networks = []
    for i, route in enumerate(routes):
        if not isinstance(route, kind):
            raise _invalid(f"{path}[{i}]", route, f"must be an {kind.__name__} (a route outside the settings' family?)")
        networks.append(route._validated(f"{path}[{i}]"))
    return networks


@dataclass
class IPv4Settings:
    """Mirrors NEIPv4Settings: addresses of the virtual interface and the IPv4 routes (Apple: NEIPv4Settings.h).

    Differences from Apple: ``router`` (macOS 13+) is accepted and ignored, as Apple ignores it for TUN
    interfaces. An empty ``addresses`` list is rejected (Apple's behaviour for it is undocumented).
    """

    addresses: list[str]
    subnet_masks: list[str]
    included_routes: list[IPv4Route] | None = None
    excluded_routes: list[IPv4Route] | None = None
    router: str | None = None

    def interfaces(self) -> list[ipaddress.IPv4Interface]:
        """The address/mask pairs as `ipaddress.IPv4Interface` objects (validates first)."""
        return self._validate("ipv4_settings")[0]

    def _validate(
        self, path: str
    ) -> tuple[list[ipaddress.IPv4Interface], list[ipaddress.IPv4Network], list[ipaddress.IPv4Network]]:
        addresses = _string_list(f"{path}.addresses", self.addresses)
        masks = _string_list(f"{path}.subnet_masks", self.subnet_masks)
        if not addresses:
            raise _invalid(f"{path}.addresses", self.addresses, "must name at least one address")
        if len(addresses) != len(masks):
            raise _invalid(
                f"{path}.subnet_masks",
                self.subnet_masks,
                f"has {len(masks)} entries but addresses has {len(addresses)}; give one mask per address",
            )
        interfaces = []
        for i, (address, mask) in enumerate(zip(addresses, masks, strict=True)):
            ip = _ipv4(f"{path}.addresses[{i}]", address)
            length = _netmask(f"{path}.subnet_masks[{i}]", mask)
            interfaces.append(ipaddress.IPv4Interface((ip, length)))
        if self.router is not None:
            _ipv4(f"{path}.router", self.router)
        included = _routes(f"{path}.included_routes", self.included_routes, IPv4Route)
        excluded = _routes(f"{path}.excluded_routes", self.excluded_routes, IPv4Route)
        return interfaces, included, excluded


@dataclass
class IPv6Settings:
    """Mirrors NEIPv6Settings (Apple: NEIPv6Settings.h).

    Differences from Apple: no /120 clamp is applied to address prefixes (WireGuardKit does it for iOS, the
    kernel here needs none). An empty ``addresses`` list is rejected (NetBird reports Apple needs one too).
    """

    addresses: list[str]
    network_prefix_lengths: list[int]
    included_routes: list[IPv6Route] | None = None
    excluded_routes: list[IPv6Route] | None = None

    def interfaces(self) -> list[ipaddress.IPv6Interface]:
        """The address/prefix pairs as `ipaddress.IPv6Interface` objects (validates first)."""
        return self._validate("ipv6_settings")[0]

    def _validate(
        self, path: str
    ) -> tuple[list[ipaddress.IPv6Interface], list[ipaddress.IPv6Network], list[ipaddress.IPv6Network]]:
        addresses = _string_list(f"{path}.addresses", self.addresses)
        lengths: object = self.network_prefix_lengths
        if isinstance(lengths, str) or not isinstance(lengths, Sequence):
            raise _invalid(f"{path}.network_prefix_lengths", lengths, "must be a list of integers")
        if not addresses:
            raise _invalid(f"{path}.addresses", self.addresses, "must name at least one address")
        if len(addresses) != len(lengths):
            raise _invalid(
                f"{path}.network_prefix_lengths",
                lengths,
                f"has {len(lengths)} entries but addresses has {len(addresses)}; give one length per address",
            )
        interfaces = []
        for i, (address, length) in enumerate(zip(addresses, lengths, strict=True)):
            ip = _ipv6(f"{path}.addresses[{i}]", address)
            plen = _prefix_length(f"{path}.network_prefix_lengths[{i}]", length, 128)
            interfaces.append(ipaddress.IPv6Interface((ip, plen)))
        included = _routes(f"{path}.included_routes", self.included_routes, IPv6Route)
        excluded = _routes(f"{path}.excluded_routes", self.excluded_routes, IPv6Route)
        return interfaces, included, excluded


@dataclass
class DNSSettings:
    """Mirrors NEDNSSettings: resolvers for tunnelled traffic (Apple: NEDNSSettings.h).

    ``match_domains`` selects split DNS; ``[""]`` makes the tunnel resolver the default, and Apple ignores match
    domains when the tunnel claims the default route. ``match_domains_no_search`` False (the default) appends the
    match domains to the search list.

    Differences from Apple: in the lab the simulated Mac runs its own resolver (docs/dns.md), which implements
    split DNS, scopes the tunnel's servers to the utun and drops a crashed tunnel's servers; the search list is
    recorded but not applied. Outside the lab (a namespace without the resolver's state files) netsim writes
    resolv.conf, and glibc cannot send one domain to one server and the rest to another (docs/apple-mapping.md).
    ``allow_failover`` (26.0) is recorded only.
    """

    servers: list[str]
    search_domains: list[str] | None = None
    domain_name: str | None = None
    match_domains: list[str] | None = None
    match_domains_no_search: bool = False
    allow_failover: bool = False

    @property
    def dns_protocol(self) -> DNSProtocol:
        """Cleartext for this class (Apple: ``NEDNSSettings.dnsProtocol``)."""
        return DNSProtocol.CLEARTEXT

    def _validate(self, path: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        servers = _string_list(f"{path}.servers", self.servers)
        if not servers:
            raise _invalid(f"{path}.servers", self.servers, "must name at least one DNS server address")
        parsed: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for i, server in enumerate(servers):
            try:
                parsed.append(ipaddress.ip_address(server))
            except ValueError:
                raise _invalid(f"{path}.servers[{i}]", server, "is not a valid IP address") from None
        for name in ("search_domains", "match_domains"):
            value = getattr(self, name)
            if value is not None:
                for i, domain in enumerate(_string_list(f"{path}.{name}", value)):
                    _domain(f"{path}.{name}[{i}]", domain, allow_empty=name == "match_domains")
        if self.domain_name is not None:
            if not isinstance(self.domain_name, str):
                raise _invalid(f"{path}.domain_name", self.domain_name, "must be a string")
            _domain(f"{path}.domain_name", self.domain_name)
        return parsed


@dataclass
class DNSOverTLSSettings(DNSSettings):
    """Mirrors NEDNSOverTLSSettings (macOS 11 / iOS 14).

    Differences from Apple: recorded and validated; the Linux stub resolver still queries in cleartext.
    """

    server_name: str | None = None

    @property
    def dns_protocol(self) -> DNSProtocol:
        """TLS (Apple: ``NEDNSProtocol.tls``)."""
        return DNSProtocol.TLS


@dataclass
class DNSOverHTTPSSettings(DNSSettings):
    """Mirrors NEDNSOverHTTPSSettings (macOS 11 / iOS 14).

    Differences from Apple: recorded and validated; the Linux stub resolver still queries in cleartext.
    """

    server_url: str | None = None

    @property
    def dns_protocol(self) -> DNSProtocol:
        """HTTPS (Apple: ``NEDNSProtocol.https``)."""
        return DNSProtocol.HTTPS


@dataclass
class ProxyServer:
    """Mirrors NEProxyServer (Apple: NEProxySettings.h).

    Differences from Apple: data only; netsim runs no proxy.
    """

    address: str
    port: int
    authentication_required: bool = False
    username: str | None = None
    password: str | None = None

    def _validate(self, path: str) -> None:
        if not isinstance(self.address, str) or not self.address:
            raise _invalid(f"{path}.address", self.address, "must be a non-empty host name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise _invalid(f"{path}.port", self.port, "must be a port number between 1 and 65535")


@dataclass
class ProxySettings:
    """Mirrors NEProxySettings: HTTP(S) proxy configuration for tunnelled connections (Apple: NEProxySettings.h).

    Differences from Apple: carried as data and validated; nothing in a Linux namespace consumes it.
    """

    auto_proxy_configuration_enabled: bool = False
    proxy_auto_configuration_url: str | None = None
    proxy_auto_configuration_javascript: str | None = None
    http_enabled: bool = False
    http_server: ProxyServer | None = None
    https_enabled: bool = False
    https_server: ProxyServer | None = None
    exclude_simple_hostnames: bool = False
    exception_list: list[str] | None = None
    match_domains: list[str] | None = None

    def _validate(self, path: str) -> None:
        for name in ("http_server", "https_server"):
            server = getattr(self, name)
            if server is not None:
                if not isinstance(server, ProxyServer):
                    raise _invalid(f"{path}.{name}", server, "must be a ProxyServer or None")
                server._validate(f"{path}.{name}")
            elif getattr(self, name.replace("_server", "_enabled")):
                raise _invalid(f"{path}.{name}", server, f"is required when {name[:-7]}_enabled is True")
        for name in ("exception_list", "match_domains"):
            if getattr(self, name) is not None:
                _string_list(f"{path}.{name}", getattr(self, name))


@dataclass
class TunnelNetworkSettings:
    """Mirrors NETunnelNetworkSettings: what every tunnel provider's settings carry (Apple: NETunnelNetworkSettings.h).

    ``tunnel_remote_address`` is the tunnel server's address; it must be an IP address (Apple fails with "Invalid
    NETunnelNetworkSettings tunnelRemoteAddress" otherwise) and is excluded from the tunnel routes automatically.

    Differences from Apple: plain mutable data; the object is deep-copied when applied, as Apple copies it.
    """

    tunnel_remote_address: str
    dns_settings: DNSSettings | None = None
    proxy_settings: ProxySettings | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (used for logs and the controller's view of applied settings)."""
        return dataclasses.asdict(self)


@dataclass
class PacketTunnelNetworkSettings(TunnelNetworkSettings):
    """Mirrors NEPacketTunnelNetworkSettings: addresses, routes, DNS and MTU of the utun (Apple: header R6).

    If ``mtu`` is set, ``tunnel_overhead_bytes`` is ignored; otherwise the TUN MTU is the primary physical
    interface's MTU minus ``tunnel_overhead_bytes``.

    Differences from Apple: when neither is set netsim uses the physical interface's MTU (Apple's default is
    undocumented). ``include_all_networks`` / ``exclude_local_networks`` (27 SDK, typed
    ``NEPacketTunnelNetworkSettings.IPFamily``) are not mirrored: the Xcode 27 beta 5 headers mark that enum
    unavailable on every platform again; use the `TunnelProviderProtocol` flags (which take precedence anyway).
    """

    ipv4_settings: IPv4Settings | None = None
    ipv6_settings: IPv6Settings | None = None
    tunnel_overhead_bytes: int | None = None
    mtu: int | None = None

    def validate(self) -> None:
        """Check every field; raise `TunnelProviderError` (NETWORK_SETTINGS_INVALID) naming the first bad one."""
        try:
            ipaddress.ip_address(self.tunnel_remote_address)
        except (ValueError, TypeError):
            raise _invalid("tunnel_remote_address", self.tunnel_remote_address, "is not a valid IP address") from None
        if self.ipv4_settings is not None:
            if not isinstance(self.ipv4_settings, IPv4Settings):
                raise _invalid("ipv4_settings", self.ipv4_settings, "must be an IPv4Settings or None")
            self.ipv4_settings._validate("ipv4_settings")
        if self.ipv6_settings is not None:
            if not isinstance(self.ipv6_settings, IPv6Settings):
                raise _invalid("ipv6_settings", self.ipv6_settings, "must be an IPv6Settings or None")
            self.ipv6_settings._validate("ipv6_settings")
        if self.dns_settings is not None:
            if not isinstance(self.dns_settings, DNSSettings):
                raise _invalid("dns_settings", self.dns_settings, "must be a DNSSettings or None")
            self.dns_settings._validate("dns_settings")
        if self.proxy_settings is not None:
            if not isinstance(self.proxy_settings, ProxySettings):
                raise _invalid("proxy_settings", self.proxy_settings, "must be a ProxySettings or None")
            self.proxy_settings._validate("proxy_settings")
        minimum = MIN_IPV6_MTU if self.ipv6_settings is not None else MIN_IPV4_MTU
        if self.mtu is not None:
            self.check_mtu(self.mtu, "mtu")
        if self.tunnel_overhead_bytes is not None:
            value = self.tunnel_overhead_bytes
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MTU - minimum:
                raise _invalid("tunnel_overhead_bytes", value, f"must be an integer between 0 and {MAX_MTU - minimum}")

    def check_mtu(self, mtu: object, path: str) -> int:
        """Validate a TUN MTU for these settings (RFC 8200 §5 needs 1280 once IPv6 is configured)."""
        minimum = MIN_IPV6_MTU if self.ipv6_settings is not None else MIN_IPV4_MTU
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not minimum <= mtu <= MAX_MTU:
            why = " (IPv6 is configured, RFC 8200 §5)" if minimum == MIN_IPV6_MTU else ""
            raise _invalid(path, mtu, f"must be an integer between {minimum} and {MAX_MTU}{why}")
        return mtu

    def effective_mtu(self, physical_mtu: int) -> int:
        """The TUN MTU Apple would use: ``mtu`` if set, else physical MTU minus ``tunnel_overhead_bytes``.

        Raises:
            TunnelProviderError: NETWORK_SETTINGS_INVALID when the result is out of range.
        """
        if self.mtu is not None:
            return self.check_mtu(self.mtu, "mtu")
        overhead = self.tunnel_overhead_bytes or 0
        return self.check_mtu(
            physical_mtu - overhead, f"physical MTU {physical_mtu} - tunnel_overhead_bytes {overhead}"
        )
