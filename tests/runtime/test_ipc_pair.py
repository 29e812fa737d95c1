"""The in-memory IPC pair (and through it, IpcChannel): batches, partial sends, backpressure, drops, closing."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from netsim.core import ipc
from netsim.errors import RemoteProtocolError, TunnelDown
from netsim.runtime.channel import IpcChannel, open_ipc_channel
from netsim.testing.ipc_pair import memory_stream_pair, open_ipc_pair


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def batches(seed: int, count: int, size: int = 64) -> list[list[bytes]]:
    rng = random.Random(seed)
    return [[rng.randbytes(rng.randint(20, 1400)) for _ in range(size)] for _ in range(count)]


async def collect(ch: IpcChannel, npackets: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < npackets:
        ev = await ch.receive_event()
        assert isinstance(ev, ipc.PacketBatch), ev
        got += ev.copy_packets()
    return got


@pytest.mark.parametrize("max_send", [None, 7, 1500])
def test_batches_arrive_intact_with_partial_sends(max_send: int | None) -> None:
    async def main() -> None:
        count = 2 if max_send == 7 else 20
        sent = batches(1, count)
        async with open_ipc_pair(max_send=max_send, capacity=8192) as (prov, helper):
            async with trio.open_nursery() as n:

                async def send_all() -> None:
                    for b in sent:
                        await prov.send_packets(b, 2)

                n.start_soon(send_all)
                got = await collect(helper, count * 64)
            assert got == [p for b in sent for p in b]
            stats = prov.statistics()
            assert stats.ipc_out.forwarded == count * 64 and stats.ipc_out.unattributed() == 0
            if max_send is not None:
                assert stats.partial_sends > 0
            assert helper.statistics().packets_received == count * 64

    run(main)


def test_slow_reader_drops_are_counted_and_bounded() -> None:
    async def main() -> None:
        async with open_ipc_pair(capacity=4096, max_queued_batches=4) as (prov, helper):
            accepted = 0
            for b in batches(2, 200):
                accepted += prov.send_packets_nowait(b, 30)
                stats = prov.statistics()
                assert stats.queued_batches <= 4  # never more than the bound, however fast we push
                await trio.sleep(0)
            out = prov.statistics().ipc_out
            assert out.read == 200 * 64
            assert out.dropped_for("ipc_queue_full") == (200 - accepted) * 64 > 0
            # control messages are never dropped, even with the packet queue full: the request overtakes the
            # queued batches; the reader catches up and gets exactly the accepted packets
            got = 0
            async with trio.open_nursery() as n:
                n.start_soon(prov.send, ipc.StatsRequest(1))
                seen_request = False
                while not seen_request or got < accepted * 64:
                    ev = await helper.receive_event()
                    if isinstance(ev, ipc.StatsRequest):
                        seen_request = True
                        continue
                    assert isinstance(ev, ipc.PacketBatch)
                    got += len(ev)
            assert got == accepted * 64
            out = prov.statistics().ipc_out
            assert out.forwarded == accepted * 64 and out.queued == 0 and out.unattributed() == 0

    run(main)


def test_goodbye_follows_queued_packets() -> None:
    async def main() -> None:
        async with open_ipc_pair(capacity=2048, max_queued_batches=64) as (prov, helper):
            for b in batches(3, 10):
                assert prov.send_packets_nowait(b, 2)
            async with trio.open_nursery() as n:
                n.start_soon(prov.aclose)
                got = 0
                while True:
                    ev = await helper.receive_event()
                    if isinstance(ev, ipc.Goodbye):
                        break
                    assert isinstance(ev, ipc.PacketBatch)
                    got += len(ev)
            assert got == 640
            assert await helper.receive_event() == ipc.ConnectionClosed(clean=True)

    run(main)


def test_peer_close_drops_as_ipc_closed_and_sends_raise() -> None:
    async def main() -> None:
        async with open_ipc_pair() as (prov, helper):
            helper.close()
            assert await prov.receive_event() == ipc.ConnectionClosed(clean=False)
            with pytest.raises(TunnelDown):
                await prov.send(ipc.Ping(1))
            assert not prov.send_packets_nowait([b"E" * 20], 2)
            out = prov.statistics().ipc_out
            assert out.dropped_for("ipc_closed") == 1 and out.unattributed() == 0

    run(main)


def test_handshake_token_mismatch_and_garbage() -> None:
    async def main() -> None:
        with pytest.raises(RemoteProtocolError):
            async with open_ipc_pair(
                provider_connection=ipc.Connection(ipc.Role.PROVIDER, token=b"a"),
                helper_connection=ipc.Connection(ipc.Role.HELPER, expected_token=b"b"),
            ):
                pass  # pragma: no cover

        a, b = memory_stream_pair()
        async with open_ipc_channel(b, ipc.Connection(ipc.Role.HELPER)) as helper:
            await a.send_some([b"GET / HTTP/1.1\r\n\r\n"])
            with pytest.raises(RemoteProtocolError) as e:
                await helper.handshake()
            assert e.value.reason == "bad_magic"
            # the garbage client is told why before the close
            view = memoryview(bytearray(4096))
            n = await a.receive_into(view)
            client = ipc.Connection(ipc.Role.PROVIDER)
            client.receive_data(view[:n])
            err = client.next_event()
            assert isinstance(err, ipc.Error) and err.code == ipc.ErrorCode.PROTOCOL

    run(main)


def test_stats_round_trip_and_ping() -> None:
    async def main() -> None:
        async with open_ipc_pair() as (prov, helper):
            await prov.send(ipc.StatsRequest(5))
            assert await helper.receive_event() == ipc.StatsRequest(5)
            await helper.send(ipc.StatsResponse(5, {"ipc_out": 1}))
            assert await prov.receive_event() == ipc.StatsResponse(5, {"ipc_out": 1})
            await helper.send(ipc.Ping(9))
            assert await prov.receive_event() == ipc.Ping(9)
            await prov.send(ipc.Pong(9))
            assert await helper.receive_event() == ipc.Pong(9)

    run(main)


# --- inline send: a batch the socket takes at once wakes no writer task --------------------------------------------
def test_prompt_reader_batches_go_inline_with_zero_writer_wakeups() -> None:
    async def main() -> None:
        sent = batches(11, 50, size=8)
        async with open_ipc_pair(capacity=1 << 20) as (prov, helper):
            before = prov.statistics()
            async with trio.open_nursery() as n:

                async def reader() -> None:
                    got.extend(await collect(helper, 50 * 8))

                got: list[bytes] = []
                n.start_soon(reader)
                for b in sent:
                    assert prov.send_packets_nowait(b, 2)
                    await trio.sleep(0)  # the peer reads promptly
            after = prov.statistics()
            assert got == [p for b in sent for p in b]
            assert after.writer_wakeups == before.writer_wakeups  # no wakeup for any of the 50 batches
            assert after.inline_sends - before.inline_sends == 50
            assert after.sendmsg_calls - before.sendmsg_calls == 50
            assert after.ipc_out.forwarded == 50 * 8 and after.ipc_out.unattributed() == 0

    run(main)


@pytest.mark.parametrize("max_send", [None, 300])
def test_eagain_and_partial_inline_sends_keep_order(max_send: int | None) -> None:
    """A full pipe (EAGAIN) or a partial send hands the rest to the writer; later batches queue behind it, so the
    peer sees every batch whole and in call order."""

    async def main() -> None:
        sent = batches(12, 40, size=16)
        async with open_ipc_pair(
            capacity=4096, max_send=max_send, max_queued_batches=64, max_queued_bytes=64 << 20
        ) as (
            prov,
            helper,
        ):
            for b in sent:  # nobody reads yet: the first batch fills the pipe, the rest must queue behind it
                assert prov.send_packets_nowait(b, 2)
            st = prov.statistics()
            assert st.inline_sends >= 1 and st.queued_batches == 40
            got = await collect(helper, 40 * 16)
            assert got == [p for b in sent for p in b]
            st = prov.statistics()
            assert st.writer_wakeups > 0 and st.ipc_out.forwarded == 40 * 16 and st.ipc_out.unattributed() == 0

    run(main)


def test_control_message_waits_for_the_rest_of_a_partially_sent_batch() -> None:
    """A control message overtakes queued batches, but never lands inside a frame the inline send began."""

    async def main() -> None:
        big = [bytes([i]) * 1000 for i in range(8)]
        async with open_ipc_pair(capacity=2048) as (prov, helper):
            assert prov.send_packets_nowait(big, 2)  # 8 kB into a 2 kB pipe: a partial inline send
            assert prov.statistics().partial_sends == 1
            async with trio.open_nursery() as n:
                n.start_soon(prov.send, ipc.Ping(7))
                ev = await helper.receive_event()
                assert isinstance(ev, ipc.PacketBatch) and ev.copy_packets() == big
                assert await helper.receive_event() == ipc.Ping(7)

    run(main)
