"""The IPC channel: one provider <-> helper connection driven by trio (queues, writer task, handshake, liveness).

`IpcChannel` wraps any `netsim.transports.uds.IpcStream` (a connected Unix socket, or the in-memory pipes of
`netsim.testing.ipc_pair`) around a sans-IO `netsim.core.ipc.Connection`; the protocol (frame format, state,
handshake order, error codes, liveness timers) is the connection's, the sockets are the transport's, and this module
only schedules:

* Packet batches: `IpcChannel.send_packets_nowait` writes a batch at once with one non-blocking scatter-gather
  ``sendmsg`` when the writer holds nothing (the common case: the peer reads promptly, so the batch fits the socket
  buffer and no task is woken). What the socket refuses waits in a *bounded* queue for the writer task; when the
  peer reads too slowly, new batches are dropped and counted as ``ipc_queue_full`` instead of buffering without
  bound. The writer coalesces queued batches into one ``sendmsg`` (at most ``IOV_MAX`` buffers), resuming partial
  sends where they stopped.
* Control messages (`IpcChannel.send`) are never dropped, overtake queued packets, and block their caller until
  written. GOODBYE/ERROR go last, after the queue drained, so the peer never sees packets after them.
* The reader receives with ``recv_into`` straight into the connection's buffer (no copy).
* `IpcChannel.handshake` and `IpcChannel.start_liveness` drive the connection's handshake order and its pulled
  liveness timer (PING / deadline).

`UnixIpcServer` and `connect_ipc_unix` compose the transport's server and connect (`netsim.transports.uds`: socket
directory, SO_PEERCRED, session slots, HELLO and token checks, backoff) with channels; transports never import
this layer.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from netsim.core import ipc
from netsim.core.ledger import Ledger, StageSnapshot
from netsim.errors import ConfigError, LocalProtocolError, RemoteProtocolError, TunnelDown
from netsim.transports import uds
from netsim.transports.uds import IOV_MAX, IpcStream, PeerCredentials

__all__ = [
    "IpcChannel",
    "IpcChannelStatistics",
    "UnixIpcServer",
    "connect_ipc_unix",
    "open_ipc_channel",
]

log = logging.getLogger("netsim.ipc")

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _unsent(bufs: list[ipc.Buffer], sent: int) -> list[ipc.Buffer]:
    """What is left of ``bufs`` after the first ``sent`` bytes went out (the first buffer sliced, not copied)."""
    i = 0
    while sent >= len(bufs[i]):
        sent -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if sent:
        rest[0] = memoryview(rest[0])[sent:]
    return rest


@dataclass(frozen=True, slots=True)
class IpcChannelStatistics:
    """Counters of one `IpcChannel`. ``ipc_out`` is the ledger stage of outgoing packets."""

    frames_sent: int
    frames_received: int
    bytes_sent: int
    bytes_received: int
    packets_received: int
    sendmsg_calls: int
    partial_sends: int
    queued_batches: int
    queued_bytes: int
    ipc_out: StageSnapshot
    inline_sends: int = 0
    """Batches written by the caller's own non-blocking ``sendmsg``, without waking the writer task."""
    writer_wakeups: int = 0
    """Times the writer task was woken to write something (a control message, a batch the socket refused)."""
    borrowed_copies: int = 0
    """Borrowed batches (``send_packets_nowait(..., borrowed=True)``) copied because they had to be queued."""
    corked_frames: int = 0
    """PACKETS frames held by `IpcChannel.corked` and written together when the block ended."""
    receive_calls: int = 0
    """Stream receives (one ``recv_into`` and one trio scheduling point each): frames per receive =
    ``frames_received / receive_calls``; the reader's wakeups on this hop (docs/helper.md, Hops)."""


@dataclass(slots=True)
class _Item:
    bufs: list[ipc.Buffer]
    packets: int
    nbytes: int
    done: trio.Event | None
    started: bool = False  # part of its frame is already on the wire: nothing may be written before the rest


class IpcChannel:
    """One IPC connection over a stream: bounded packet queue, never-dropped control messages, zero-copy receive.

    Create with `open_ipc_channel` (which runs the writer task), `connect_ipc_unix`, `UnixIpcServer` or
    `netsim.testing.ipc_pair.open_ipc_pair`. Only one task may call `receive_event` at a time.

    Args:
        stream: the byte stream.
        connection: the sans-IO connection (its role decides the handshake direction).
        max_queued_batches: packet batches waiting for the writer before new ones are dropped.
        max_queued_bytes: the same bound in bytes (whichever is hit first).
        ledger: where the ``ipc_out`` stage is counted (a private one if omitted).
        recv_size: bytes asked of each ``recv_into``.
    """

    def __init__(
        self,
        stream: IpcStream,
        connection: ipc.Connection,
        *,
        max_queued_batches: int = 64,
        max_queued_bytes: int = 4 << 20,
        ledger: Ledger | None = None,
        recv_size: int = 1 << 16,
    ) -> None:
        if max_queued_batches < 1 or max_queued_bytes < 1:
            raise ConfigError("max_queued_batches and max_queued_bytes must be >= 1")
        self.stream = stream
        self.connection = connection
        self.max_queued_batches = max_queued_batches
        self.max_queued_bytes = max_queued_bytes
        self._out = (ledger or Ledger("ipc")).stage("ipc_out")
        self._recv_size = recv_size
        self._control: deque[_Item] = deque()
        self._batches: deque[_Item] = deque()
        self._final: _Item | None = None
        self._queued_bytes = 0
        self._wake = trio.Event()
        self._room = trio.lowlevel.ParkingLot()
        self._write_lock = trio.Lock()
        self._broken: BaseException | None = None
        self._receiving = False
        self._bytes_sent = 0
        self._sendmsg_calls = 0
        self._partial_sends = 0
        self._inline_sends = 0
        self._writer_wakeups = 0
        self._borrowed_copies = 0
        self._cork: list[tuple[list[ipc.Buffer], int, int, bool]] | None = None  # frames held by `corked`
        self._cork_iovs = 0
        self._corked_frames = 0
        self._pending_error: RemoteProtocolError | None = None  # met by receive_event_nowait, raised by receive_event
        self._packets_received = 0
        self._receive_calls = 0
        self._nursery: trio.Nursery | None = None  # set by open_ipc_channel: runs the liveness task

    @property
    def peer(self) -> PeerCredentials | None:
        return self.stream.peer

    @property
    def is_broken(self) -> bool:
        """True once writing failed or the channel was closed: packets are then dropped as ``ipc_closed``."""
        return self._broken is not None

    def statistics(self) -> IpcChannelStatistics:
        c = self.connection
        return IpcChannelStatistics(
            frames_sent=c.frames_sent,
            frames_received=c.frames_received,
            bytes_sent=self._bytes_sent,
            bytes_received=c.bytes_received,
            packets_received=self._packets_received,
            sendmsg_calls=self._sendmsg_calls,
            partial_sends=self._partial_sends,
            queued_batches=len(self._batches),
            queued_bytes=self._queued_bytes,
            ipc_out=self._out.snapshot(),
            inline_sends=self._inline_sends,
            writer_wakeups=self._writer_wakeups,
            borrowed_copies=self._borrowed_copies,
            corked_frames=self._corked_frames,
            receive_calls=self._receive_calls,
        )

    # --- sending ----------------------------------------------------------------------------------------------------
    def send_packets_nowait(
        self, packets: Sequence[ipc.Buffer], families: Sequence[int] | int, *, borrowed: bool = False
    ) -> bool:
        """Send a batch now if the socket takes it, else queue it for the writer; never blocks. False (and
        counted) if dropped.

        When nothing is queued or being written, the batch goes out at once with one non-blocking scatter-gather
        ``sendmsg`` from the caller's task (almost always the whole of it: the peer reads promptly); only what the
        socket refuses (EAGAIN, or the rest of a partial send) is handed to the writer task, behind anything it
        already holds, so the order on the wire is the order of the calls.

        Buffer ownership: by default the channel owns the packet buffers until they are written, so do not
        mutate them afterwards (pass ``bytes``, or use `send_packets`, which returns only once they are on the
        socket). With ``borrowed=True`` the caller keeps them: they need to stay valid only during this call
        (views into a receive buffer or decrypt arena the caller's next receive overwrites), and the part of the
        batch that has to be queued is copied first -- the rare path; counted in ``borrowed_copies``.
        """
        n = len(packets)
        out = self._out
        out.count_read(n)
        if self._broken is not None:
            out.count_dropped("ipc_closed", n)
            return False
        nbytes = sum(map(len, packets))
        if len(self._batches) >= self.max_queued_batches or (
            self._batches and self._queued_bytes + nbytes > self.max_queued_bytes
        ):
            out.count_dropped("ipc_queue_full", n)
            return False
        try:
            bufs = self.connection.send_packets(packets, families)
        except LocalProtocolError:
            out.count_dropped("ipc_local_error", n)
            raise
        cork = self._cork
        if cork is not None:  # inside `corked`: written with the others when the block ends
            cork.append((bufs, n, nbytes, borrowed))
            out.count_queued(n)  # held in the cork: the ledger balances inside the block too
            self._cork_iovs += len(bufs)
            if self._cork_iovs >= IOV_MAX:  # one sendmsg's worth: write it now
                self._uncork()
                self._cork = []
            return True
        return self._send_or_queue(bufs, n, nbytes, borrowed)

    def _send_or_queue(self, bufs: list[ipc.Buffer], n: int, nbytes: int, borrowed: bool) -> bool:
        """Write ``bufs`` (whole frames of ``n`` packets, ``nbytes`` of them) inline, queue what is left."""
        out = self._out
        rest = self._send_inline(bufs, n, nbytes)
        if rest is None:
            return True
        if self.is_broken:  # the inline send found the socket broken
            out.count_dropped("ipc_closed", n)
            return False
        started = rest is not bufs
        if borrowed:  # the caller reuses these buffers after we return: the queue keeps its own copy
            rest = [b"".join(rest)]
            self._borrowed_copies += 1
        self._enqueue(_Item(rest, n, nbytes, None, started=started))
        return True

    def _send_inline(self, bufs: list[ipc.Buffer], packets: int, nbytes: int) -> list[ipc.Buffer] | None:
        """Try to write ``bufs`` now without blocking. Returns None when all of it was written (counted as
        forwarded), else what is left to queue: all of ``bufs`` if the writer is busy or holds anything (order)
        or the socket refused it (EAGAIN), or the unsent tail of a partial send."""
        if self._control or self._batches or self._final is not None or self._write_lock.locked():
            return bufs
        chunk = bufs[:IOV_MAX] if len(bufs) > IOV_MAX else bufs
        total = len(bufs[0]) + nbytes if len(bufs) == packets + 1 else sum(map(len, bufs))  # one frame, or several
        try:
            sent = self.stream.send_nowait(chunk)
        except BlockingIOError:
            return bufs
        except _BROKEN as exc:
            self._break(exc)
            return bufs
        self._sendmsg_calls += 1
        self._inline_sends += 1
        self._bytes_sent += sent
        if sent >= total:  # headers and descriptors, then the packets
            self._out.count_forwarded(packets)
            return None
        if sent < sum(map(len, chunk)):
            self._partial_sends += 1
        return _unsent(bufs, sent)

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Hold the PACKETS frames `send_packets_nowait` makes inside the block; write them with one ``sendmsg``
        when it ends (TCP_CORK's idea, for a caller that sends many small frames in one tick).

        One-packet frames sent back to back otherwise cost one ``sendmsg`` each (the inline send); corked, a
        burst costs one, as when the writer task coalesced them, without waking it. Use it around a loop that
        answers every event already buffered (`receive_event_nowait`). Do not await inside the block: nothing
        corked is written until it ends. Frames keep their order; a block reaching ``IOV_MAX`` buffers is
        written early. Nested blocks join the outer one.
        """
        if self._cork is not None:
            yield
            return
        self._cork = []
        try:
            yield
        finally:
            self._uncork()

    def _uncork(self) -> None:
        cork, self._cork = self._cork, None
        self._cork_iovs = 0
        if not cork:
            return
        self._corked_frames += len(cork)
        self._out.count_queued(-sum(frame[1] for frame in cork))
        if len(cork) == 1:
            bufs, n, nbytes, borrowed = cork[0]
        else:
            bufs = [b for frame in cork for b in frame[0]]
            n = sum(frame[1] for frame in cork)
            nbytes = sum(frame[2] for frame in cork)
            borrowed = any(frame[3] for frame in cork)
        self._send_or_queue(bufs, n, nbytes, borrowed)

    async def send_packets(self, packets: Sequence[ipc.Buffer], families: Sequence[int] | int) -> None:
        """Send a batch, waiting for queue room and for the write (backpressure instead of drops).

        Raises `TunnelDown` if the channel breaks first.
        """
        n = len(packets)
        self._out.count_read(n)
        nbytes = sum(map(len, packets))
        while self._broken is None and (
            len(self._batches) >= self.max_queued_batches
            or (self._batches and self._queued_bytes + nbytes > self.max_queued_bytes)
        ):
            await self._room.park()
        if self._broken is not None:
            self._out.count_dropped("ipc_closed", n)
            raise TunnelDown(f"IPC channel is closed: {self._broken!r}")
        try:
            bufs = self.connection.send_packets(packets, families)
        except LocalProtocolError:
            self._out.count_dropped("ipc_local_error", n)
            raise
        rest = self._send_inline(bufs, n, nbytes)
        if rest is None:
            await trio.lowlevel.checkpoint()  # on the socket already; still a checkpoint, as an async call must be
            return
        if self.is_broken:  # the inline send found the socket broken
            self._out.count_dropped("ipc_closed", n)
            raise TunnelDown(f"IPC channel is closed: {self._broken!r}")
        item = _Item(rest, n, nbytes, trio.Event(), started=rest is not bufs)
        self._enqueue(item)
        await self._wait_done(item)

    def _enqueue(self, item: _Item) -> None:
        self._batches.append(item)
        self._queued_bytes += item.nbytes
        self._out.count_queued(item.packets)
        self._wake.set()

    async def send(self, event: ipc.Event) -> None:
        """Send a control message; never dropped. Returns once written. Raises `TunnelDown` if the channel broke."""
        if isinstance(event, ipc.PacketBatch):
            raise LocalProtocolError("use send_packets / send_packets_nowait for packet batches")
        if self._broken is not None:
            raise TunnelDown(f"IPC channel is closed: {self._broken!r}")
        item = _Item(self.connection.send(event), 0, 0, trio.Event())
        if isinstance(event, ipc.Goodbye | ipc.Error):
            self._final = item  # after every queued batch: nothing may follow it on the wire
        else:
            self._control.append(item)
        self._wake.set()
        await self._wait_done(item)

    async def _wait_done(self, item: _Item) -> None:
        assert item.done is not None
        await item.done.wait()
        if self._broken is not None and item.bufs:
            raise TunnelDown(f"IPC channel broke before the message was written: {self._broken!r}")

    async def _writer(self) -> None:
        """The single writer: the rest of a frame the inline send began, then control, then packet batches
        coalesced up to IOV_MAX, then the final closer."""
        try:
            while True:
                if self._batches and self._batches[0].started:
                    await self._write_batches()
                elif self._control:
                    await self._write_item(self._control[0])
                    self._control.popleft()
                elif self._batches:
                    await self._write_batches()
                elif self._final is not None:
                    await self._write_item(self._final)
                    self._final = None
                else:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    self._writer_wakeups += 1
        except _BROKEN as exc:
            self._break(exc)

    async def _write_item(self, item: _Item) -> None:
        # The item stays queued while it is written, so a failure here still wakes its sender via _break.
        await self._write(item.bufs)
        item.bufs = []
        if item.done is not None:
            item.done.set()

    async def _write_batches(self) -> None:
        # Coalesce queued batches into one sendmsg while they fit in IOV_MAX iovecs: one syscall per wakeup.
        items = [self._batches[0]]
        iovs = len(items[0].bufs)
        for nxt in list(self._batches)[1:]:
            if iovs + len(nxt.bufs) > IOV_MAX:
                break
            items.append(nxt)
            iovs += len(nxt.bufs)
        bufs = [b for it in items for b in it.bufs] if len(items) > 1 else items[0].bufs
        await self._write(bufs)  # on failure the items are still queued and _break counts them
        out = self._out
        for it in items:
            self._batches.popleft()
            self._queued_bytes -= it.nbytes
            out.count_queued(-it.packets)
            out.count_forwarded(it.packets)
            it.bufs = []
            if it.done is not None:
                it.done.set()
        self._room.unpark_all()

    async def _write(self, bufs: list[ipc.Buffer]) -> None:
        """Write all of ``bufs``, resuming partial sends mid-buffer, at most IOV_MAX buffers per sendmsg."""
        async with self._write_lock:
            i = 0
            end = len(bufs)
            pending = list(bufs) if end > 1 else bufs
            while i < end:
                chunk = pending[i : i + IOV_MAX]
                sent = await self.stream.send_some(chunk)
                self._sendmsg_calls += 1
                if sent <= 0:
                    raise trio.BrokenResourceError("send made no progress")
                self._bytes_sent += sent
                if sent < sum(map(len, chunk)):
                    self._partial_sends += 1
                while sent:
                    size = len(pending[i])
                    if sent >= size:
                        sent -= size
                        i += 1
                    else:
                        pending[i] = memoryview(pending[i])[sent:]
                        sent = 0
                while i < end and not len(pending[i]):
                    i += 1

    def _break(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
            # Before the handshake this is a rejected client: the server logs that once, rate limited.
            log.log(self._level(logging.INFO), "IPC channel to %s broke: %r", self.peer, exc)
        out = self._out
        while self._batches:
            it = self._batches.popleft()
            out.count_queued(-it.packets)
            out.count_dropped("ipc_closed", it.packets)
            if it.done is not None:
                it.done.set()
        self._queued_bytes = 0
        for it in (*self._control, *((self._final,) if self._final else ())):
            if it.done is not None:
                it.done.set()
        self._control.clear()
        self._final = None
        self._room.unpark_all()
        self._wake.set()

    # --- receiving --------------------------------------------------------------------------------------------------
    async def receive_event(self) -> ipc.Event:
        """The next event from the peer; `ipc.ConnectionClosed` at EOF.

        A `RemoteProtocolError` closes the channel (after a best-effort ERROR frame telling the peer why) and is
        re-raised. `ipc.PacketBatch` views stay valid for as long as the caller keeps them.
        """
        if self._receiving:
            raise LocalProtocolError("another task is already in receive_event on this channel")
        self._receiving = True
        conn = self.connection
        try:
            if self._pending_error is not None:
                exc, self._pending_error = self._pending_error, None
                await self._fail_remote(exc)
                raise exc
            while True:
                try:
                    ev = conn.next_event()
                except RemoteProtocolError as exc:
                    await self._fail_remote(exc)
                    raise
                if not isinstance(ev, ipc.NeedData):
                    if isinstance(ev, ipc.PacketBatch):
                        self._packets_received += len(ev)
                    return ev
                view = conn.receive_buffer(self._recv_size)
                self._receive_calls += 1
                try:
                    n = await self.stream.receive_into(view)
                except _BROKEN as exc:
                    n = 0
                    log.log(self._level(logging.INFO), "IPC receive from %s failed: %r", self.peer, exc)
                finally:
                    view.release()
                conn.receive_commit(n)
        finally:
            self._receiving = False

    def receive_event_nowait(self) -> ipc.Event | None:
        """The next event if its bytes are already received, else None (no I/O; never blocks).

        With `corked`, answer every frame one ``recv`` brought with one ``sendmsg``::

            ev = await channel.receive_event()
            with channel.corked():
                while ev is not None:
                    handle(ev)
                    ev = channel.receive_event_nowait()

        A protocol violation found here is raised by the next `receive_event` (which closes the channel).
        """
        if self._receiving:
            raise LocalProtocolError("another task is already in receive_event on this channel")
        if self._pending_error is not None:
            return None
        try:
            ev = self.connection.next_event()
        except RemoteProtocolError as exc:
            self._pending_error = exc
            return None
        if isinstance(ev, ipc.NeedData):
            return None
        if isinstance(ev, ipc.PacketBatch):
            self._packets_received += len(ev)
        return ev

    async def _fail_remote(self, exc: RemoteProtocolError) -> None:
        log.log(self._level(logging.WARNING), "IPC peer %s violated the protocol: %s; closing", self.peer, exc)
        # Not in the middle of a frame the inline send began (rare: the writer had no turn yet): an ERROR there
        # would corrupt the stream, so the peer then sees only the close.
        if self._broken is None and not (self._batches and self._batches[0].started):
            try:
                bufs = self.connection.send(self.connection.error_for(exc))
            except LocalProtocolError:
                bufs = []
            with trio.move_on_after(0.5):
                try:
                    await self._write(bufs)
                except _BROKEN:
                    pass
        self.close()

    def _level(self, level: int) -> int:
        """``level`` for a session, DEBUG before the handshake: a flood of refused clients must not grow the log
        one line per connection (`UnixIpcServer` logs each rejection kind with a rate limit and counts it)."""
        return level if self.connection.version else logging.DEBUG

    # --- closing ----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close at once; queued packets are counted as ``ipc_closed``."""
        self._break(trio.ClosedResourceError("closed locally"))
        self.stream.close()

    async def aclose(self, goodbye: ipc.Goodbye | None = None, *, grace: float = 1.0) -> None:
        """Say GOODBYE after the queue drains (bounded by ``grace`` seconds, even when cancelled), then close."""
        conn = self.connection
        if self._broken is None and conn.our_state is ipc.SideState.OPEN:
            with trio.CancelScope(shield=True), trio.move_on_after(grace):
                try:
                    await self.send(goodbye or ipc.Goodbye())
                except (TunnelDown, LocalProtocolError):
                    pass
        self.close()

    # --- liveness -------------------------------------------------------------------------------------------------
    def start_liveness(self) -> None:
        """Drive the connection's liveness timer (`ipc.Connection.get_timer` / ``handle_timer``) in the background.

        Called after the handshake. A PING is queued without waiting for the write (a stalled peer may have
        filled the socket buffer), and a peer that misses the deadline gets the stream closed under it: the
        reader then gets `RemoteProtocolError` ``peer_timeout`` from the connection.
        """
        conn = self.connection
        conn.start_liveness(trio.current_time())
        if conn.get_timer() is not None and self._nursery is not None:
            self._nursery.start_soon(self._liveness)

    async def _liveness(self) -> None:
        conn = self.connection
        while self._broken is None:
            when = conn.get_timer()
            if when is None:
                return
            await trio.sleep_until(when)
            if self.is_broken:
                return
            ping = conn.handle_timer(trio.current_time())
            if conn.peer_timed_out:
                log.warning("IPC peer %s did not answer PING within %g s; closing", self.peer, conn.ping_timeout)
                self._break(trio.BrokenResourceError("peer_timeout"))
                self.stream.close()  # wakes the reader, which raises peer_timeout
                return
            if ping is not None:
                try:
                    bufs = conn.send(ping)
                except LocalProtocolError:
                    return  # closing meanwhile
                self._control.append(_Item(bufs, 0, 0, None))
                self._wake.set()

    async def handshake(self) -> ipc.Hello | ipc.HelloAck:
        """Drive the connection's handshake (`ipc.Connection.handshake_opening` / ``handshake_event`` /
        ``handshake_reply``: the provider sends HELLO and waits for HELLO_ACK, the helper waits for HELLO and
        answers HELLO_ACK), then start liveness. Returns the peer's message.

        Raises `RemoteProtocolError` if the peer answers anything else (an ERROR frame is reported with its code).
        """
        conn = self.connection
        send_failed: TunnelDown | None = None
        opening = conn.handshake_opening()
        if opening is not None:
            try:
                await self.send(opening)
            except TunnelDown as exc:
                send_failed = exc  # a refusing helper writes ERROR and closes: read its reason first
        ev = await self.receive_event()
        if send_failed is not None and not isinstance(ev, ipc.Error):
            raise send_failed
        try:
            peer = conn.handshake_event(ev)
        except RemoteProtocolError:
            self.close()
            raise
        reply = conn.handshake_reply()
        if reply is not None:
            await self.send(reply)
        self.start_liveness()
        return peer


@asynccontextmanager
async def open_ipc_channel(stream: IpcStream, connection: ipc.Connection, **options: Any) -> AsyncIterator[IpcChannel]:
    """Run an `IpcChannel` (its writer task) for the duration of the block; say GOODBYE and close on exit."""
    channel = IpcChannel(stream, connection, **options)
    try:
        async with trio.open_nursery() as nursery:
            channel._nursery = nursery
            nursery.start_soon(channel._writer)
            try:
                yield channel
            finally:
                await channel.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The writer task never raises (it records failures), so a group here holds the caller's own exception:
        # hand it back unwrapped, as if no nursery were involved.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


# --- the server and connect, with channels --------------------------------------------------------------------------
_CHANNEL_OPTIONS = frozenset(inspect.signature(IpcChannel).parameters) - {"stream", "connection"}


class UnixIpcServer(uds.UnixIpcServer):
    """`netsim.transports.uds.UnixIpcServer` handing each admitted session to a handler as an `IpcChannel`.

    The transport accepts, checks SO_PEERCRED, reads and checks HELLO (the per-tunnel token) and takes the session
    slot; here the session gets its channel, the HELLO_ACK is sent and liveness starts. Keyword arguments are
    the transport server's (``allowed_uids``, ``max_clients``, ``connection_factory``...) and `IpcChannel`'s
    (``ledger``, ``max_queued_batches``...): each goes to the one that declares it (kept in ``channel_options``).
    """

    def __init__(self, socket_path: str | os.PathLike[str], **options: Any) -> None:
        # One definition of each parameter set: the names `IpcChannel` takes go to every session's channel, the
        # rest to the transport server, whose own signature checks them (an unknown name is a TypeError there).
        channel_options = {k: options.pop(k) for k in _CHANNEL_OPTIONS.intersection(options)}
        super().__init__(socket_path, **options)
        self.channel_options = channel_options

    async def serve(
        self,
        handler: Callable[[IpcChannel], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept sessions forever, calling ``handler(channel)`` after the handshake; use with ``nursery.start``.

        A session ends when ``handler`` returns; the server then accepts the next client. Protocol errors and
        broken connections end only their session.
        """

        async def session(accepted: uds.AcceptedSession) -> None:
            async with open_ipc_channel(accepted.stream, accepted.connection, **self.channel_options) as ch:
                reply = accepted.connection.handshake_reply()
                assert reply is not None  # the helper answers HELLO
                await ch.send(reply)
                ch.start_liveness()
                await handler(ch)

        await self.serve_sessions(session, task_status=task_status)


@asynccontextmanager
async def connect_ipc_unix(
    socket_path: str | os.PathLike[str],
    *,
    connection: ipc.Connection | None = None,
    retry_for: float = 10.0,
    backoff_initial: float = 0.05,
    backoff_max: float = 1.0,
    handshake_timeout: float = 5.0,
    allowed_server_uids: Collection[int] | None = None,
    **channel_options: Any,
) -> AsyncIterator[IpcChannel]:
    """Connect to a helper (retrying with exponential backoff while it is absent), handshake, yield the channel.

    The socket side (backoff, the server's uid) is `netsim.transports.uds.connect_unix`. Raises `TunnelDown` when
    the helper stays unreachable for ``retry_for`` seconds, `RemoteProtocolError` when the handshake fails
    (including an ERROR BUSY from a helper serving another provider), and `LabError` when the server runs as a uid
    outside ``allowed_server_uids``.
    """
    deadline = trio.current_time() + retry_for
    delay = backoff_initial
    while True:
        remaining = max(0.0, deadline - trio.current_time())
        stream = await uds.connect_unix(
            socket_path,
            retry_for=remaining,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            allowed_server_uids=allowed_server_uids,
        )
        try:
            conn = connection or ipc.Connection(ipc.Role.PROVIDER)
            async with open_ipc_channel(stream, conn, **channel_options) as channel:
                try:
                    with trio.fail_after(handshake_timeout):
                        await channel.handshake()
                except trio.TooSlowError:
                    # e.g. a stopped (SIGSTOP) helper: the kernel queues our connect, nobody answers
                    raise TunnelDown(
                        f"the helper at {socket_path} did not answer HELLO in {handshake_timeout:g} s"
                    ) from None
                except RemoteProtocolError as exc:
                    # BUSY: the helper is still closing our previous session; retry while time remains.
                    if exc.reason != "peer_busy" or trio.current_time() + delay > deadline:
                        raise
                    busy = True
                else:
                    busy = False
                    yield channel
        finally:
            stream.close()
        if not busy:
            return
        await trio.sleep(delay)
        delay = min(delay * 2, backoff_max)
        connection = None if connection is None else _fresh_like(connection)


def _fresh_like(conn: ipc.Connection) -> ipc.Connection:
    """A new provider connection with the same settings (a used one cannot say HELLO again)."""
    return ipc.Connection(
        ipc.Role.PROVIDER,
        versions=conn.versions,
        capabilities=conn.capabilities,
        max_frame_size=conn.max_frame_size,
        token=conn.hello().token or None,
        ping_interval=conn.ping_interval,
        ping_timeout=conn.ping_timeout,
    )
