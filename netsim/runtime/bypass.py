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

Wiring: the helper builds its NAT bypass itself, from a factory it is given at construction
(``Helper(..., nat_bypass=factory)``, ``factory(sink, ledger) -> NatBypass``), once its ledger exists: the NAT's
stages join the helper's ledger, the helper is its `BypassSink`, and nothing is assigned on either object
afterwards (`NatBypassHost.make_bypass` is such a factory). The helper hands each BYPASS packet over with the
`PacketView` it already parsed (`NatBypass.send_view`), and the NAT rewrites it in place in the helper's own IPC
receive buffer: one parse, no copy. Replies are parsed once too: a DNS answer among them goes to
`BypassSink.bypass_dns_reply` with the NAT's view before the batch is delivered.

Batching: the helper hands BYPASS packets over one by one from its classification loop (`NatBypass.send_view`;
one ``sendto`` each, Python has no ``sendmmsg``) and ends the batch with `NatBypass.rearm`. The capture side is
a `netsim.runtime.driver.DatagramCore` run by the one driver (`DatagramDriver`): one wakeup per readiness of the
packet socket or due NAT expiry (`NatTable.get_timer` / `handle_timer`) drains up to ``batch`` frames into the
driver's reused buffers (the third list carries each frame's offload flags), translates them all, hands them to
the provider as one IPC frame, then fires the expiries that are due -- in the same wakeup, as for every core. The
NAT never sends through the driver (``datagrams_to_send`` is empty): it sends on its own, from `send_view`.
Replies are handed to the sink as views into the driver's buffers, valid only during the call: the helper's IPC
channel copies only what it must queue (``borrowed=True``), a sink that keeps them copies them.

Ledger stages (added to the helper's ledger): ``nat_out`` (BYPASS packets -> sent on en0; dropped: the NAT's
``nat_*`` reasons, ``malformed``, ``raw_eagain``, ``raw_error``) and ``nat_in`` (captured frames -> handed to the
provider; dropped: ``nat_*`` reasons, ``malformed``, ``no_provider``, ``ipc_queue_full``...). Segments made from
a super-packet are counted in ``segments_out``, not as extra packets.
"""

from __future__ import annotations

import logging
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
from netsim.runtime.driver import DatagramDriver
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

    def bypass_deliver(self, packets: list[Buffer]) -> str | None:
        """Hand de-NATed packets to the provider (one call per batch): None, or a drop reason (``no_provider``).

        ``packets`` may be views into the NAT's receive buffers, valid only during the call: copy what you keep.
        """
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

    It is the `netsim.runtime.driver.DatagramCore` of its own capture loop (`run`, a `DatagramDriver`).
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
        # the capture loop is the one driver; its receive buffers are the NAT's (the third list: offload flags)
        self._driver = DatagramDriver(
            self, transport, batch=batch, clock=self._now, send=_no_send, max_datagram=_MAX_FRAME
        )
        self._rx = self._driver.views
        self._rx_sizes = self._driver.sizes
        self._rx_flags: list[Any] = self._driver.addrs
        self._view = PacketView()
        self.checksums_completed = 0
        self.superpackets = 0
        self.segments_out = 0
        self.batches_delivered = 0

    def _now(self) -> float:
        return self.clock()  # read at each wakeup: ``clock`` may be replaced after construction

    @property
    def wakeups(self) -> int:
        """Capture-loop wakeups so far (the driver's)."""
        return self._driver.wakeups

    # -- outbound (tunnel -> en0) --------------------------------------------------------------------------
    def send_view(self, view: PacketView, now: float) -> None:
        """NAT and send one packet the caller already parsed into ``view``; call `rearm` after the batch.

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

    def rearm(self) -> None:
        """End of an outbound batch: pull the capture loop's wakeup in to the NAT's next expiry (a new mapping)."""
        self._driver.rearm()

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
        self.rearm()

    # -- inbound (en0 -> tunnel): the DatagramCore the capture loop drives -------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The capture loop (`DatagramDriver.run` over this core): one wakeup drains a batch, translates it and
        delivers it in one call, then expires the NAT mappings that are due. The helper runs it in its nursery
        (`netsim.runtime.helper.Helper.run`)."""
        await self._driver.run(task_status=task_status)

    def get_timer(self) -> float | None:
        """`DatagramCore`: the NAT table's next expiry."""
        return self.nat.get_timer()

    def handle_timer(self, now: float) -> None:
        """`DatagramCore`: expire the mappings due at ``now``."""
        self.nat.handle_timer(now)

    def datagrams_to_send(self, now: float) -> tuple[()]:
        """`DatagramCore`: nothing; the NAT sends on its own (`send_view`, `send_batch`)."""
        return ()

    def receive(self, n: int, now: float) -> None:
        """`receive_batch` over this object's (the driver's) receive buffers."""
        self.receive_batch(self._rx, self._rx_sizes, self._rx_flags, n, now)

    def receive_batch(self, bufs: Sequence[memoryview], sizes: list[int], flags: list[Any], n: int, now: float) -> None:
        """`DatagramCore`: translate ``n`` captured frames ``bufs[i][:sizes[i]]`` and deliver them (one sink call).

        ``flags[i]`` are the frame's offload flags (`netsim.transports.raw.FLAG_CSUM_NOT_READY`). Each frame is
        parsed once: the NAT's view serves the translation, the checksum completion, the segmentation and the
        DNS learning (`BypassSink.bypass_dns_reply`). The delivered packets are views into ``bufs`` (no copy):
        the sink copies what it keeps past the call.
        """
        st = self._in
        st.count_read(n)
        nat = self.nat
        view = self._view
        sink = self.sink
        out: list[Buffer] = []
        frames = 0
        max_packet = self.max_packet
        for i in range(n):
            frame = bufs[i][: sizes[i]]
            flag = flags[i]
            try:
                view.load_untrusted(frame)
            except BadPacket:
                st.count_dropped("malformed")
                continue
            reason = nat.translate_inbound(view, now)
            if reason is not None:
                st.count_dropped(reason)
                continue
            if flag & FLAG_CSUM_NOT_READY:
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
                out.extend(segs)  # new buffers of their own
                continue
            if view.sport == 53 and view.protocol == 17 and sink is not None and not view.is_fragment:
                sink.bypass_dns_reply(view, now)  # before delivery: the app's next packet sees the binding
            out.append(frame[: view.total_length])  # a view: valid during the sink call (it copies what it keeps)
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

    `open` reads the interface's addresses, installs `HostSetup` and opens `RawBypassTransport`; `make_bypass` is
    the helper's NAT factory (``Helper(..., nat_bypass=host.make_bypass)``): the helper calls it once its ledger
    exists and runs the pump in its own nursery. `close` undoes it all in reverse.
    """

    def __init__(
        self,
        setup: HostSetup,
        transport: BypassTransport,
        config: NatConfig,
        *,
        clock: Callable[[], float] = trio.current_time,
        max_packet: int = 1420,
    ) -> None:
        self.setup = setup
        self.transport = transport
        self.config = config
        self.clock = clock
        self.max_packet = max_packet
        self.bypass: NatBypass | None = None

    @classmethod
    def open(
        cls,
        interface: str,
        *,
        fwmark: int | None = None,
        port_range: tuple[int, int] = (61000, 61999),
        clock: Callable[[], float] = trio.current_time,
        max_packet: int = 1420,
    ) -> NatBypassHost:
        """Open the NAT bypass's host side on ``interface`` (root; run inside the simulated Mac's namespace).

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
        log.info(
            "nat bypass ready",
            extra={"event": "bypass_ready", "interface": interface, "v4": v4, "v6": v6, "ports": list(port_range)},
        )
        return cls(setup, transport, config, clock=clock, max_packet=max_packet)

    def make_bypass(self, sink: BypassSink, ledger: Ledger) -> NatBypass:
        """The helper's NAT factory: the pump over this host's sockets, replying to ``sink``, counting in
        ``ledger``. Called once.

        Raises:
            ConfigError: called a second time (one pump per capture socket).
        """
        if self.bypass is not None:
            raise ConfigError("this NatBypassHost already made its NatBypass (one pump per capture socket)")
        self.bypass = NatBypass(
            NatTable(self.config),
            self.transport,
            sink=sink,
            ledger=ledger,
            clock=self.clock,
            max_packet=self.max_packet,
        )
        return self.bypass

    def close(self) -> None:
        """Close the sockets and remove the host rules (idempotent)."""
        self.transport.close()
        self.setup.remove()


def _no_send(data: Buffer, addr: Any) -> None:
    """The driver's send for the NAT: never called (`NatBypass.datagrams_to_send` is empty)."""
