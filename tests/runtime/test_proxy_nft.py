"""The transparent proxy's nftables ruleset, rendered without root: Apple's rule semantics compiled to nft."""

from __future__ import annotations

from examples.transparent_proxy import parse_rule
from netsim.apple.proxy import HostEndpoint, NetworkRule, NetworkRuleProtocol
from netsim.runtime.proxy_nft import INTERCEPT_MARK, OWN_MARK, rule_matches_nft, tproxy_ruleset


def test_wildcards_skip_loopback_and_named_loopback_matches() -> None:
    assert rule_matches_nft(parse_rule("0.0.0.0/0:80/tcp").fields) == [
        "ip daddr != 127.0.0.0/8 meta l4proto tcp th dport 80"
    ]
    assert rule_matches_nft(parse_rule("::/0:443/udp").fields) == ["ip6 daddr != ::1 meta l4proto udp th dport 443"]
    assert rule_matches_nft(parse_rule("127.0.0.1/32:0/any").fields) == [
        "ip daddr 127.0.0.1/32 meta l4proto { tcp, udp }"
    ]
    both = rule_matches_nft(NetworkRule(protocol=NetworkRuleProtocol.TCP).fields)  # nil/nil: both families
    assert both == ["ip daddr != 127.0.0.0/8 meta l4proto tcp", "ip6 daddr != ::1 meta l4proto tcp"]


def test_hostname_rules_are_not_compiled_but_said_so() -> None:
    rule = NetworkRule.destination_host(HostEndpoint("lab.test", 443))
    assert rule_matches_nft(rule.fields) == []
    text = tproxy_ruleset([rule.fields], [], 3129)
    assert "included_network_rules[0]: a hostname rule" in text


def test_order_own_marks_replies_exclusions_then_inclusions() -> None:
    text = tproxy_ruleset([parse_rule("0.0.0.0/0:80/tcp").fields], [parse_rule("192.168.1.20/32:80/tcp").fields], 3129)
    lines = [ln.strip() for ln in text.splitlines()]
    own = lines.index(f"meta mark {OWN_MARK:#x} return")
    reply = lines.index("ct direction reply return")
    excl = lines.index("ip daddr 192.168.1.20/32 meta l4proto tcp th dport 80 return")
    incl = lines.index(f"ip daddr != 127.0.0.0/8 meta l4proto tcp th dport 80 meta mark set {INTERCEPT_MARK:#x}")
    assert own < reply < excl < incl
    assert "tproxy ip to 127.0.0.1:3129 accept" in text and "tproxy ip6 to [::1]:3129 accept" in text


def test_local_network_in_an_exclusion() -> None:
    rule = NetworkRule(HostEndpoint("0.0.0.0", 53), 0, HostEndpoint("192.168.1.10", 0), 32)
    assert rule_matches_nft(rule.fields) == [
        "ip daddr != 127.0.0.0/8 ip saddr 192.168.1.10/32 meta l4proto { tcp, udp } th dport 53"
    ]
