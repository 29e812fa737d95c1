"""`PacketFilterEngine` and `run_packet_filter` in memory: verdict mapping, delay and its bound, the failure
verdict (fail open / fail closed), misuse, and one flush per batch (netsim.runtime.filter; docs/filters.md)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from netsim.apple import AF_INET, AF_INET6, Packet, ProviderStopReason, TrafficDirection
from netsim.apple.filter import FilterPacketContext, FilterPacketProvider, FilterPacketProviderVerdict
from netsim.errors import LocalProtocolError
from netsim.runtime.filter import FilterStatistics, PacketFilterEngine, run_packet_filter
from netsim.transports.nfqueue import NF_ACCEPT, NF_DROP, QueuedPacket

V4 = bytes.fromhex("4500001c0001000040117cce7f0000017f000001d4310007000812ab")
V6 = bytes([0x60]) + bytes(39)
ALLOW, DROP, DELAY = (
    FilterPacketProviderVerdict.ALLOW,
    FilterPacketProviderVerdict.DROP,
    FilterPacketProviderVerdict.DELAY,
)
Handler = Callable[[FilterPacketContext, str, TrafficDirection, bytes, int], Any]


def _q(pid: int, hook: int = 4, payload: bytes = V4, indev: int = 0, outdev: int = 2) -> QueuedPacket:
    return QueuedPacket(pid, 0x0800, hook, payload, 0, indev, outdev)


class Sink:
    def __init__(self) -> None:
        self.buffered: list[tuple[int, int]] = []
        self.flushes: list[list[tuple[int, int]]] = []

    def send(self, pid: int, verdict: int) -> None:
        self.buffered.append((pid, verdict))

    def flush(self) -> None:
        self.flushes.append(self.buffered)
        self.buffered = []

    @property
    def sent(self) -> dict[int, int]:
        return {pid: v for batch in self.flushes for pid, v in batch}


class Recorder(FilterPacketProvider):
    def __init__(self, handler: Handler | None = None) -> None:
        super().__init__()
        self.packet_handler = handler
        self.calls: list[tuple[str, TrafficDirection, int]] = []
        self.delayed: list[Packet] = []


def _engine(handler: Handler | None, **kw: Any) -> tuple[PacketFilterEngine, Recorder, Sink]:
    provider = Recorder(handler)
    sink = Sink()
    engine = PacketFilterEngine(provider, sink.send, sink.flush, interfaces={2: "en0", 3: "en1"}, **kw)
    return engine, provider, sink


def test_allow_and_drop_become_kernel_verdicts_sent_in_one_flush_per_batch() -> None:
    engine, _, sink = _engine(lambda ctx, i, d, b, n: DROP if b[19] == 2 and len(b) == n else ALLOW)
    dropped = V4[:19] + b"\x02" + V4[20:]
    engine.handle_batch([_q(1), _q(2, payload=dropped), _q(3)])
    assert sink.flushes == [[(1, NF_ACCEPT), (2, NF_DROP), (3, NF_ACCEPT)]]
    assert engine.statistics() == FilterStatistics(seen=3, allowed=2, dropped=1)


def test_the_handler_sees_interface_names_and_directions_by_hook() -> None:
    calls: list[tuple[str, TrafficDirection]] = []

    def handler(ctx: FilterPacketContext, iface: str, direction: TrafficDirection, data: bytes, n: int) -> Any:
        calls.append((iface, direction))
        return ALLOW

    engine, _, _ = _engine(handler)
    engine.handle_batch([_q(1, hook=0, indev=3, outdev=0), _q(2, hook=4, outdev=2), _q(3, hook=4, outdev=7)])
    assert calls == [
        ("en1", TrafficDirection.INBOUND),
        ("en0", TrafficDirection.OUTBOUND),
        ("if7", TrafficDirection.OUTBOUND),
    ]


def test_no_handler_allows() -> None:
    engine, _, sink = _engine(None)
    engine.handle_batch([_q(1)])
    assert sink.sent == {1: NF_ACCEPT}


def test_a_delayed_packet_is_held_until_allow_or_drop_and_then_sent_at_once() -> None:
    def handler(ctx: FilterPacketContext, iface: str, d: TrafficDirection, data: bytes, n: int) -> Any:
        provider.delayed.append(provider.delay_current_packet(ctx))
        return DELAY

    engine, provider, sink = _engine(handler)
    engine.handle_batch([_q(1), _q(2, payload=V6)])
    assert sink.sent == {}  # held: no verdict yet
    first, second = provider.delayed
    assert (first.protocol_family, second.protocol_family) == (AF_INET, AF_INET6)
    assert first.data == V4 and first.direction == TrafficDirection.OUTBOUND
    provider.allow(second)
    assert sink.flushes[-1] == [(2, NF_ACCEPT)]  # outside a batch: flushed at once
    provider.drop(first)
    assert sink.flushes[-1] == [(1, NF_DROP)]
    provider.allow(first)  # no longer delayed
    stats = engine.statistics()
    assert (stats.delayed, stats.released_allowed, stats.released_dropped, stats.stale_releases, stats.held) == (
        2, 1, 1, 1, 0,
    )  # fmt: skip


def test_delaying_past_the_bound_drops_the_oldest() -> None:
    def handler(ctx: FilterPacketContext, iface: str, d: TrafficDirection, data: bytes, n: int) -> Any:
        provider.delayed.append(provider.delay_current_packet(ctx))
        return DELAY

    engine, provider, sink = _engine(handler, max_delayed=2)
    engine.handle_batch([_q(1), _q(2), _q(3)])
    assert sink.flushes == [[(1, NF_DROP)]]
    provider.allow(provider.delayed[0])  # evicted: stale
    provider.allow(provider.delayed[2])
    stats = engine.statistics()
    assert (stats.delay_evicted, stats.stale_releases, stats.held, stats.released_allowed) == (1, 1, 1, 1)


@pytest.mark.parametrize("fail_open", [False, True])
def test_the_failure_verdict_follows_the_fail_open_choice(fail_open: bool) -> None:
    def handler(ctx: FilterPacketContext, iface: str, d: TrafficDirection, data: bytes, n: int) -> Any:
        if data is V6:
            raise RuntimeError("boom")
        if n == len(V4) and ctx is not None and iface == "en1":
            return "nonsense"
        if iface == "en0" and d == TrafficDirection.OUTBOUND and n == len(V4):
            return DELAY  # without delay_current_packet
        provider.delayed.append(provider.delay_current_packet(ctx))
        return DELAY

    engine, provider, sink = _engine(handler, fail_open=fail_open)
    engine.handle_batch([_q(1, payload=V6), _q(2, outdev=3), _q(3, outdev=2), _q(4, hook=0, indev=2, outdev=0)])
    fail = NF_ACCEPT if fail_open else NF_DROP
    assert sink.flushes == [[(1, fail), (2, fail), (3, fail)]]
    engine.finish()  # the held packet 4 gets the failure verdict too
    assert sink.flushes[-1] == [(4, fail)]
    stats = engine.statistics()
    assert (stats.handler_errors, stats.bad_verdicts, stats.finished) == (1, 2, 1)
    with pytest.raises(LocalProtocolError, match="not attached"):
        provider.allow(provider.delayed[0])  # detached by finish


def test_delayed_then_answered_otherwise_is_not_held() -> None:
    def handler(ctx: FilterPacketContext, iface: str, d: TrafficDirection, data: bytes, n: int) -> Any:
        provider.delay_current_packet(ctx)
        with pytest.raises(LocalProtocolError, match="already delayed"):
            provider.delay_current_packet(ctx)
        return DROP

    engine, provider, sink = _engine(handler)
    engine.handle_batch([_q(1)])
    assert sink.sent == {1: NF_DROP} and engine.statistics().held == 0


def test_delay_current_packet_outside_the_handler_or_with_a_foreign_context_is_misuse() -> None:
    engine, provider, _ = _engine(lambda *a: ALLOW)
    with pytest.raises(LocalProtocolError, match="only valid inside packet_handler"):
        provider.delay_current_packet(engine._context)
    other, _, _ = _engine(None)
    with pytest.raises(LocalProtocolError, match="not from this provider"):
        provider.delay_current_packet(other._context)
    with pytest.raises(LocalProtocolError, match="max_delayed"):
        _engine(None, max_delayed=0)


def test_statistics_from_another_process_are_read_defensively() -> None:
    stats = FilterStatistics(seen=3, allowed=2, dropped=1)
    assert FilterStatistics.from_dict_untrusted(stats.to_dict()) == stats
    assert FilterStatistics.from_dict_untrusted({"seen": -1, "allowed": True, "dropped": "x"}) == FilterStatistics()
    assert FilterStatistics.from_dict_untrusted([1, 2]) == FilterStatistics()


class FakeQueue:
    """An `NfQueue` stand-in: a socketpair end to wake on, batches handed in by the test."""

    def __init__(self) -> None:
        self.rx, self.tx = socket.socketpair()
        self.rx.setblocking(False)
        self.pending: list[list[QueuedPacket]] = []
        self.sink = Sink()
        self.bad: dict[str, int] = {"truncated_nlmsghdr": 1}

    def fileno(self) -> int:
        return self.rx.fileno()

    def push(self, batch: list[QueuedPacket]) -> None:
        self.pending.append(batch)
        self.tx.send(b"x")

    def receive_batch(self, limit: int = 256) -> list[QueuedPacket]:
        try:
            self.rx.recv(64)
        except BlockingIOError:
            pass
        return self.pending.pop(0) if self.pending else []

    def verdict(self, pid: int, verdict: int, mark: int | None = None) -> None:
        self.sink.send(pid, verdict)

    def flush(self) -> int:
        self.sink.flush()
        return 0


class Lifecycle(FilterPacketProvider):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[object] = []

    async def start_filter(self) -> None:
        self.events.append(("start", self.filter_configuration.vendor_configuration))
        self.packet_handler = lambda ctx, iface, d, data, n: DROP if iface == "en1" else ALLOW

    async def stop_filter(self, reason: ProviderStopReason) -> None:
        self.events.append(("stop", reason))


@trio.testing.trio_test
async def test_run_packet_filter_starts_the_provider_and_answers_one_batch_per_wakeup() -> None:
    queue = FakeQueue()
    provider = Lifecycle()
    async with trio.open_nursery() as nursery:
        engine = await nursery.start(
            lambda task_status: run_packet_filter(
                provider,
                queue,  # type: ignore[arg-type]
                interfaces={2: "en0", 3: "en1"},
                configuration={"k": 1},
                task_status=task_status,
            )
        )
        queue.push([_q(1), _q(2, outdev=3)])
        await trio.testing.wait_all_tasks_blocked()
        queue.push([_q(3)])
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert queue.sink.flushes[:2] == [[(1, NF_ACCEPT), (2, NF_DROP)], [(3, NF_ACCEPT)]]
    assert provider.events == [("start", {"k": 1}), ("stop", ProviderStopReason.USER_INITIATED)]
    assert engine.statistics(sum(queue.bad.values())).bad_messages == 1
    queue.rx.close()
    queue.tx.close()
