"""The bypass policy: ordered rules -> a Verdict (TUNNEL, BYPASS or DROP) per packet, sans-IO.

Theory of operation
-------------------
A :class:`Policy` is an ordered tuple of :class:`Rule` plus a default action and the bypass *mechanism* it is
meant for. A rule matches a packet when all of its given conditions hold: the destination is in one of its
``dst`` prefixes **or** is an address a name matching one of its ``domains`` resolved to (both are destination
selectors; a rule with neither matches every destination), the transport protocol is one of ``protos``, and
the destination port is in one of the ``ports`` ranges. The first matching rule wins (as in an iptables chain;
note pf's default is the opposite, last match); no match gives the default.

:class:`PolicyEngine` compiles a policy once into a flattened range table per address family: the address space
is cut at every prefix boundary into disjoint intervals, and each interval holds the candidate rules (in rule
order) whose prefixes cover it. A lookup is one ``int.from_bytes``, one C ``bisect`` and a short scan of the
candidates for the first one whose protocol and port also match -- the cost does not grow with the number of
distinct prefix lengths as a per-length probe would. Domain rules are looked up through the learned DNS bindings
of the destination address (:class:`DnsBindings`), which survive :meth:`PolicyEngine.replace`.

Replacement is atomic: :meth:`PolicyEngine.replace` compiles the new table off to the side and then rebinds one
attribute, so every packet is classified by the complete old table or the complete new one.

``classify`` is the hot path (precomputed :class:`Verdict` objects, plain-int hit counters). ``explain`` is the
slow path: it walks the rules one by one and says, for each earlier rule, why it did not match.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
import re
import tomllib
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Any, Protocol

from netsim.core.dns import DNS_MAX_TTL, bindings_from_response, normalize_name, parse_dns_response_untrusted
from netsim.errors import BadPacket, ConfigError

if TYPE_CHECKING:
    from netsim.core.dnsguard import DnsGuard

__all__ = [
    "PROTOCOLS",
    "Action",
    "DnsBindings",
    "DnsBindingsStatistics",
    "Explanation",
    "FlowFields",
    "Mechanism",
    "Policy",
    "PolicyEngine",
    "PolicyStatistics",
    "RouteExclusion",
    "Rule",
    "Verdict",
    "excluded_routes_for",
    "parse_policy",
]

Network = IPv4Network | IPv6Network

#: Protocol names accepted in rules (IANA protocol numbers).
PROTOCOLS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
_PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}
_PORT_PROTOS = frozenset({6, 17})
_ANY_PROTO = (1 << 256) - 1
_SET_PORTS_MAX = 4096  # port lists spanning at most this many ports compile to a frozenset
_DOMAIN_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
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


class _PortRanges:
    """Membership test over sorted, merged port ranges (used when a set would be too large)."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.ranges = tuple(ranges)

    def __contains__(self, port: object) -> bool:
        return any(lo <= port <= hi for lo, hi in self.ranges)  # type: ignore[operator]


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


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
            if not _DOMAIN_RE.match(dom) or len(dom) > 253:
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
        if self.ports and self.protos is not None and not self.protos <= _PORT_PROTOS:
            bad = sorted(_PROTO_NAMES.get(p, str(p)) for p in self.protos - _PORT_PROTOS)
            raise ConfigError(f"{where}: ports apply only to tcp/udp, but proto includes {', '.join(bad)}")

    @property
    def matches_any_destination(self) -> bool:
        """True when the rule has neither ``dst`` nor ``domains``."""
        return not self.dst and not self.domains

    def describe(self) -> str:
        """One-line human description, e.g. ``bypass dst 10.0.0.0/8 proto tcp ports 443``."""
        parts = [self.action.name.lower()]
        if self.dst:
            parts.append("dst " + ",".join(str(n) for n in self.dst))
        if self.domains:
            parts.append("domain " + ",".join(self.domains))
        if self.protos is not None:
            parts.append("proto " + ",".join(_PROTO_NAMES.get(p, str(p)) for p in sorted(self.protos)))
        if self.ports:
            parts.append("ports " + _ports_text(self.ports))
        return " ".join(parts)


def _ports_text(ports: Sequence[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


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
        number = _proto_number(proto, "--proto")
        if dport is not None and not 0 <= dport <= 65535:
            raise ConfigError(f"--dport {dport} is outside 0-65535")
        return cls(addr, number, dport)


class _Fields:
    """A minimal stand-in for a PacketView (``classify_fields``)."""

    __slots__ = ("dport", "dst", "fragment_offset", "protocol")

    def __init__(self, dst: bytes, protocol: int, dport: int, fragment_offset: int) -> None:
        self.dst = dst
        self.protocol = protocol
        self.dport = dport
        self.fragment_offset = fragment_offset


class _PacketLike(Protocol):
    @property
    def dst(self) -> bytes: ...
    @property
    def protocol(self) -> int: ...
    @property
    def dport(self) -> int: ...
    @property
    def fragment_offset(self) -> int: ...


def _proto_number(proto: str | int, where: str) -> int:
    if isinstance(proto, int) and not isinstance(proto, bool):
        if 0 <= proto <= 255:
            return proto
        raise ConfigError(f"{where}: protocol number {proto} is outside 0-255")
    if isinstance(proto, str):
        key = proto.strip().lower()
        if key in PROTOCOLS:
            return PROTOCOLS[key]
        if key.isascii() and key.isdigit() and len(key) <= 3 and int(key) <= 255:
            return int(key)
    raise ConfigError(f"{where}: unknown protocol {_short(proto)}; use one of {', '.join(PROTOCOLS)} or 'any'")


# --------------------------------------------------------------------------------------------------- bindings


@dataclass(frozen=True)
class DnsBindingsStatistics:
    """Counters of the learned name -> address table."""

    bindings: int
    learned: int
    refreshed: int
    expired: int
    evicted: int
    responses: int
    bad_responses: int


class DnsBindings:
    """Learned ``address -> {name: expiry}`` bindings with TTL expiry (driven by ``now``) and a size cap.

    When full, the binding closest to expiry is evicted (it is the least valuable one left); likewise when one
    address collects more than ``max_names_per_address`` names (a shared CDN address), which bounds the names
    ``classify`` scans per packet. Expiry uses a heap
    with lazy deletion; the heap is rebuilt when stale entries outnumber live ones, so memory stays bounded.
    """

    def __init__(
        self,
        *,
        max_bindings: int = 65536,
        min_ttl: float = 30.0,
        max_ttl: float = DNS_MAX_TTL,
        max_names_per_address: int = 32,
    ) -> None:
        if max_bindings < 1 or max_names_per_address < 1:
            raise ConfigError(
                f"max_bindings and max_names_per_address must be >= 1, got {max_bindings}, {max_names_per_address}"
            )
        self.max_names_per_address = max_names_per_address
        if not 0 <= min_ttl <= max_ttl:
            raise ConfigError(f"need 0 <= min_ttl <= max_ttl, got {min_ttl}, {max_ttl}")
        self.max_bindings = max_bindings
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._by_addr: dict[bytes, dict[str, float]] = {}
        self._heap: list[tuple[float, bytes, str]] = []
        self._count = 0
        self._learned = self._refreshed = self._expired = self._evicted = 0
        self.responses = 0
        self.bad_responses = 0

    def __len__(self) -> int:
        return self._count

    def get(self, addr: bytes) -> dict[str, float] | None:
        """The ``{name: expiry}`` map for ``addr`` (may hold expired entries; compare with ``now``)."""
        return self._by_addr.get(addr)

    def names_for(self, addr: bytes, now: float) -> list[str]:
        """Live names bound to ``addr``."""
        names = self._by_addr.get(bytes(addr))
        return sorted(n for n, exp in names.items() if exp > now) if names else []

    def learn(self, name: str, addr: bytes, ttl: float, now: float) -> None:
        """Bind ``name`` to ``addr`` until ``now + ttl`` (clamped to ``[min_ttl, max_ttl]``).

        The floor keeps a binding alive long enough for the app that asked to connect: a TTL of 0 is common
        for CDN names and would otherwise expire before the first SYN.
        """
        expiry = now + min(max(ttl, self.min_ttl), self.max_ttl)
        name = normalize_name(name)
        names = self._by_addr.get(addr)
        if names is None:
            names = self._by_addr[addr] = {}
        old = names.get(name)
        if old is not None:
            if expiry <= old:
                return
            self._refreshed += 1
        else:
            self.expire(now)
            if self._count >= self.max_bindings:
                self._evict_one()
            names = self._by_addr.setdefault(addr, names)
            if len(names) >= self.max_names_per_address:
                # A shared CDN address can collect many names; classify scans them, so cap the scan.
                victim = min(names, key=names.__getitem__)
                del names[victim]  # its heap entry goes stale and is skipped
                self._count -= 1
                self._evicted += 1
            self._count += 1
            self._learned += 1
        names[name] = expiry
        heapq.heappush(self._heap, (expiry, addr, name))
        if len(self._heap) > 2 * self._count + 64:
            self._heap = [(exp, a, n) for a, ns in self._by_addr.items() for n, exp in ns.items()]
            heapq.heapify(self._heap)

    def _pop_live(self) -> tuple[float, bytes, str] | None:
        """Pop heap entries until one matches a live binding; return it (already removed from the map)."""
        heap = self._heap
        while heap:
            exp, addr, name = heapq.heappop(heap)
            names = self._by_addr.get(addr)
            if names is not None and names.get(name) == exp:
                del names[name]
                if not names:
                    del self._by_addr[addr]
                self._count -= 1
                return exp, addr, name
        return None

    def _evict_one(self) -> None:
        if self._pop_live() is not None:
            self._evicted += 1

    def expire(self, now: float) -> int:
        """Drop bindings whose expiry is at or before ``now``; return how many."""
        n = 0
        heap = self._heap
        by_addr = self._by_addr
        while heap and heap[0][0] <= now:
            exp, addr, name = heapq.heappop(heap)
            names = by_addr.get(addr)
            if names is not None and names.get(name) == exp:  # else superseded by a refresh or evicted
                del names[name]
                if not names:
                    del by_addr[addr]
                n += 1
        self._count -= n
        self._expired += n
        return n

    def statistics(self) -> DnsBindingsStatistics:
        """Current counters."""
        return DnsBindingsStatistics(
            bindings=self._count,
            learned=self._learned,
            refreshed=self._refreshed,
            expired=self._expired,
            evicted=self._evicted,
            responses=self.responses,
            bad_responses=self.bad_responses,
        )


# --------------------------------------------------------------------------------------------------- compiled

_Cand = tuple[int, int, "frozenset[int] | _PortRanges | None"]  # (rule index, protocol bitmask, ports)


def _compile_ports(ports: tuple[tuple[int, int], ...]) -> frozenset[int] | _PortRanges | None:
    if not ports:
        return None
    merged = _merge_ranges(ports)
    if sum(hi - lo + 1 for lo, hi in merged) <= _SET_PORTS_MAX:
        return frozenset(p for lo, hi in merged for p in range(lo, hi + 1))
    return _PortRanges(merged)


def _range_table(entries: list[tuple[int, int, _Cand]], bits: int) -> tuple[list[int], list[tuple[_Cand, ...]]]:
    """Flatten ``(start, end_exclusive, candidate)`` entries into disjoint intervals with ordered candidates."""
    top = 1 << bits
    events: dict[int, tuple[list[_Cand], list[_Cand]]] = {0: ([], [])}
    for start, end, cand in entries:
        events.setdefault(start, ([], []))[0].append(cand)
        if end < top:
            events.setdefault(end, ([], []))[1].append(cand)
    bounds: list[int] = []
    cands: list[tuple[_Cand, ...]] = []
    interned: dict[tuple[_Cand, ...], tuple[_Cand, ...]] = {}
    active: dict[int, tuple[_Cand, int]] = {}  # id -> (cand, multiplicity)
    for point in sorted(events):
        adds, removes = events[point]
        for c in removes:
            key = id(c)
            cand, k = active[key]
            if k == 1:
                del active[key]
            else:
                active[key] = (cand, k - 1)
        for c in adds:
            key = id(c)
            prev = active.get(key)
            active[key] = (c, prev[1] + 1 if prev else 1)
        snap = tuple(sorted((c for c, _k in active.values()), key=lambda c: c[0]))
        snap = interned.setdefault(snap, snap)
        if cands and cands[-1] is snap:
            continue
        bounds.append(point)
        cands.append(snap)
    return bounds, cands


class _Compiled:
    """An immutable compiled policy plus its own hit counters (replaced as one reference)."""

    __slots__ = (
        "default_verdict",
        "domain_cands",
        "exact",
        "has_domains",
        "hits",
        "name_cache",
        "policy",
        "suffix",
        "v4_bounds",
        "v4_cands",
        "v6_bounds",
        "v6_cands",
        "verdicts",
    )

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        rules = policy.rules
        self.verdicts = tuple(
            Verdict(r.action, i, r.name, f"policy_{r.action.name.lower()}:{r.name}") for i, r in enumerate(rules)
        )
        self.default_verdict = Verdict(policy.default, -1, "default", f"policy_{policy.default.name.lower()}:default")
        self.hits = [0] * (len(rules) + 1)  # last slot: default
        v4: list[tuple[int, int, _Cand]] = []
        v6: list[tuple[int, int, _Cand]] = []
        self.domain_cands: dict[int, _Cand] = {}
        self.exact: dict[str, list[int]] = {}
        self.suffix: dict[str, list[int]] = {}
        for i, r in enumerate(rules):
            mask = _ANY_PROTO if r.protos is None else sum(1 << p for p in r.protos)
            if r.ports and r.protos is None:
                mask = sum(1 << p for p in _PORT_PROTOS)
            cand: _Cand = (i, mask, _compile_ports(r.ports))
            nets: Sequence[Network] = r.dst
            if r.matches_any_destination:
                nets = (IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))
            for net in nets:
                start = int(net.network_address)
                entry = (start, start + net.num_addresses, cand)
                (v4 if net.version == 4 else v6).append(entry)
            if r.domains:
                self.domain_cands[i] = cand
                for dom in r.domains:
                    if dom.startswith("*."):
                        self.suffix.setdefault(dom[2:], []).append(i)
                    else:
                        self.exact.setdefault(dom, []).append(i)
        self.v4_bounds, self.v4_cands = _range_table(v4, 32)
        self.v6_bounds, self.v6_cands = _range_table(v6, 128)
        self.has_domains = bool(self.domain_cands)
        self.name_cache: dict[str, tuple[int, ...]] = {}

    def domain_rules_for(self, name: str) -> tuple[int, ...]:
        """Indices (ascending) of the domain rules whose patterns match ``name``."""
        hit = self.name_cache.get(name)
        if hit is not None:
            return hit
        found = set(self.exact.get(name, ()))
        rest = name
        while True:
            dot = rest.find(".")
            if dot < 0:
                break
            rest = rest[dot + 1 :]
            found.update(self.suffix.get(rest, ()))
        out = tuple(sorted(found))
        if len(self.name_cache) >= 4096:
            self.name_cache.clear()
        self.name_cache[name] = out
        return out


# --------------------------------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class PolicyStatistics:
    """Counters of a :class:`PolicyEngine`.

    ``rule_hits`` are per rule of the *current* policy (reset by ``replace``), as ``(name, hits)``.
    """

    classified: int
    by_action: tuple[tuple[str, int], ...]
    rule_hits: tuple[tuple[str, int], ...]
    default_hits: int
    replacements: int
    dns: DnsBindingsStatistics


@dataclass(frozen=True)
class Explanation:
    """Why a packet gets its verdict.

    Attributes:
        verdict: the same verdict ``classify`` returns.
        rule: the matching rule, ``None`` for the default.
        why: how the matching rule (or the default) applies.
        skipped: ``(index, name, why not)`` for each earlier rule that did not match, in order.
        names: live DNS names bound to the destination.
    """

    verdict: Verdict
    rule: Rule | None
    why: str
    skipped: tuple[tuple[int, str, str], ...]
    names: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        lines = [f"{self.verdict.action.name}: {self.why}"]
        lines += [f"  rule #{i} {name!r} did not match: {why}" for i, name, why in self.skipped]
        return "\n".join(lines)


class PolicyEngine:
    """Classifies packets against a :class:`Policy`; learns DNS bindings for domain rules.

    Args:
        policy: initial policy (default: no rules, tunnel everything).
        max_bindings, min_ttl, max_ttl: see :class:`DnsBindings`.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        max_bindings: int = 65536,
        min_ttl: float = 30.0,
        max_ttl: float = DNS_MAX_TTL,
    ) -> None:
        self._c = _Compiled(policy or Policy())
        self.bindings = DnsBindings(max_bindings=max_bindings, min_ttl=min_ttl, max_ttl=max_ttl)
        self._replacements = 0
        self._names_by_addr = self.bindings._by_addr  # the same dict for the engine's lifetime
        self._retired = [0, 0, 0]  # per-action hits of replaced policies

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._c.policy

    def route_exclusion(self, now: float) -> RouteExclusion:
        """`excluded_routes_for` the policy in force, with the live DNS bindings of its BYPASS domain rules.

        What the route mechanism can exclude right now: prefix rules, plus one host route per address a bypassed
        name resolved to (bindings that expired are left out). Cost: one pass over the bindings; call it when a
        DNS answer taught something, not per packet.
        """
        policy = self._c.policy
        patterns = [p for r in policy.rules if r.action is Action.BYPASS for p in r.domains]
        if not patterns:
            return excluded_routes_for(policy)
        learned: dict[str, list[IPv4Address | IPv6Address]] = {}
        for addr, names in self._names_by_addr.items():
            for name, expiry in names.items():
                if expiry > now and any(_domain_matches(p, name) for p in patterns):
                    learned.setdefault(name, []).append(ipaddress.ip_address(addr))
        return excluded_routes_for(policy, learned)

    @property
    def has_domain_rules(self) -> bool:
        """True when the policy in force has a domain rule (so DNS answers are worth learning)."""
        return self._c.has_domains

    def replace(self, policy: Policy | Sequence[Rule]) -> None:
        """Atomically switch to ``policy`` (or to new rules keeping the default and mechanism).

        The new table is compiled completely before one reference is swapped, so every packet sees the old or
        the new rules, never neither; a compile error leaves the old policy in force. Learned DNS bindings are
        kept, so domain rules in the new policy apply at once.
        """
        if not isinstance(policy, Policy):
            policy = Policy(tuple(policy), self._c.policy.default, self._c.policy.mechanism)
        compiled = _Compiled(policy)
        for action, hits in self._action_hits(self._c).items():
            self._retired[action] += hits
        self._c = compiled
        self._replacements += 1

    # ---------------------------------------------------------------------------------------------- hot path

    def classify(self, view: _PacketLike, now: float) -> Verdict:
        """Hot path: the verdict for a parsed :class:`~netsim.core.packet.PacketView`.

        A non-first fragment carries no ports (PacketView reports 0), so it matches only rules without ports.
        The hit counter of the returned verdict's rule is incremented.
        """
        c = self._c
        dst = view.dst
        proto = view.protocol
        dport = None if view.fragment_offset else view.dport
        if len(dst) == 4:
            cands = c.v4_cands[bisect_right(c.v4_bounds, int.from_bytes(dst, "big")) - 1]
        else:
            cands = c.v6_cands[bisect_right(c.v6_bounds, int.from_bytes(dst, "big")) - 1]
        best = -1
        for idx, pmask, ports in cands:
            if pmask >> proto & 1 and (ports is None or (dport is not None and dport in ports)):
                best = idx
                break
        if c.has_domains:
            names = self._names_by_addr.get(dst)
            if names:
                for name, expiry in names.items():
                    if expiry <= now:
                        continue
                    for idx in c.domain_rules_for(name):
                        if best >= 0 and idx >= best:
                            break
                        _, pmask, ports = c.domain_cands[idx]
                        if pmask >> proto & 1 and (ports is None or (dport is not None and dport in ports)):
                            best = idx
                            break
        c.hits[best] += 1  # -1 is the default's slot
        return c.verdicts[best] if best >= 0 else c.default_verdict

    def classify_fields(self, dst: bytes, proto: int, dport: int | None, now: float) -> Verdict:
        """The verdict for raw fields: ``dst`` is 4 or 16 address bytes, ``dport`` None when absent."""
        return self.classify(_Fields(bytes(dst), proto, dport or 0, 1 if dport is None else 0), now)

    # ---------------------------------------------------------------------------------------------- dns

    def learn_dns_response_untrusted(
        self,
        payload: bytes | bytearray | memoryview,
        now: float,
        *,
        guard: DnsGuard | None = None,
        resolver: bytes = b"",
        client: bytes = b"",
        client_port: int = 0,
    ) -> int:
        """Learn name -> address bindings from one DNS response message; return how many were (re)learned.

        With ``guard`` (what the helper does), only an answer to a query the guard recorded teaches anything:
        ``resolver`` is the answer's source address, ``client``/``client_port`` its destination
        (`netsim.core.dnsguard.DnsGuard.accept_response_untrusted` screens it and counts refusals). Without it
        the message is trusted as is: for tools and tests that feed answers they obtained themselves.

        Raises:
            BadPacket: malformed message (also counted in ``statistics().dns.bad_responses``).
        """
        self.bindings.responses += 1
        learned: Sequence[tuple[str, bytes, float]]
        try:
            if guard is not None:
                learned = guard.accept_response_untrusted(resolver, client, client_port, payload, now)
            else:
                learned = bindings_from_response(parse_dns_response_untrusted(payload))
        except BadPacket:
            self.bindings.bad_responses += 1
            raise
        for name, addr, ttl in learned:
            self.bindings.learn(name, addr, ttl, now)
        return len(learned)

    def learn_binding(self, name: str, address: IPv4Address | IPv6Address | str, ttl: float, now: float) -> None:
        """Bind a name to an address directly (static hosts entries, tests)."""
        self.bindings.learn(name, ipaddress.ip_address(address).packed, ttl, now)

    def expire(self, now: float) -> int:
        """Drop expired DNS bindings (call from a timer; lookups ignore expired ones anyway)."""
        return self.bindings.expire(now)

    # ---------------------------------------------------------------------------------------------- slow path

    def explain(self, packet: _PacketLike | FlowFields, now: float) -> Explanation:
        """Slow path: the verdict plus why, rule by rule. Agrees with :meth:`classify` (tested)."""
        if isinstance(packet, FlowFields):
            addr = packet.dst
            proto, dport = packet.proto, packet.dport
        else:
            addr = ipaddress.ip_address(bytes(packet.dst))
            proto = packet.protocol
            dport = None if packet.fragment_offset or proto not in _PORT_PROTOS else packet.dport
        policy = self._c.policy
        names = tuple(self.bindings.names_for(addr.packed, now))
        skipped: list[tuple[int, str, str]] = []
        pname = _PROTO_NAMES.get(proto, str(proto))
        for i, rule in enumerate(policy.rules):
            why_not = _why_not(rule, addr, proto, dport, names)
            if why_not is None:
                why = f"rule #{i} {rule.name!r} ({rule.describe()}) matches {addr} {pname}"
                if dport is not None:
                    why += f" port {dport}"
                if rule.domains and not any(addr in net for net in rule.dst):
                    via = [n for n in names if any(_domain_matches(p, n) for p in rule.domains)]
                    why += f" (DNS: {', '.join(via)} -> {addr})"
                verdict = self._c.verdicts[i]
                return Explanation(verdict, rule, why, tuple(skipped), names)
            skipped.append((i, rule.name, why_not))
        why = f"no rule matched {addr} {pname}; default action {policy.default.name.lower()}"
        return Explanation(self._c.default_verdict, None, why, tuple(skipped), names)

    @staticmethod
    def _action_hits(c: _Compiled) -> dict[Action, int]:
        out: dict[Action, int] = {}
        for verdict, hits in zip((*c.verdicts, c.default_verdict), c.hits, strict=True):
            out[verdict.action] = out.get(verdict.action, 0) + hits
        return out

    def statistics(self) -> PolicyStatistics:
        """Current counters."""
        c = self._c
        live = self._action_hits(c)
        return PolicyStatistics(
            classified=sum(self._retired) + sum(c.hits),
            by_action=tuple((a.name.lower(), self._retired[a] + live.get(a, 0)) for a in Action),
            rule_hits=tuple((r.name, c.hits[i]) for i, r in enumerate(c.policy.rules)),
            default_hits=c.hits[-1],
            replacements=self._replacements,
            dns=self.bindings.statistics(),
        )


def _domain_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def _why_not(
    rule: Rule, addr: IPv4Address | IPv6Address, proto: int, dport: int | None, names: tuple[str, ...]
) -> str | None:
    """Why ``rule`` does not match, or None if it does (the reference semantics, also used as an oracle)."""
    if not rule.matches_any_destination:
        in_dst = any(addr in net for net in rule.dst)
        in_dom = any(_domain_matches(p, n) for p in rule.domains for n in names)
        if not (in_dst or in_dom):
            parts = []
            if rule.dst:
                parts.append(f"{addr} not in {', '.join(str(n) for n in rule.dst)}")
            if rule.domains:
                bound = ", ".join(names) if names else "none"
                parts.append(f"no live DNS binding of {addr} matches {', '.join(rule.domains)} (bound: {bound})")
            return "; ".join(parts)
    if rule.ports and rule.protos is None and proto not in _PORT_PROTOS:
        return f"ports {_ports_text(rule.ports)} need tcp/udp, packet is {_PROTO_NAMES.get(proto, str(proto))}"
    if rule.protos is not None and proto not in rule.protos:
        want = ",".join(_PROTO_NAMES.get(p, str(p)) for p in sorted(rule.protos))
        return f"protocol {_PROTO_NAMES.get(proto, str(proto))} not in {want}"
    if rule.ports:
        if dport is None:
            return f"packet has no destination port (rule needs {_ports_text(rule.ports)})"
        if not any(lo <= dport <= hi for lo, hi in rule.ports):
            return f"port {dport} not in {_ports_text(rule.ports)}"
    return None


# --------------------------------------------------------------------------------------------------- mechanisms


@dataclass(frozen=True)
class RouteExclusion:
    """What the ``route`` mechanism can do with a policy.

    Attributes:
        routes: prefixes to put in ``excludedRoutes`` (the kernel sends them out of the physical interface).
        unsupported: ``(rule index, rule name, why)`` for BYPASS behaviour routes cannot express; those packets
            reach the tunnel provider and are tunnelled (or dropped by DROP rules) instead.
    """

    routes: tuple[Network, ...]
    unsupported: tuple[tuple[int, str, str], ...]


def _subtract(nets: list[Network], hole: Network) -> list[Network]:
    out: list[Network] = []
    for net in nets:
        if net.version != hole.version or not net.overlaps(hole):
            out.append(net)
        elif hole.supernet_of(net):  # type: ignore[arg-type]
            continue
        else:
            out.extend(net.address_exclude(hole))  # type: ignore[arg-type]
    return out


def excluded_routes_for(
    policy: Policy, learned: Mapping[str, Iterable[IPv4Address | IPv6Address]] | None = None
) -> RouteExclusion:
    """Compile the prefix-only BYPASS rules of ``policy`` to excluded routes, and list what cannot be compiled.

    A route sees only the destination address, before any rule order applies. So a BYPASS rule compiles only
    if it has ``dst`` and no ``proto``/``ports``/``domains``, and only the parts of its prefixes that no earlier
    TUNNEL/DROP rule could claim (those are cut out; an earlier rule matching any destination or by domain
    blocks it entirely, since its addresses are unknown in advance). A default of BYPASS cannot be expressed
    with excluded routes (use included routes for the tunnelled prefixes instead).

    With ``learned`` (live DNS bindings: name -> addresses, see `PolicyEngine.route_exclusion`), a BYPASS rule
    with domains and no ``proto``/``ports`` also compiles: each address a matching name resolved to becomes a
    host route, cut by earlier rules exactly like a ``dst`` prefix.
    """
    routes: list[Network] = []
    unsupported: list[tuple[int, str, str]] = []
    earlier: list[Rule] = []
    for i, rule in enumerate(policy.rules):
        if rule.action is Action.BYPASS:
            reasons = []
            if rule.domains and learned is None:
                reasons.append("domain rules need the addresses learned from DNS at run time")
            if rule.protos is not None:
                reasons.append("a route cannot select by protocol")
            if rule.ports:
                reasons.append("a route cannot select by port")
            if rule.matches_any_destination:
                reasons.append("no dst prefix (a route needs one; bypassing everything is not an exclusion)")
            if reasons:
                unsupported.append((i, rule.name, "; ".join(reasons)))
            else:
                nets = list(rule.dst)
                if rule.domains and learned is not None:
                    hosts = {
                        ipaddress.ip_network(addr)
                        for name, addrs in learned.items()
                        if any(_domain_matches(p, name) for p in rule.domains)
                        for addr in addrs
                    }
                    nets += sorted(hosts - set(nets), key=lambda n: (n.version, n))
                blocked = None
                for j, prev in enumerate(earlier):
                    if prev.action is Action.BYPASS:
                        continue
                    if prev.matches_any_destination or prev.domains:
                        blocked = f"earlier rule #{j} {prev.name!r} may claim any address of it"
                        break
                    cut = [n for n in nets if any(n.overlaps(h) for h in prev.dst if h.version == n.version)]
                    for hole in prev.dst:
                        nets = _subtract(nets, hole)
                    if cut:
                        unsupported.append(
                            (i, rule.name, f"parts overlapping earlier rule #{j} {prev.name!r} stay in the tunnel")
                        )
                if blocked:
                    unsupported.append((i, rule.name, blocked))
                else:
                    routes.extend(nets)
        earlier.append(rule)
    if policy.default is Action.BYPASS:
        unsupported.append((-1, "default", "default bypass cannot be an excluded route; include tunnel prefixes"))
    collapsed: list[Network] = [
        *ipaddress.collapse_addresses(n for n in routes if n.version == 4),
        *ipaddress.collapse_addresses(n for n in routes if n.version == 6),
    ]
    return RouteExclusion(tuple(collapsed), tuple(unsupported))


# --------------------------------------------------------------------------------------------------- parsing


def _as_list(value: Any, where: str, what: str) -> list[Any]:
    if isinstance(value, str | int):
        return [value]
    if isinstance(value, list | tuple):
        return list(value)
    raise ConfigError(f"{where}: '{what}' must be a string or a list of strings, got {type(value).__name__}")


def _parse_action(value: Any, where: str) -> Action:
    if isinstance(value, str) and value.strip().upper() in Action.__members__:
        return Action[value.strip().upper()]
    raise ConfigError(f"{where}: action must be one of 'tunnel', 'bypass', 'drop', got {_short(value)}")


def _parse_port(text: str, where: str) -> tuple[int, int]:
    lo_s, sep, hi_s = text.strip().partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
    except ValueError:
        raise ConfigError(
            f"{where}: port {_short(text)} must be 'N' or 'LOW-HIGH' (e.g. '443' or '8000-8100')"
        ) from None
    if not 0 <= lo <= hi <= 65535:
        raise ConfigError(f"{where}: port range {_short(text)} must satisfy 0 <= LOW <= HIGH <= 65535")
    return lo, hi


_RULE_KEYS = frozenset({"name", "action", "dst", "domain", "proto", "ports"})
_TOP_KEYS = frozenset({"default", "mechanism", "rule"})


def _parse_rule(i: int, raw: Any, source: str | None) -> Rule:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"rule #{i}: must be a table/mapping, got {type(raw).__name__}", source=source)
    name = raw.get("name", f"rule{i}")
    where = f"rule #{i} {_short(name)}"
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_RULE_KEYS))}",
            source=source,
        )
    if "action" not in raw:
        raise ConfigError(f"{where}: missing 'action' (tunnel, bypass or drop)", source=source)
    try:
        return _rule_fields(raw, str(name), where)
    except ConfigError as exc:
        if source is not None and exc.source is None:
            raise ConfigError(str(exc), source=source) from None
        raise


def _rule_fields(raw: Mapping[str, Any], name: str, where: str) -> Rule:
    action = _parse_action(raw["action"], where)
    dst: list[Network] = []
    for text in _as_list(raw.get("dst", []), where, "dst"):
        try:
            dst.append(ipaddress.ip_network(str(text).strip(), strict=True))
        except ValueError as exc:
            raise ConfigError(
                f"{where}: dst {_short(text)} is not a prefix with no host bits set ({exc}), e.g. '192.168.1.0/24'"
            ) from None
    domains: list[str] = []
    for text in _as_list(raw.get("domain", []), where, "domain"):
        dom = normalize_name(str(text).strip())
        if not _DOMAIN_RE.match(dom):
            raise ConfigError(
                f"{where}: domain {_short(text)} must be a DNS name or '*.suffix' (e.g. '*.example.test')"
            )
        domains.append(dom)
    protos: frozenset[int] | None = None
    if "proto" in raw:
        items = _as_list(raw["proto"], where, "proto")
        if not any(isinstance(p, str) and p.strip().lower() == "any" for p in items):
            protos = frozenset(_proto_number(p, f"{where}: proto") for p in items)
    ports = tuple(_parse_port(str(p), f"{where}: ports") for p in _as_list(raw.get("ports", []), where, "ports"))
    if ports and protos is not None and not protos <= _PORT_PROTOS:
        raise ConfigError(f"{where}: 'ports' needs proto tcp and/or udp (or omit proto), got proto={raw['proto']!r}")
    return Rule(name, action, tuple(dst), tuple(domains), protos, ports)


#: Bounds on untrusted policy documents (a POLICY_UPDATE arrives over IPC): checked before and while decoding,
#: so no input can exhaust the stack or memory of the process parsing it (docs/policy.md, "Parser guarantees").
MAX_POLICY_BYTES = 1 << 20
MAX_POLICY_DEPTH = 32
MAX_POLICY_NODES = 200_000
MAX_POLICY_RULES = 10_000
_MAX_INT = 1 << 64
_CONTAINERS = (Mapping, list, tuple, set, frozenset)


def _short(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` for error messages (the value may be any decoded leaf or a bounded container)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def parse_policy(
    text_or_mapping: str | bytes | bytearray | memoryview | Mapping[str, Any],
    *,
    fmt: str | None = None,
    source: str | None = None,
) -> Policy:
    """Parse a policy from TOML or YAML text (or UTF-8 bytes), or from an already decoded mapping.

    Untrusted input is fine: whatever the input (any bytes, bad encodings, non-string or date keys, deep nesting,
    YAML aliases, huge documents), the only exception is `ConfigError` (a hypothesis test over arbitrary TOML
    and YAML documents checks it). Documents are limited to `MAX_POLICY_BYTES` bytes, `MAX_POLICY_DEPTH` levels
    of nesting, `MAX_POLICY_NODES` values and `MAX_POLICY_RULES` rules; YAML aliases are refused (an alias
    expansion, the "billion laughs", is the classic way to make a small document huge).

    Args:
        text_or_mapping: file contents or a mapping with ``default``, ``mechanism`` and ``rule`` (a list).
        fmt: ``"toml"`` or ``"yaml"``; when None, TOML is tried first, then YAML.
        source: file name for error messages.

    Raises:
        ConfigError: naming the rule (index and name), the field and what to fix.
    """
    try:
        return _parse_policy(text_or_mapping, fmt, source)
    except ConfigError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # Safety net for the contract above; reaching it is a parser bug (the hypothesis test fails on this text).
        raise ConfigError(
            f"unexpected parser failure ({type(exc).__name__}): {_short(str(exc))}", source=source
        ) from None


def _parse_policy(text_or_mapping: Any, fmt: str | None, source: str | None) -> Policy:
    if isinstance(text_or_mapping, bytes | bytearray | memoryview):
        if len(text_or_mapping) > MAX_POLICY_BYTES:
            raise ConfigError(f"policy is {len(text_or_mapping)} bytes; the limit is {MAX_POLICY_BYTES}", source=source)
        try:
            text_or_mapping = str(text_or_mapping, "utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"policy is not UTF-8 (byte {exc.start})", source=source) from None
    if isinstance(text_or_mapping, str):
        data = _decode(text_or_mapping, fmt, source)
    elif isinstance(text_or_mapping, Mapping):
        data = text_or_mapping
    else:
        raise ConfigError(f"a policy is TOML/YAML text or a mapping, got {type(text_or_mapping).__name__}")
    _check_shape(data, source)
    if not isinstance(data, Mapping):
        raise ConfigError("a policy must be a table/mapping with 'default', 'mechanism' and 'rule'", source=source)
    unknown = sorted(set(data) - _TOP_KEYS - {"rules"})
    if unknown:
        raise ConfigError(
            f"unknown top-level field(s) {', '.join(unknown)}; allowed: default, mechanism, rule", source=source
        )
    default = _parse_action(data.get("default", "tunnel"), "default")
    mech_raw = data.get("mechanism", "nat")
    try:
        mechanism = Mechanism(str(mech_raw).strip().lower())
    except ValueError:
        raise ConfigError(f"mechanism must be 'route' or 'nat', got {_short(mech_raw)}", source=source) from None
    raw_rules = data.get("rule", data.get("rules", []))
    if not isinstance(raw_rules, list):
        raise ConfigError("'rule' must be a list of rules ([[rule]] in TOML, 'rule:' list in YAML)", source=source)
    if len(raw_rules) > MAX_POLICY_RULES:
        raise ConfigError(f"{len(raw_rules)} rules; the limit is {MAX_POLICY_RULES}", source=source)
    rules = tuple(_parse_rule(i, r, source) for i, r in enumerate(raw_rules))
    try:
        return Policy(rules, default, mechanism)
    except ConfigError as exc:
        raise ConfigError(str(exc), source=source) from None


def _check_shape(data: Any, source: str | None) -> None:
    """Bound a decoded document: nesting depth, value count, string keys only, integers below 2**64.

    Iterative (an explicit stack), so a deep or cyclic mapping handed in by a caller cannot exhaust the stack
    either; the node budget also ends a cycle. After it, every ``repr``/``str`` of a value is bounded.
    """
    stack: list[tuple[Any, int]] = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_POLICY_NODES:
            raise ConfigError(f"policy has more than {MAX_POLICY_NODES} values", source=source)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            if not -_MAX_INT < value < _MAX_INT:
                raise ConfigError("policy has an integer of more than 64 bits", source=source)
            continue
        if not isinstance(value, _CONTAINERS):
            continue
        if depth >= MAX_POLICY_DEPTH:
            raise ConfigError(f"policy is nested more than {MAX_POLICY_DEPTH} levels deep", source=source)
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str):
                    raise ConfigError(
                        f"keys must be strings, got a {type(key).__name__} key (quote it in YAML)", source=source
                    )
            stack.extend((v, depth + 1) for v in value.values())
        else:
            stack.extend((v, depth + 1) for v in value)


def _decode(text: str, fmt: str | None, source: str | None) -> Any:
    if fmt not in (None, "toml", "yaml"):
        raise ConfigError(f"unknown policy format {fmt!r}; use 'toml' or 'yaml'", source=source)
    if len(text) > MAX_POLICY_BYTES:  # characters: at least as many bytes in UTF-8
        raise ConfigError(f"policy is {len(text)} characters; the limit is {MAX_POLICY_BYTES} bytes", source=source)
    if fmt in (None, "toml"):
        try:
            return tomllib.loads(text)
        # tomllib recurses per nested array/inline table (RecursionError) and int()s digit strings past the
        # conversion limit (ValueError); both are bad documents here. TOMLDecodeError is a ValueError.
        except (ValueError, RecursionError) as exc:
            if fmt == "toml":
                what = "nested too deeply" if isinstance(exc, RecursionError) else _short(str(exc), 200)
                raise ConfigError(f"not valid TOML: {what}", source=source) from None
    import yaml

    try:
        return yaml.load(text, Loader=_bounded_yaml_loader())  # a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(str(exc), source=source or "<policy>") from None
    except yaml.YAMLError as exc:
        line = None
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        what = "YAML" if fmt == "yaml" else "TOML or YAML"
        raise ConfigError(
            f"not valid {what}: {_short(str(exc), 300)}", source=source or "<policy>", line=line
        ) from None
    except (ValueError, OverflowError) as exc:  # e.g. a timestamp out of range, an int past the conversion limit
        raise ConfigError(f"not valid YAML: {_short(str(exc), 200)}", source=source or "<policy>") from None


_YAML_LOADER: Any = None


def _bounded_yaml_loader() -> Any:
    """A `yaml.SafeLoader` that refuses aliases and bounds depth and node count while composing.

    Bounding in the composer (before any Python object exists) keeps the constructor's recursion shallow and
    makes alias expansion impossible rather than merely expensive.
    """
    global _YAML_LOADER
    if _YAML_LOADER is not None:
        return _YAML_LOADER
    import yaml

    class BoundedSafeLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._depth = 0
            self._nodes = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise ConfigError("YAML aliases (*name) are not allowed in a policy")
            self._nodes += 1
            if self._nodes > MAX_POLICY_NODES:
                raise ConfigError(f"policy has more than {MAX_POLICY_NODES} values")
            self._depth += 1
            try:
                if self._depth > MAX_POLICY_DEPTH:
                    raise ConfigError(f"policy is nested more than {MAX_POLICY_DEPTH} levels deep")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    _YAML_LOADER = BoundedSafeLoader
    return BoundedSafeLoader
