"""An in-memory, connected provider <-> helper IPC pair with the same interface as the Unix-socket channel.

`open_ipc_pair` yields two `netsim.runtime.channel.IpcChannel` objects (provider, helper) joined by
`MemoryIpcStream` byte pipes instead of a socket. The pipes have a bounded capacity like a socket buffer, accept
partial writes, and wake readers and writers through trio, so backpressure, partial sends and slow readers behave
as on the real socket, deterministically under `trio.testing.MockClock`. The in-memory backend uses it in place of
the UDS transport.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from netsim.core import ipc
from netsim.errors import RemoteProtocolError, TunnelDown
from netsim.runtime.channel import IpcChannel, open_ipc_channel
from netsim.transports.uds import PeerCredentials

__all__ = ["MemoryIpcStream", "memory_stream_pair", "open_ipc_pair"]


class _Pipe:
    """One direction: a bounded byte buffer with a read offset."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buf = bytearray()
        self.pos = 0
        self.closed = False  # writer closed (EOF after the buffer drains)
        self.reader_gone = False
        self.lot = trio.lowlevel.ParkingLot()

    def readable(self) -> int:
        return len(self.buf) - self.pos


class MemoryIpcStream:
    """One end of an in-memory byte stream pair (`netsim.transports.uds.IpcStream`).

    Args:
        max_send: at most this many bytes accepted per `send_some` call, to exercise partial-send handling.
    """

    def __init__(self, tx: _Pipe, rx: _Pipe, peer: PeerCredentials, max_send: int | None = None) -> None:
        self._tx = tx
        self._rx = rx
        self.peer: PeerCredentials | None = peer
        self.max_send = max_send
        self.send_calls = 0

    async def send_some(self, buffers: Sequence[ipc.Buffer]) -> int:
        tx = self._tx
        await trio.lowlevel.checkpoint()
        while True:
            if tx.closed or tx.reader_gone:
                raise trio.BrokenResourceError("peer closed the in-memory IPC stream")
            room = tx.capacity - tx.readable()
            if room > 0:
                break
            await tx.lot.park()
        return self._put(buffers, room)

    def send_nowait(self, buffers: Sequence[ipc.Buffer]) -> int:
        """`send_some` without waiting: `BlockingIOError` (EAGAIN) when the pipe is full, like a socket."""
        tx = self._tx
        if tx.closed or tx.reader_gone:
            raise trio.BrokenResourceError("peer closed the in-memory IPC stream")
        room = tx.capacity - tx.readable()
        if room <= 0:
            raise BlockingIOError("in-memory IPC pipe is full")
        return self._put(buffers, room)

    def _put(self, buffers: Sequence[ipc.Buffer], room: int) -> int:
        tx = self._tx
        if self.max_send is not None:
            room = min(room, self.max_send)
        sent = 0
        for b in buffers:
            take = min(len(b), room - sent)
            tx.buf += memoryview(b)[:take]
            sent += take
            if sent == room:
                break
        self.send_calls += 1
        tx.lot.unpark_all()
        return sent

    async def receive_into(self, view: memoryview) -> int:
        rx = self._rx
        await trio.lowlevel.checkpoint()
        while not rx.readable():
            if rx.closed or rx.reader_gone:
                return 0
            await rx.lot.park()
        n = min(len(view), rx.readable())
        view[:n] = rx.buf[rx.pos : rx.pos + n]
        rx.pos += n
        if rx.pos > 65536 and rx.pos * 2 > len(rx.buf):
            del rx.buf[: rx.pos]  # compact occasionally: amortized O(1) per byte
            rx.pos = 0
        rx.lot.unpark_all()
        return n

    def close(self) -> None:
        self._tx.closed = True
        self._rx.reader_gone = True
        self._tx.lot.unpark_all()
        self._rx.lot.unpark_all()


def memory_stream_pair(capacity: int = 1 << 16, max_send: int | None = None) -> tuple[MemoryIpcStream, MemoryIpcStream]:
    """Two connected `MemoryIpcStream` ends; each direction buffers at most ``capacity`` bytes."""
    a_to_b, b_to_a = _Pipe(capacity), _Pipe(capacity)
    me = PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
    return MemoryIpcStream(a_to_b, b_to_a, me, max_send), MemoryIpcStream(b_to_a, a_to_b, me, max_send)


@asynccontextmanager
async def open_ipc_pair(
    *,
    capacity: int = 1 << 16,
    max_send: int | None = None,
    provider_connection: ipc.Connection | None = None,
    helper_connection: ipc.Connection | None = None,
    handshake: bool = True,
    **channel_options: Any,
) -> AsyncIterator[tuple[IpcChannel, IpcChannel]]:
    """Yield ``(provider, helper)`` channels over in-memory pipes, handshaken unless ``handshake=False``.

    ``channel_options`` go to both `IpcChannel` objects (e.g. ``max_queued_batches``).
    """
    a, b = memory_stream_pair(capacity, max_send)
    pconn = provider_connection or ipc.Connection(ipc.Role.PROVIDER)
    hconn = helper_connection or ipc.Connection(ipc.Role.HELPER)
    async with (
        open_ipc_channel(a, pconn, **channel_options) as prov,
        open_ipc_channel(b, hconn, **channel_options) as helper,
    ):
        if handshake:
            errors: list[BaseException] = []

            async def side(ch: IpcChannel) -> None:
                try:
                    await ch.handshake()
                except (RemoteProtocolError, TunnelDown) as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(side, helper)
                await side(prov)
            if errors:
                raise errors[-1]  # the provider's view (it fails last, with the helper's ERROR reason)
        yield prov, helper
