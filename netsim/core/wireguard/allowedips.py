"""Crypto-key routing: the AllowedIPs table (whitepaper §2, "Cryptokey Routing").

One table serves both directions. Outbound, the destination address of a plaintext packet selects the peer
to encrypt to (longest prefix wins). Inbound, after a datagram from peer P decrypts, its inner source address
must look up to P itself, else the packet is dropped: a peer may only send from the addresses it is allowed.

Semantics follow the Linux module and wireguard-go (``device/allowedips.go``): a prefix belongs to at most one
peer, so inserting a prefix another peer owns *moves* it; removing a peer removes all its prefixes; inserted
prefixes have their host bits masked off (``10.0.0.1/24`` is stored as ``10.0.0.0/24``).

Built on `netsim.core.prefix.PrefixTable`, whose lookup costs one dict probe per distinct prefix length.
Peers are any hashable objects (the protocol's peer state, or a `PublicKey`); they are compared by identity
first, then equality.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from ipaddress import ip_network
from typing import Generic, TypeVar

from netsim.core.prefix import Network, PrefixTable

__all__ = ["AllowedIPs"]

P = TypeVar("P", bound=Hashable)


def _as_network(network: Network | str) -> Network:
    """Parse with host bits masked, as WireGuard does (``wg set ... allowed-ips 10.0.0.1/24`` stores /24).

    Network objects already have zero host bits (``ipaddress`` guarantees it).

    Raises:
        ValueError: not an IPv4/IPv6 prefix.
    """
    return ip_network(network, strict=False) if isinstance(network, str) else network


class AllowedIPs(Generic[P]):
    """Map prefixes to peers with longest-prefix match on raw address bytes.

    Example:
        >>> t: AllowedIPs[str] = AllowedIPs()
        >>> t.insert("10.0.0.0/24", "alice"); t.insert("0.0.0.0/0", "bob")
        >>> t.lookup(bytes([10, 0, 0, 7])), t.allowed("alice", bytes([10, 0, 0, 7])), t.allowed("alice", bytes(4))
        ('alice', True, False)
    """

    __slots__ = ("_by_peer", "_table", "lookup")

    lookup: Callable[[bytes | bytearray | memoryview], P | None]
    """Outbound peer selection: the peer owning the longest prefix covering a raw 4- or 16-byte address.

    The table's own bound method, so the per-packet call costs one frame, not two.
    """

    def __init__(self) -> None:
        self._table: PrefixTable[P] = PrefixTable()
        self._by_peer: dict[P, set[Network]] = {}
        self.lookup = self._table.lookup

    def insert(self, network: Network | str, peer: P) -> None:
        """Allow ``network`` for ``peer``, taking it away from any peer that had it (WireGuard semantics)."""
        net = _as_network(network)
        previous = self._table.get(net)
        if previous is not None and previous is not peer:
            owned = self._by_peer[previous]
            owned.discard(net)
            if not owned:
                del self._by_peer[previous]
        self._table.insert(net, peer)
        self._by_peer.setdefault(peer, set()).add(net)

    def remove(self, network: Network | str) -> P | None:
        """Remove one prefix; returns the peer that owned it, or None if nobody did."""
        net = _as_network(network)
        peer = self._table.get(net)
        if peer is None:
            return None
        self._table.remove(net)
        owned = self._by_peer[peer]
        owned.discard(net)
        if not owned:
            del self._by_peer[peer]
        return peer

    def remove_peer(self, peer: P) -> int:
        """Remove every prefix of ``peer`` (the peer was removed); returns how many."""
        owned = self._by_peer.pop(peer, set())
        for net in owned:
            self._table.remove(net)
        return len(owned)

    def replace_peer(self, peer: P, networks: Iterable[Network | str]) -> None:
        """Set ``peer``'s prefixes to exactly ``networks`` (``wg set ... replace-allowed-ips``)."""
        self.remove_peer(peer)
        for net in networks:
            self.insert(net, peer)

    def allowed(self, peer: P, src: bytes | bytearray | memoryview) -> bool:
        """Inbound source validation: may ``peer`` send packets from source address ``src`` (4 or 16 bytes)?"""
        owner = self._table.lookup(src)
        return owner is peer or (owner is not None and owner == peer)

    def networks(self, peer: P) -> list[Network]:
        """The prefixes ``peer`` owns, sorted (v4 first, then by address and length)."""
        return sorted(self._by_peer.get(peer, ()), key=lambda n: (n.version, n.network_address, n.prefixlen))

    def peers(self) -> list[P]:
        """Every peer that owns at least one prefix."""
        return list(self._by_peer)

    def items(self) -> Iterator[tuple[Network, P]]:
        """All (prefix, peer) pairs."""
        return self._table.items()

    def clear(self) -> None:
        """Remove everything."""
        self._table.clear()
        self._by_peer.clear()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, network: object) -> bool:
        return network in self._table
