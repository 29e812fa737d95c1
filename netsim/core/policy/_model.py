"""The policy's data model: actions, mechanisms, rules, policies and verdicts (immutable, validated on creation).

Everything else in the package reads these types; none of them knows about compiling, parsing or DNS. The small
text helpers shared by the explain text and the parser's error messages live here too, so both say a rule's
ports and protocols the same way.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from netsim.core.policy._table import TypeTable
from netsim.errors import ConfigError

__all__ = [
    "DOMAIN_RE",
    "PORT_PROTOS",
    "PROTOCOLS",
    "PROTO_NAMES",
    "Action",
    "FlowFields",
    "Mechanism",
    "Network",
    "Policy",
    "Rule",
    "Verdict",
    "domain_matches",
    "ports_text",
    "proto_number",
    "protos_text",
    "short",
]

Network = IPv4Network | IPv6Network

#: Protocol names accepted in rules (IANA protocol numbers).
PROTOCOLS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}
PORT_PROTOS = frozenset({6, 17})
DOMAIN_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class Action(enum.IntEnum):
    """What to do with a packet."""

    TUNNEL = 0
    BYPASS = 1
    DROP = 2


class Mechanism(enum.Enum):
    """How BYPASS verdicts are carried out.

    ``ROUTE``: prefix-only BYPASS rules become ``excludedRoutes`` (Apple-supported; the kernel decides before the
    packet reaches the TUN). ``NAT``: the helper NATs BYPASS packets read from the TUN out of the physical
    interface (not a supported use on Apple, TN3120, but what teams try).
    """

    ROUTE = "route"
    NAT = "nat"


@dataclass(frozen=True)
class Rule:
    """One policy rule. All given conditions must hold; omitted ones match anything.

    Attributes:
        name: unique name, used in counters (``policy_drop:<name>``) and in explanations.
        action: what a match does.
        dst: destination prefixes (IPv4 and/or IPv6).
        domains: names (``host.example.test``, exact) or suffixes (``*.example.test``: any name strictly under
            example.test). Matched through learned DNS bindings. ``dst`` and ``domains`` are alternatives: the
            destination must satisfy one of them.
        protos: IANA protocol numbers (see :data:`PROTOCOLS`); ``None`` matches any protocol.
        ports: inclusive destination port ranges; empty matches any port *and* packets without ports. A rule
            with ports only matches TCP/UDP packets that carry a destination port (not ICMP, not non-first
            fragments).
    """

    name: str
    action: Action
    dst: tuple[Network, ...] = ()
    domains: tuple[str, ...] = ()
    protos: frozenset[int] | None = None
    ports: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        where = f"rule {self.name!r}"
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"{where}: name must be 1-64 characters of letters, digits, '_', '.', ':' or '-'")
        if not isinstance(self.action, Action):
            raise ConfigError(f"{where}: action must be an Action, got {self.action!r}")
        for net in self.dst:
            if not isinstance(net, IPv4Network | IPv6Network):
                raise ConfigError(f"{where}: dst entries must be IPv4Network/IPv6Network, got {net!r}")
        for dom in self.domains:
            if not DOMAIN_RE.match(dom) or len(dom) > 253:
                raise ConfigError(
                    f"{where}: domain {dom!r} is not a lower-case DNS name or '*.suffix' (e.g. '*.example.test')"
                )
        if self.protos is not None:
            if not self.protos:
                raise ConfigError(f"{where}: proto list is empty; omit it to match any protocol")
            for p in self.protos:
                if not 0 <= p <= 255:
                    raise ConfigError(f"{where}: protocol number {p} is outside 0-255")
        for lo, hi in self.ports:
            if not (0 <= lo <= hi <= 65535):
                raise ConfigError(f"{where}: port range {lo}-{hi} must satisfy 0 <= low <= high <= 65535")
        if self.ports and self.protos is not None and not self.protos <= PORT_PROTOS:
            bad = sorted(PROTO_NAMES.get(p, str(p)) for p in self.protos - PORT_PROTOS)
            raise ConfigError(f"{where}: ports apply only to tcp/udp, but proto includes {', '.join(bad)}")

    @property
    def matches_any_destination(self) -> bool:
        """True when the rule has neither ``dst`` nor ``domains``."""
        return not self.dst and not self.domains

    def describe(self) -> str:
        """One-line human description, e.g. ``bypass dst 10.0.0.0/8 proto tcp ports 443``."""
        parts = [self.action.name.lower()]
        parts += [text for describe in _DESCRIBE_FIELDS if (text := describe(self)) is not None]
        return " ".join(parts)


def ports_text(ports: Sequence[tuple[int, int]]) -> str:
    """``443,8000-8100``: port ranges as the rule files write them."""
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


def protos_text(protos: frozenset[int]) -> str:
    """``tcp,udp``: protocol numbers by name where they have one, in number order."""
    return ",".join(PROTO_NAMES.get(p, str(p)) for p in sorted(protos))


# Rule.describe: one formatter per condition, in the order the text names them (None: the rule has no such
# condition). A new rule condition adds its formatter here.
_DESCRIBE_FIELDS: tuple[Callable[[Rule], str | None], ...] = (
    lambda r: "dst " + ",".join(str(n) for n in r.dst) if r.dst else None,
    lambda r: "domain " + ",".join(r.domains) if r.domains else None,
    lambda r: "proto " + protos_text(r.protos) if r.protos is not None else None,
    lambda r: "ports " + ports_text(r.ports) if r.ports else None,
)


@dataclass(frozen=True)
class Policy:
    """An ordered rule list, the default action and the bypass mechanism it targets."""

    rules: tuple[Rule, ...] = ()
    default: Action = Action.TUNNEL
    mechanism: Mechanism = Mechanism.NAT

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ConfigError(
                    f"rule #{i} {rule.name!r}: name already used by rule #{seen[rule.name]}; names must be unique"
                )
            seen[rule.name] = i


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one packet.

    Attributes:
        action: TUNNEL, BYPASS or DROP.
        rule_index: index of the matching rule, -1 for the default.
        rule_name: the rule's name, ``"default"`` for the default.
        reason: counter name for the caller: ``policy_drop:<name>``, ``policy_bypass:<name>``,
            ``policy_tunnel:<name>`` (``<name>`` is ``default`` when no rule matched).
    """

    action: Action
    rule_index: int
    rule_name: str
    reason: str


@dataclass(frozen=True, slots=True)
class FlowFields:
    """The packet fields the policy looks at, for ``explain`` without a packet (the CLI)."""

    dst: IPv4Address | IPv6Address
    proto: int
    dport: int | None = None

    @classmethod
    def parse(cls, dst: str, proto: str | int = "tcp", dport: int | None = None) -> FlowFields:
        """Build from user strings (``"192.0.2.1"``, ``"tcp"``); raises ConfigError on bad input."""
        try:
            addr = ipaddress.ip_address(dst)
        except ValueError:
            raise ConfigError(f"--dst {dst!r} is not an IPv4 or IPv6 address") from None
        number = proto_number(proto, "--proto")
        if dport is not None and not 0 <= dport <= 65535:
            raise ConfigError(f"--dport {dport} is outside 0-65535")
        return cls(addr, number, dport)


def short(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` for error messages (the value may be any decoded leaf or a bounded container)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def domain_matches(pattern: str, name: str) -> bool:
    """``name`` matches ``pattern`` (an exact name, or ``*.suffix``: any name strictly under suffix)."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


# ------------------------------------------------------------------------------------------ protocol decoding
def _proto_from_int(proto: int, where: str) -> int | None:
    if 0 <= proto <= 255:
        return proto
    raise ConfigError(f"{where}: protocol number {proto} is outside 0-255")


def _proto_from_str(proto: str, where: str) -> int | None:
    key = proto.strip().lower()
    if key in PROTOCOLS:
        return PROTOCOLS[key]
    if key.isascii() and key.isdigit() and len(key) <= 3 and int(key) <= 255:
        return int(key)
    return None


def _proto_unknown(proto: object, where: str) -> int | None:
    return None


# A protocol is a number or a name; ``True`` is not protocol 1 (bool has its own entry, before int).
_PROTO_DECODERS: TypeTable[Callable[[Any, str], int | None]] = TypeTable(
    {bool: _proto_unknown, int: _proto_from_int, str: _proto_from_str}, default=_proto_unknown
)


def proto_number(proto: str | int, where: str) -> int:
    """The IANA number of ``proto`` (a name from :data:`PROTOCOLS`, a number, or a decimal string of one).

    Raises:
        ConfigError: naming ``where`` and the accepted names.
    """
    number = _PROTO_DECODERS(proto)(proto, where)
    if number is None:
        raise ConfigError(f"{where}: unknown protocol {short(proto)}; use one of {', '.join(PROTOCOLS)} or 'any'")
    return number
