"""A per-source token bucket for handshake messages under load (sans-IO: the clock is passed in as ``now``).

Theory of operation. Under load the device demands a cookie (mac2) before it spends a Diffie-Hellman on a
handshake message; a valid mac2 proves the sender can receive at its source address, so it is worth counting
per source. Each source gets a bucket of ``PACKETS_BURSTABLE`` handshakes refilled at ``PACKETS_PER_SECOND``;
a message that finds its bucket empty is dropped before the DH. The constants, the integer-nanosecond token
arithmetic (a new source starts with a full bucket less one packet; a packet is allowed when the bucket holds
*more* than one packet's cost) and the one-second idle expiry are wireguard-go's ``ratelimiter/ratelimiter.go``.

Keys: an IPv4 source by its full address; an IPv6 source by its /64, as the Linux kernel's
``drivers/net/wireguard/ratelimiter.c`` does (wireguard-go keys the full IPv6 address, which lets one host
with a /64 have 2^64 buckets). An IPv4-mapped IPv6 address counts as its IPv4 address.

Bounded memory: the table holds at most ``max_entries`` sources (`MAX_ENTRIES` by default). Entries idle for
more than ``GARBAGE_COLLECT_TIME`` are collected by `handle_timer` (pulled through `get_timer`, as every
netsim timer) and, so that nothing depends on the driver calling it, also by `allow` when a collection is due.
When the table is full of live sources a *new* source is denied, as the kernel does when
it reaches its ``max_entries``: a flood from many addresses then costs at most ``max_entries`` allowed
handshakes per burst, never unbounded memory or DH work. (Evicting an old entry instead would let a rotation
of ``max_entries + 1`` sources be allowed every packet.)
"""

from __future__ import annotations

from ipaddress import IPv6Address, ip_address

__all__ = [
    "GARBAGE_COLLECT_TIME",
    "MAX_ENTRIES",
    "PACKETS_BURSTABLE",
    "PACKETS_PER_SECOND",
    "RateLimiter",
    "source_key",
]

PACKETS_PER_SECOND = 20  # wireguard-go ratelimiter.go packetsPerSecond (kernel: the same)
PACKETS_BURSTABLE = 5  # wireguard-go packetsBurstable
GARBAGE_COLLECT_TIME = 1.0  # seconds idle before an entry is collected (wireguard-go garbageCollectTime)
PACKET_COST = 1_000_000_000 // PACKETS_PER_SECOND  # nanoseconds of tokens one packet costs
MAX_TOKENS = PACKET_COST * PACKETS_BURSTABLE
# Our cap (the kernel's is 8 x its hash table size, 65536 on hosts with more than 1 GiB). Only sources that
# answered a cookie reach the table, so 4096 live ones within a second is already an attack; the table stays
# around a megabyte.
MAX_ENTRIES = 4096


def source_key(host: str) -> bytes | str:
    """The bucket key of a source address: 4 bytes for IPv4, the first 8 (the /64) for IPv6.

    A string that is not an IP address (an in-memory test network's names) is its own key.
    """
    try:
        ip = ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, IPv6Address):
        mapped = ip.ipv4_mapped
        return mapped.packed if mapped is not None else ip.packed[:8]
    return ip.packed


class RateLimiter:
    """Token buckets per source address (see the module docstring for the rules and where they come from).

    Args:
        max_entries: the most sources tracked at once; beyond it new sources are denied.

    Attributes:
        allowed / denied: packets `allow` let through / refused (plain counters).
        table_full: of ``denied``, the new sources refused because the table was full.
    """

    def __init__(self, *, max_entries: int = MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        # key -> [last time (ns), tokens (ns)]; a list so an update is two stores, not a new object
        self._table: dict[bytes | str, list[int]] = {}
        self._next_gc: int | None = None  # ns; None while the table is empty
        self.allowed = self.denied = self.table_full = 0

    def __len__(self) -> int:
        return len(self._table)

    def allow(self, host: str, now: float) -> bool:
        """Charge one handshake from ``host`` at ``now``; True if it may proceed to the DH."""
        t = round(now * 1e9)
        table = self._table
        if self._next_gc is not None and t >= self._next_gc:
            self._collect(t)
        key = source_key(host)
        entry = table.get(key)
        if entry is None:
            if len(table) >= self.max_entries:  # full of sources seen within the last second (collected above)
                self.denied += 1
                self.table_full += 1
                return False
            table[key] = [t, MAX_TOKENS - PACKET_COST]
            if self._next_gc is None:
                self._next_gc = t + round(GARBAGE_COLLECT_TIME * 1e9)
            self.allowed += 1
            return True
        tokens = entry[1] + t - entry[0]
        entry[0] = t
        tokens = min(tokens, MAX_TOKENS)
        if tokens > PACKET_COST:
            entry[1] = tokens - PACKET_COST
            self.allowed += 1
            return True
        entry[1] = tokens
        self.denied += 1
        return False

    def get_timer(self) -> float | None:
        """When `handle_timer` should next collect idle entries (None: the table is empty)."""
        return None if self._next_gc is None else self._next_gc / 1e9

    def handle_timer(self, now: float) -> None:
        """Collect entries idle for more than `GARBAGE_COLLECT_TIME` if a collection is due."""
        t = round(now * 1e9)
        if self._next_gc is not None and t >= self._next_gc:
            self._collect(t)

    def _collect(self, t: int) -> None:
        idle = round(GARBAGE_COLLECT_TIME * 1e9)
        table = self._table
        for key in [k for k, e in table.items() if t - e[0] > idle]:
            del table[key]
        # wireguard-go's collector ticks every second while the table is not empty, and stops when it is
        self._next_gc = t + idle if table else None
