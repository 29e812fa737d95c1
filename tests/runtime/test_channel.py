"""`IpcChannel` over a real AF_UNIX socketpair: borrowed batches survive a full socket; `UnixIpcServer` options."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from netsim.core import ipc
from netsim.core.ledger import Ledger
from netsim.errors import RemoteProtocolError
from netsim.runtime.channel import IpcChannel, UnixIpcServer, open_ipc_channel
from netsim.transports.uds import SocketStream, peer_credentials


@asynccontextmanager
async def _socketpair(sndbuf: int) -> AsyncIterator[tuple[IpcChannel, IpcChannel]]:
    """Provider and helper channels over a socketpair whose helper -> provider buffer is ``sndbuf`` bytes."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    async with AsyncExitStack() as stack:
        chans = []
        for sock, role in ((a, ipc.Role.PROVIDER), (b, ipc.Role.HELPER)):
            stream = SocketStream(trio.socket.from_stdlib_socket(sock), peer_credentials(sock))
            chans.append(await stack.enter_async_context(open_ipc_channel(stream, ipc.Connection(role))))
        provider, helper = chans
        async with trio.open_nursery() as n:
            n.start_soon(helper.handshake)
            await provider.handshake()
        yield provider, helper


def _packet(seq: int, size: int = 1000) -> bytes:
    """An IPv4-looking packet whose every payload byte encodes ``seq``."""
    return bytes([0x45, 0]) + size.to_bytes(2, "big") + bytes(16) + seq.to_bytes(4, "big") * ((size - 20) // 4)


def test_borrowed_batches_queued_on_a_full_socket_are_not_corrupted() -> None:
    """The helper sends views into buffers its next receive overwrites (decrypt arena, NAT capture buffers) with
    ``borrowed=True``. The provider does not read, so the socket fills: the inline send meets EAGAIN (or a partial
    send) and the rest is queued. Overwriting the one reused buffer after each call, as the next receive would,
    must not change a byte of what the provider finally reads. Without the copy on queue it reads the last
    overwrite many times over."""

    async def main() -> None:
        async with _socketpair(4096) as (provider, helper):
            arena = bytearray(1000)  # one reused buffer, as the device's arena is
            view = memoryview(arena)
            sent = 0
            while helper.statistics().queued_batches < 8:  # past EAGAIN: eight batches wait for the writer
                arena[:] = _packet(sent)
                assert helper.send_packets_nowait([view], ipc.AF_INET, borrowed=True)
                sent += 1
                assert sent < 10_000, "the socket never filled"
            arena[:] = b"\xee" * len(arena)  # the next receive reuses the buffer
            assert helper.statistics().queued_batches == 8
            got: list[bytes] = []
            with trio.fail_after(10):
                while len(got) < sent:
                    ev = await provider.receive_event()
                    if isinstance(ev, ipc.PacketBatch):
                        got += [bytes(p) for p in ev.packets()]
            assert got == [_packet(i) for i in range(sent)]  # every batch intact, in order
            assert helper.statistics().borrowed_copies >= 8  # copied: only those that had to be queued
            await trio.testing.wait_all_tasks_blocked()  # the writer books its last sendmsg
            out = helper.statistics().ipc_out
            assert out.forwarded == sent and out.queued == 0

    trio.run(main)


def test_unix_ipc_server_gives_each_option_to_the_side_that_declares_it(tmp_path: Path) -> None:
    ledger = Ledger("helper")
    server = UnixIpcServer(tmp_path / "s" / "h.sock", max_clients=2, ledger=ledger, max_queued_batches=7)
    assert server.max_clients == 2
    assert server.channel_options == {"ledger": ledger, "max_queued_batches": 7}
    with pytest.raises(TypeError, match="no_such_option"):
        UnixIpcServer(tmp_path / "s" / "h.sock", no_such_option=1)


def test_corked_frames_go_out_in_one_sendmsg_in_order() -> None:
    """`corked` + `receive_event_nowait`: a burst of one-packet frames costs one ``sendmsg``, not one each (the
    ``loop/uds b1`` case), in the order of the calls, with the ledger balanced inside and after the block."""

    async def main() -> None:
        async with _socketpair(1 << 20) as (provider, helper):
            calls = helper.statistics().sendmsg_calls
            with helper.corked():
                for i in range(64):
                    assert helper.send_packets_nowait([_packet(i, 100)], ipc.AF_INET)
                st = helper.statistics()
                assert st.sendmsg_calls == calls and st.ipc_out.queued == 64  # held, and counted as held
            st = helper.statistics()
            assert st.sendmsg_calls == calls + 1 and st.corked_frames == 64
            assert st.ipc_out.forwarded == 64 and st.ipc_out.queued == 0
            # the reader side: one receive_event, the rest of what that recv brought without I/O
            got: list[bytes] = []
            with trio.fail_after(10):
                while len(got) < 64:
                    ev: ipc.Event | None = await provider.receive_event()
                    while ev is not None:
                        if isinstance(ev, ipc.PacketBatch):
                            got += [bytes(p) for p in ev.packets()]
                        ev = provider.receive_event_nowait()
            assert got == [_packet(i, 100) for i in range(64)]
            assert provider.receive_event_nowait() is None  # nothing buffered: no I/O, no wait

    trio.run(main)


def test_receive_event_nowait_leaves_a_protocol_error_to_receive_event() -> None:
    async def main() -> None:
        async with _socketpair(1 << 16) as (provider, helper):
            await helper.stream.send_some([b"\xde\xad" + bytes(30)])  # bad magic
            view = provider.connection.receive_buffer(4096)  # the bytes arrive as a receive_event would read them
            with trio.fail_after(5):
                n = await provider.stream.receive_into(view)
            view.release()
            provider.connection.receive_commit(n)
            assert provider.receive_event_nowait() is None
            with pytest.raises(RemoteProtocolError) as info:
                await provider.receive_event()
            assert info.value.reason == "bad_magic" and provider.is_broken

    trio.run(main)
