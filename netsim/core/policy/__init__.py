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

Layout (import from this package; the modules are private):

* ``_model``: `Action`, `Mechanism`, `Rule`, `Policy`, `Verdict`, `FlowFields` (immutable, validated).
* ``_compile``: a policy -> the range tables ``classify`` reads.
* ``_engine``: `PolicyEngine` (classify, explain, atomic replace, statistics).
* ``_dns``: `DnsBindings`, the learned name -> address table, and learning it from (guarded) DNS answers.
* ``_path``: `explain_path`: the verdict carried out by a mechanism, after the tunnel's routes (``netsim explain``).
* ``_routes``: the route mechanism: `excluded_routes_for`, `RouteExclusion`, `route_exclusions_payload`.
* ``_parse``: `parse_policy` for TOML/YAML/mappings (bounded; only `ConfigError` escapes).
* ``_table``: `TypeTable`, the per-type dispatch the decoders use.
"""

from __future__ import annotations

from netsim.core.policy._dns import DnsBindings, DnsBindingsStatistics
from netsim.core.policy._engine import Explanation, PolicyEngine, PolicyStatistics
from netsim.core.policy._model import (
    PROTOCOLS,
    Action,
    FlowFields,
    Mechanism,
    Network,
    Policy,
    Rule,
    Verdict,
)
from netsim.core.policy._parse import (
    MAX_POLICY_BYTES,
    MAX_POLICY_DEPTH,
    MAX_POLICY_NODES,
    MAX_POLICY_RULES,
    parse_policy,
)
from netsim.core.policy._path import PathExplanation, explain_path
from netsim.core.policy._routes import RouteExclusion, excluded_routes_for, route_exclusions_payload

__all__ = [
    "MAX_POLICY_BYTES",
    "MAX_POLICY_DEPTH",
    "MAX_POLICY_NODES",
    "MAX_POLICY_RULES",
    "PROTOCOLS",
    "Action",
    "DnsBindings",
    "DnsBindingsStatistics",
    "Explanation",
    "FlowFields",
    "Mechanism",
    "Network",
    "PathExplanation",
    "Policy",
    "PolicyEngine",
    "PolicyStatistics",
    "RouteExclusion",
    "Rule",
    "Verdict",
    "excluded_routes_for",
    "explain_path",
    "parse_policy",
    "route_exclusions_payload",
]
