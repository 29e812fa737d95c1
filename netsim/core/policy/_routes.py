"""The ``route`` mechanism's share of a policy: which BYPASS rules can be excluded routes, and the SETTINGS payload.

A route sees only the destination address, before any rule order applies, so only the destination-only part of
a policy compiles to ``excludedRoutes`` (Apple: ``NEIPv4Settings.excludedRoutes``); `excluded_routes_for` says
what compiles and why the rest does not. The helper sends the result to the provider in its SETTINGS frame
(`route_exclusions_payload`); the provider turns it into excluded routes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from netsim.core.policy._model import Action, Mechanism, Network, Policy, Rule, domain_matches

__all__ = ["RouteExclusion", "excluded_routes_for", "route_exclusions_payload"]


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
                        if any(domain_matches(p, name) for p in rule.domains)
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


def route_exclusions_payload(policy: Policy, exclusion: RouteExclusion | None = None) -> dict[str, Any]:
    """What the helper adds to its SETTINGS payload for ``policy``: excluded routes when the mechanism is route.

    ``{"excluded_routes": [prefix, ...], "bypass_unsupported": [[index, name, why], ...]}``; empty lists for the
    NAT mechanism (its BYPASS verdicts are carried out by the helper, not by routes). ``exclusion`` is a
    precomputed `RouteExclusion` (`PolicyEngine.route_exclusion`, which adds host routes for the addresses of
    bypassed domains); default: ``excluded_routes_for(policy)``.
    """
    if policy.mechanism is not Mechanism.ROUTE:
        return {"excluded_routes": [], "bypass_unsupported": []}
    ex = exclusion if exclusion is not None else excluded_routes_for(policy)
    return {
        "excluded_routes": [str(n) for n in ex.routes],
        "bypass_unsupported": [list(u) for u in ex.unsupported],
    }
