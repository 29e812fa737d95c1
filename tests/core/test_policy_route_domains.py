"""Route mechanism with learned DNS bindings: bypassed domains become host routes, cut by earlier rules."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from netsim.core.policy import Action, Mechanism, Policy, PolicyEngine, Rule, excluded_routes_for

BYPASS_DOMAIN = Rule("video", Action.BYPASS, domains=("*.video.test",))


def _policy(*rules: Rule) -> Policy:
    return Policy(rules, mechanism=Mechanism.ROUTE)


def test_without_bindings_a_domain_rule_is_unsupported() -> None:
    ex = excluded_routes_for(_policy(BYPASS_DOMAIN))
    assert ex.routes == () and [u[1] for u in ex.unsupported] == ["video"]


def test_learned_addresses_of_matching_names_become_host_routes() -> None:
    learned = {
        "a.video.test": [ip_address("198.51.100.7"), ip_address("2001:db8::7")],
        "video.test": [ip_address("198.51.100.8")],  # "*.video.test" means strictly under it
        "other.test": [ip_address("198.51.100.9")],
    }
    ex = excluded_routes_for(_policy(BYPASS_DOMAIN), learned)
    assert ex.routes == (ip_network("198.51.100.7/32"), ip_network("2001:db8::7/128"))
    assert ex.unsupported == ()


def test_earlier_rules_cut_or_block_learned_hosts_like_prefixes() -> None:
    learned = {"a.video.test": [ip_address("198.51.100.7"), ip_address("203.0.113.5")]}
    tunnel_net = Rule("keep", Action.TUNNEL, dst=(ip_network("203.0.113.0/24"),))
    ex = excluded_routes_for(_policy(tunnel_net, BYPASS_DOMAIN), learned)
    assert ex.routes == (ip_network("198.51.100.7/32"),)
    assert [u[1] for u in ex.unsupported] == ["video"]  # "parts overlapping earlier rule ... stay in the tunnel"
    by_port = Rule("web", Action.BYPASS, domains=("*.video.test",), protos=frozenset({6}), ports=((443, 443),))
    ex = excluded_routes_for(_policy(by_port), learned)
    assert ex.routes == () and "port" in ex.unsupported[0][2]


def test_engine_uses_only_live_bindings() -> None:
    engine = PolicyEngine(_policy(BYPASS_DOMAIN, Rule("lan", Action.BYPASS, dst=(ip_network("10.9.0.0/16"),))))
    assert engine.route_exclusion(0.0).routes == (ip_network("10.9.0.0/16"),)
    engine.learn_binding("cdn.video.test", "198.51.100.7", ttl=60, now=0.0)
    engine.learn_binding("www.elsewhere.test", "198.51.100.9", ttl=60, now=0.0)
    assert engine.route_exclusion(10.0).routes == (ip_network("10.9.0.0/16"), ip_network("198.51.100.7/32"))
    assert engine.route_exclusion(61.0).routes == (ip_network("10.9.0.0/16"),)  # the binding expired
