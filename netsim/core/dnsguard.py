"""Which DNS answers the helper may learn from: answers to queries the client really sent (sans-IO).

Theory of operation
-------------------
Domain rules (``bypass isp.lab.test``) act on the addresses the helper learns from DNS answers on their way back
to the apps (`netsim.core.policy.DnsBindings`). Whatever the helper learns pulls traffic out of the tunnel (a
host route excluded from it, or the NAT bypass), so an answer nobody asked for must teach nothing: otherwise one
datagram with source port 53 sent through the tunnel to the client (from anywhere on the internet side, or by the
resolver itself) moves any address it names onto the physical link.

`DnsGuard` applies the acceptance rule of a stub resolver (RFC 5452 §3): an answer counts only if

* it answers a query the client sent and the guard saw (`DnsGuard.record_query_untrusted`, called for every UDP
  datagram to port 53 the client sends), matched on the client's address and port, the transaction id, the
  address the query was sent to and the question (name compared case-insensitively, RFC 4343; type; class);
  ports are 53 on the resolver's side by construction (only those datagrams are recorded or screened);
* it arrives within ``query_timeout`` seconds of the query;
* and it is the first such answer: a match consumes the outstanding query, so a second answer (a forgery racing
  the real one, or a replay) is refused as unsolicited.

A matched answer is then screened record by record: addresses that are the tunnel's own (its DNS servers, the
WireGuard server, the tunnel's interface addresses; `DnsGuard.protect`) are never learned, since excluding them
would move the resolver or the tunnel itself out of the tunnel; IPv4-mapped IPv6 forms of them are refused too.
TTLs are capped at ``max_ttl`` (`netsim.core.dns.DNS_MAX_TTL`, one hour).

Refusals are counted by reason (`REFUSALS`) and nothing here raises but `BadPacket` (a malformed answer, also
counted). An answer that mismatches does not consume the query, so a forgery cannot stop the real answer from
being learned; it can only race it, which the id and the client's random port make a 1-in-2^32 guess for an
off-path sender (the on-path resolver is trusted: put it inside the tunnel).

Memory and time are bounded: at most ``max_pending`` outstanding queries (the oldest is dropped when full,
counted as ``evicted``), each dropped ``query_timeout`` after it was sent (checked on every recorded query and
by `DnsGuard.handle_timer`). Lookups are dict probes: a flood of forged answers costs O(1) each.

Not handled: DNS over TCP (answers to truncated UDP queries, zone-sized answers) is neither recorded nor learned,
so names resolved over TCP get no binding and their traffic follows the other rules (the default, usually the
tunnel); encrypted DNS (DoT, DoH, DoQ) is invisible; multicast DNS (port 5353) is not learned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from netsim.core.dns import (
    DNS_MAX_TTL,
    bindings_from_response,
    normalize_name,
    parse_dns_query_untrusted,
    parse_dns_response_untrusted,
)
from netsim.errors import BadPacket, ConfigError

__all__ = ["REFUSALS", "DnsGuard", "DnsGuardStatistics"]

#: Why an answer (or, for ``own_address``, one of its address records) taught nothing.
REFUSALS: tuple[str, ...] = (
    "unsolicited",  # no outstanding query from this client port with this id
    "wrong_source",  # the client asked another address with this id and port
    "question_mismatch",  # same client port, id and resolver, but another question
    "expired",  # the answer came after query_timeout
    "malformed",  # not a well-formed single-question response
    "own_address",  # a binding naming one of the tunnel's own addresses (counted per name/address binding)
)

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped IPv6 (RFC 4291 §2.5.5.2)

# (client address, client port, transaction id, resolver address, question name, qtype, qclass)
_Key = tuple[bytes, int, int, bytes, str, int, int]


@dataclass(frozen=True, slots=True)
class DnsGuardStatistics:
    """Counters of a `DnsGuard` (plain ints).

    Attributes:
        queries: queries recorded (a retransmission of an outstanding one counts again and refreshes it).
        bad_queries: datagrams to port 53 that are not a well-formed standard query (not tracked).
        pending: outstanding queries now.
        evicted: outstanding queries dropped because the table was full.
        timed_out: outstanding queries dropped unanswered after ``query_timeout``.
        answers: answers screened.
        matched: answers that matched an outstanding query (and consumed it).
        refused: per reason of `REFUSALS`; ``own_address`` counts bindings, the others answers.
        ttl_capped: bindings whose TTL was cut to ``max_ttl``.
    """

    queries: int
    bad_queries: int
    pending: int
    evicted: int
    timed_out: int
    answers: int
    matched: int
    refused: dict[str, int]
    ttl_capped: int

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (the helper's STATS_RESPONSE carries it as ``dns_guard``)."""
        return {
            "queries": self.queries,
            "bad_queries": self.bad_queries,
            "pending": self.pending,
            "evicted": self.evicted,
            "timed_out": self.timed_out,
            "answers": self.answers,
            "matched": self.matched,
            "refused": dict(self.refused),
            "ttl_capped": self.ttl_capped,
        }


def _packed(addr: str | bytes | IPv4Address | IPv6Address) -> bytes:
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise ConfigError(f"a packed address is 4 or 16 bytes, got {len(addr)}")
        return addr
    return ipaddress.ip_address(str(addr).split("%")[0]).packed


class DnsGuard:
    """Outstanding DNS queries of the client, and the screen that only lets their answers teach bindings.

    Args:
        protected: addresses never learned (the tunnel's DNS servers, WireGuard server, interface addresses).
        max_pending: outstanding queries kept at most (>= 1).
        query_timeout: seconds an outstanding query waits for its answer. Stub resolvers give up and retry
            after a few seconds (glibc: 5 s per try, resolv.conf(5)); a retry is recorded again.
        max_ttl: cap on the TTL of a learned record, seconds.
    """

    def __init__(
        self,
        protected: Iterable[str | bytes | IPv4Address | IPv6Address] = (),
        *,
        max_pending: int = 4096,
        query_timeout: float = 15.0,
        max_ttl: float = DNS_MAX_TTL,
    ) -> None:
        if max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, got {max_pending}")
        if not query_timeout > 0 or not max_ttl >= 0:
            raise ConfigError(f"need query_timeout > 0 and max_ttl >= 0, got {query_timeout}, {max_ttl}")
        self.max_pending = max_pending
        self.query_timeout = query_timeout
        self.max_ttl = max_ttl
        self._protected: set[bytes] = set()
        self.protect(protected)
        # Insertion order is expiry order (one timeout for all, ``now`` does not go backwards), so the oldest
        # entry is always first: eviction and expiry pop from the front.
        self._pending: dict[_Key, float] = {}
        self._by_id: dict[tuple[bytes, int, int], int] = {}  # (client, port, id) -> outstanding count
        self._by_src: dict[tuple[bytes, int, int, bytes], int] = {}  # ... plus resolver -> count
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.queries = self.bad_queries = self.evicted = self.timed_out = 0
        self.answers = self.matched = self.ttl_capped = 0

    def protect(self, addresses: Iterable[str | bytes | IPv4Address | IPv6Address]) -> None:
        """Add addresses that answers may never bind (IPv4 ones also in their IPv4-mapped IPv6 form).

        Raises:
            ConfigError: an entry is not an IP address.
        """
        for addr in addresses:
            try:
                packed = _packed(addr)
            except ValueError:
                raise ConfigError(f"not an IP address: {addr!r}") from None
            self._protected.add(packed)
            if len(packed) == 4:
                self._protected.add(_MAPPED_PREFIX + packed)

    @property
    def protected(self) -> frozenset[bytes]:
        """The packed addresses never learned."""
        return frozenset(self._protected)

    def __len__(self) -> int:
        return len(self._pending)

    # -- queries --------------------------------------------------------------------------------------------
    def record_query_untrusted(
        self, client: bytes, client_port: int, resolver: bytes, payload: bytes | bytearray | memoryview, now: float
    ) -> bool:
        """Remember one query the client sent to ``resolver`` port 53 (the UDP payload); True if recorded.

        A datagram that is not a well-formed query is counted in ``bad_queries`` and not tracked (never raised:
        it is the app's packet, it goes on regardless).
        """
        self.handle_timer(now)
        try:
            q = parse_dns_query_untrusted(payload)
        except BadPacket:
            self.bad_queries += 1
            return False
        key = (bytes(client), client_port, q.id, bytes(resolver), normalize_name(q.question), q.qtype, q.qclass)
        pending = self._pending
        if pending.pop(key, None) is None:
            if len(pending) >= self.max_pending:
                self._remove(next(iter(pending)))
                self.evicted += 1
            ident = key[:3]
            self._by_id[ident] = self._by_id.get(ident, 0) + 1
            src = key[:4]
            self._by_src[src] = self._by_src.get(src, 0) + 1
        pending[key] = now + self.query_timeout  # (re)inserted last: the newest
        self.queries += 1
        return True

    def _remove(self, key: _Key) -> None:
        del self._pending[key]
        ident = key[:3]
        left = self._by_id[ident] - 1
        if left:
            self._by_id[ident] = left
        else:
            del self._by_id[ident]
        src = key[:4]
        left = self._by_src[src] - 1
        if left:
            self._by_src[src] = left
        else:
            del self._by_src[src]

    def get_timer(self) -> float | None:
        """When the oldest outstanding query times out (None when there is none)."""
        for expiry in self._pending.values():
            return expiry
        return None

    def handle_timer(self, now: float) -> int:
        """Drop the outstanding queries whose timeout is at or before ``now``; return how many."""
        pending = self._pending
        n = 0
        while pending:
            key, expiry = next(iter(pending.items()))
            if expiry > now:
                break
            self._remove(key)
            n += 1
        self.timed_out += n
        return n

    # -- answers --------------------------------------------------------------------------------------------
    def accept_response_untrusted(
        self, resolver: bytes, client: bytes, client_port: int, payload: bytes | bytearray | memoryview, now: float
    ) -> list[tuple[str, bytes, float]]:
        """Screen one answer from ``resolver`` port 53 to ``client``:``client_port``; return what may be learned.

        Returns ``(name, packed address, ttl)`` bindings (`netsim.core.dns.bindings_from_response`) with the
        tunnel's own addresses left out and TTLs capped; an empty list for a refused answer (counted by reason)
        or one that names nothing (e.g. NXDOMAIN, which still consumes its query).

        Raises:
            BadPacket: the payload is not a well-formed response (counted as ``malformed``).
        """
        self.answers += 1
        try:
            response = parse_dns_response_untrusted(payload)
        except BadPacket:
            self.refused["malformed"] += 1
            raise
        client = bytes(client)
        resolver = bytes(resolver)
        key = (
            client,
            client_port,
            response.id,
            resolver,
            response.question,  # already normalized by the parser
            response.qtype,
            response.qclass,
        )
        expiry = self._pending.get(key)
        if expiry is None:
            if (client, client_port, response.id, resolver) in self._by_src:
                reason = "question_mismatch"
            elif (client, client_port, response.id) in self._by_id:
                reason = "wrong_source"
            else:
                reason = "unsolicited"
            self.refused[reason] += 1
            return []
        self._remove(key)  # consumed: a second answer to the same query is unsolicited
        if expiry <= now:
            self.refused["expired"] += 1
            return []
        self.matched += 1
        out: list[tuple[str, bytes, float]] = []
        protected = self._protected
        cap = self.max_ttl
        for name, addr, ttl in bindings_from_response(response):
            if addr in protected:
                self.refused["own_address"] += 1
                continue
            if ttl > cap:
                self.ttl_capped += 1
                out.append((name, addr, cap))
            else:
                out.append((name, addr, float(ttl)))
        return out

    def statistics(self) -> DnsGuardStatistics:
        """Current counters."""
        return DnsGuardStatistics(
            queries=self.queries,
            bad_queries=self.bad_queries,
            pending=len(self._pending),
            evicted=self.evicted,
            timed_out=self.timed_out,
            answers=self.answers,
            matched=self.matched,
            refused=dict(self.refused),
            ttl_capped=self.ttl_capped,
        )
