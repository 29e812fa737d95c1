"""Impaired links on the memory backend (row F10): `FakeNetwork` runs the same seeded model as the lab's impairer,
on trio's clock (virtual time under ``MockClock``), so a memory tunnel is impaired the same way."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from netsim.core.impairment import Action, Impairment
from netsim.testing.memory_tunnel import SERVER_ADDR, FakeNetwork, icmp_echo, memory_tunnel

pytestmark = pytest.mark.reliability("F10")
A, B = ("10.0.0.1", 1), ("10.0.0.2", 2)


def _receive_all(rx: object, bufs: int = 4096) -> list[int]:
    views = [memoryview(bytearray(64)) for _ in range(bufs)]
    sizes, addrs = [0] * bufs, [None] * bufs
    n = rx.recv_batch(views, sizes, addrs)  # type: ignore[attr-defined]
    return [int.from_bytes(bytes(views[i][:4]), "big") for i in range(n)]


def _offline(spec: Impairment, n: int) -> tuple[set[int], set[int]]:
    model = spec.model()
    for h in range(n):
        model.packet_in(h, 8, 0.0)
    out = model.flush(0.0)
    return {r.handle for r in out if r.action == Action.DROP}, {r.handle for r in out if r.action == Action.COPY}


def test_loss_and_copies_are_the_seeds_and_delay_holds_datagrams() -> None:
    spec = Impairment(loss=0.2, duplicate=0.1, delay=1.0, seed=4)

    async def main() -> None:
        net = FakeNetwork(impairment={B: spec})
        a, b = net.attach(A), net.attach(B)
        for seq in range(300):
            a.send(seq.to_bytes(4, "big") + b"....", B)
        await trio.sleep(0.5)
        assert _receive_all(b) == []  # held by the delay
        await trio.sleep(0.6)
        got = _receive_all(b)
        stats = net.impairment_statistics(B)
        missing = set(range(300)) - set(got)
        doubled = {s for s in got if got.count(s) == 2}
        assert (missing, doubled) == _offline(spec, 300)  # the same datagrams as the model replayed offline
        assert len(missing) == stats.dropped == net.lost > 0 and len(doubled) == stats.duplicated > 0
        a.send(b"\0\0\0\0back", A)  # the other direction is not impaired
        assert _receive_all(a) == [0]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_parked_receiver_wakes_for_a_held_datagram_and_reorder_shows() -> None:
    async def main() -> None:
        net = FakeNetwork(impairment=Impairment(delay=0.2, reorder=0.3, seed=2))
        a, b = net.attach(A), net.attach(B)
        got: list[int] = []

        async def receiver() -> None:
            while len(got) < 100:
                await b.wait_readable()
                got.extend(_receive_all(b))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.sleep(0.1)  # the receiver parks before anything is sent
            for seq in range(100):
                a.send(seq.to_bytes(4, "big"), B)
                await trio.sleep(0.01)
        assert sorted(got) == list(range(100)) and got != sorted(got)
        assert net.impairment_statistics().reordered > 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_memory_tunnel_works_through_an_impaired_uplink() -> None:
    async def main() -> None:
        uplink = Impairment(loss=0.1, delay=0.03, jitter=0.01, seed=1)
        async with memory_tunnel(impairment={SERVER_ADDR: uplink}) as t:
            sent = 100
            replies = await t.exchange([icmp_echo(t.client_v4, "203.0.113.10", i) for i in range(sent)], timeout=30)
            stats = t.network.impairment_statistics(SERVER_ADDR)
            assert stats.dropped > 0 and stats.delayed > 0
            # a lost echo request is a missing reply; the downlink is not impaired
            assert sent - len(replies) == t.network.lost_data > 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_receiver_parked_before_a_delayed_datagram_is_sent_gets_it() -> None:
    async def main() -> None:
        net = FakeNetwork(impairment=Impairment(delay=0.5))
        a, b = net.attach(A), net.attach(B)
        got: list[int] = []

        async def receiver() -> None:
            await b.wait_readable()  # parks with nothing in flight: no wakeup armed yet
            while not (batch := _receive_all(b)):
                await b.wait_readable()
            got.extend(batch)

        with trio.fail_after(5):  # virtual seconds: a receiver never woken fails here instead of hanging
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await trio.sleep(0.1)
                a.send((7).to_bytes(4, "big"), B)
        assert got == [7]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
