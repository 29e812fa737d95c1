"""NENetworkRule matching and the transparent-proxy claim decision, sans-IO (Apple: NENetworkRule.h, R13, R50, R51).

Theory of operation. A rule names a remote network (address + prefix + port, or a hostname), an optional local
network, a protocol and a direction; a flow is a 5-tuple plus the hostname the app asked for, if any. Apple's
documented semantics, all implemented here and nowhere else:

- **Wildcard**: a remote address of ``0.0.0.0`` or ``::`` (whatever the prefix) matches every destination of its
  family *except loopback*; so does a rule with no remote and no local network (both families). To match
  loopback a rule must name a loopback address (``127.0.0.1``, ``::1``) (R13).
- **Port**: ``0`` (or Apple's empty string) matches any port (R13).
- **Hostname**: one label (``"com"``) matches only that exact host; two or more labels (``"example.com"``) match
  every host in the domain (R13). A flow carries a hostname only when the app connected by name.
- **Protocol**: ``ANY`` (0) matches TCP and UDP only; ``TCP`` (1); ``UDP`` (2) (R13).
- **Precedence** in `NETransparentProxyNetworkSettings`: any excluded rule that matches ends evaluation (the flow
  is not claimed); otherwise any included rule claims it (R50).
- **Restrictions on included rules** (R51): port 0 needs a non-wildcard address; a wildcard address needs a
  non-zero port; port 53 is not allowed (domain rules match DNS); no local network; direction outbound.

Everything here is pure: addresses are `ipaddress` objects, numbers plain ints; `decide` returns which rule
matched and why, like the bypass policy's ``explain``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

__all__ = [
    "DIRECTION_ANY",
    "DIRECTION_INBOUND",
    "DIRECTION_OUTBOUND",
    "PROTOCOL_ANY",
    "PROTOCOL_TCP",
    "PROTOCOL_UDP",
    "ClaimDecision",
    "FlowKey",
    "RuleFields",
    "decide",
    "hostname_matches",
    "included_rule_problems",
    "is_wildcard",
    "rule_matches",
]

# Apple's raw values (NENetworkRuleProtocol, NETrafficDirection in NENetworkRule.h)
PROTOCOL_ANY, PROTOCOL_TCP, PROTOCOL_UDP = 0, 1, 2
DIRECTION_ANY, DIRECTION_INBOUND, DIRECTION_OUTBOUND = 0, 1, 2
_IP_PROTOCOL = {PROTOCOL_TCP: 6, PROTOCOL_UDP: 17}  # IANA protocol numbers

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
_LOOPBACK_V4 = IPv4Network("127.0.0.0/8")
_LOOPBACK_V6 = IPv6Network("::1/128")


@dataclass(frozen=True, slots=True)
class RuleFields:
    """The matchable content of one rule: what `netsim.apple.NetworkRule` compiles to.

    ``remote_network`` None with ``remote_hostname`` None means "no remote endpoint" (Apple's nil).
    """

    remote_network: Network | None = None
    remote_port: int = 0
    remote_hostname: str | None = None
    local_network: Network | None = None
    local_port: int = 0
    protocol: int = PROTOCOL_ANY
    direction: int = DIRECTION_OUTBOUND


@dataclass(frozen=True, slots=True)
class FlowKey:
    """What the system knows about a new flow when it decides whether to claim it.

    ``ip_protocol`` is the IANA number (6 TCP, 17 UDP; anything else never matches, as Apple's rules match TCP and
    UDP only). ``remote_hostname`` is the name the app connected to, if it used one.
    """

    ip_protocol: int
    remote_address: Address
    remote_port: int
    local_address: Address | None = None
    local_port: int = 0
    direction: int = DIRECTION_OUTBOUND
    remote_hostname: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimDecision:
    """`decide`'s answer: claimed or not, the deciding rule (index into its list) and a sentence why."""

    claimed: bool
    excluded_by: int | None
    included_by: int | None
    reason: str


def is_wildcard(network: Network | None) -> bool:
    """True for ``0.0.0.0`` / ``::`` (any prefix): Apple's wildcard addresses."""
    return network is not None and int(network.network_address) == 0


def _is_loopback(address: Address) -> bool:
    return address in (_LOOPBACK_V4 if address.version == 4 else _LOOPBACK_V6)


def hostname_matches(rule_host: str, flow_host: str) -> bool:
    """Apple's hostname rule: one label matches only itself; two or more match the domain and its subdomains."""
    rule = rule_host.rstrip(".").lower()
    host = flow_host.rstrip(".").lower()
    if "." not in rule:
        return host == rule
    return host == rule or host.endswith("." + rule)


def _network_matches(network: Network | None, address: Address | None, wildcard_excludes_loopback: bool) -> bool:
    if network is None:
        return True
    if address is None or address.version != network.version:
        return False
    if is_wildcard(network):
        return not (wildcard_excludes_loopback and _is_loopback(address))
    return address in network


def rule_matches(rule: RuleFields, flow: FlowKey) -> bool:
    """Whether one rule matches one flow (the semantics in the module docstring)."""
    if flow.ip_protocol not in (6, 17):
        return False
    if rule.protocol != PROTOCOL_ANY and _IP_PROTOCOL.get(rule.protocol) != flow.ip_protocol:
        return False
    if rule.direction != DIRECTION_ANY and rule.direction != flow.direction:
        return False
    if rule.remote_hostname is not None:
        if flow.remote_hostname is None or not hostname_matches(rule.remote_hostname, flow.remote_hostname):
            return False
    elif rule.remote_network is None and rule.local_network is None:
        # no remote and no local network: everything except loopback (R13)
        if _is_loopback(flow.remote_address):
            return False
    elif not _network_matches(rule.remote_network, flow.remote_address, True):
        return False
    if rule.remote_port and rule.remote_port != flow.remote_port:
        return False
    if not _network_matches(rule.local_network, flow.local_address, False):
        return False
    return not (rule.local_port and rule.local_port != flow.local_port)


def decide(included: Sequence[RuleFields], excluded: Sequence[RuleFields], flow: FlowKey) -> ClaimDecision:
    """Apple's transparent-proxy precedence (R50): a matching excluded rule wins; then any included rule claims."""
    for i, rule in enumerate(excluded):
        if rule_matches(rule, flow):
            return ClaimDecision(False, i, None, f"excluded by excluded_network_rules[{i}]")
    for i, rule in enumerate(included):
        if rule_matches(rule, flow):
            return ClaimDecision(True, None, i, f"claimed by included_network_rules[{i}]")
    if _is_loopback(flow.remote_address):
        return ClaimDecision(False, None, None, "loopback: only a rule naming the loopback address claims it")
    return ClaimDecision(False, None, None, "no included rule matches")


def included_rule_problems(rule: RuleFields) -> list[str]:
    """Why ``rule`` may not be an included rule (R51); empty when it may."""
    problems = []
    if rule.remote_network is not None:
        if rule.remote_port == 0 and is_wildcard(rule.remote_network):
            problems.append("a wildcard address (0.0.0.0 or ::) needs a non-zero port")
        if rule.remote_port == 53:
            problems.append("port 53 is not allowed; match DNS with a destination domain rule")
    if rule.remote_hostname is None and rule.remote_network is None and rule.remote_port == 53:
        problems.append("port 53 is not allowed; match DNS with a destination domain rule")
    if rule.local_network is not None:
        problems.append("match_local_network must be None")
    if rule.direction != DIRECTION_OUTBOUND:
        problems.append("match_direction must be OUTBOUND")
    return problems


def parse_network(address: str, prefix: int) -> Network:
    """``address``/``prefix`` as a network (host bits cleared, as a route's destination is)."""
    return ip_network(f"{address}/{prefix}", strict=False)
