"""The kill switch's nftables ruleset (netsim.core.killswitch): rendering per flag combination, K5, counters.

With root and nft, every rendered variant is also checked by ``nft -c -f`` in a throwaway netsim-prefixed
namespace (never the root namespace).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from netsim.core.killswitch import (
    KILLSWITCH_COUNTERS,
    CounterValue,
    KillSwitchConfig,
    parse_counters,
    render_killswitch,
    render_release,
    split_local_prefixes,
)
from netsim.testing.require import require_binary, require_root


def _chain(text: str, hook: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"\tchain {hook} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 2 : end]]


def test_default_ruleset_accepts_only_tunnel_lo_bypass_and_control_plane_then_drops() -> None:
    text = render_killswitch(KillSwitchConfig())
    out = _chain(text, "output")
    assert out == [
        "oif lo counter name out_lo accept",
        'oifname "utun*" counter name out_tunnel accept',
        "meta mark 0x6e73 counter name out_bypass accept",
        "udp sport 68 udp dport 67 counter name out_dhcp4 accept",
        "udp sport 546 udp dport 547 counter name out_dhcp6 accept",
        "icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, "
        "mld2-listener-report } counter name out_nd accept",
        "counter name out_drop drop",
    ]
    fwd = _chain(text, "forward")
    assert fwd[-1] == "counter name fwd_drop drop"
    assert not any("mark" in rule for rule in fwd), "forwarded packets are never the tunnel's own transport"
    assert not any("daddr" in rule for rule in out + fwd), "no local exemption without exclude_local_networks"
    assert "policy accept" in text and "table inet netsim_killswitch {" in text
    assert "ct state" not in text, "established connections get no exception (Apple drops their packets)"


def test_render_is_an_atomic_replace_and_release_is_idempotent() -> None:
    text = render_killswitch(KillSwitchConfig())
    assert text.splitlines()[:3] == [
        "table inet netsim_killswitch {}",
        "delete table inet netsim_killswitch",
        "table inet netsim_killswitch {",
    ]
    assert render_release() == "table inet netsim_killswitch {}\ndelete table inet netsim_killswitch\n"


def test_exclude_local_networks_exempts_only_the_given_private_prefixes() -> None:
    config = KillSwitchConfig(
        exclude_local_networks=True, local_prefixes=("192.168.1.10/24", "fd00:1::5/64", "fe80::/64")
    )
    assert config.local_prefixes == ("192.168.1.0/24", "fd00:1::/64", "fe80::/64")
    out = _chain(render_killswitch(config), "output")
    local = [rule for rule in out if "out_local" in rule]
    assert local == [
        "ip daddr { 192.168.1.0/24, 224.0.0.0/24, 239.255.255.250/32, 255.255.255.255/32 } "
        "counter name out_local accept",
        "ip6 daddr { fd00:1::/64, fe80::/64, ff02::/16 } counter name out_local accept",
    ]
    assert out.index(local[0]) < out.index("counter name out_drop drop")
    fwd = _chain(render_killswitch(config), "forward")
    assert any("192.168.1.0/24" in rule and "fwd_local" in rule for rule in fwd)


def test_prefixes_are_ignored_without_exclude_local_networks() -> None:
    text = render_killswitch(KillSwitchConfig(local_prefixes=("192.168.1.0/24",)))
    assert "192.168.1.0/24" not in text


@pytest.mark.reliability("K5")
def test_a_public_prefix_advertised_on_link_is_never_exempted() -> None:
    """TunnelCrack LocalNet: the ISP router claims a public /24 is on-link; only RFC1918/link-local/ULA pass."""
    private, refused = split_local_prefixes(
        ["192.168.1.10/24", "203.0.113.7/24", "10.9.0.1/16", "fe80::1/64", "2001:db8:1::10/64", "fd12::1/64", "junk"]
    )
    assert private == ("192.168.1.0/24", "10.9.0.0/16", "fe80::/64", "fd12::/64")
    assert refused == ("203.0.113.0/24", "2001:db8:1::/64", "junk")
    with pytest.raises(ValueError, match="not a private prefix"):
        KillSwitchConfig(exclude_local_networks=True, local_prefixes=("203.0.113.0/24",))
    with pytest.raises(ValueError, match="not a private prefix"):
        KillSwitchConfig(exclude_local_networks=True, local_prefixes=("172.32.0.0/16",))  # just outside 172.16/12
    text = render_killswitch(KillSwitchConfig(exclude_local_networks=True, local_prefixes=private))
    assert "203.0.113" not in text and "2001:db8" not in text


def test_no_forward_chain_and_no_bypass_mark_when_asked() -> None:
    text = render_killswitch(KillSwitchConfig(forward=False, bypass_fwmark=None))
    assert "chain forward" not in text and "fwd_" not in text and "meta mark" not in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tun_prefix": 'utun" accept'},
        {"tun_prefix": ""},
        {"table": "x y"},
        {"bypass_fwmark": 0},
        {"bypass_fwmark": 2**32},
    ],
)
def test_bad_inputs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        KillSwitchConfig(**kwargs)  # type: ignore[arg-type]


def test_parse_counters_reads_nft_json_and_never_raises() -> None:
    doc = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {
                "counter": {
                    "family": "inet",
                    "name": "out_drop",
                    "table": "netsim_killswitch",
                    "packets": 3,
                    "bytes": 252,
                }
            },
            {"counter": {"family": "inet", "name": "out_lo", "table": "other", "packets": 1, "bytes": 1}},
            {"counter": {"family": "inet", "name": "out_nd", "table": "netsim_killswitch", "packets": -1, "bytes": 0}},
            {"counter": {"family": "inet", "name": "out_bypass", "table": "netsim_killswitch", "packets": True}},
            "junk",
        ]
    }
    assert parse_counters(json.dumps(doc)) == {"out_drop": CounterValue(3, 252)}
    for bad in ("", "{", "[]", '{"nftables": 5}', b"\xff\xfe", "x" * (2 << 20)):
        assert parse_counters(bad) == {}


# ------------------------------------------------------------------------------------------------ nft -c
@pytest.fixture(scope="module")
def scratch_netns() -> Iterator[str]:
    require_root()
    require_binary("ip", "nft")
    name = f"netsim-kscheck-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("forward", [True, False])
@pytest.mark.parametrize("local", [False, True])
def test_every_variant_loads_in_nft(scratch_netns: str, forward: bool, local: bool) -> None:
    config = KillSwitchConfig(
        exclude_local_networks=local, local_prefixes=("192.168.1.0/24", "fe80::/64") if local else (), forward=forward
    )
    ns = ["ip", "netns", "exec", scratch_netns]
    load = subprocess.run(
        [*ns, "nft", "-f", "-"], input=render_killswitch(config), text=True, capture_output=True, check=False
    )
    assert load.returncode == 0, load.stderr
    listed = subprocess.run(
        [*ns, "nft", "-j", "list", "counters", "table", "inet", "netsim_killswitch"], capture_output=True, check=True
    )
    names = set(parse_counters(listed.stdout))
    expected = {n for n in KILLSWITCH_COUNTERS if forward or not n.startswith("fwd_")}
    assert names == expected
    again = subprocess.run(
        [*ns, "nft", "-f", "-"], input=render_killswitch(config), text=True, capture_output=True, check=False
    )
    assert again.returncode == 0, again.stderr  # re-engaging replaces the table
    for _ in range(2):  # release twice: idempotent
        gone = subprocess.run(
            [*ns, "nft", "-f", "-"], input=render_release(), text=True, capture_output=True, check=False
        )
        assert gone.returncode == 0, gone.stderr
    tables = subprocess.run([*ns, "nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    assert "netsim_killswitch" not in tables
