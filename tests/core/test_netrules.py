"""NENetworkRule semantics (netsim.core.netrules, netsim.apple.proxy): wildcards, loopback, ports, hostnames,
precedence, the included-rule restrictions, raw values, and the flow life-cycle table."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netsim.apple import TrafficDirection
from netsim.apple.proxy import (
    AppProxyFlowError,
    HostEndpoint,
    NetworkRule,
    NetworkRuleProtocol,
    TransparentProxyNetworkSettings,
)
from netsim.core import netrules, proxyflow
from netsim.core.netrules import FlowKey
from netsim.errors import ConfigError

TCP, UDP = 6, 17


def key(address: str, port: int = 80, proto: int = TCP, host: str | None = None) -> FlowKey:
    return FlowKey(proto, ip_address(address), port, ip_address("192.168.1.10"), 40000, 2, host)


def net_rule(
    address: str, prefix: int, port: int = 0, proto: NetworkRuleProtocol = NetworkRuleProtocol.ANY
) -> NetworkRule:
    return NetworkRule.destination_network(HostEndpoint(address, port), prefix, proto)


def test_raw_values_are_apples() -> None:
    assert [int(p) for p in NetworkRuleProtocol] == [0, 1, 2]  # NENetworkRuleProtocol any/TCP/UDP
    assert [int(d) for d in TrafficDirection] == [0, 1, 2]  # NETrafficDirection any/inbound/outbound
    assert AppProxyFlowError.NOT_CONNECTED == 1 and AppProxyFlowError.READ_ALREADY_PENDING == 10
    assert (netrules.PROTOCOL_ANY, netrules.PROTOCOL_TCP, netrules.PROTOCOL_UDP) == (0, 1, 2)


def test_wildcard_matches_everything_but_loopback() -> None:
    wild = net_rule("0.0.0.0", 0, 80)
    assert wild.matches(key("203.0.113.10")) and wild.matches(key("192.168.1.20"))
    assert not wild.matches(key("127.0.0.1")) and not wild.matches(key("127.1.2.3"))
    assert not wild.matches(key("203.0.113.10", 81))  # the port still applies
    assert not wild.matches(key("2001:db8::10"))  # 0.0.0.0 is the IPv4 wildcard
    wild6 = net_rule("::", 0, 80)
    assert wild6.matches(key("2001:db8::10")) and not wild6.matches(key("::1"))
    # no remote and no local network: both families, still not loopback (the forum's nil/nil rule)
    nil = NetworkRule(protocol=NetworkRuleProtocol.TCP)
    assert nil.matches(key("203.0.113.10")) and nil.matches(key("2001:db8::10"))
    assert not nil.matches(key("127.0.0.1")) and not nil.matches(key("::1"))
    assert not nil.matches(key("203.0.113.10", proto=UDP))


def test_loopback_rule_forum_question() -> None:
    """Forum: "Intercept local connections with NETransparentProxyProvider": a wildcard rule never sees
    127.0.0.1; per Apple's NENetworkRule page, only a rule naming the loopback address matches it."""
    settings = TransparentProxyNetworkSettings(included_network_rules=[NetworkRule(protocol=NetworkRuleProtocol.TCP)])
    decision = settings.decide(key("127.0.0.1", 8000))
    assert not decision.claimed and "loopback" in decision.reason
    loop = net_rule("127.0.0.1", 32)  # port "" = any port; allowed because the address is not a wildcard
    settings.included_network_rules = [loop]
    settings.validate()
    assert settings.decide(key("127.0.0.1", 8000)).claimed
    assert settings.decide(key("127.0.0.1", 3128)).claimed  # ...including a local proxy on 3128: see docs/proxy.md
    assert not settings.decide(key("203.0.113.10")).claimed


def test_port_zero_any_and_protocols() -> None:
    r = net_rule("203.0.113.0", 24, 0, NetworkRuleProtocol.UDP)
    assert r.matches(key("203.0.113.7", 7, UDP)) and r.matches(key("203.0.113.7", 9999, UDP))
    assert not r.matches(key("203.0.113.7", 7, TCP))
    assert not net_rule("203.0.113.0", 24).matches(FlowKey(1, ip_address("203.0.113.7"), 0))  # ICMP: never


def test_hostname_rules_one_label_vs_domain() -> None:
    com = NetworkRule.destination_host(HostEndpoint("com"))
    assert com.matches(key("203.0.113.10", host="com")) and not com.matches(key("203.0.113.10", host="x.com"))
    dom = NetworkRule.destination_host(HostEndpoint("lab.test"))
    assert dom.matches(key("203.0.113.10", host="www.lab.test")) and dom.matches(key("1.2.3.4", host="LAB.test."))
    assert not dom.matches(key("203.0.113.10", host="evillab.test"))
    assert not dom.matches(key("203.0.113.10"))  # a flow by address carries no name
    assert dom.match_remote_prefix is None  # Apple: NSNotFound for a hostname rule
    with pytest.raises(ConfigError):
        NetworkRule.destination_network(HostEndpoint("lab.test", 80), 32)
    with pytest.raises(ConfigError):
        NetworkRule.destination_host(HostEndpoint("203.0.113.10", 80))


def test_exclusions_win() -> None:
    s = TransparentProxyNetworkSettings(
        included_network_rules=[net_rule("203.0.113.0", 24)], excluded_network_rules=[net_rule("203.0.113.10", 32, 7)]
    )
    assert not s.decide(key("203.0.113.10", 7, UDP)).claimed
    assert s.decide(key("203.0.113.10", 7, UDP)).excluded_by == 0
    assert s.decide(key("203.0.113.10", 80)).included_by == 0
    assert not s.decide(key("198.51.100.1")).claimed


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        (NetworkRule.destination_network(HostEndpoint("0.0.0.0", 0), 0), "non-zero port"),
        (NetworkRule.destination_network(HostEndpoint("::", 0), 0), "non-zero port"),
        (NetworkRule.destination_network(HostEndpoint("192.168.1.1", 53), 32), "port 53"),
        (NetworkRule(HostEndpoint("0.0.0.0", 443), 0, HostEndpoint("192.168.1.0", 0), 24), "local_network"),
        (NetworkRule(HostEndpoint("0.0.0.0", 443), 0, direction=TrafficDirection.INBOUND), "OUTBOUND"),
    ],
)
def test_included_rule_restrictions(rule: NetworkRule, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        TransparentProxyNetworkSettings(included_network_rules=[rule]).validate()
    # the same rule is fine as an exclusion (Apple restricts only includedNetworkRules)
    TransparentProxyNetworkSettings(excluded_network_rules=[rule]).validate()


@given(
    st.ip_addresses(v=4),
    st.integers(0, 32),
    st.ip_addresses(v=4),
    st.integers(0, 65535),
    st.integers(0, 3),
)
def test_network_rule_against_brute_force(net: object, prefix: int, dst: object, port: int, rport: int) -> None:
    """Oracle: ipaddress membership, the wildcard/loopback exception and the port rule, written out plainly."""
    rule_port = [0, 80, port, 7][rport]
    rule = net_rule(str(net), prefix, rule_port)
    network = ip_network(f"{net}/{prefix}", strict=False)
    wildcard = int(network.network_address) == 0
    expect = (not ip_address(str(dst)).is_loopback if wildcard else ip_address(str(dst)) in network) and (
        rule_port in (0, port)
    )
    assert rule.matches(key(str(dst), port)) == expect


def test_flow_table_is_total_and_errors_are_apple_codes() -> None:
    for state in proxyflow.STATES:
        for op in proxyflow.OPERATIONS:
            nxt = proxyflow.next_state(state, op)
            assert nxt in proxyflow.STATES or nxt in (int(AppProxyFlowError.NOT_CONNECTED), 4)
    assert proxyflow.next_state("new", "read") == AppProxyFlowError.NOT_CONNECTED
    assert proxyflow.next_state("open", "open") == AppProxyFlowError.INVALID_ARGUMENT
    assert proxyflow.next_state("read-closed", "close_write") == "closed"
