"""Learned DNS bindings (address -> names, TTL-bounded) and learning them from DNS answers, sans-IO.

Domain rules match a destination through the names it was resolved from. :class:`DnsBindings` holds what the
helper learned, expires it by ``now`` and bounds it (total and per address), so neither time nor a flood of
answers can grow it without limit. Answers are untrusted bytes: with a `netsim.core.dnsguard.DnsGuard` (the
helper), only an answer to a query the guard saw teaches anything (reliability S9).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netsim.core.dns import DNS_MAX_TTL, bindings_from_response, normalize_name, parse_dns_response_untrusted
from netsim.errors import BadPacket, ConfigError

if TYPE_CHECKING:
    from netsim.core.dnsguard import DnsGuard

__all__ = ["DnsBindings", "DnsBindingsStatistics"]


@dataclass(frozen=True)
class DnsBindingsStatistics:
    """Counters of the learned name -> address table."""

    bindings: int
    learned: int
    refreshed: int
    expired: int
    evicted: int
    responses: int
    bad_responses: int


class DnsBindings:
    """Learned ``address -> {name: expiry}`` bindings with TTL expiry (driven by ``now``) and a size cap.

    When full, the binding closest to expiry is evicted (it is the least valuable one left); likewise when one
    address collects more than ``max_names_per_address`` names (a shared CDN address), which bounds the names
    ``classify`` scans per packet. Expiry uses a heap
    with lazy deletion; the heap is rebuilt when stale entries outnumber live ones, so memory stays bounded.
    """

    def __init__(
        self,
        *,
        max_bindings: int = 65536,
        min_ttl: float = 30.0,
        max_ttl: float = DNS_MAX_TTL,
        max_names_per_address: int = 32,
    ) -> None:
        if max_bindings < 1 or max_names_per_address < 1:
            raise ConfigError(
                f"max_bindings and max_names_per_address must be >= 1, got {max_bindings}, {max_names_per_address}"
            )
        self.max_names_per_address = max_names_per_address
        if not 0 <= min_ttl <= max_ttl:
            raise ConfigError(f"need 0 <= min_ttl <= max_ttl, got {min_ttl}, {max_ttl}")
        self.max_bindings = max_bindings
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._by_addr: dict[bytes, dict[str, float]] = {}
        self._heap: list[tuple[float, bytes, str]] = []
        self._count = 0
        self._learned = self._refreshed = self._expired = self._evicted = 0
        self.responses = 0
        self.bad_responses = 0

    def __len__(self) -> int:
        return self._count

    def get(self, addr: bytes) -> dict[str, float] | None:
        """The ``{name: expiry}`` map for ``addr`` (may hold expired entries; compare with ``now``)."""
        return self._by_addr.get(addr)

    def names_for(self, addr: bytes, now: float) -> list[str]:
        """Live names bound to ``addr``."""
        names = self._by_addr.get(bytes(addr))
        return sorted(n for n, exp in names.items() if exp > now) if names else []

    def learn(self, name: str, addr: bytes, ttl: float, now: float) -> None:
        """Bind ``name`` to ``addr`` until ``now + ttl`` (clamped to ``[min_ttl, max_ttl]``).

        The floor keeps a binding alive long enough for the app that asked to connect: a TTL of 0 is common
        for CDN names and would otherwise expire before the first SYN.
        """
        expiry = now + min(max(ttl, self.min_ttl), self.max_ttl)
        name = normalize_name(name)
        names = self._by_addr.get(addr)
        if names is None:
            names = self._by_addr[addr] = {}
        old = names.get(name)
        if old is not None:
            if expiry <= old:
                return
            self._refreshed += 1
        else:
            self.expire(now)
            if self._count >= self.max_bindings:
                self._evict_one()
            names = self._by_addr.setdefault(addr, names)
            if len(names) >= self.max_names_per_address:
                # A shared CDN address can collect many names; classify scans them, so cap the scan.
                victim = min(names, key=names.__getitem__)
                del names[victim]  # its heap entry goes stale and is skipped
                self._count -= 1
                self._evicted += 1
            self._count += 1
            self._learned += 1
        names[name] = expiry
        heapq.heappush(self._heap, (expiry, addr, name))
        if len(self._heap) > 2 * self._count + 64:
            self._heap = [(exp, a, n) for a, ns in self._by_addr.items() for n, exp in ns.items()]
            heapq.heapify(self._heap)

    def learn_response_untrusted(
        self,
        payload: bytes | bytearray | memoryview,
        now: float,
        *,
        guard: DnsGuard | None = None,
        resolver: bytes = b"",
        client: bytes = b"",
        client_port: int = 0,
    ) -> int:
        """Learn the bindings of one DNS response message; return how many were (re)learned.

        ``PolicyEngine.learn_dns_response_untrusted`` is this (see there for ``guard`` and the addresses). Every
        message counts in ``responses``; a malformed one also in ``bad_responses``.

        Raises:
            BadPacket: malformed message.
        """
        self.responses += 1
        learned: Sequence[tuple[str, bytes, float]]
        try:
            if guard is not None:
                learned = guard.accept_response_untrusted(resolver, client, client_port, payload, now)
            else:
                learned = bindings_from_response(parse_dns_response_untrusted(payload))
        except BadPacket:
            self.bad_responses += 1
            raise
        for name, addr, ttl in learned:
            self.learn(name, addr, ttl, now)
        return len(learned)

    def _pop_live(self) -> tuple[float, bytes, str] | None:
        """Pop heap entries until one matches a live binding; return it (already removed from the map)."""
        heap = self._heap
        while heap:
            exp, addr, name = heapq.heappop(heap)
            names = self._by_addr.get(addr)
            if names is not None and names.get(name) == exp:
                del names[name]
                if not names:
                    del self._by_addr[addr]
                self._count -= 1
                return exp, addr, name
        return None

    def _evict_one(self) -> None:
        if self._pop_live() is not None:
            self._evicted += 1

    def expire(self, now: float) -> int:
        """Drop bindings whose expiry is at or before ``now``; return how many."""
        n = 0
        heap = self._heap
        by_addr = self._by_addr
        while heap and heap[0][0] <= now:
            exp, addr, name = heapq.heappop(heap)
            names = by_addr.get(addr)
            if names is not None and names.get(name) == exp:  # else superseded by a refresh or evicted
                del names[name]
                if not names:
                    del by_addr[addr]
                n += 1
        self._count -= n
        self._expired += n
        return n

    def statistics(self) -> DnsBindingsStatistics:
        """Current counters."""
        return DnsBindingsStatistics(
            bindings=self._count,
            learned=self._learned,
            refreshed=self._refreshed,
            expired=self._expired,
            evicted=self._evicted,
            responses=self.responses,
            bad_responses=self.bad_responses,
        )
