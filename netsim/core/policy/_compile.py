"""Compiling a :class:`~netsim.core.policy.Policy` into the lookup tables ``PolicyEngine.classify`` reads.

The address space of each family is cut at every prefix boundary into disjoint intervals; each interval holds the
candidate rules (in rule order) whose prefixes cover it, as ``(rule index, protocol bitmask, ports)``. A lookup
is then one ``int.from_bytes``, one C ``bisect`` and a short scan for the first candidate whose protocol and port
also match, whatever the number of distinct prefix lengths. Domain rules are indexed by exact name and by
suffix, since their addresses are only known from DNS at run time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network

from netsim.core.policy._model import PORT_PROTOS, Network, Policy, Verdict

__all__ = ["Candidate", "CompiledPolicy", "PortRanges"]

_ANY_PROTO = (1 << 256) - 1
_SET_PORTS_MAX = 4096  # port lists spanning at most this many ports compile to a frozenset


class PortRanges:
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


Candidate = tuple[int, int, "frozenset[int] | PortRanges | None"]  # (rule index, protocol bitmask, ports)


def _compile_ports(ports: tuple[tuple[int, int], ...]) -> frozenset[int] | PortRanges | None:
    if not ports:
        return None
    merged = _merge_ranges(ports)
    if sum(hi - lo + 1 for lo, hi in merged) <= _SET_PORTS_MAX:
        return frozenset(p for lo, hi in merged for p in range(lo, hi + 1))
    return PortRanges(merged)


def _range_table(entries: list[tuple[int, int, Candidate]], bits: int) -> tuple[list[int], list[tuple[Candidate, ...]]]:
    """Flatten ``(start, end_exclusive, candidate)`` entries into disjoint intervals with ordered candidates."""
    top = 1 << bits
    events: dict[int, tuple[list[Candidate], list[Candidate]]] = {0: ([], [])}
    for start, end, cand in entries:
        events.setdefault(start, ([], []))[0].append(cand)
        if end < top:
            events.setdefault(end, ([], []))[1].append(cand)
    bounds: list[int] = []
    cands: list[tuple[Candidate, ...]] = []
    interned: dict[tuple[Candidate, ...], tuple[Candidate, ...]] = {}
    active: dict[int, tuple[Candidate, int]] = {}  # id -> (cand, multiplicity)
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


class CompiledPolicy:
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
        v4: list[tuple[int, int, Candidate]] = []
        v6: list[tuple[int, int, Candidate]] = []
        self.domain_cands: dict[int, Candidate] = {}
        self.exact: dict[str, list[int]] = {}
        self.suffix: dict[str, list[int]] = {}
        for i, r in enumerate(rules):
            mask = _ANY_PROTO if r.protos is None else sum(1 << p for p in r.protos)
            if r.ports and r.protos is None:
                mask = sum(1 << p for p in PORT_PROTOS)
            cand: Candidate = (i, mask, _compile_ports(r.ports))
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
