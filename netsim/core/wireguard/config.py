"""wg-quick style WireGuard configuration: parse text into dataclasses, render it back.

Sans-IO: `parse_config` takes text, never a path (``netsim.lab.wireguard.load_config`` reads files).

Theory of operation. The grammar is the union of what ``wg-quick`` reads itself (Address, DNS, MTU and its
hook keys) and what it hands to ``wg setconf`` (wireguard-tools ``config.c``), with the same lexical rules:
``#`` starts a comment anywhere on a line, section names and keys are case-insensitive, whitespace around
``=`` and around list items is ignored, list keys (Address, DNS, AllowedIPs) may repeat and accumulate.
Where ``wg`` is silent or lenient about a likely mistake netsim is stricter and says what to fix: an unknown
key, a key outside a section, a scalar key given twice, a second ``[Interface]``, a peer listed twice or
equal to the interface's own key are errors naming the line. Every error is a `ConfigError` with
``source`` and ``line`` set; no other exception escapes `parse_config`.

Kept as WireGuard does: AllowedIPs with host bits set are masked (``10.0.0.1/24`` means ``10.0.0.0/24``, as
``wg show`` prints it); Address keeps its host bits (it is an interface address). Endpoint hosts may be
names; resolving them is the caller's job (``wg`` resolves at ``setconf`` time).

wg-quick-only keys netsim does not act on (Table, PreUp, PostUp, PreDown, PostDown, SaveConfig) are kept
verbatim in `InterfaceConfig.wg_quick_options` so a file round-trips; netsim never runs hook commands.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)

from netsim.core.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from netsim.errors import ConfigError

__all__ = [
    "Endpoint",
    "InterfaceConfig",
    "PeerConfig",
    "TunnelConfig",
    "parse_config",
    "parse_config_bytes",
    "parse_endpoint",
    "render_wg_quick",
    "to_wg_setconf",
]

IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

MIN_MTU_V4 = 68  # RFC 791: every IPv4 host must accept 68-octet datagrams unfragmented
MIN_MTU_V6 = 1280  # RFC 8200 §5: IPv6 links need an MTU of at least 1280
MAX_MTU = 65535

# A DNS name: labels of letters, digits, '-' and '_' (seen in search domains), 1-63 chars, 253 total (RFC 1035).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# wg-quick's own DNS split (wg-quick/linux.bash): digits-and-dots or anything with a colon is an address.
_LOOKS_LIKE_ADDRESS = re.compile(r"^[0-9.]+$|:")
_SCALAR_INTERFACE_KEYS = ("PrivateKey", "ListenPort", "FwMark", "MTU", "Table", "SaveConfig")
_LIST_INTERFACE_KEYS = ("Address", "DNS", "PreUp", "PostUp", "PreDown", "PostDown")
_WG_QUICK_OPTION_KEYS = ("Table", "SaveConfig", "PreUp", "PostUp", "PreDown", "PostDown")
_SCALAR_PEER_KEYS = ("PublicKey", "PresharedKey", "Endpoint", "PersistentKeepalive")
_LIST_PEER_KEYS = ("AllowedIPs",)
_CANONICAL = {
    k.lower(): k for k in (*_SCALAR_INTERFACE_KEYS, *_LIST_INTERFACE_KEYS, *_SCALAR_PEER_KEYS, *_LIST_PEER_KEYS)
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A peer's UDP endpoint: an IP literal or a host name, and a port (1-65535).

    ``str()`` gives the form ``wg`` reads and prints: ``host:port``, ``[v6]:port``.
    """

    host: str
    port: int

    @property
    def address(self) -> IPAddress | None:
        """The host as an IP address, or None when it is a name still to be resolved."""
        try:
            return ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """The ``[Interface]`` section.

    Attributes:
        private_key: the interface's static key.
        addresses: tunnel addresses with their prefix (wg-quick ``Address``), v4 and v6.
        dns_servers: resolver addresses (the IP entries of ``DNS``).
        dns_search: search domains (the name entries of ``DNS``).
        mtu: tunnel MTU, None to let the tool choose (wg-quick: route MTU minus 80).
        listen_port: UDP port, None for a random one.
        fwmark: socket mark for the tunnel's own packets, None for off.
        wg_quick_options: wg-quick hook and routing-table keys kept verbatim as (key, value), not acted on.
    """

    private_key: PrivateKey
    addresses: tuple[IPInterface, ...] = ()
    dns_servers: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()
    mtu: int | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    wg_quick_options: tuple[tuple[str, str], ...] = ()

    @property
    def public_key(self) -> PublicKey:
        """The interface's public key, what peers put in their ``[Peer] PublicKey``."""
        return self.private_key.public_key()


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One ``[Peer]`` section.

    Attributes:
        public_key: the peer's identity.
        preshared_key: optional symmetric key (None: WireGuard uses zeros).
        endpoint: where to send; None for a peer that only connects to us.
        allowed_ips: the crypto-routing prefixes (host bits masked, order kept).
        persistent_keepalive: seconds between keepalives through NATs, None for off.
    """

    public_key: PublicKey
    preshared_key: PresharedKey | None = None
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: int | None = None


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """A whole configuration file: one interface and its peers (order kept)."""

    interface: InterfaceConfig
    peers: tuple[PeerConfig, ...] = ()

    def peer(self, public_key: PublicKey) -> PeerConfig:
        """The peer with ``public_key``.

        Raises:
            KeyError: no such peer.
        """
        for p in self.peers:
            if p.public_key == public_key:
                return p
        raise KeyError(str(public_key))


# --- value parsers: each raises ConfigError(message) without a location; parse_config adds it ---------------


def _parse_int(value: str, what: str, lo: int, hi: int, hint: str = "") -> int:
    v = value.strip()
    # wg accepts decimal only for ports and keepalives (strtoul base 10); reject signs and other bases.
    if not v.isascii() or not v.isdigit():
        raise ConfigError(f"{what} must be an integer between {lo} and {hi}{hint}, got {value!r}")
    n = int(v)
    if not lo <= n <= hi:
        raise ConfigError(f"{what} must be between {lo} and {hi}{hint}, got {n}")
    return n


def _parse_off_or_int(value: str, what: str, hi: int) -> int | None:
    """``off`` or 0 mean off (wg's PersistentKeepalive and FwMark); FwMark may be hex (strtoul base 0)."""
    v = value.strip()
    if v.lower() == "off":
        return None
    if what == "FwMark" and v.lower().startswith("0x"):
        try:
            n = int(v, 16)
        except ValueError:
            raise ConfigError(f"FwMark must be 'off' or an integer up to {hi:#x}, got {value!r}") from None
        if n > hi:
            raise ConfigError(f"FwMark must be 'off' or an integer up to {hi:#x}, got {value!r}")
    else:
        n = _parse_int(v, what, 0, hi, " or 'off'")
    return n or None


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _parse_address(item: str) -> IPInterface:
    try:
        return ip_interface(item)
    except ValueError:
        raise ConfigError(
            f"Address entry {item!r} is not an IP address with an optional /prefix (e.g. 10.0.0.2/32, fd00::2/128)"
        ) from None


def _parse_allowed_ip(item: str) -> IPNetwork:
    try:
        return ip_network(item, strict=False)
    except ValueError:
        raise ConfigError(
            f"AllowedIPs entry {item!r} is not a CIDR prefix (e.g. 10.0.0.0/24, 0.0.0.0/0, ::/0)"
        ) from None


def _is_dns_name(s: str) -> bool:
    name = s[:-1] if s.endswith(".") else s
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _parse_dns(item: str) -> IPAddress | str:
    if _LOOKS_LIKE_ADDRESS.search(item):
        try:
            return ip_address(item)
        except ValueError:
            raise ConfigError(f"DNS entry {item!r} looks like an address but is not a valid IP address") from None
    if _is_dns_name(item):
        return item
    raise ConfigError(f"DNS entry {item!r} is neither an IP address nor a search domain name")


def parse_endpoint(value: str) -> Endpoint:
    """Parse ``host:port`` or ``[v6]:port`` as ``wg`` does (config.c ``parse_endpoint``).

    Raises:
        ConfigError: missing port, port out of range, unbracketed IPv6, or a malformed host.
    """
    v = value.strip()
    if v.startswith("["):
        close = v.find("]")
        if close < 0 or not v[close + 1 : close + 2] == ":":
            raise ConfigError(f"Endpoint {value!r} must look like [2001:db8::1]:51820")
        host, port_text = v[1:close], v[close + 2 :]
        try:
            is_v6 = ip_address(host).version == 6
        except ValueError:
            is_v6 = False
        if not is_v6:
            raise ConfigError(f"Endpoint {value!r}: brackets are for IPv6 addresses, got {host!r}") from None
    else:
        host, sep, port_text = v.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"Endpoint {value!r} must be host:port (e.g. 192.0.2.1:51820 or vpn.example:51820)")
        if ":" in host:
            raise ConfigError(f"Endpoint {value!r}: write an IPv6 endpoint in brackets, e.g. [{host}]:{port_text}")
        try:
            ip_address(host)
        except ValueError:
            if not _is_dns_name(host):
                raise ConfigError(f"Endpoint {value!r}: {host!r} is neither an IP address nor a host name") from None
    port = _parse_int(port_text, "Endpoint port", 1, 65535)
    return Endpoint(host, port)


# --- the parser --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Section:
    kind: str  # "Interface" or "Peer"
    line: int
    scalars: dict[str, tuple[str, int]] = field(default_factory=dict)  # canonical key -> (value, line)
    lists: dict[str, list[tuple[str, int]]] = field(default_factory=dict)


def _lex(text: str, source: str | None) -> list[_Section]:
    sections: list[_Section] = []
    text = text.removeprefix("\ufeff")
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            name = line.lower()
            if name == "[interface]":
                sections.append(_Section("Interface", lineno))
            elif name == "[peer]":
                sections.append(_Section("Peer", lineno))
            else:
                raise ConfigError(
                    f"unknown section {line!r}; expected [Interface] or [Peer]", source=source, line=lineno
                )
            continue
        key_text, sep, value = line.partition("=")
        key_text, value = key_text.strip(), value.strip()
        if not sep or not key_text:
            raise ConfigError(f"expected 'Key = Value' or a [Section], got {line!r}", source=source, line=lineno)
        if not sections:
            raise ConfigError(
                f"{key_text!r} is outside any section; put it under [Interface] or [Peer]", source=source, line=lineno
            )
        sec = sections[-1]
        key = _CANONICAL.get(key_text.lower(), "")
        allowed_scalars: tuple[str, ...]
        allowed_lists: tuple[str, ...]
        if sec.kind == "Interface":
            allowed_scalars, allowed_lists = _SCALAR_INTERFACE_KEYS, _LIST_INTERFACE_KEYS
        else:
            allowed_scalars, allowed_lists = _SCALAR_PEER_KEYS, _LIST_PEER_KEYS
        if key in allowed_lists:
            sec.lists.setdefault(key, []).append((value, lineno))
        elif key in allowed_scalars:
            if key in sec.scalars:
                first = sec.scalars[key][1]
                raise ConfigError(
                    f"{key} given twice in this [{sec.kind}] section (first on line {first}); keep one",
                    source=source,
                    line=lineno,
                )
            sec.scalars[key] = (value, lineno)
        else:
            valid = ", ".join((*allowed_scalars, *allowed_lists))
            raise ConfigError(
                f"unknown key {key_text!r} in [{sec.kind}]; valid keys are {valid}", source=source, line=lineno
            )
    return sections


@contextmanager
def _at(source: str | None, line: int) -> Iterator[None]:
    """Give a location-less ConfigError from a value parser the file and line it came from."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(str(exc), source=source, line=line) from None


def _interface(sec: _Section, source: str | None) -> InterfaceConfig:
    sc, ls = sec.scalars, sec.lists
    if "PrivateKey" not in sc:
        raise ConfigError(
            "[Interface] has no PrivateKey; add 'PrivateKey = <output of wg genkey>'", source=source, line=sec.line
        )
    addresses: list[IPInterface] = []
    dns_servers: list[IPAddress] = []
    dns_search: list[str] = []
    mtu: int | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    value, line = sc["PrivateKey"]
    with _at(source, line):
        private_key = PrivateKey.from_base64(value)
    if "ListenPort" in sc:
        value, line = sc["ListenPort"]
        with _at(source, line):
            listen_port = _parse_int(value, "ListenPort", 0, 65535, " (0 picks a random port)") or None
    if "FwMark" in sc:
        value, line = sc["FwMark"]
        with _at(source, line):
            fwmark = _parse_off_or_int(value, "FwMark", 0xFFFFFFFF)
    for value, line in ls.get("Address", []):
        with _at(source, line):
            addresses.extend(_parse_address(item) for item in _split_list(value))
    for value, line in ls.get("DNS", []):
        with _at(source, line):
            for item in _split_list(value):
                entry = _parse_dns(item)
                if isinstance(entry, str):
                    dns_search.append(entry)
                else:
                    dns_servers.append(entry)
    if "MTU" in sc:
        value, line = sc["MTU"]
        lo = MIN_MTU_V6 if any(a.version == 6 for a in addresses) else MIN_MTU_V4
        hint = " (IPv6 needs at least 1280, RFC 8200 §5)" if lo == MIN_MTU_V6 else ""
        with _at(source, line):
            mtu = _parse_int(value, "MTU", lo, MAX_MTU, hint)
    options: list[tuple[str, str]] = []
    for key in _WG_QUICK_OPTION_KEYS:
        if key in sc:
            options.append((key, sc[key][0]))
        options.extend((key, v) for v, _ in ls.get(key, []))
    return InterfaceConfig(
        private_key=private_key,
        addresses=tuple(addresses),
        dns_servers=tuple(dns_servers),
        dns_search=tuple(dns_search),
        mtu=mtu,
        listen_port=listen_port,
        fwmark=fwmark,
        wg_quick_options=tuple(options),
    )


def _peer(sec: _Section, source: str | None) -> PeerConfig:
    sc = sec.scalars
    if "PublicKey" not in sc:
        raise ConfigError(
            "[Peer] has no PublicKey; add 'PublicKey = <the peer's wg pubkey>'", source=source, line=sec.line
        )
    preshared_key: PresharedKey | None = None
    endpoint: Endpoint | None = None
    keepalive: int | None = None
    allowed: list[IPNetwork] = []
    value, line = sc["PublicKey"]
    with _at(source, line):
        public_key = PublicKey.from_base64(value)
    if "PresharedKey" in sc:
        value, line = sc["PresharedKey"]
        with _at(source, line):
            preshared_key = PresharedKey.from_base64(value)
    if "Endpoint" in sc:
        value, line = sc["Endpoint"]
        with _at(source, line):
            endpoint = parse_endpoint(value)
    if "PersistentKeepalive" in sc:
        value, line = sc["PersistentKeepalive"]
        with _at(source, line):
            keepalive = _parse_off_or_int(value, "PersistentKeepalive", 65535)
    for value, line in sec.lists.get("AllowedIPs", []):
        with _at(source, line):
            for item in _split_list(value):
                net = _parse_allowed_ip(item)
                if net not in allowed:
                    allowed.append(net)
    return PeerConfig(
        public_key=public_key,
        preshared_key=preshared_key,
        endpoint=endpoint,
        allowed_ips=tuple(allowed),
        persistent_keepalive=keepalive,
    )


def parse_config_bytes(data: bytes, *, source: str | None = None) -> TunnelConfig:
    """`parse_config` of a file's bytes: strict UTF-8 first (the caller reads the file; the core does no I/O).

    Raises:
        ConfigError: the bytes are not UTF-8, or the content is bad (the message names the line).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read the WireGuard config: {exc}", source=source) from None
    return parse_config(text, source=source)


def parse_config(text: str, *, source: str | None = None) -> TunnelConfig:
    """Parse a wg-quick style configuration.

    Args:
        text: the file's contents.
        source: a name for error messages (usually the file path).

    Raises:
        ConfigError: with ``.line`` set, saying what to fix. Nothing else is raised.
    """
    sections = _lex(text, source)
    interfaces = [s for s in sections if s.kind == "Interface"]
    if not interfaces:
        raise ConfigError(
            "no [Interface] section; a configuration needs one with at least a PrivateKey", source=source, line=None
        )
    if len(interfaces) > 1:
        raise ConfigError(
            f"second [Interface] section (the first is on line {interfaces[0].line}); merge them",
            source=source,
            line=interfaces[1].line,
        )
    iface = _interface(interfaces[0], source)
    own = iface.public_key
    peers: list[PeerConfig] = []
    seen: dict[PublicKey, int] = {}
    for sec in sections:
        if sec.kind != "Peer":
            continue
        peer = _peer(sec, source)
        key_line = sec.scalars["PublicKey"][1]
        if peer.public_key in seen:
            raise ConfigError(
                f"duplicate peer {peer.public_key} (also on line {seen[peer.public_key]}); merge the two [Peer] "
                "sections",
                source=source,
                line=key_line,
            )
        if peer.public_key == own:
            raise ConfigError(
                "this [Peer]'s PublicKey is the interface's own public key; use the other side's key",
                source=source,
                line=key_line,
            )
        seen[peer.public_key] = key_line
        peers.append(peer)
    return TunnelConfig(iface, tuple(peers))


# --- rendering ---------------------------------------------------------------------------------------------


def _render_peer(peer: PeerConfig) -> list[str]:
    lines = ["[Peer]", f"PublicKey = {peer.public_key.to_base64()}"]
    if peer.preshared_key is not None:
        lines.append(f"PresharedKey = {peer.preshared_key.to_base64()}")
    if peer.endpoint is not None:
        lines.append(f"Endpoint = {peer.endpoint}")
    if peer.allowed_ips:
        lines.append("AllowedIPs = " + ", ".join(str(n) for n in peer.allowed_ips))
    if peer.persistent_keepalive is not None:
        lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    return lines


def _render(config: TunnelConfig, *, wg_quick: bool) -> str:
    i = config.interface
    lines = ["[Interface]", f"PrivateKey = {i.private_key.to_base64()}"]
    if i.listen_port is not None:
        lines.append(f"ListenPort = {i.listen_port}")
    if i.fwmark is not None:
        lines.append(f"FwMark = {i.fwmark:#x}")
    if wg_quick:
        if i.addresses:
            lines.append("Address = " + ", ".join(str(a) for a in i.addresses))
        if i.dns_servers or i.dns_search:
            lines.append("DNS = " + ", ".join([*(str(a) for a in i.dns_servers), *i.dns_search]))
        if i.mtu is not None:
            lines.append(f"MTU = {i.mtu}")
        lines.extend(f"{k} = {v}" for k, v in i.wg_quick_options)
    for peer in config.peers:
        lines.append("")
        lines.extend(_render_peer(peer))
    return "\n".join(lines) + "\n"


def to_wg_setconf(config: TunnelConfig) -> str:
    """The subset ``wg setconf`` / ``wg syncconf`` accept: PrivateKey, ListenPort, FwMark and the peers.

    Address, DNS, MTU and the wg-quick hooks are left out; ``wg`` rejects them (``wg-quick strip`` does the
    same). The text contains the private key: pass it on stdin, do not write it to a world-readable file.
    """
    return _render(config, wg_quick=False)


def render_wg_quick(config: TunnelConfig) -> str:
    """A full wg-quick file; ``parse_config(render_wg_quick(c)) == c`` for every valid ``c``."""
    return _render(config, wg_quick=True)
