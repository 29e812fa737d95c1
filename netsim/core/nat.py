"""Stateful NAT (NAPT44 and NAPT66) for helper-side bypass, sans-IO with ``now`` injected.

Theory of operation
-------------------
A BYPASS packet read from the tunnel carries an address of the tunnel's address space. To send it out of the
physical interface the helper rewrites its source to that interface's address and a port (TCP/UDP) or echo
identifier (ICMP/ICMPv6 echo) taken from a reserved range, in place in the caller's buffer, with RFC 1624
incremental checksum updates (:mod:`netsim.core.checksum`). Replies captured on the interface are matched by
that external port and rewritten back. ICMP errors quoting a mapped packet are translated too (outer address,
quoted address and port, and every checksum involved; RFC 5508 §7).

Behaviour, with the requirement it follows:

* Mapping: endpoint-independent (RFC 4787 REQ-1, RFC 5382 REQ-1): one external port per internal
  ``(address, port)`` whatever the destination.
* Filtering: address-and-port-dependent (RFC 4787 §5, allowed by REQ-8): a reply is let in only from a remote
  endpoint the mapping has sent to. A bypass NAT injects into the provider's tunnel interface, so unsolicited
  inbound traffic from the physical network must not reach it.
* Timeouts (defaults in :class:`NatConfig`): UDP 120 s (RFC 4787 REQ-5: at least 2 min); TCP established
  7440 s (RFC 5382 REQ-5: at least 2 h 4 min) and transitory 240 s (REQ-5: 4 min) -- transitory until a SYN was
  seen each way, and again once a FIN was seen each way or a RST either way; ICMP echo 60 s (RFC 5508 REQ-1).
  Both directions refresh a mapping (RFC 4787 REQ-6 requires outbound refresh, allows inbound).
* Fragments are dropped (``nat_fragment``): a NAPT needs the transport header of every fragment; reassembly is
  out of scope, and the policy sends fragments to rules without ports anyway.
* A full table drops the new flow (``nat_table_full``); a protocol whose port range is used up drops it as
  ``nat_ports_exhausted``. Live mappings are never evicted (that would break a live flow silently).

Expiry is lazy: each mapping holds its deadline; the heap holds one authoritative entry per mapping (plus
superseded ones, skipped when popped). A popped entry whose mapping was refreshed is pushed back with the new
deadline; only a deadline that moves *earlier* (a TCP connection closing) pushes at refresh time, so the
per-packet cost of a refresh is one attribute store. Timers are pulled like the rest of the core: a driver
sleeps until ``get_timer()`` and then calls ``handle_timer(now)`` (``expire(now)``, which also returns the count);
that and any lookup that finds a stale mapping release the port.

No collision with the host's own sockets: the reserved range must be kept away from the kernel's ephemeral
ports, e.g. ``sysctl net.ipv4.ip_local_reserved_ports=61000-61999`` (applies to IPv6 too) or an
``net.ipv4.ip_local_port_range`` that ends below the range. docs/policy.md explains the helper's setup.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections import deque
from dataclasses import dataclass

from netsim.core.checksum import (
    checksum_offset,
    ones_complement_sum,
    rewrite_address,
    update_checksum_field,
)
from netsim.core.packet import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PacketView
from netsim.errors import BadPacket, ConfigError

__all__ = ["DROP_REASONS", "NatConfig", "NatMapping", "NatStatistics", "NatTable"]

#: Every drop reason ``translate_*`` can return (pre-create counters with these).
DROP_REASONS = (
    "nat_no_external_address",
    "nat_fragment",
    "nat_unsupported_protocol",
    "nat_table_full",
    "nat_ports_exhausted",
    "nat_not_for_us",
    "nat_no_mapping",
    "nat_filtered",
    "nat_bad_quote",
)

_U16 = struct.Struct("!H")
_U16_pack = _U16.pack_into
_U16_unpack = _U16.unpack_from
_A4_pack = struct.Struct("4s").pack_into
_A16_pack = struct.Struct("16s").pack_into
_KIND_ICMP = 1  # ICMP and ICMPv6 echo share one identifier space per address family
_SYN, _ACK, _FIN, _RST = 0x02, 0x10, 0x01, 0x04
_SYN_OUT, _SYN_IN, _FIN_OUT, _FIN_IN, _RESET = 1, 2, 4, 8, 16
_ECHO_REQUEST = {4: 8, 6: 128}
_ECHO_REPLY = {4: 0, 6: 129}
_MAX_REMOTES = 64  # remote endpoints remembered per mapping for filtering


@dataclass(frozen=True)
class NatConfig:
    """NAT settings.

    Attributes:
        external_v4, external_v6: the physical interface's addresses (packed bytes or text); None disables that
            family (its packets drop as ``nat_no_external_address``).
        port_range: inclusive external port (and ICMP echo id) range, reserved from the kernel (see module doc).
        max_mappings: table cap across all protocols.
        udp_timeout, tcp_established_timeout, tcp_transitory_timeout, icmp_timeout: seconds (module doc).
    """

    external_v4: bytes | str | None = None
    external_v6: bytes | str | None = None
    port_range: tuple[int, int] = (61000, 61999)
    max_mappings: int = 4096
    udp_timeout: float = 120.0
    tcp_established_timeout: float = 7440.0
    tcp_transitory_timeout: float = 240.0
    icmp_timeout: float = 60.0

    def __post_init__(self) -> None:
        lo, hi = self.port_range
        if not 1024 <= lo <= hi <= 65535:
            raise ConfigError(f"NAT port_range {lo}-{hi} must satisfy 1024 <= low <= high <= 65535")
        if self.max_mappings < 1:
            raise ConfigError(f"NAT max_mappings must be >= 1, got {self.max_mappings}")
        for name in ("udp_timeout", "tcp_established_timeout", "tcp_transitory_timeout", "icmp_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"NAT {name} must be > 0 seconds")
        for attr, version in (("external_v4", 4), ("external_v6", 6)):
            value = getattr(self, attr)
            if value is None:
                continue
            try:
                addr = ipaddress.ip_address(value)
            except ValueError:
                raise ConfigError(f"NAT {attr} {value!r} is not an IP address") from None
            if addr.version != version:
                raise ConfigError(f"NAT {attr} must be an IPv{version} address, got {addr}")
            object.__setattr__(self, attr, addr.packed)


def _rewrite(view: PacketView, m: NatMapping, ext: bytes, outbound: bool) -> None:
    """Rewrite the mapped endpoint in place: source to external (outbound) or destination to internal (inbound).

    RFC 1624 eq. 3 (``HC' = HC + m - m'`` in one's complement arithmetic, as in
    :func:`netsim.core.checksum.incremental_update`) with the differences precomputed per mapping: the old and
    new address and port of a mapping never change, so each checksum update is one add and one modulo. The
    tests check every result against scapy's full recomputation.
    """
    buf = view.buffer
    l4 = view.l4_offset
    kind = m.kind
    if outbound:
        pos = 12 if m.version == 4 else 8
        addr = ext
        port = m.ext_port
        port_pos = l4 + 4 if kind == _KIND_ICMP else l4
        d_ip = m.d_ip
        d_l4 = m.d_l4
    else:
        pos = 16 if m.version == 4 else 24
        addr = m.int_addr
        port = m.int_port
        port_pos = l4 + 4 if kind == _KIND_ICMP else l4 + 2
        d_ip = -m.d_ip
        d_l4 = -m.d_l4
    (_A4_pack if m.version == 4 else _A16_pack)(buf, pos, addr)  # struct beats slice assignment here
    _U16_pack(buf, port_pos, port)
    if m.version == 4:
        _U16_pack(buf, 10, (_U16_unpack(buf, 10)[0] + d_ip) % 0xFFFF)  # RFC 791 header checksum
    if kind == PROTO_UDP:
        csum = l4 + 6
        (cs,) = _U16_unpack(buf, csum)
        if cs or m.version == 6:  # RFC 768: IPv4 UDP checksum 0 means none, and stays none
            _U16_pack(buf, csum, ((cs + d_l4) % 0xFFFF) or 0xFFFF)
    else:
        csum = l4 + 16 if kind == PROTO_TCP else l4 + 2
        _U16_pack(buf, csum, (_U16_unpack(buf, csum)[0] + d_l4) % 0xFFFF)
    if outbound:
        view.src = addr
        if kind == _KIND_ICMP:
            view.icmp_id = port
        else:
            view.sport = port
    else:
        view.dst = addr
        if kind == _KIND_ICMP:
            view.icmp_id = port
        else:
            view.dport = port


class NatMapping:
    """One mapping: internal ``(address, port)`` <-> external port, with its deadline and TCP state."""

    __slots__ = (
        "d_ip",
        "d_l4",
        "expiry",
        "ext_port",
        "int_addr",
        "int_port",
        "kind",
        "queued",
        "remotes",
        "tcp",
        "version",
    )

    def __init__(self, version: int, kind: int, int_addr: bytes, int_port: int, *, ext: bytes, ext_port: int) -> None:
        # Outbound checksum deltas (old - new, RFC 1624); inbound uses their negation. ICMPv4 has no
        # pseudo-header (RFC 792), so only the identifier enters its checksum.
        a_delta = int.from_bytes(int_addr, "big") - int.from_bytes(ext, "big")
        self.d_ip = a_delta % 0xFFFF
        pseudo = 0 if (kind == _KIND_ICMP and version == 4) else a_delta
        self.d_l4 = (pseudo + int_port - ext_port) % 0xFFFF
        self.version = version
        self.kind = kind
        self.int_addr = int_addr
        self.int_port = int_port
        self.ext_port = ext_port
        self.expiry = 0.0
        self.queued = 0.0  # deadline of this mapping's authoritative heap entry
        self.remotes: dict[tuple[bytes, int], None] = {}
        self.tcp = 0

    @property
    def established(self) -> bool:
        """TCP: a SYN seen each way and not closing (RFC 5382 §5 "established")."""
        t = self.tcp
        return t & 3 == 3 and not t & _RESET and t & 12 != 12

    def __repr__(self) -> str:
        return (
            f"NatMapping(v{self.version} kind={self.kind} {ipaddress.ip_address(self.int_addr)}:{self.int_port}"
            f" <-> :{self.ext_port} expiry={self.expiry})"
        )


@dataclass(frozen=True)
class NatStatistics:
    """Counters of a :class:`NatTable`."""

    mappings: int
    created: int
    expired: int
    translated_out: int
    translated_in: int
    icmp_errors_translated: int
    drops: tuple[tuple[str, int], ...]


class NatTable:
    """The NAT state: translate outbound packets (tunnel -> physical) and inbound replies back, in place."""

    def __init__(self, config: NatConfig) -> None:
        self.config = config
        self._ext: dict[int, bytes | None] = {4: config.external_v4, 6: config.external_v6}  # type: ignore[dict-item]
        self._out: dict[tuple[int, int, bytes, int], NatMapping] = {}
        self._in: dict[tuple[int, int, int], NatMapping] = {}
        lo, hi = config.port_range
        self._free: dict[tuple[int, int], deque[int]] = {
            (v, k): deque(range(lo, hi + 1)) for v in (4, 6) for k in (PROTO_TCP, PROTO_UDP, _KIND_ICMP)
        }
        self._heap: list[tuple[float, int, NatMapping]] = []
        self._seq = 0
        self._created = self._expired = 0
        self._out_count = self._in_count = self._icmp_err = 0
        self._drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    def __len__(self) -> int:
        return len(self._out)

    # ---------------------------------------------------------------------------------------------- helpers

    def _drop(self, reason: str) -> str:
        self._drops[reason] += 1
        return reason

    def _timeout(self, m: NatMapping) -> float:
        cfg = self.config
        if m.kind == PROTO_TCP:
            return cfg.tcp_established_timeout if m.established else cfg.tcp_transitory_timeout
        if m.kind == PROTO_UDP:
            return cfg.udp_timeout
        return cfg.icmp_timeout

    def _refresh(self, m: NatMapping, now: float) -> None:
        m.expiry = expiry = now + self._timeout(m)
        if expiry < m.queued:  # the deadline moved earlier (TCP closing): queue it, the old entry goes stale
            m.queued = expiry
            self._seq += 1
            heapq.heappush(self._heap, (expiry, self._seq, m))

    def _release(self, m: NatMapping) -> None:
        del self._out[(m.version, m.kind, m.int_addr, m.int_port)]
        del self._in[(m.version, m.kind, m.ext_port)]
        self._free[(m.version, m.kind)].append(m.ext_port)  # to the back: not reused soon (stale replies)
        m.expiry = -1.0

    def _create(self, key: tuple[int, int, bytes, int], now: float) -> NatMapping | str:
        if len(self._out) >= self.config.max_mappings:
            self.expire(now)
            if len(self._out) >= self.config.max_mappings:
                return self._drop("nat_table_full")
        pool = self._free[(key[0], key[1])]
        if not pool:
            self.expire(now)
            if not pool:
                return self._drop("nat_ports_exhausted")
        ext = self._ext[key[0]]
        assert ext is not None
        m = NatMapping(key[0], key[1], key[2], key[3], ext=ext, ext_port=pool.popleft())
        self._out[key] = m
        self._in[(key[0], key[1], m.ext_port)] = m
        m.expiry = m.queued = now + self._timeout(m)
        self._seq += 1
        heapq.heappush(self._heap, (m.expiry, self._seq, m))
        self._created += 1
        return m

    def _live_in(self, version: int, kind: int, ext_port: int, now: float) -> NatMapping | None:
        m = self._in.get((version, kind, ext_port))
        if m is not None and m.expiry <= now:
            self._release(m)
            self._expired += 1
            return None
        return m

    # ---------------------------------------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        """When `handle_timer` may next have work (a lower bound), or None if the table is empty.

        The pulled-timer pair of the sans-IO core (as `WireGuardDevice.get_timer`): a driver sleeps until this
        deadline (or until a packet arrives) instead of polling.
        """
        return self._heap[0][0] if self._heap else None

    def handle_timer(self, now: float) -> None:
        """Expire the mappings due at ``now`` (`expire`, without its count)."""
        self.expire(now)

    def next_deadline(self) -> float | None:
        """Alias of `get_timer` (the older name)."""
        return self._heap[0][0] if self._heap else None

    def expire(self, now: float) -> int:
        """Remove mappings whose deadline is at or before ``now``; return how many."""
        heap = self._heap
        n = 0
        while heap and heap[0][0] <= now:
            deadline, _, m = heapq.heappop(heap)
            if m.expiry < 0 or deadline != m.queued:
                continue  # released, or a superseded entry
            if m.expiry > now:
                self._seq += 1
                m.queued = m.expiry
                heapq.heappush(heap, (m.expiry, self._seq, m))  # refreshed since it was pushed
                continue
            self._release(m)
            n += 1
        self._expired += n
        return n

    def mapping_for(self, version: int, proto: int, int_addr: bytes, int_port: int, now: float) -> NatMapping | None:
        """The live mapping of an internal endpoint (``proto`` 1 or 58 for echo ids), if any."""
        kind = _KIND_ICMP if proto in (PROTO_ICMP, PROTO_ICMPV6) else proto
        m = self._out.get((version, kind, bytes(int_addr), int_port))
        return m if m is not None and m.expiry > now else None

    # ---------------------------------------------------------------------------------------------- hot path

    def translate_outbound(self, view: PacketView, now: float) -> str | None:
        """Rewrite a packet from the tunnel to leave by the physical interface; None, or the drop reason.

        ``view.buffer`` must be writable (a ``bytearray`` or writable memoryview); the view is kept in step.
        """
        version = view.version
        ext = self._ext[version]
        if ext is None:
            return self._drop("nat_no_external_address")
        if view.fragment_offset or view.more_fragments:
            return self._drop("nat_fragment")
        proto = view.protocol
        if proto in (PROTO_TCP, PROTO_UDP):
            kind = proto
            port = view.sport
            remote = (view.dst, view.dport)
        elif proto == (PROTO_ICMP if version == 4 else PROTO_ICMPV6):
            if view.icmp_type == _ECHO_REQUEST[version]:
                kind = _KIND_ICMP
                port = view.icmp_id
                remote = (view.dst, 0)
            elif view.is_icmp_error:
                return self._icmp_error(view, now, outbound=True)
            else:
                return self._drop("nat_unsupported_protocol")
        else:
            return self._drop("nat_unsupported_protocol")
        key = (version, kind, view.src, port)
        m = self._out.get(key)
        if m is not None and m.expiry <= now:
            self._release(m)
            self._expired += 1
            m = None
        if m is None:
            created = self._create(key, now)
            if isinstance(created, str):
                return created
            m = created
        remotes = m.remotes
        if remote not in remotes:
            if len(remotes) >= _MAX_REMOTES:
                del remotes[next(iter(remotes))]
            remotes[remote] = None
        _rewrite(view, m, ext, True)
        if kind == PROTO_TCP:
            self._track_tcp(m, view.tcp_flags, outbound=True)
        self._refresh(m, now)
        self._out_count += 1
        return None

    def translate_inbound(self, view: PacketView, now: float) -> str | None:
        """Rewrite a reply captured on the physical interface back to the tunnel side; None, or a drop reason.

        ``nat_not_for_us`` means the packet is not addressed to the external address (let the host have it).
        """
        version = view.version
        ext = self._ext[version]
        if ext is None or view.dst != ext:
            return self._drop("nat_not_for_us")
        if view.fragment_offset or view.more_fragments:
            return self._drop("nat_fragment")
        proto = view.protocol
        if proto in (PROTO_TCP, PROTO_UDP):
            kind = proto
            port = view.dport
            remote = (view.src, view.sport)
        elif proto == (PROTO_ICMP if version == 4 else PROTO_ICMPV6):
            if view.icmp_type == _ECHO_REPLY[version]:
                kind = _KIND_ICMP
                port = view.icmp_id
                remote = (view.src, 0)
            elif view.is_icmp_error:
                return self._icmp_error(view, now, outbound=False)
            else:
                return self._drop("nat_unsupported_protocol")
        else:
            return self._drop("nat_unsupported_protocol")
        m = self._live_in(version, kind, port, now)
        if m is None:
            return self._drop("nat_no_mapping")
        if remote not in m.remotes:
            return self._drop("nat_filtered")
        _rewrite(view, m, ext, False)
        if kind == PROTO_TCP:
            self._track_tcp(m, view.tcp_flags, outbound=False)
        self._refresh(m, now)
        self._in_count += 1
        return None

    @staticmethod
    def _track_tcp(m: NatMapping, flags: int, *, outbound: bool) -> None:
        # RFC 5382 §5: SYN each way -> established; FIN each way or RST -> transitory.
        if flags & _RST:
            m.tcp |= _RESET
        elif flags & _SYN:
            if outbound and not flags & _ACK and (m.tcp & _RESET or m.tcp & 12 == 12):
                m.tcp = 0  # a new connection reusing the internal port after the old one closed
            m.tcp |= _SYN_OUT if outbound else _SYN_IN
        if flags & _FIN:
            m.tcp |= _FIN_OUT if outbound else _FIN_IN

    # ---------------------------------------------------------------------------------------------- icmp errors

    def _icmp_error(self, view: PacketView, now: float, *, outbound: bool) -> str | None:
        """Translate an ICMP error that quotes a mapped packet (RFC 5508 §7; RFC 4443 §2.4).

        Inbound, the quote is our translated outbound packet (src = external address and port); outbound (the
        tunnel side's host rejecting a reply), the quote is a de-NATed inbound packet (dst = internal).
        """
        version = view.version
        ext = self._ext[version]
        assert ext is not None
        base = view.quoted_packet_offset()
        try:
            q = view.quoted_packet_untrusted()
        except BadPacket:
            return self._drop("nat_bad_quote")
        if q.version != version or q.fragment_offset:
            return self._drop("nat_bad_quote")
        qproto = q.protocol
        if qproto in (PROTO_TCP, PROTO_UDP):
            kind = qproto
            qport = q.sport if not outbound else q.dport
        elif (
            not outbound
            and qproto == (PROTO_ICMP if version == 4 else PROTO_ICMPV6)
            and q.icmp_type == _ECHO_REQUEST[version]
        ):
            kind = _KIND_ICMP
            qport = q.icmp_id
        else:
            return self._drop("nat_bad_quote")
        if outbound:
            m = self._out.get((version, kind, q.dst, qport))
            if m is None or m.expiry <= now:
                return self._drop("nat_no_mapping")
            remote = (q.src, q.sport)
        else:
            if q.src != ext:
                return self._drop("nat_bad_quote")
            m = self._live_in(version, kind, qport, now)
            if m is None:
                return self._drop("nat_no_mapping")
            remote = (q.dst, q.dport)
        if remote not in m.remotes:
            # Only errors about a flow this mapping carries to that remote (blind ICMP injection, RFC 5927).
            return self._drop("nat_filtered")
        buf = view.buffer
        icmp_csum = view.l4_offset + 2
        end = view.total_length
        before = ones_complement_sum(memoryview(buf)[base:end])
        size = 4 if version == 4 else 16
        # The quoted packet: rewrite its source (inbound) or destination (outbound) endpoint.
        if outbound:
            addr_pos, new_addr, new_port = (16 if version == 4 else 24), ext, m.ext_port
            port_pos = 2
        else:
            addr_pos, new_addr, new_port = (12 if version == 4 else 8), m.int_addr, m.int_port
            port_pos = 0
        old_addr = bytes(buf[base + addr_pos : base + addr_pos + size])
        buf[base + addr_pos : base + addr_pos + size] = new_addr  # type: ignore[index]
        if version == 4:
            update_checksum_field(buf, base + 10, old_addr, new_addr)
        ql4 = base + q.l4_offset
        port_at = ql4 + 4 if kind == _KIND_ICMP else ql4 + port_pos
        old_port = bytes(buf[port_at : port_at + 2])
        new_port_b = new_port.to_bytes(2, "big")
        buf[port_at : port_at + 2] = new_port_b  # type: ignore[index]
        qcs = checksum_offset(q)
        if qcs is not None and base + qcs + 2 <= end:
            at = base + qcs
            if not (kind == PROTO_UDP and version == 4 and buf[at] == 0 and buf[at + 1] == 0):
                if kind != _KIND_ICMP or version == 6:
                    update_checksum_field(buf, at, old_addr, new_addr)  # pseudo-header (ICMPv4 has none)
                update_checksum_field(buf, at, old_port, new_port_b)
        after = ones_complement_sum(memoryview(buf)[base:end])
        # The outer ICMP checksum covers the whole quote: apply the quote's net change (RFC 1624).
        cs = int.from_bytes(buf[icmp_csum : icmp_csum + 2], "big")
        buf[icmp_csum : icmp_csum + 2] = ((cs + before - after) % 0xFFFF).to_bytes(2, "big")  # type: ignore[index]
        # Then the outer header: source (outbound) or destination (inbound), with the ICMPv6 pseudo-header.
        if outbound:
            rewrite_address(view, ext, source=True)
        else:
            rewrite_address(view, m.int_addr, source=False)
        # RFC 5508 REQ-4/REQ-8 (§7): an ICMP error neither refreshes nor deletes the mapping.
        self._icmp_err += 1
        return None

    def statistics(self) -> NatStatistics:
        """Current counters."""
        return NatStatistics(
            mappings=len(self._out),
            created=self._created,
            expired=self._expired,
            translated_out=self._out_count,
            translated_in=self._in_count,
            icmp_errors_translated=self._icmp_err,
            drops=tuple(self._drops.items()),
        )
