"""AllowedIPs crypto-routing table against a brute-force `ipaddress` oracle."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.prefix import Network
from netsim.core.wireguard.allowedips import AllowedIPs
from netsim.core.wireguard.keys import PublicKey

PEERS = ["alice", "bob", "carol"]


def oracle_lookup(model: dict[Network, str], addr: bytes) -> str | None:
    """Slow reference: scan every prefix, keep the longest one containing the address."""
    a = ip_address(addr)
    best: tuple[int, str] | None = None
    for net, peer in model.items():
        if net.version == a.version and a in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, peer)
    return None if best is None else best[1]


# Prefixes drawn from a small space so inserts collide, nest and move between peers often.
v4 = st.builds(lambda a, p: IPv4Network((a << 24 | a << 8, p), strict=False), st.integers(0, 3), st.integers(0, 32))
v6 = st.builds(lambda a, p: IPv6Network((a << 120 | a << 64, p), strict=False), st.integers(0, 3), st.integers(0, 128))
nets = st.one_of(v4, v6)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), nets, st.sampled_from(PEERS)),
        st.tuples(st.just("remove"), nets, st.none()),
        st.tuples(st.just("remove_peer"), st.none(), st.sampled_from(PEERS)),
    ),
    max_size=40,
)


def probes(model: dict[Network, str], extra: list[bytes]) -> list[bytes]:
    """Addresses at the edges of every prefix plus random ones: where off-by-one masks would show."""
    out = list(extra)
    for net in model:
        out += [net.network_address.packed, net.broadcast_address.packed]
        if net.prefixlen:
            out.append(
                (int(net.network_address) ^ (1 << (net.max_prefixlen - net.prefixlen))).to_bytes(
                    net.max_prefixlen // 8, "big"
                )
            )
    return out


@settings(max_examples=400)
@given(ops, st.lists(st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16), max_size=10))
def test_matches_brute_force_oracle(
    operations: list[tuple[str, Network | None, str | None]], extra: list[bytes]
) -> None:
    table: AllowedIPs[str] = AllowedIPs()
    model: dict[Network, str] = {}
    for op, net, peer in operations:
        if op == "insert":
            assert net is not None and peer is not None
            table.insert(net, peer)
            model[net] = peer  # a prefix belongs to one peer: inserting moves it
        elif op == "remove":
            assert net is not None
            assert table.remove(net) == model.pop(net, None)
        else:
            assert peer is not None
            n = table.remove_peer(peer)
            gone = [k for k, v in model.items() if v == peer]
            assert n == len(gone)
            for k in gone:
                del model[k]
    assert len(table) == len(model)
    assert dict(table.items()) == model
    for peer in PEERS:
        assert set(table.networks(peer)) == {k for k, v in model.items() if v == peer}
    assert set(table.peers()) == set(model.values())
    for addr in probes(model, extra):
        expected = oracle_lookup(model, addr)
        assert table.lookup(addr) == expected
        assert table.lookup(memoryview(bytearray(addr))) == expected
        for peer in PEERS:
            assert table.allowed(peer, addr) == (expected == peer)


def test_insert_moves_prefix_between_peers_and_masks_host_bits() -> None:
    table: AllowedIPs[PublicKey] = AllowedIPs()
    a, b = PublicKey(bytes(32)), PublicKey(bytes([1]) * 32)
    table.insert("10.0.0.7/24", a)  # stored as 10.0.0.0/24, like `wg set`
    table.insert("0.0.0.0/0", b)
    assert table.networks(a) == [ip_network("10.0.0.0/24")]
    assert table.lookup(bytes([10, 0, 0, 200])) == a
    table.insert(ip_network("10.0.0.0/24"), b)
    assert table.networks(a) == [] and a not in table.peers()
    assert table.lookup(bytes([10, 0, 0, 200])) == b
    assert not table.allowed(a, bytes([10, 0, 0, 1]))
    assert "10.0.0.0/24" in table and len(table) == 2


def test_inbound_source_validation_with_equal_but_distinct_peer_objects() -> None:
    table: AllowedIPs[PublicKey] = AllowedIPs()
    table.insert("fd00::/64", PublicKey(bytes([7]) * 32))
    src = ip_address("fd00::1").packed
    assert table.allowed(PublicKey(bytes([7]) * 32), src)
    assert not table.allowed(PublicKey(bytes([8]) * 32), src)
    assert not table.allowed(PublicKey(bytes([7]) * 32), ip_address("fd01::1").packed)
    # an IPv4 source never matches an IPv6 prefix, even ::/0
    table.insert("::/0", PublicKey(bytes([7]) * 32))
    assert table.lookup(bytes(4)) is None


def test_replace_peer_and_clear() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.0.0.0/8", "a")
    table.insert("192.168.0.0/16", "b")
    table.replace_peer("a", ["172.16.0.0/12", "10.1.0.0/16"])
    assert table.networks("a") == [ip_network("10.1.0.0/16"), ip_network("172.16.0.0/12")]
    assert table.lookup(bytes([10, 2, 0, 1])) is None
    table.clear()
    assert len(table) == 0 and table.lookup(bytes([192, 168, 0, 1])) is None
