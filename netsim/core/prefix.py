"""Longest-prefix-match tables over raw address bytes.

One structure serves every prefix lookup in netsim: WireGuard crypto-routing (AllowedIPs), the Apple route
resolver and the bypass policy. Theory of operation: per address family, one dict per prefix length maps the
masked address (an ``int``) to the value; a lookup converts the address once with ``int.from_bytes`` and probes
the lengths present, longest first. Real tables hold few distinct lengths (a handful to a few dozen), so a lookup
is a few dict probes -- a binary trie in pure Python would do a Python step per bit instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Generic, TypeVar

__all__ = ["Network", "PrefixTable", "as_network"]

V = TypeVar("V")
Network = IPv4Network | IPv6Network

_FULL = {4: (1 << 32) - 1, 6: (1 << 128) - 1}
_BITS = {4: 32, 6: 128}


def as_network(network: Network | str) -> Network:
    """Parse ``network`` (a string such as ``"10.0.0.0/8"`` or a network object), strict about host bits.

    Raises:
        ValueError: with a message naming the bad prefix (host bits set, not an address).
    """
    if isinstance(network, IPv4Network | IPv6Network):
        return network
    try:
        return ip_network(network, strict=True)
    except ValueError as exc:
        raise ValueError(f"bad prefix {network!r}: {exc}") from None


class _Family(Generic[V]):
    __slots__ = ("bits", "by_length", "lengths", "masks")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_length: dict[int, dict[int, V]] = {}
        self.lengths: tuple[int, ...] = ()  # present lengths, longest first
        self.masks: tuple[int, ...] = ()

    def reindex(self) -> None:
        self.lengths = tuple(sorted((n for n, d in self.by_length.items() if d), reverse=True))
        full = (1 << self.bits) - 1
        self.masks = tuple(full ^ ((1 << (self.bits - n)) - 1) for n in self.lengths)


class PrefixTable(Generic[V]):
    """A map from IPv4/IPv6 prefixes to values with longest-prefix-match lookup on raw address bytes.

    Example:
        >>> t: PrefixTable[str] = PrefixTable()
        >>> t.insert("10.0.0.0/8", "tunnel"); t.insert("10.1.2.3/32", "bypass")
        >>> t.lookup(bytes([10, 1, 2, 3])), t.lookup(bytes([10, 9, 9, 9])), t.lookup(bytes(4))
        ('bypass', 'tunnel', None)
    """

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[V] = _Family(32)
        self._v6: _Family[V] = _Family(128)

    def _family(self, version: int) -> _Family[V]:
        return self._v4 if version == 4 else self._v6

    def insert(self, network: Network | str, value: V) -> None:
        """Map ``network`` to ``value``, replacing any value already stored for that exact prefix."""
        net = as_network(network)
        fam = self._family(net.version)
        bucket = fam.by_length.setdefault(net.prefixlen, {})
        is_new_length = not bucket
        bucket[int(net.network_address)] = value
        if is_new_length:
            fam.reindex()

    def remove(self, network: Network | str) -> V:
        """Remove the exact prefix and return its value.

        Raises:
            KeyError: the prefix is not in the table.
        """
        net = as_network(network)
        fam = self._family(net.version)
        bucket = fam.by_length.get(net.prefixlen)
        if bucket is None or int(net.network_address) not in bucket:
            raise KeyError(str(net))
        value = bucket.pop(int(net.network_address))
        if not bucket:
            del fam.by_length[net.prefixlen]
            fam.reindex()
        return value

    def get(self, network: Network | str) -> V | None:
        """The value stored for exactly ``network`` (no longest-prefix match), or None."""
        net = as_network(network)
        bucket = self._family(net.version).by_length.get(net.prefixlen)
        return None if bucket is None else bucket.get(int(net.network_address))

    def lookup(self, addr: bytes | bytearray | memoryview) -> V | None:
        """Longest-prefix match for a raw 4- or 16-byte address; None when nothing covers it."""
        fam = self._v4 if len(addr) == 4 else self._v6
        a = int.from_bytes(addr, "big")
        by_length = fam.by_length
        for n, mask in zip(fam.lengths, fam.masks, strict=True):
            v = by_length[n].get(a & mask)
            if v is not None:
                return v
        return None

    def lookup_prefix(self, addr: bytes | bytearray | memoryview) -> tuple[Network, V] | None:
        """Like `lookup` but also returns the matching prefix (the first, i.e. longest, of `matches`)."""
        return next(self.matches(addr), None)

    def matches(self, addr: bytes | bytearray | memoryview) -> Iterator[tuple[Network, V]]:
        """Every prefix covering ``addr``, longest first."""
        version = 4 if len(addr) == 4 else 6
        fam = self._family(version)
        a = int.from_bytes(addr, "big")
        for n, mask in zip(fam.lengths, fam.masks, strict=True):
            bucket = fam.by_length[n]
            key = a & mask
            if key in bucket:
                yield (IPv4Network((key, n)) if version == 4 else IPv6Network((key, n))), bucket[key]

    def items(self) -> Iterator[tuple[Network, V]]:
        """All (prefix, value) pairs, IPv4 first, longest prefixes first within a family."""
        for version, fam in ((4, self._v4), (6, self._v6)):
            for n in fam.lengths:
                for key, value in fam.by_length[n].items():
                    yield (IPv4Network((key, n)) if version == 4 else IPv6Network((key, n))), value

    def clear(self) -> None:
        """Remove everything."""
        self._v4 = _Family(32)
        self._v6 = _Family(128)

    def __len__(self) -> int:
        return sum(len(b) for fam in (self._v4, self._v6) for b in fam.by_length.values())

    def __contains__(self, network: object) -> bool:
        if not isinstance(network, str | IPv4Network | IPv6Network):
            return False
        return self.get(network) is not None
