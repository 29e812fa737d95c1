"""The CVE-2019-14899 guard's nft script (`utun_guard_ruleset`); the lab test is tests/lab/test_utun_guard_lab.py."""

from __future__ import annotations

import ipaddress

import pytest

from netsim.errors import LocalProtocolError
from netsim.runtime.netconfig import UTUN_GUARD_TABLE, utun_guard_ruleset


def _ifaces(*text: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    return [ipaddress.ip_interface(t) for t in text]


def test_the_guard_drops_each_family_off_the_utun_and_lets_lo_and_the_utun_through() -> None:
    script = utun_guard_ruleset("utun3", _ifaces("10.66.0.2/32", "fd00:66::2/128", "fe80::1/64", "10.66.0.9/24"))
    lines = [line.strip() for line in script.splitlines()]
    # replaced in one transaction: no window without the guard, and no error when it did not exist yet
    assert lines[:3] == [f"add table inet {UTUN_GUARD_TABLE}", f"delete table inet {UTUN_GUARD_TABLE}",
                         f"table inet {UTUN_GUARD_TABLE} {{"]  # fmt: skip
    assert "type filter hook prerouting priority raw; policy accept;" in lines
    assert lines.index('iifname { "lo", "utun3" } accept') < lines.index(
        'ip daddr { 10.66.0.2, 10.66.0.9 } counter drop comment "utun address off the utun"'
    )
    assert 'ip6 daddr { fd00:66::2 } counter drop comment "utun address off the utun"' in lines
    assert "fe80::1" not in script  # link-local is scoped by the kernel already


def test_a_v4_only_tunnel_gets_no_v6_rule_and_no_addresses_only_delete() -> None:
    assert "ip6 daddr" not in utun_guard_ruleset("utun0", _ifaces("10.66.0.2/32"))
    assert utun_guard_ruleset("utun0", []).splitlines() == [
        f"add table inet {UTUN_GUARD_TABLE}",
        f"delete table inet {UTUN_GUARD_TABLE}",
    ]


@pytest.mark.parametrize("name", ["", 'ut"un', "utun 0", "utun0\nflush ruleset"])
def test_a_device_name_that_could_inject_nft_syntax_is_refused(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        utun_guard_ruleset(name, _ifaces("10.66.0.2/32"))
