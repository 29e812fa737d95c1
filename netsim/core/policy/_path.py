"""Where a packet really goes: the policy's verdict carried out by a bypass mechanism, after the tunnel's routes.

A verdict alone does not say what happens on the wire (issue 13). Two things come first or after it:

1. **The tunnel's routes** (Apple: ``includedRoutes``/``excludedRoutes``, resolved by `netsim.core.routes`):
   a packet the routes send out of the physical interface never reaches the provider, so the policy is not
   consulted at all. A provider's own excluded route can take a host off a NAT bypass, a DROP or the tunnel.
2. **The mechanism**: with ``route`` the helper turns the policy's prefix-only BYPASS rules into excluded routes
   (`excluded_routes_for`); a BYPASS verdict the routes cannot express (a port, protocol or unresolved domain
   rule) reaches the helper, which tunnels it (counted ``bypass_tunnelled``). With ``nat`` every BYPASS verdict
   is NATed out of the physical interface by the helper.

`explain_path` answers both, for the mechanism the policy names or another one, and says whether the tunnel
settings were given or assumed (a full tunnel: default routes included, nothing excluded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from netsim.core.policy._engine import Explanation, PacketLike, PolicyEngine
from netsim.core.policy._model import Action, FlowFields, Mechanism, Network
from netsim.core.routes import RouteKind, RouteTable

__all__ = ["PathExplanation", "explain_path"]

_DEFAULTS = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class PathExplanation:
    """What happens to a packet under one mechanism.

    Attributes:
        outcome: the action on the wire: TUNNEL (encrypted), BYPASS (out of the physical interface in the clear),
            DROP.
        how: ``"tunnel"``, ``"nat"`` (the helper NATs it), ``"excluded-route"`` (the policy's route, kernel),
            ``"provider-route"`` (the tunnel settings send it direct; the policy is not consulted), ``"drop"``.
        mechanism: the mechanism answered for.
        why: one sentence: what decided it.
        policy: the rule-by-rule explanation of the verdict (what the helper would decide if it sees the packet).
        reaches_provider: False when the routes send the packet out of the physical interface before the TUN.
        settings_given: False when no tunnel routes were given and a full tunnel was assumed.
    """

    outcome: Action
    how: str
    mechanism: Mechanism
    why: str
    policy: Explanation
    reaches_provider: bool
    settings_given: bool

    def __str__(self) -> str:
        lines = [f"{self.outcome.name}: {self.why}"]
        lines += [f"  rule #{i} {name!r} did not match: {why}" for i, name, why in self.policy.skipped]
        return "\n".join(lines)


def _route_table(
    included: Sequence[Network] | None, excluded: Sequence[Network], tunnel_remote_address: str | None
) -> RouteTable:
    table = RouteTable()
    for default in _DEFAULTS:
        table.add_system_route(default, interface="en0")
    table.set_tunnel_routes(_DEFAULTS if included is None else included, excluded, tunnel_remote_address)
    return table


def explain_path(
    engine: PolicyEngine,
    packet: PacketLike | FlowFields,
    now: float,
    *,
    mechanism: Mechanism | None = None,
    included_routes: Sequence[Network] | None = None,
    excluded_routes: Sequence[Network] | None = None,
    tunnel_remote_address: str | None = None,
) -> PathExplanation:
    """Say where ``packet`` goes: the tunnel's routes first, then the policy's verdict under ``mechanism``.

    Args:
        engine: the policy (and its learned DNS bindings, for domain rules).
        packet: the packet or its fields.
        now: the clock, for DNS bindings.
        mechanism: the mechanism to answer for; default: the one the policy names.
        included_routes, excluded_routes: the provider's tunnel routes (``PacketTunnelNetworkSettings``). When
            both are None the settings are unknown and a full tunnel is assumed (the answer says so).
        tunnel_remote_address: the server's address, excluded automatically as Apple does.
    """
    mech = engine.policy.mechanism if mechanism is None else mechanism
    verdict = engine.explain(packet, now)
    settings_given = included_routes is not None or excluded_routes is not None
    provider_excluded = list(excluded_routes or ())
    policy_routes = list(engine.route_exclusion(now).routes) if mech is Mechanism.ROUTE else []
    # the helper appends the policy's routes to the provider's (SETTINGS "excluded_routes"); duplicates dropped
    merged = provider_excluded + [n for n in policy_routes if n not in provider_excluded]
    dst = _address(packet)
    route = _route_table(included_routes, merged, tunnel_remote_address).resolve(dst)
    answer = _Answer(verdict, mech, settings_given)
    if route is not None and route.kind is RouteKind.INCLUDED:
        return answer.by_policy()
    if route is not None and route.kind is RouteKind.EXCLUDED and route.network not in provider_excluded:
        return answer.direct(
            "excluded-route",
            f"{verdict.why}; the route mechanism made it the excluded route {route.network}: the kernel sends it "
            "out of en0 before the tunnel",
        )
    if route is not None and route.kind is RouteKind.EXCLUDED:
        what = f"the provider's excluded route {route.network}"
    elif route is not None and route.kind is RouteKind.SERVER:
        what = f"the tunnel server's automatic exclusion {route.network}"
    else:
        what = "no included route (it follows the system default route)"
    said = verdict.verdict.action.name.lower()
    return answer.direct(
        "provider-route",
        f"{what} sends it out of en0 before the tunnel: the policy is never consulted (it would say {said}: "
        f"{verdict.why})",
    )


def _address(packet: PacketLike | FlowFields) -> bytes:
    if isinstance(packet, FlowFields):
        return packet.dst.packed
    return bytes(packet.dst)


@dataclass(frozen=True)
class _Answer:
    verdict: Explanation
    mechanism: Mechanism
    settings_given: bool

    def _make(self, outcome: Action, how: str, why: str, reaches: bool) -> PathExplanation:
        return PathExplanation(outcome, how, self.mechanism, why, self.verdict, reaches, self.settings_given)

    def direct(self, how: str, why: str) -> PathExplanation:
        return self._make(Action.BYPASS, how, why, reaches=False)

    def by_policy(self) -> PathExplanation:
        v = self.verdict
        action = v.verdict.action
        if action is Action.TUNNEL:
            return self._make(Action.TUNNEL, "tunnel", v.why, reaches=True)
        if action is Action.DROP:
            return self._make(Action.DROP, "drop", f"{v.why}; the helper drops it", reaches=True)
        if self.mechanism is Mechanism.NAT:
            return self._make(Action.BYPASS, "nat", f"{v.why}; the helper NATs it out of en0", reaches=True)
        why = (
            f"{v.why}, so the verdict is bypass, but the route mechanism cannot express it as an excluded route "
            "(a route sees only the destination address): the packet reaches the helper, which tunnels it "
            "(counted bypass_tunnelled)"
        )
        return self._make(Action.TUNNEL, "tunnel", why, reaches=True)
