"""The transparent proxy's nftables ruleset, rendered without root: Apple's rule semantics compiled to nft."""

from __future__ import annotations

from examples.transparent_proxy import parse_rule
from netsim.apple.proxy import HostEndpoint, NetworkRule, NetworkRuleProtocol
from netsim.core.netrules import PROTOCOL_TCP, PROTOCOL_UDP
from netsim.runtime.proxy_nft import (
    DECLINE_MARK,
    INTERCEPT_MARK,
    OWN_MARK,
    QUERY_MARK,
    QUEUE_NUM,
    ProxyKernelState,
    queue_rules,
    rule_matches_nft,
    tproxy_ruleset,
)
from netsim.runtime.proxy_tproxy import DNS_PROXY_NAMES


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


def test_order_own_marks_replies_decided_exclusions_then_inclusions() -> None:
    text = tproxy_ruleset([parse_rule("0.0.0.0/0:80/any").fields], [parse_rule("192.168.1.20/32:80/tcp").fields], 3129)
    lines = [ln.strip() for ln in text.splitlines()]
    own = lines.index(f"meta mark {OWN_MARK:#x} return")
    reply = lines.index("ct direction reply return")
    declined = lines.index(f"meta l4proto tcp ct mark {DECLINE_MARK:#x} return")
    claimed = lines.index(f"meta l4proto tcp ct mark {INTERCEPT_MARK:#x} meta mark set {INTERCEPT_MARK:#x} return")
    excl = lines.index("ip daddr 192.168.1.20/32 meta l4proto tcp th dport 80 return")
    syn = lines.index(
        f"ip daddr != 127.0.0.0/8 meta l4proto tcp th dport 80 tcp flags & (syn | ack) == syn "
        f"ct mark set {QUERY_MARK:#x}"
    )  # an ANY rule: its TCP SYNs are queued (a conntrack mark: the app's packet mark is kept)...
    udp = lines.index(f"ip daddr != 127.0.0.0/8 meta l4proto udp th dport 80 meta mark set {INTERCEPT_MARK:#x}")
    assert own < reply < declined < claimed < excl < syn < udp  # ...its UDP goes to TPROXY as before
    claim = lines.index(
        f"meta l4proto tcp ct mark {QUERY_MARK:#x} meta mark {INTERCEPT_MARK:#x} ct mark set {INTERCEPT_MARK:#x}"
    )
    # declined, or a SYN that bypassed the queue (fail open): remembered as declined, the connection goes direct
    assert claim < lines.index(f"meta l4proto tcp ct mark {QUERY_MARK:#x} ct mark set {DECLINE_MARK:#x}")
    assert "type route hook output priority mangle - 10; policy accept;" in lines  # before iptables' mangle
    assert "tproxy ip to 127.0.0.1:3129 accept" in text and "tproxy ip6 to [::1]:3129 accept" in text


def test_a_protocol_narrows_a_rule() -> None:
    tcp_rule = parse_rule("0.0.0.0/0:80/tcp").fields
    assert rule_matches_nft(tcp_rule, PROTOCOL_UDP) == []
    assert rule_matches_nft(tcp_rule, PROTOCOL_TCP) == rule_matches_nft(tcp_rule)
    assert rule_matches_nft(parse_rule("0.0.0.0/0:53/any").fields, PROTOCOL_UDP) == [
        "ip daddr != 127.0.0.0/8 meta l4proto udp th dport 53"
    ]


def test_queue_rules_install_and_remove_only_their_chain() -> None:
    install, remove = queue_rules("netsim_tproxy_syn", QUERY_MARK, QUEUE_NUM)
    assert install.splitlines() == [
        "*mangle",
        ":netsim_tproxy_syn - [0:0]",
        "-A netsim_tproxy_syn -j NFQUEUE --queue-num 29808 --queue-bypass",
        "-I OUTPUT -m connmark --mark 0x17470 -j netsim_tproxy_syn",
        "COMMIT",
    ]
    assert remove.splitlines() == [
        "*mangle",
        "-D OUTPUT -m connmark --mark 0x17470 -j netsim_tproxy_syn",
        "-F netsim_tproxy_syn",
        "-X netsim_tproxy_syn",
        "COMMIT",
    ]


def test_a_dns_proxy_owns_distinct_queue_names() -> None:
    tp, dns = ProxyKernelState(1), ProxyKernelState(1, **DNS_PROXY_NAMES)
    assert (tp.query_mark, tp.decline_mark, tp.queue_num, tp.chain) == (
        QUERY_MARK,
        DECLINE_MARK,
        QUEUE_NUM,
        "netsim_tproxy_syn",
    )
    owned = [{k.query_mark, k.decline_mark, k.intercept_mark, k.own_mark} for k in (tp, dns)]
    assert not owned[0] & owned[1] and len(owned[0]) == len(owned[1]) == 4
    assert tp.queue_num != dns.queue_num and tp.chain != dns.chain == "netsim_dnsproxy_syn"


def test_local_network_in_an_exclusion() -> None:
    rule = NetworkRule(HostEndpoint("0.0.0.0", 53), 0, HostEndpoint("192.168.1.10", 0), 32)
    assert rule_matches_nft(rule.fields) == [
        "ip daddr != 127.0.0.0/8 ip saddr 192.168.1.10/32 meta l4proto { tcp, udp } th dport 53"
    ]
