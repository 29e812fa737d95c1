"""The kill switch's nftables ruleset (NEVPNProtocol.includeAllNetworks, enforced in the kernel): pure rendering.

Inputs are data (the TUN name prefix, the bypass fwmark, the local prefixes the runtime read from the physical
interfaces); the output is the text ``nft -f -`` loads, and a parser for what ``nft -j list counters`` prints.
No sockets, files or subprocesses here: `netsim.runtime.killswitch` loads it into a namespace.

The table (``table inet netsim_killswitch``, IPv4 and IPv6 alike) has an ``output`` and a ``forward`` chain,
both ``policy accept`` with explicit accepts and a final ``counter drop``, so nothing else in the namespace is
touched and deleting the table removes the block completely. Each rule has a named counter
(`KILLSWITCH_COUNTERS`), so a test can read what was accepted and what was dropped. In order:

* ``lo``: loopback (a local resolver on 127.0.0.53, the IPC sockets' TCP fallbacks).
* ``tunnel``: ``oifname "utun*"``: the provider's TUN (the configurator names it ``utun%d``).
* ``bypass``: ``meta mark 0x6e73`` (output only): the tunnel's own transport, the helper's and NAT-bypass
  sockets marked with ``BYPASS_FWMARK``: the analogue of Apple always exempting the provider's traffic to its
  VPN server ("communicates directly with the VPN server").
* ``dhcp4`` / ``dhcp6`` / ``nd``: network control plane Apple always exempts (DHCP; ICMPv6 router/neighbour
  discovery and MLD reports, without which IPv6 on the link stops working).
* ``local`` (only with ``exclude_local_networks``): the *private* connected prefixes of the physical interfaces
  (RFC 1918, 169.254/16, fe80::/10, fc00::/7) plus link-local multicast and the limited broadcast. A public
  prefix advertised as on-link is **not** exempted (TunnelCrack's LocalNet attack, docs/reliability.md K5):
  `split_local_prefixes` reports it as refused.
* ``drop``: everything else (``counter drop``; Apple drops, it does not reject).

Established connections get no exception: their packets are dropped too, as Apple drops the packets of TCP
connections that survive a reconnect.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

__all__ = [
    "KILLSWITCH_COUNTERS",
    "KILLSWITCH_TABLE",
    "PRIVATE_PREFIXES",
    "CounterValue",
    "KillSwitchConfig",
    "is_physical_interface",
    "parse_counters",
    "render_killswitch",
    "render_release",
    "split_local_prefixes",
]

KILLSWITCH_TABLE = "netsim_killswitch"
DEFAULT_BYPASS_FWMARK = 0x6E73  # netsim.runtime.netconfig.BYPASS_FWMARK (core does not import runtime)

#: Prefixes a connected network must lie inside to be exempted as "local" (excludeLocalNetworks).
PRIVATE_PREFIXES: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fc00::/7"),
)
#: Link-scope destinations that are part of the local network (mDNS, SSDP, broadcast) with excludeLocalNetworks.
_LOCAL_MULTICAST_V4 = ("224.0.0.0/24", "239.255.255.250/32", "255.255.255.255/32")
_LOCAL_MULTICAST_V6 = ("ff02::/16",)
_ND_TYPES = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report"

_CHAINS = ("out", "fwd")
_RULES = ("lo", "tunnel", "bypass", "dhcp4", "dhcp6", "nd", "local", "drop")
#: Every named counter the table declares: ``out_<rule>`` for the output chain, ``fwd_<rule>`` for forward.
KILLSWITCH_COUNTERS: tuple[str, ...] = tuple(
    f"{chain}_{rule}" for chain in _CHAINS for rule in _RULES if not (chain == "fwd" and rule == "bypass")
)
_MAX_COUNTERS_JSON = 1 << 20  # bounded parsing: nft's answer for this table is a few KiB


@dataclass(frozen=True)
class KillSwitchConfig:
    """What the kill switch allows besides the tunnel.

    Attributes:
        tun_prefix: interface name prefix of the provider's TUN (netsim's configurator: ``utun%d``).
        bypass_fwmark: the mark of the tunnel's own transport sockets (None: no exemption by mark).
        exclude_local_networks: NEVPNProtocol.excludeLocalNetworks: exempt `local_prefixes`.
        local_prefixes: the private connected prefixes to exempt (filter with `split_local_prefixes`); a prefix
            outside `PRIVATE_PREFIXES` is a ValueError, so a public on-link /24 can never be exempted.
        forward: also guard traffic routed through this namespace (the ``forward`` chain).
        table: the nft table name (``inet`` family).
    """

    tun_prefix: str = "utun"
    bypass_fwmark: int | None = DEFAULT_BYPASS_FWMARK
    exclude_local_networks: bool = False
    local_prefixes: tuple[str, ...] = ()
    forward: bool = True
    table: str = KILLSWITCH_TABLE

    def __post_init__(self) -> None:
        if not self.tun_prefix or not all(c.isalnum() or c in "-_." for c in self.tun_prefix):
            raise ValueError(f"tun_prefix must be a plain interface name prefix, got {self.tun_prefix!r}")
        if not self.table or not all(c.isalnum() or c == "_" for c in self.table):
            raise ValueError(f"table must be an nft identifier, got {self.table!r}")
        if self.bypass_fwmark is not None and not 0 < self.bypass_fwmark < 2**32:
            raise ValueError(f"bypass_fwmark must be a 32-bit non-zero mark, got {self.bypass_fwmark!r}")
        normalised = []
        for text in self.local_prefixes:
            net = ipaddress.ip_network(text, strict=False)
            if not _is_private(net):
                raise ValueError(f"{net} is not a private prefix; a public on-link prefix is never exempted (K5)")
            normalised.append(str(net))
        object.__setattr__(self, "local_prefixes", tuple(dict.fromkeys(normalised)))


def _is_private(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return any(net.version == p.version and net.subnet_of(p) for p in PRIVATE_PREFIXES)  # type: ignore[arg-type]


def is_physical_interface(ifname: str, *, tun_prefix: str = "utun", skip: Iterable[str] = ("lo",)) -> bool:
    """Whether ``ifname`` is a physical interface whose connected prefixes can be "local networks".

    Loopback and every tunnel interface (``tun_prefix*``) are not. Both readers of a namespace's addresses use it:
    the kill switch (`netsim.runtime.killswitch.connected_prefixes`, from ``ip -j addr``) and the tunnel's routes
    (`netsim.runtime.netconfig.KernelNetworkConfigurator`, from netlink), so the two sets cannot drift apart.
    """
    return ifname not in set(skip) and not ifname.startswith(tun_prefix)


def split_local_prefixes(connected: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split connected prefixes (``"192.168.1.10/24"`` or networks) into (private: exempt, public: refused).

    Host bits are cleared; duplicates are dropped; unparseable entries are refused as they are.
    """
    private: list[str] = []
    refused: list[str] = []
    for text in connected:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            refused.append(str(text))
            continue
        (private if _is_private(net) else refused).append(str(net))
    return tuple(dict.fromkeys(private)), tuple(dict.fromkeys(refused))


def _chain(config: KillSwitchConfig, chain: str, hook: str) -> list[str]:
    def rule(name: str, match: str, verdict: str = "accept") -> str:
        return f"\t\t{match} counter name {chain}_{name} {verdict}".replace("\t\t ", "\t\t")

    out = [f"\tchain {hook} {{", f"\t\ttype filter hook {hook} priority filter; policy accept;"]
    out.append(rule("lo", "oif lo" if chain == "out" else 'oifname "lo"'))
    out.append(rule("tunnel", f'oifname "{config.tun_prefix}*"'))
    if chain == "out" and config.bypass_fwmark is not None:
        out.append(rule("bypass", f"meta mark {config.bypass_fwmark:#x}"))
    out.append(rule("dhcp4", "udp sport 68 udp dport 67"))
    out.append(rule("dhcp6", "udp sport 546 udp dport 547"))
    out.append(rule("nd", f"icmpv6 type {{ {_ND_TYPES} }}"))
    if config.exclude_local_networks:
        v4 = [p for p in config.local_prefixes if ":" not in p] + list(_LOCAL_MULTICAST_V4)
        v6 = [p for p in config.local_prefixes if ":" in p] + list(_LOCAL_MULTICAST_V6)
        out.append(rule("local", f"ip daddr {{ {', '.join(v4)} }}"))
        out.append(rule("local", f"ip6 daddr {{ {', '.join(v6)} }}"))
    out.append(rule("drop", "", "drop"))
    out.append("\t}")
    return out


def render_killswitch(config: KillSwitchConfig) -> str:
    """The ``nft -f`` text that (re)creates the kill switch table atomically (counters start at zero)."""
    lines = [
        f"table inet {config.table} {{}}",  # so the delete below cannot fail on a fresh namespace
        f"delete table inet {config.table}",
        f"table inet {config.table} {{",
    ]
    chains = [c for c in _CHAINS if c == "out" or config.forward]
    for name in KILLSWITCH_COUNTERS:
        if name.split("_", 1)[0] in chains:
            lines.append(f"\tcounter {name} {{ }}")
    lines += _chain(config, "out", "output")
    if config.forward:
        lines += _chain(config, "fwd", "forward")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_release(table: str = KILLSWITCH_TABLE) -> str:
    """The ``nft -f`` text that removes the table whether or not it exists (idempotent release)."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


@dataclass(frozen=True)
class CounterValue:
    """One named counter: packets and bytes."""

    packets: int = 0
    bytes: int = 0


def parse_counters(text: str | bytes, table: str = KILLSWITCH_TABLE) -> dict[str, CounterValue]:
    """The named counters of ``table`` from ``nft -j list counters table inet <table>`` (bounded, never raises).

    Malformed or oversized input gives an empty dict; entries of other tables or with bad values are skipped.
    """
    if len(text) > _MAX_COUNTERS_JSON:
        return {}
    try:
        data: Any = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return {}
    items = data.get("nftables") if isinstance(data, Mapping) else None
    result: dict[str, CounterValue] = {}
    for item in items if isinstance(items, list) else []:
        counter = item.get("counter") if isinstance(item, Mapping) else None
        if not isinstance(counter, Mapping) or counter.get("table") != table:
            continue
        name, packets, nbytes = counter.get("name"), counter.get("packets"), counter.get("bytes")
        if isinstance(name, str) and _is_count(packets) and _is_count(nbytes):
            result[name] = CounterValue(packets, nbytes)
    return result


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
