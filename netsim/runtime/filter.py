"""Runs a `FilterPacketProvider` against an NFQUEUE queue: one batch of verdicts per wakeup (docs/filters.md).

Theory of operation. The kernel queues every packet the filter's rules match (the physical interfaces, both
directions) and holds it until a verdict names its id. `PacketFilterEngine` (no I/O, no trio) turns one batch of
`QueuedPacket` into verdicts: it presents each to the provider's handler through one reused
`FilterPacketContext`, maps ALLOW/DROP to ``NF_ACCEPT``/``NF_DROP``, and for DELAY keeps the packet id, bounded by
``max_delayed`` (one more evicts the oldest, dropped). `FilterPacketProvider.allow` / ``drop`` on a delayed packet
send its verdict at once. The failure verdict (a handler that raises or answers nonsense, packets still delayed
at the end) is ``NF_ACCEPT`` when the filter fails open and ``NF_DROP`` when it fails closed, the same choice the
rules make with ``--queue-bypass`` for a filter that is not running.

`run_packet_filter` is the trio loop: wait until the queue's socket is readable, read every queued packet
(`NfQueue.receive_batch`, bounded), run the batch, send its verdicts in one ``send``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from netsim.apple.enums import ProviderStopReason, TrafficDirection
from netsim.apple.filter import FilterPacketContext, FilterPacketProvider, FilterPacketProviderVerdict
from netsim.apple.packet import AF_INET, AF_INET6, Packet
from netsim.errors import LocalProtocolError
from netsim.transports.nfqueue import NF_ACCEPT, NF_DROP, NfQueue, QueuedPacket

__all__ = ["FilterStatistics", "PacketFilterEngine", "run_packet_filter"]

log = logging.getLogger(__name__)

_NF_INET_PRE_ROUTING = 0
_NF_INET_LOCAL_IN = 1
_NF_INET_FORWARD = 2
_MAX_DELAYED = 1 << 16
_ALLOW, _DROP, _DELAY = (int(v) for v in FilterPacketProviderVerdict)


@dataclass(frozen=True)
class FilterStatistics:
    """A filter's counters (plain numbers; ``seen = allowed + dropped + delayed_now + released + ...``).

    Attributes:
        seen: packets presented to the handler (or allowed because no handler is set).
        allowed, dropped: verdicts ALLOW and DROP (and the failure verdict, in its own counters below too).
        delayed: DELAY verdicts; ``held`` of them are still delayed now.
        released_allowed, released_dropped: delayed packets later passed to `allow` / `drop`.
        delay_evicted: delayed packets dropped because ``max_delayed`` more were delayed after them.
        finished: delayed packets given the failure verdict when the filter stopped.
        handler_errors: handler calls that raised (the packet got the failure verdict).
        bad_verdicts: answers that are not a verdict, or DELAY without `delay_current_packet`.
        stale_releases: `allow` / `drop` of a packet no longer delayed.
        bad_messages: malformed netlink messages the queue skipped (their packets get no verdict from us).
    """

    seen: int = 0
    allowed: int = 0
    dropped: int = 0
    delayed: int = 0
    held: int = 0
    released_allowed: int = 0
    released_dropped: int = 0
    delay_evicted: int = 0
    finished: int = 0
    handler_errors: int = 0
    bad_verdicts: int = 0
    stale_releases: int = 0
    bad_messages: int = 0

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict_untrusted(cls, data: object) -> FilterStatistics:
        """Read counters another process wrote: anything malformed reads as zero."""
        if not isinstance(data, dict):
            return cls()
        out: dict[str, int] = {}
        for name in cls.__dataclass_fields__:
            value = data.get(name)
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63
            out[name] = value if ok and isinstance(value, int) else 0
        return cls(**out)


class PacketFilterEngine:
    """The verdict logic between a queue and a provider (sans-IO: verdicts go to ``send``, ``flush`` ends a batch).

    Args:
        provider: the `FilterPacketProvider` (attached to this engine; detached by `finish`).
        send: buffers one verdict ``(packet_id, NF_ACCEPT or NF_DROP)`` (`NfQueue.verdict`).
        flush: sends what ``send`` buffered (`NfQueue.flush`); called once per batch, and once per release.
        interfaces: interface index -> name, for the handler's ``interface`` (an unknown index reads ``"if<n>"``).
        fail_open: the failure verdict is allow (else drop).
        max_delayed: packets delayed at once (1-65536); one more evicts the oldest (dropped).
        configuration: the provider's ``filter_configuration.vendor_configuration``.
    """

    def __init__(
        self,
        provider: FilterPacketProvider,
        send: Callable[[int, int], None],
        flush: Callable[[], object],
        *,
        interfaces: Mapping[int, str] | None = None,
        fail_open: bool = False,
        max_delayed: int = 256,
        configuration: Mapping[str, Any] | None = None,
    ) -> None:
        if not 1 <= max_delayed <= _MAX_DELAYED:
            raise LocalProtocolError(f"max_delayed must be 1-{_MAX_DELAYED}, not {max_delayed}")
        self.provider = provider
        self.fail_open = fail_open
        self.max_delayed = max_delayed
        self._send, self._flush = send, flush
        self._fail = NF_ACCEPT if fail_open else NF_DROP
        self._names = dict(interfaces or {})
        self._context = FilterPacketContext(self)
        self._current: QueuedPacket | None = None
        self._delayed: dict[int, tuple[Packet, int]] = {}  # id(Packet) -> (Packet, packet_id), oldest first
        self._delayed_now = False
        self._in_batch = False
        self._c = dict.fromkeys(FilterStatistics.__dataclass_fields__, 0)
        provider._attach(self, configuration)

    # ---- the provider's calls (netsim.apple.filter._FilterHost)
    def delay(self, context: FilterPacketContext) -> Packet:
        current = self._current
        if context is not self._context or current is None:
            raise LocalProtocolError("delay_current_packet is only valid inside packet_handler, with its context")
        if self._delayed_now:
            raise LocalProtocolError("delay_current_packet: this packet is already delayed")
        payload = current.payload
        family = AF_INET6 if payload[:1] and payload[0] >> 4 == 6 else AF_INET
        packet = Packet(payload, family, self._direction(current.hook))
        if len(self._delayed) >= self.max_delayed:  # the bound: the oldest goes
            _, oldest_id = self._delayed.pop(next(iter(self._delayed)))
            self._send(oldest_id, NF_DROP)
            self._c["delay_evicted"] += 1
        self._delayed[id(packet)] = (packet, current.packet_id)
        self._delayed_now = True
        return packet

    def release(self, packet: Packet, allow: bool) -> None:
        entry = self._delayed.get(id(packet))
        if entry is None or entry[0] is not packet:
            self._c["stale_releases"] += 1
            return
        del self._delayed[id(packet)]
        self._send(entry[1], NF_ACCEPT if allow else NF_DROP)
        self._c["released_allowed" if allow else "released_dropped"] += 1
        if not self._in_batch:  # from another task: nobody else will flush it
            self._flush()

    # ---- the host's calls
    @staticmethod
    def _direction(hook: int) -> TrafficDirection:
        return TrafficDirection.INBOUND if hook <= _NF_INET_LOCAL_IN else TrafficDirection.OUTBOUND

    def handle_batch(self, batch: Sequence[QueuedPacket]) -> None:
        """Present every packet of ``batch`` to the handler; their verdicts are sent with one flush."""
        if not batch:
            return
        c = self._c
        send = self._send
        context = self._context
        self._in_batch = True
        try:
            for queued in batch:
                c["seen"] += 1
                handler = self.provider.packet_handler
                if handler is None:
                    send(queued.packet_id, NF_ACCEPT)
                    c["allowed"] += 1
                    continue
                hook = queued.hook
                ifindex = queued.indev if hook <= _NF_INET_FORWARD and queued.indev else queued.outdev
                name = self._names.get(ifindex)
                if name is None:
                    name = self._names[ifindex] = f"if{ifindex}"
                self._current = queued
                self._delayed_now = False
                context._current = queued.packet_id
                verdict: object
                try:
                    verdict = handler(context, name, self._direction(hook), queued.payload, len(queued.payload))
                except Exception:
                    log.exception("packet_handler raised; packet %d gets the failure verdict", queued.packet_id)
                    c["handler_errors"] += 1
                    verdict = -1
                finally:
                    self._current = None
                    context._current = None
                self._decide(queued.packet_id, verdict)
        finally:
            self._in_batch = False
            self._flush()

    def _decide(self, packet_id: int, verdict: object) -> None:
        c = self._c
        if self._delayed_now and verdict != _DELAY:  # delayed, then answered otherwise: the answer wins
            self._delayed.popitem()  # the newest entry is this packet
        if verdict == _ALLOW:
            self._send(packet_id, NF_ACCEPT)
            c["allowed"] += 1
        elif verdict == _DROP:
            self._send(packet_id, NF_DROP)
            c["dropped"] += 1
        elif verdict == _DELAY and self._delayed_now:
            c["delayed"] += 1
        else:
            if verdict != -1:
                c["bad_verdicts"] += 1
            self._send(packet_id, self._fail)
            c["allowed" if self.fail_open else "dropped"] += 1
        self._delayed_now = False

    def finish(self) -> None:
        """Give every packet still delayed the failure verdict, flush, and detach from the provider."""
        for _, packet_id in self._delayed.values():
            self._send(packet_id, self._fail)
            self._c["finished"] += 1
        self._delayed.clear()
        self._flush()
        self.provider._attach(None)

    def statistics(self, bad_messages: int = 0) -> FilterStatistics:
        return FilterStatistics(**{**self._c, "held": len(self._delayed), "bad_messages": bad_messages})


async def run_packet_filter(
    provider: FilterPacketProvider,
    queue: NfQueue,
    *,
    interfaces: Mapping[int, str] | None = None,
    fail_open: bool = False,
    max_delayed: int = 256,
    configuration: Mapping[str, Any] | None = None,
    batch_limit: int = 256,
    on_engine: Callable[[PacketFilterEngine], object] | None = None,
    task_status: trio.TaskStatus[PacketFilterEngine] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``provider`` on ``queue`` until cancelled: `FilterPacketProvider.start_filter`, then one batch of
    verdicts per wakeup; on the way out, delayed packets get the failure verdict and
    `FilterPacketProvider.stop_filter` runs (shielded, bounded to 5 s). ``task_status.started`` gets the engine
    (its `PacketFilterEngine.statistics` are live)."""
    engine = PacketFilterEngine(
        provider,
        queue.verdict,
        queue.flush,
        interfaces=interfaces,
        fail_open=fail_open,
        max_delayed=max_delayed,
        configuration=configuration,
    )
    if on_engine is not None:
        on_engine(engine)
    reason = ProviderStopReason.USER_INITIATED
    try:
        await provider.start_filter()
        task_status.started(engine)
        fd = queue.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            engine.handle_batch(queue.receive_batch(batch_limit))
    except trio.Cancelled:
        raise
    except BaseException:
        reason = ProviderStopReason.PROVIDER_FAILED
        raise
    finally:
        engine.finish()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await provider.stop_filter(reason)
