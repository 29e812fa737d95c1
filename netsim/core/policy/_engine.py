"""The policy engine: classify packets (hot path), explain verdicts (slow path), replace policies atomically.

``classify`` reads the tables `CompiledPolicy` built (precomputed :class:`Verdict` objects, plain-int hit
counters in the compiled object, so a replacement starts counting afresh); domain rules are looked up through
the learned DNS bindings of the destination (:class:`DnsBindings`), which outlive a replacement. ``explain``
walks the rules one by one and says, for each earlier rule, which condition failed (`_CONDITIONS`, the reference
semantics that tests compare ``classify`` against).

Replacement is atomic: :meth:`PolicyEngine.replace` compiles the new table off to the side and then rebinds one
attribute, so every packet is classified by the complete old table or the complete new one.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from netsim.core.dns import DNS_MAX_TTL
from netsim.core.policy._compile import CompiledPolicy
from netsim.core.policy._dns import DnsBindings, DnsBindingsStatistics
from netsim.core.policy._model import (
    PORT_PROTOS,
    PROTO_NAMES,
    Action,
    FlowFields,
    Policy,
    Rule,
    Verdict,
    domain_matches,
    ports_text,
    protos_text,
)
from netsim.core.policy._routes import RouteExclusion, excluded_routes_for
from netsim.core.policy._table import TypeTable

if TYPE_CHECKING:
    from netsim.core.dnsguard import DnsGuard

__all__ = ["Explanation", "PacketLike", "PolicyEngine", "PolicyStatistics"]


class _Fields:
    """A minimal stand-in for a PacketView (``classify_fields``)."""

    __slots__ = ("dport", "dst", "fragment_offset", "protocol")

    def __init__(self, dst: bytes, protocol: int, dport: int, fragment_offset: int) -> None:
        self.dst = dst
        self.protocol = protocol
        self.dport = dport
        self.fragment_offset = fragment_offset


class PacketLike(Protocol):
    """The fields of a :class:`~netsim.core.packet.PacketView` the policy reads."""

    @property
    def dst(self) -> bytes: ...
    @property
    def protocol(self) -> int: ...
    @property
    def dport(self) -> int: ...
    @property
    def fragment_offset(self) -> int: ...


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
        max_bindings: see :class:`DnsBindings`.
        min_ttl: see :class:`DnsBindings`.
        max_ttl: see :class:`DnsBindings`.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        max_bindings: int = 65536,
        min_ttl: float = 30.0,
        max_ttl: float = DNS_MAX_TTL,
    ) -> None:
        self._c = CompiledPolicy(policy or Policy())
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
                if expiry > now and any(domain_matches(p, name) for p in patterns):
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
        compiled = CompiledPolicy(policy)
        for action, hits in self._action_hits(self._c).items():
            self._retired[action] += hits
        self._c = compiled
        self._replacements += 1

    # ---------------------------------------------------------------------------------------------- hot path

    def classify(self, view: PacketLike, now: float) -> Verdict:
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
        return self.bindings.learn_response_untrusted(
            payload, now, guard=guard, resolver=resolver, client=client, client_port=client_port
        )

    def learn_binding(self, name: str, address: IPv4Address | IPv6Address | str, ttl: float, now: float) -> None:
        """Bind a name to an address directly (static hosts entries, tests)."""
        self.bindings.learn(name, ipaddress.ip_address(address).packed, ttl, now)

    def expire(self, now: float) -> int:
        """Drop expired DNS bindings (call from a timer; lookups ignore expired ones anyway)."""
        return self.bindings.expire(now)

    # ---------------------------------------------------------------------------------------------- slow path

    def explain(self, packet: PacketLike | FlowFields, now: float) -> Explanation:
        """Slow path: the verdict plus why, rule by rule. Agrees with :meth:`classify` (tested)."""
        addr, proto, dport = _FLOW_OF(packet)(packet)
        policy = self._c.policy
        names = tuple(self.bindings.names_for(addr.packed, now))
        skipped: list[tuple[int, str, str]] = []
        pname = PROTO_NAMES.get(proto, str(proto))
        for i, rule in enumerate(policy.rules):
            why_not = _why_not(rule, addr, proto, dport, names)
            if why_not is None:
                why = f"rule #{i} {rule.name!r} ({rule.describe()}) matches {addr} {pname}"
                if dport is not None:
                    why += f" port {dport}"
                if rule.domains and not any(addr in net for net in rule.dst):
                    via = [n for n in names if any(domain_matches(p, n) for p in rule.domains)]
                    why += f" (DNS: {', '.join(via)} -> {addr})"
                verdict = self._c.verdicts[i]
                return Explanation(verdict, rule, why, tuple(skipped), names)
            skipped.append((i, rule.name, why_not))
        why = f"no rule matched {addr} {pname}; default action {policy.default.name.lower()}"
        return Explanation(self._c.default_verdict, None, why, tuple(skipped), names)

    @staticmethod
    def _action_hits(c: CompiledPolicy) -> dict[Action, int]:
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


# ------------------------------------------------------------------------------------------------- explain
_Flow = tuple[IPv4Address | IPv6Address, int, int | None]  # (destination, protocol, destination port)


def _flow_of_fields(flow: FlowFields) -> _Flow:
    return flow.dst, flow.proto, flow.dport


def _flow_of_packet(packet: PacketLike) -> _Flow:
    proto = packet.protocol
    dport = None if packet.fragment_offset or proto not in PORT_PROTOS else packet.dport
    return ipaddress.ip_address(bytes(packet.dst)), proto, dport


# explain takes a FlowFields (the CLI) or anything packet-shaped (a PacketView).
_FLOW_OF: TypeTable[Callable[[Any], _Flow]] = TypeTable({FlowFields: _flow_of_fields}, default=_flow_of_packet)


class _Probe(NamedTuple):
    """What ``explain`` knows about the packet: its fields and the live DNS names of its destination."""

    addr: IPv4Address | IPv6Address
    proto: int
    dport: int | None
    names: tuple[str, ...]


def _why_not_destination(rule: Rule, p: _Probe) -> str | None:
    if rule.matches_any_destination:
        return None
    if any(p.addr in net for net in rule.dst) or any(domain_matches(d, n) for d in rule.domains for n in p.names):
        return None
    parts = []
    if rule.dst:
        parts.append(f"{p.addr} not in {', '.join(str(n) for n in rule.dst)}")
    if rule.domains:
        bound = ", ".join(p.names) if p.names else "none"
        parts.append(f"no live DNS binding of {p.addr} matches {', '.join(rule.domains)} (bound: {bound})")
    return "; ".join(parts)


def _why_not_ported_protocol(rule: Rule, p: _Probe) -> str | None:
    if rule.ports and rule.protos is None and p.proto not in PORT_PROTOS:
        return f"ports {ports_text(rule.ports)} need tcp/udp, packet is {PROTO_NAMES.get(p.proto, str(p.proto))}"
    return None


def _why_not_protocol(rule: Rule, p: _Probe) -> str | None:
    if rule.protos is not None and p.proto not in rule.protos:
        return f"protocol {PROTO_NAMES.get(p.proto, str(p.proto))} not in {protos_text(rule.protos)}"
    return None


def _why_not_port(rule: Rule, p: _Probe) -> str | None:
    if not rule.ports:
        return None
    if p.dport is None:
        return f"packet has no destination port (rule needs {ports_text(rule.ports)})"
    if not any(lo <= p.dport <= hi for lo, hi in rule.ports):
        return f"port {p.dport} not in {ports_text(rule.ports)}"
    return None


# A rule's conditions, in the order explain reports the first one that fails (the reference semantics: tests
# check classify against it). A new rule condition adds its check here and its compiled form in _compile.
_CONDITIONS: tuple[Callable[[Rule, _Probe], str | None], ...] = (
    _why_not_destination,
    _why_not_ported_protocol,
    _why_not_protocol,
    _why_not_port,
)


def _why_not(
    rule: Rule, addr: IPv4Address | IPv6Address, proto: int, dport: int | None, names: tuple[str, ...]
) -> str | None:
    """Why ``rule`` does not match, or None if it does (the reference semantics, also used as an oracle)."""
    probe = _Probe(addr, proto, dport, names)
    for condition in _CONDITIONS:
        why = condition(rule, probe)
        if why is not None:
            return why
    return None
