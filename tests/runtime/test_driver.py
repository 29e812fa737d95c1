"""`netsim.runtime.driver.DatagramDriver` with a scripted core over the fake network (autojump MockClock), and
the helper's statistics JSON generated from the dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import trio
import trio.testing

from netsim.core.wireguard.device import DeviceStatistics
from netsim.runtime.driver import Buffer, DatagramDriver
from netsim.runtime.helper import HelperStatistics
from netsim.testing.memory_tunnel import FakeNetwork, memory_tunnel, udp_packet


class EchoCore:
    """Answers every datagram with its bytes reversed and runs a periodic timer."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.next_timer: float | None = period
        self.batches: list[int] = []
        self.fired: list[float] = []
        self.out: list[tuple[bytes, Any]] = []

    def receive_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any], n: int, now: float) -> None:
        self.batches.append(n)
        self.out += [(bytes(bufs[i][: sizes[i]])[::-1], addrs[i]) for i in range(n)]

    def datagrams_to_send(self, now: float) -> Iterable[tuple[Buffer, Any]]:
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        return self.next_timer

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        self.next_timer = now + self.period if len(self.fired) < 3 else None


def test_one_wakeup_per_batch_timers_pulled_and_replies_sent() -> None:
    async def main() -> None:
        net = FakeNetwork()
        a, b = net.attach(("10.0.0.1", 1)), net.attach(("10.0.0.2", 2))
        core = EchoCore(period=5.0)
        after: list[float] = []
        driver = DatagramDriver(core, a, batch=8, after=after.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            for i in range(20):
                b.send(b"abc%d" % i, ("10.0.0.1", 1))
            await trio.sleep(1)
            bufs = [memoryview(bytearray(100)) for _ in range(32)]
            sizes, addrs = [0] * 32, [None] * 32
            n = b.recv_batch(bufs, sizes, addrs)  # type: ignore[arg-type]
            assert n == 20
            assert bytes(bufs[0][: sizes[0]]) == b"0cba"
            assert core.batches == [8, 8, 4]  # bounded batches, one per wakeup
            await trio.sleep(20)
            assert core.fired == [5.0, 10.0, 15.0]  # fired at the deadline, not after a poll interval
            nursery.cancel_scope.cancel()
        assert driver.wakeups == len(after) == 3 + 3

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_flush_moves_the_wakeup_earlier() -> None:
    async def main() -> None:
        net = FakeNetwork()
        a = net.attach(("10.0.0.1", 1))
        core = EchoCore(period=100.0)
        driver = DatagramDriver(core, a)
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            await trio.sleep(1)
            core.next_timer = 2.0  # a call from outside the loop armed an earlier timer
            driver.flush(trio.current_time())
            await trio.sleep(2)
            assert core.fired == [2.0]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_stats_json_has_every_dataclass_field() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            await t.exchange([udp_packet(t.client_v4, "203.0.113.10", 5000, 7, b"x")])
            js = await t.helper_stats()
        assert _keys(HelperStatistics) <= set(js)
        # rx_keepalives, tx_keepalives and the rest were missing from the hand-written JSON
        assert _keys(DeviceStatistics) <= set(js["device"])
        assert js["device"]["rx_keepalives"] >= 0
        assert isinstance(js["verdicts"], dict)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class FlagSource:
    """A receive-only source whose per-datagram metadata is an int (the NAT capture socket's shape)."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.ready = trio.Event()

    def recv_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any]) -> int:
        n = 0
        while self.queue and n < len(bufs):
            data = self.queue.pop(0)
            bufs[n][: len(data)] = data
            sizes[n], addrs[n] = len(data), 7
            n += 1
        if not self.queue:
            self.ready = trio.Event()
        return n

    async def wait_readable(self) -> None:
        await self.ready.wait()


def test_a_receive_only_source_with_metadata_drives_a_core() -> None:
    async def main() -> None:
        src = FlagSource()
        core = EchoCore(period=1000.0)
        sent: list[tuple[bytes, Any]] = []
        driver = DatagramDriver(core, src, batch=4, send=lambda d, a: sent.append((bytes(d), a)), max_datagram=64)
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            src.queue += [b"ab", b"cd"]
            src.ready.set()
            await trio.sleep(1)
            assert sent == [(b"ba", 7), (b"dc", 7)]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
