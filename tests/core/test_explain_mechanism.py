"""`netsim explain` answers for the mechanism in use and for the tunnel's routes (issue 13)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policy import ADDRESSES, V4_PREFIXES, V6_PREFIXES, policies

from netsim.core.policy import (
    Action,
    FlowFields,
    Mechanism,
    Policy,
    PolicyEngine,
    Rule,
    explain_path,
    parse_policy,
)
from netsim.runtime.policy_file import explain_command

ROUTE_POLICY = """
mechanism = "route"

[[rule]]
name = "web"
action = "bypass"
dst = "198.51.100.0/24"
proto = "tcp"
ports = "443"

[[rule]]
name = "printer"
action = "bypass"
dst = "192.168.1.0/24"
"""

NAT_POLICY = (
    ROUTE_POLICY.replace('mechanism = "route"', 'mechanism = "nat"')
    + """
[[rule]]
name = "no-telnet"
action = "drop"
dst = "203.0.113.0/24"
"""
)


def explain(tmp_path: Path, text: str, *args: str) -> tuple[int, str]:
    path = tmp_path / "p.toml"
    path.write_text(text)
    res = CliRunner().invoke(explain_command, ["--policy", str(path), *args])
    return res.exit_code, res.output


def test_route_mechanism_port_rule_is_tunnelled(tmp_path: Path) -> None:
    code, out = explain(tmp_path, ROUTE_POLICY, "--dst", "198.51.100.7", "--dport", "443")
    assert code == 0, out
    first = out.splitlines()[0]
    assert first.startswith("TUNNEL:"), out  # it said BYPASS: the route mechanism cannot express a port rule
    assert "rule #0 'web'" in first and "route mechanism cannot express it" in first


def test_route_mechanism_prefix_rule_is_an_excluded_route(tmp_path: Path) -> None:
    code, out = explain(tmp_path, ROUTE_POLICY, "--dst", "192.168.1.20")
    assert code == 0, out
    assert out.startswith("BYPASS:") and "excluded route 192.168.1.0/24" in out.splitlines()[0]


def test_nat_mechanism_port_rule_is_natted(tmp_path: Path) -> None:
    code, out = explain(tmp_path, NAT_POLICY, "--dst", "198.51.100.7", "--dport", "443")
    assert code == 0, out
    assert out.startswith("BYPASS: rule #0 'web'") and "the helper NATs it" in out.splitlines()[0]
    # the other mechanism's answer is shown too
    assert "with mechanism route: TUNNEL" in out


def test_says_when_tunnel_settings_were_not_given(tmp_path: Path) -> None:
    code, out = explain(tmp_path, NAT_POLICY, "--dst", "203.0.113.5")
    assert code == 0, out
    assert out.startswith("DROP:")
    assert "tunnel settings: not given" in out and "--excluded-route" in out


def test_provider_excluded_route_takes_a_host_off_the_policy(tmp_path: Path) -> None:
    # The policy drops 203.0.113.0/24, but the provider excludes 203.0.113.0/25: those packets leave en0 in the
    # clear and the helper never sees them.
    code, out = explain(tmp_path, NAT_POLICY, "--dst", "203.0.113.5", "--excluded-route", "203.0.113.0/25")
    assert code == 0, out
    first = out.splitlines()[0]
    assert first.startswith("BYPASS:") and "provider's excluded route 203.0.113.0/25" in first
    assert "policy is never consulted" in first and "would say drop" in first
    assert "tunnel settings: included routes 0.0.0.0/0, ::/0" in out  # default included when only excluded given


def test_not_in_included_routes_goes_direct(tmp_path: Path) -> None:
    args = ("--dst", "198.51.100.7", "--dport", "80", "--included-route", "10.0.0.0/8")
    code, out = explain(tmp_path, NAT_POLICY, *args)
    assert code == 0, out
    assert out.startswith("BYPASS: no included route")


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--dst", "not-an-ip"], "--dst"),
        (["--dst", "10.0.0.1", "--excluded-route", "10.1.2.3/16"], "host bits"),
        (["--dst", "10.0.0.1", "--included-route", "nonsense"], "--included-route"),
        (["--dst", "10.0.0.1", "--bind", "nobind"], "--bind"),
        (["--dst", "10.0.0.1", "--proto", "gre"], "proto"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], named: str) -> None:
    code, out = explain(tmp_path, NAT_POLICY, *args)
    assert code == 2, out
    assert named in out


def test_explain_path_api_per_mechanism() -> None:
    engine = PolicyEngine(parse_policy(ROUTE_POLICY))
    web = FlowFields.parse("198.51.100.7", "tcp", 443)
    as_route = explain_path(engine, web, 0.0)
    as_nat = explain_path(engine, web, 0.0, mechanism=Mechanism.NAT)
    assert (as_route.outcome, as_route.how, as_route.mechanism) == (Action.TUNNEL, "tunnel", Mechanism.ROUTE)
    assert (as_nat.outcome, as_nat.how) == (Action.BYPASS, "nat")
    assert as_route.policy.verdict.action is Action.BYPASS  # the rule's verdict is unchanged; the wire differs
    assert not as_route.settings_given and as_route.reaches_provider
    # the tunnel server is excluded automatically (Apple), whatever the policy says
    server = explain_path(engine, FlowFields.parse("2001:db8::9"), 0.0, tunnel_remote_address="2001:db8::9")
    assert (server.outcome, server.how, server.reaches_provider) == (Action.BYPASS, "provider-route", False)
    # an included route only for 10/8: everything else never reaches the provider
    direct = explain_path(engine, web, 0.0, included_routes=[ipaddress.ip_network("10.0.0.0/8")])
    assert direct.how == "provider-route" and direct.settings_given


# --- explain_path against a brute-force model ---------------------------------------------------------------------
ROUTE_PREFIXES = [p for p in V4_PREFIXES + V6_PREFIXES if not p.endswith("/0")] + ["203.0.113.0/24"]


def _reaches_tun(policy_routes: list[str], included: list[str] | None, excluded: list[str], dst: str) -> bool:
    """Longest prefix over included and excluded routes (an exact duplicate: excluded wins); none: the default."""
    addr = ipaddress.ip_address(dst)
    best: tuple[int, bool] | None = None  # (prefix length, excluded?)
    inc = ["0.0.0.0/0", "::/0"] if included is None else included
    for is_excluded, prefixes in ((False, inc), (True, excluded + policy_routes)):
        for net in map(ipaddress.ip_network, prefixes):
            if net.version == addr.version and addr in net and (best is None or (net.prefixlen, is_excluded) > best):
                best = (net.prefixlen, is_excluded)
    return best is not None and not best[1]


@st.composite
def prefix_policies(draw: st.DrawFn) -> Policy:
    """Destination-only rules: the ones the route mechanism compiles to excluded routes."""
    rules = [
        Rule(
            f"p{i}", draw(st.sampled_from(list(Action))), (ipaddress.ip_network(draw(st.sampled_from(ROUTE_PREFIXES))),)
        )
        for i in range(draw(st.integers(0, 4)))
    ]
    return Policy(tuple(rules), draw(st.sampled_from([Action.TUNNEL, Action.DROP])))


@settings(max_examples=400, deadline=None)
@given(
    policy=st.one_of(policies(), prefix_policies()),
    mech=st.sampled_from(list(Mechanism)),
    dst=st.sampled_from(ADDRESSES),
    proto=st.sampled_from(["tcp", "udp", "icmp"]),
    port=st.integers(0, 140),
    included=st.one_of(st.none(), st.lists(st.sampled_from(ROUTE_PREFIXES), max_size=2)),
    excluded=st.lists(st.sampled_from(ROUTE_PREFIXES), max_size=2),
)
def test_explain_path_matches_a_brute_force_model(
    policy: Policy, mech: Mechanism, dst: str, proto: str, port: int, included: list[str] | None, excluded: list[str]
) -> None:
    engine = PolicyEngine(policy)
    fields = FlowFields.parse(dst, proto, None if proto == "icmp" else port)
    inc = None if included is None else [ipaddress.ip_network(p) for p in included]
    exc = [ipaddress.ip_network(p) for p in excluded]
    got = explain_path(engine, fields, 0.0, mechanism=mech, included_routes=inc, excluded_routes=exc)
    # the routes the helper puts in SETTINGS for the route mechanism (their compilation is tested in
    # test_policy_file.py and test_policy_route_domains.py; the model here is the route lookup and the mechanism)
    exclusion = engine.route_exclusion(0.0)
    policy_routes = [str(n) for n in exclusion.routes] if mech is Mechanism.ROUTE else []
    # the hot path's verdict, not explain's: the model shares nothing with explain_path but the policy
    verdict = engine.classify_fields(fields.dst.packed, fields.proto, fields.dport, 0.0).action
    if not _reaches_tun(policy_routes, included, excluded, dst):
        assert (got.outcome, got.reaches_provider) == (Action.BYPASS, False), got
    elif verdict is Action.BYPASS and mech is Mechanism.ROUTE:
        assert (got.outcome, got.how) == (Action.TUNNEL, "tunnel"), got  # what routes cannot express is tunnelled
    else:
        assert (got.outcome, got.reaches_provider) == (verdict, True), got
