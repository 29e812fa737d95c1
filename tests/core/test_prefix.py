"""PrefixTable against a brute-force ipaddress oracle."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.prefix import PrefixTable


def v4_networks() -> st.SearchStrategy[IPv4Network]:
    return st.builds(lambda a, n: IPv4Network((a, n), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32))


def v6_networks() -> st.SearchStrategy[IPv6Network]:
    # Few distinct high bits so random addresses actually fall inside the prefixes.
    return st.builds(
        lambda a, n: IPv6Network(((a << 112), n), strict=False),
        st.integers(0, 2**16 - 1),
        st.integers(0, 128),
    )


def oracle(entries: dict[IPv4Network | IPv6Network, int], addr: IPv4Address | IPv6Address) -> int | None:
    best: tuple[int, int] | None = None
    for net, value in entries.items():
        if net.version == addr.version and addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, value)
    return None if best is None else best[1]


@settings(max_examples=300)
@given(
    nets=st.lists(st.one_of(v4_networks(), v6_networks()), max_size=30),
    probes=st.lists(
        st.one_of(
            st.integers(0, 2**32 - 1).map(IPv4Address),
            st.integers(0, 2**16 - 1).map(lambda a: IPv6Address(a << 112)),
            st.integers(0, 2**128 - 1).map(IPv6Address),
        ),
        max_size=20,
    ),
    removals=st.lists(st.integers(0, 29), max_size=5),
)
def test_lookup_matches_brute_force(
    nets: list[IPv4Network | IPv6Network], probes: list[IPv4Address | IPv6Address], removals: list[int]
) -> None:
    table: PrefixTable[int] = PrefixTable()
    entries: dict[IPv4Network | IPv6Network, int] = {}
    for i, net in enumerate(nets):
        table.insert(net, i)
        entries[net] = i
    for r in removals:
        if r < len(nets) and nets[r] in entries:
            assert table.remove(nets[r]) == entries.pop(nets[r])
    assert len(table) == len(entries)
    assert dict(table.items()) == entries
    for addr in probes + [n.network_address for n in nets]:
        expected = oracle(entries, addr)
        assert table.lookup(addr.packed) == expected
        found = table.lookup_prefix(addr.packed)
        assert (found[1] if found else None) == expected
        if found:
            assert addr in found[0]
        assert [v for _, v in table.matches(addr.packed)][:1] == ([expected] if expected is not None else [])


def test_exact_get_and_replace() -> None:
    t: PrefixTable[str] = PrefixTable()
    t.insert("10.0.0.0/8", "a")
    t.insert(ip_network("10.0.0.0/8"), "b")
    assert len(t) == 1 and t.get("10.0.0.0/8") == "b" and "10.0.0.0/8" in t
    assert t.lookup(bytes([10, 0, 0, 1])) == "b"
    assert t.lookup(bytes([11, 0, 0, 1])) is None
    t.insert("0.0.0.0/0", "default")
    assert t.lookup(bytes([11, 0, 0, 1])) == "default"
    assert t.lookup(bytes(16)) is None  # families are separate


def test_bad_prefix_says_what_is_wrong() -> None:
    t: PrefixTable[int] = PrefixTable()
    with pytest.raises(ValueError, match=r"bad prefix '10\.0\.0\.1/8'"):
        t.insert("10.0.0.1/8", 1)
    with pytest.raises(KeyError):
        t.remove("10.0.0.0/8")
