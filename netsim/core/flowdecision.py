"""Flow decisions made at a connection's first packet, kept until the rest of the connection asks (sans-IO).

A transparent proxy that decides at SYN time (`netsim.runtime.proxy_tproxy`) asks the provider once, when the
app's SYN is queued, and must find that answer again later: when the SYN is retransmitted before the verdict took
effect, and when a claimed connection's socket is accepted. `DecisionTable` is that memory: keyed by the
connection's 5-tuple (`netsim.core.packet.PacketView.five_tuple`), bounded (``capacity`` entries; inserting into a
full table evicts the oldest entry, counted), and forgetful (an entry older than ``ttl`` seconds is gone). The
clock is injected: every call takes ``now``; nothing here reads time.

Theory of operation: `put` records a decision (and an optional payload, e.g. the flow object the provider was
given); `get` reads it without removing it (a SYN retransmit); `take` reads and removes it (the accepted socket:
each connection is matched once). Expiry is lazy: entries are kept in insertion order (one ``dict``, which
preserves it), so `expire` pops from the front until it meets an entry that is still young; every call runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from netsim.core.packet import FiveTuple
from netsim.errors import LocalProtocolError

__all__ = ["DecisionTable", "DecisionTableStatistics"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DecisionTableStatistics:
    """Counters of a `DecisionTable`: ``inserted = taken + expired + evicted + len(table)`` (replacements aside)."""

    inserted: int
    taken: int
    expired: int
    evicted: int
    size: int


class DecisionTable(Generic[T]):
    """A bounded, expiring map from a 5-tuple to a decision (see the module docstring).

    Args:
        capacity: entries kept at most (1-1048576); one more evicts the oldest (``evicted``).
        ttl: seconds an entry lives (> 0).
    """

    def __init__(self, capacity: int = 1024, ttl: float = 30.0) -> None:
        if not 1 <= capacity <= 1 << 20 or not ttl > 0:
            raise LocalProtocolError("DecisionTable: capacity 1-1048576 and ttl > 0 seconds")
        self.capacity, self.ttl = capacity, ttl
        self._entries: dict[FiveTuple, tuple[float, T]] = {}
        self._inserted = self._taken = self._expired = self._evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def expire(self, now: float) -> int:
        """Forget entries older than ``ttl``; returns how many went."""
        gone = 0
        deadline = now - self.ttl
        while self._entries:
            key = next(iter(self._entries))
            if self._entries[key][0] > deadline:
                break
            del self._entries[key]
            gone += 1
        self._expired += gone
        return gone

    def put(self, key: FiveTuple, decision: T, now: float) -> None:
        """Record ``decision`` for ``key`` at ``now`` (replacing, and re-aging, an entry for the same key)."""
        self.expire(now)
        if key in self._entries:
            del self._entries[key]
        elif len(self._entries) >= self.capacity:
            del self._entries[next(iter(self._entries))]
            self._evicted += 1
        self._entries[key] = (now, decision)
        self._inserted += 1

    def get(self, key: FiveTuple, now: float) -> T | None:
        """The decision for ``key``, kept in the table (None if there is none or it expired)."""
        self.expire(now)
        entry = self._entries.get(key)
        return None if entry is None else entry[1]

    def take(self, key: FiveTuple, now: float) -> T | None:
        """The decision for ``key``, removed from the table (None if there is none or it expired)."""
        self.expire(now)
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._taken += 1
        return entry[1]

    def get_timer(self) -> float | None:
        """When the oldest entry expires (None when empty): the time a caller may call `expire` at."""
        if not self._entries:
            return None
        return next(iter(self._entries.values()))[0] + self.ttl

    def statistics(self) -> DecisionTableStatistics:
        """A frozen snapshot of the counters."""
        return DecisionTableStatistics(self._inserted, self._taken, self._expired, self._evicted, len(self._entries))
