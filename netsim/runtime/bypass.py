"""The bypass mechanisms' I/O: helper packet NAT out of the physical interface, and the route compile step.

Theory of operation
-------------------
Two mechanisms carry out a policy's BYPASS verdicts (docs/bypass.md compares them):

* **route** (Apple-supported): prefix-only BYPASS rules become ``excludedRoutes`` (`excluded_routes_for`), so the
  kernel sends that traffic out of ``en0`` before it ever reaches the utun; domain rules become host routes as
  their DNS answers arrive (`PolicyEngine.route_exclusion`, pushed by the helper before the answer).
  `netsim.core.policy.route_exclusions_payload` is what the helper adds to its SETTINGS frame; the provider
  turns it into excluded routes. Ports and protocols cannot be expressed as routes: packets they would bypass
  reach the helper and are tunnelled.
* **nat** (what teams try; not a supported use on Apple, TN3120): `NatBypass` takes BYPASS packets the helper
  read from the provider, rewrites them with the sans-IO `NatTable` (source -> ``en0``'s address and a port from
  a reserved range) and sends them out of ``en0`` with a raw socket; a packet socket on ``en0`` captures the
  replies to the NAT's mappings, which are rewritten back and returned to the provider for
  ``write_packet_objects``.

Modules by layer: the capture socket's BPF program is `netsim.core.bpf`, super-packet segmentation
`netsim.core.segment`, the sockets `netsim.transports.raw` (`RawBypassTransport`, `interface_addresses`), the
nftables/sysctl host setup `netsim.runtime.bypass_host`, the in-memory transport
`netsim.testing.memory_bypass`. This module is the pump (`NatBypass`) and its wiring (`NatBypassHost`).

Wiring: the helper constructs first (the NAT's ledger stages live in the helper's ledger), then the NAT bypass
with the helper as its `BypassSink` (passed at construction; no attribute is set on it later), then
``Helper.attach_bypass`` tells the helper which NAT carries its BYPASS verdicts. The helper hands each BYPASS
packet over with the `PacketView` it already parsed (`NatBypass.send_view`), and the NAT rewrites it in place
in the helper's own IPC receive buffer: one parse, no copy. Replies are parsed once too: a DNS answer among
them goes to `BypassSink.bypass_dns_reply` with the NAT's view before the batch is delivered.

Batching: the helper hands BYPASS packets over one by one from its classification loop (`NatBypass.send_view`;
one ``sendto`` each, Python has no ``sendmmsg``) and ends the batch with `NatBypass.flush`; the capture loop
wakes once per readiness, drains up to ``batch`` frames, translates them all and hands them to the provider as
one IPC frame. The NAT's expiry timer (`NatTable.get_timer` / `handle_timer`) is the same loop's deadline.

Ledger stages (added to the helper's ledger): ``nat_out`` (BYPASS packets -> sent on en0; dropped: the NAT's
``nat_*`` reasons, ``malformed``, ``raw_eagain``, ``raw_error``) and ``nat_in`` (captured frames -> handed to the
provider; dropped: ``nat_*`` reasons, ``malformed``, ``no_provider``, ``ipc_queue_full``...). Segments made from
a super-packet are counted in ``segments_out``, not as extra packets.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from netsim.core.checksum import checksum_offset, compute_l4_checksum
from netsim.core.ledger import Ledger
from netsim.core.nat import NatConfig, NatStatistics, NatTable
from netsim.core.packet import PROTO_TCP, Buffer, PacketView
from netsim.core.segment import segment_tcp
from netsim.errors import BadPacket, ConfigError
from netsim.runtime.bypass_host import HostSetup
from netsim.transports.raw import FLAG_CSUM_NOT_READY, BypassTransport, RawBypassTransport, interface_addresses

__all__ = [
    "BypassSink",
    "BypassStatistics",
    "NatBypass",
    "NatBypassHost",
]

log = logging.getLogger("netsim.bypass")

_MAX_FRAME = 65535
_U16 = struct.Struct("!H")


class BypassSink(Protocol):
    """Where the NAT bypass hands its replies: the helper (given to `NatBypass` at construction).

    The NAT calls `bypass_dns_reply` for each de-NATed DNS answer (UDP from port 53, not a fragment) with its
    own parse of it, before `bypass_deliver` hands the batch to the provider, so a domain rule applies to the
    app's very first packet to a learned address and the reply is not parsed a second time.
    """

    def bypass_deliver(self, packets: list[bytes]) -> str | None:
        """Hand de-NATed packets to the provider (one call per batch): None, or a drop reason (``no_provider``)."""
        ...

    def bypass_dns_reply(self, view: PacketView, now: float) -> None:
        """Learn from one de-NATed DNS answer (``view`` is valid only during the call)."""
        ...


# ------------------------------------------------------------------------------------------------ the NAT bypass
@dataclass(frozen=True, slots=True)
class BypassStatistics:
    """Counters of a `NatBypass`.

    Attributes:
        nat: the NAT table's counters (mappings, translations, drops by reason).
        sent / send_drops: packets sent on the physical interface / dropped before or at the send, by reason.
        captured / delivered / receive_drops: frames captured, packets handed to the provider, drops by reason.
        checksums_completed: captured packets whose partial (offloaded) transport checksum was completed.
        superpackets / segments_out: GSO super-packets captured and the segments they were cut into.
        wakeups / batches_delivered: capture-loop wakeups and IPC batches handed to the provider.
    """

    nat: NatStatistics
    sent: int
    send_drops: tuple[tuple[str, int], ...]
    captured: int
    delivered: int
    receive_drops: tuple[tuple[str, int], ...]
    checksums_completed: int
    superpackets: int
    segments_out: int
    wakeups: int
    batches_delivered: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the helper's STATS_RESPONSE carries it under ``"bypass"``)."""
        n = self.nat
        return {
            "nat": {
                "mappings": n.mappings,
                "created": n.created,
                "expired": n.expired,
                "translated_out": n.translated_out,
                "translated_in": n.translated_in,
                "icmp_errors_translated": n.icmp_errors_translated,
                "drops": {k: v for k, v in n.drops if v},
            },
            "sent": self.sent,
            "send_drops": dict(self.send_drops),
            "captured": self.captured,
            "delivered": self.delivered,
            "receive_drops": dict(self.receive_drops),
            "checksums_completed": self.checksums_completed,
            "superpackets": self.superpackets,
            "segments_out": self.segments_out,
            "wakeups": self.wakeups,
            "batches_delivered": self.batches_delivered,
        }


class NatBypass:
    """The helper-side NAT bypass: BYPASS packets out of the physical interface, their replies back.

    Args:
        nat: the NAT state (its `NatConfig` names en0's addresses and the reserved port range).
        transport: `RawBypassTransport.open(...)` in a helper; `MemoryBypassTransport` in tests.
        sink: receives the de-NATed replies (the `Helper`); None drops them as ``no_provider``.
        ledger: the stages ``nat_out`` and ``nat_in`` are created in it (the helper's ledger).
        clock: the time source the NAT's timeouts use.
        max_packet: the largest packet the provider's utun takes (its MTU); longer TCP replies are segmented.
        batch: frames drained per wakeup.
    """

    def __init__(
        self,
        nat: NatTable,
        transport: BypassTransport,
        *,
        sink: BypassSink | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = trio.current_time,
        max_packet: int = 1420,
        batch: int = 32,
    ) -> None:
        if max_packet < 576:
            raise ConfigError(f"max_packet {max_packet} is below the IPv4 minimum of 576")
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        self.nat = nat
        self.transport = transport
        self.sink = sink
        self.clock = clock
        self.max_packet = max_packet
        self.batch = batch
        ledger = ledger if ledger is not None else Ledger("bypass")
        self.ledger = ledger
        self._out = ledger.stage("nat_out")
        self._in = ledger.stage("nat_in")
        self._tx = bytearray(_MAX_FRAME)
        self._tx_view = memoryview(self._tx)
        self._rx_slab = bytearray(batch * _MAX_FRAME)
        slab = memoryview(self._rx_slab)
        self._rx = [slab[i * _MAX_FRAME : (i + 1) * _MAX_FRAME] for i in range(batch)]
        self._rx_sizes = [0] * batch
        self._rx_flags = [0] * batch
        self._view = PacketView()
        self._scope: trio.CancelScope | None = None
        self.checksums_completed = 0
        self.superpackets = 0
        self.segments_out = 0
        self.wakeups = 0
        self.batches_delivered = 0

    # -- outbound (tunnel -> en0) --------------------------------------------------------------------------
    def send_view(self, view: PacketView, now: float) -> None:
        """NAT and send one packet the caller already parsed into ``view``; call `flush` after the batch.

        The helper's path: its classification parsed the packet (``view`` is loaded over a slice of the helper's
        own IPC receive buffer, consumed when the batch is done), so the NAT rewrites it in place there and sends
        it -- no second parse, no copy. A read-only buffer (a caller's ``bytes``) is copied into this object's
        transmit buffer first, so the caller's bytes never change.
        """
        st = self._out
        st.count_read()
        buf = view.buffer
        if isinstance(buf, memoryview) and not buf.readonly:
            frame: Buffer = buf
        else:
            n = len(buf)
            if n > _MAX_FRAME:
                st.count_dropped("malformed")
                return
            self._tx[:n] = buf
            frame = self._tx_view[:n]
            view.buffer = frame
        reason = self.nat.translate_outbound(view, now)
        if reason is None:
            reason = self.transport.send(memoryview(frame)[: view.total_length], view.version, view.dst)
        if reason is None:
            st.count_forwarded()
        else:
            st.count_dropped(reason)

    def flush(self) -> None:
        """End of an outbound batch: pull the capture loop's deadline in to the NAT's next expiry."""
        scope = self._scope
        deadline = self.nat.get_timer()
        if scope is not None and deadline is not None and deadline < scope.deadline:
            scope.deadline = deadline

    def send_batch(self, packets: Sequence[Buffer]) -> None:
        """NAT and send packets nobody parsed yet (copied: the caller's buffers are not changed)."""
        st = self._out
        now = self.clock()
        nat = self.nat
        view = self._view
        tx = self._tx
        txv = self._tx_view
        send = self.transport.send
        st.count_read(len(packets))
        for pkt in packets:
            n = len(pkt)
            if n > _MAX_FRAME:
                st.count_dropped("malformed")
                continue
            tx[:n] = pkt
            frame = txv[:n]
            try:
                view.load_untrusted(frame)
            except BadPacket:
                st.count_dropped("malformed")
                continue
            reason = nat.translate_outbound(view, now)
            if reason is None:
                reason = send(txv[: view.total_length], view.version, view.dst)
            if reason is None:
                st.count_forwarded()
            else:
                st.count_dropped(reason)
        self.flush()

    # -- inbound (en0 -> tunnel) ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The capture loop: one wakeup drains a batch, translates it and delivers it in one call; expires NAT
        mappings at their deadlines (`NatTable.get_timer` / `handle_timer`). Run it in a nursery for the
        helper's lifetime."""
        task_status.started()
        transport = self.transport
        nat = self.nat
        while True:
            deadline = nat.get_timer()
            with trio.CancelScope(deadline=deadline if deadline is not None else math.inf) as scope:
                self._scope = scope
                await transport.wait_readable()
            self._scope = None
            self.wakeups += 1
            now = self.clock()
            if scope.cancelled_caught:
                nat.handle_timer(now)
                continue
            n = transport.recv_batch(self._rx, self._rx_sizes, self._rx_flags)
            if n:
                self.receive(n, now)

    def receive(self, n: int, now: float) -> None:
        """Translate ``n`` captured frames from the receive buffers and deliver them (one sink call).

        Each frame is parsed once: the NAT's view serves the translation, the checksum completion, the
        segmentation and the DNS learning (`BypassSink.bypass_dns_reply`).
        """
        st = self._in
        st.count_read(n)
        nat = self.nat
        view = self._view
        sink = self.sink
        out: list[bytes] = []
        frames = 0
        max_packet = self.max_packet
        for i in range(n):
            frame = self._rx[i][: self._rx_sizes[i]]
            flags = self._rx_flags[i]
            try:
                view.load_untrusted(frame)
            except BadPacket:
                st.count_dropped("malformed")
                continue
            reason = nat.translate_inbound(view, now)
            if reason is not None:
                st.count_dropped(reason)
                continue
            if flags & FLAG_CSUM_NOT_READY:
                # The transport checksum held only the pseudo-header sum (offload), so the NAT's incremental
                # update of it means nothing: compute it in full now that the addresses are final.
                off = checksum_offset(view)
                if off is not None and not view.is_fragment:
                    _U16.pack_into(frame, off, compute_l4_checksum(view))
                    self.checksums_completed += 1
            frames += 1
            if view.total_length > max_packet and view.protocol == PROTO_TCP and not view.is_fragment:
                segs = segment_tcp(view, max_packet)
                self.superpackets += 1
                self.segments_out += len(segs)
                out.extend(bytes(s) for s in segs)
                continue
            if view.sport == 53 and view.protocol == 17 and sink is not None and not view.is_fragment:
                sink.bypass_dns_reply(view, now)  # before delivery: the app's next packet sees the binding
            out.append(bytes(frame[: view.total_length]))  # the IPC owns it until written: copy
        if not out:
            return
        reason = "no_provider" if sink is None else sink.bypass_deliver(out)
        # A super-packet counts as one frame forwarded, however many segments it became.
        if reason is None:
            st.count_forwarded(frames)
            self.batches_delivered += 1
        else:
            st.count_dropped(reason, frames)

    # -- statistics ----------------------------------------------------------------------------------------
    def statistics(self) -> BypassStatistics:
        """A frozen snapshot."""
        o, i = self._out, self._in
        return BypassStatistics(
            nat=self.nat.statistics(),
            sent=o.forwarded,
            send_drops=tuple(sorted(o.dropped.items())),
            captured=i.read,
            delivered=i.forwarded,
            receive_drops=tuple(sorted(i.dropped.items())),
            checksums_completed=self.checksums_completed,
            superpackets=self.superpackets,
            segments_out=self.segments_out,
            wakeups=self.wakeups,
            batches_delivered=self.batches_delivered,
        )

    def close(self) -> None:
        """Close the transport."""
        self.transport.close()


# ------------------------------------------------------------------------------------------------ wiring
class NatBypassHost:
    """Everything the helper needs for the NAT mechanism on ``interface``, opened together, closed together.

    `open` reads the interface's addresses, installs `HostSetup`, opens `RawBypassTransport` and builds the
    `NatBypass` with ``sink`` (the helper) as its reply sink; `close` undoes it in reverse. Tell the helper which
    NAT carries its BYPASS verdicts (``Helper.attach_bypass(host.bypass)``) and run ``host.bypass.run`` in the
    helper's nursery.
    """

    def __init__(self, setup: HostSetup, bypass: NatBypass) -> None:
        self.setup = setup
        self.bypass = bypass

    @classmethod
    def open(
        cls,
        interface: str,
        *,
        sink: BypassSink | None = None,
        fwmark: int | None = None,
        port_range: tuple[int, int] = (61000, 61999),
        ledger: Ledger | None = None,
        clock: Callable[[], float] = trio.current_time,
        max_packet: int = 1420,
    ) -> NatBypassHost:
        """Open the NAT bypass on ``interface`` (root; run inside the simulated Mac's namespace).

        Raises:
            ConfigError: the interface has no address, or a socket/rule could not be set up.
            PrivilegeError: not root.
        """
        v4, v6 = interface_addresses(interface)
        if v4 is None and v6 is None:
            raise ConfigError(f"interface {interface!r} has no IPv4 or global IPv6 address for the NAT bypass")
        config = NatConfig(external_v4=v4, external_v6=v6, port_range=port_range)
        setup = HostSetup(interface, port_range, v4, v6)
        setup.apply()
        try:
            transport = RawBypassTransport.open(interface, config, fwmark=fwmark)
        except BaseException:
            setup.remove()
            raise
        bypass = NatBypass(NatTable(config), transport, sink=sink, ledger=ledger, clock=clock, max_packet=max_packet)
        log.info(
            "nat bypass ready",
            extra={"event": "bypass_ready", "interface": interface, "v4": v4, "v6": v6, "ports": list(port_range)},
        )
        return cls(setup, bypass)

    def close(self) -> None:
        """Close the sockets and remove the host rules (idempotent)."""
        self.bypass.close()
        self.setup.remove()
