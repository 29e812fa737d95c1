"""Unix-domain-socket transport for the provider <-> helper IPC (trio), and the channel wrapper it shares with tests.

The protocol lives in `netsim.core.ipc` (sans-IO); this module only moves its buffers:

* `IpcChannel` wraps any `IpcStream` (a connected socket here, `netsim.testing.ipc_pair` in memory) around an
  `ipc.Connection`. One writer task sends with scatter-gather ``sendmsg`` (at most ``IOV_MAX`` buffers per call,
  partial sends resumed where they stopped). Packet batches wait in a *bounded* queue: when the peer reads too
  slowly, `IpcChannel.send_packets_nowait` drops the batch and counts it as ``ipc_queue_full`` instead of
  buffering without bound; control messages (`IpcChannel.send`) are never dropped, overtake queued packets, and
  block their caller until written. GOODBYE/ERROR go last, after the queue drained, so the peer never sees packets
  after them. The reader receives with ``recv_into`` straight into the connection's buffer (no copy).
* `UnixIpcServer` binds a ``SOCK_STREAM`` socket in a directory created 0700 under a tight umask, reads the peer's
  ``SO_PEERCRED`` and rejects uids outside ``allowed_uids`` *before reading a single byte*, and serves at most
  ``max_clients`` sessions at once (default 1: a second provider is told BUSY and closed). A client takes the
  session slot only once its HELLO passed the connection's checks (the per-tunnel token, compared in constant
  time), so an impostor that connects first cannot lock the provider out. Rejections are counted exactly and
  logged with a rate limit; a session that violates the protocol is closed and the server keeps accepting.
* `IpcChannel.start_liveness` drives the connection's sans-IO liveness timer (PING / deadline) after the handshake.
* `connect_ipc_unix` connects with exponential backoff (the helper may be restarting) and does the handshake.

Abstract sockets (``"\\0name"``) are deliberately not offered: they have no filesystem permissions, and they are
scoped per network namespace, so any process in the simulated Mac's namespace could reach the helper
(reliability.md B8). A path in a 0700 directory gives two independent gates: the directory mode and SO_PEERCRED.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from netsim.core import ipc
from netsim.core.ledger import Ledger, StageSnapshot
from netsim.errors import ConfigError, LabError, LocalProtocolError, RemoteProtocolError, TunnelDown

__all__ = [
    "IOV_MAX",
    "IpcChannel",
    "IpcChannelStatistics",
    "IpcStream",
    "PeerCredentials",
    "ServerStatistics",
    "SocketStream",
    "UnixIpcServer",
    "connect_ipc_unix",
    "open_ipc_channel",
    "peer_credentials",
    "read_token_file",
    "write_token_file",
]

log = logging.getLogger("netsim.ipc")

try:
    IOV_MAX: int = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;} (man 7 unix, SO_PEERCRED)
_ERROR_CODES = {
    "auth_failed": ipc.ErrorCode.AUTH,
    "peer_timeout": ipc.ErrorCode.TIMEOUT,
    "no_common_version": ipc.ErrorCode.VERSION,
    "frame_too_big": ipc.ErrorCode.TOO_BIG,
}
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The peer process's identity as the kernel recorded it at ``connect()`` (SO_PEERCRED, not re-fetched)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> PeerCredentials:
    """Read SO_PEERCRED of a connected AF_UNIX socket (Linux, man 7 unix)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


_MAX_TOKEN_FILE = 256


def write_token_file(path: str | os.PathLike[str], token: bytes) -> None:
    """Create ``path`` (must not exist) mode 0600 holding ``token``: the per-tunnel IPC secret, handed to both
    ends out of band (a file in a private directory, not argv, which every user can read in /proc)."""
    if not 0 < len(token) <= _MAX_TOKEN_FILE:
        raise ConfigError(f"an IPC token is 1..{_MAX_TOKEN_FILE} bytes")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token)


def read_token_file(path: str | os.PathLike[str]) -> bytes:
    """Read an IPC token written by `write_token_file`; refuse a file others may read or that is not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"cannot open the IPC token file {path}: {exc}", source=str(path)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ConfigError(
                f"IPC token file {path} must be a regular file of ours with mode 0600 (chmod 600)", source=str(path)
            )
        token = f.read(_MAX_TOKEN_FILE + 1).strip()
    if not 0 < len(token) <= _MAX_TOKEN_FILE:
        raise ConfigError(f"IPC token file {path} must hold 1..{_MAX_TOKEN_FILE} bytes", source=str(path))
    return token


class IpcStream(Protocol):
    """A reliable byte stream with scatter-gather send and receive-into; what `IpcChannel` needs."""

    peer: PeerCredentials | None

    async def send_some(self, buffers: Sequence[ipc.Buffer]) -> int:
        """Send a prefix of the concatenation of ``buffers`` (at most IOV_MAX of them); return bytes sent (> 0)."""
        ...

    async def receive_into(self, view: memoryview) -> int:
        """Receive into ``view``; return bytes received, 0 at EOF."""
        ...

    def close(self) -> None:
        """Close; idempotent."""
        ...


class SocketStream:
    """`IpcStream` over a connected trio AF_UNIX SOCK_STREAM socket."""

    def __init__(self, sock: trio.socket.SocketType, peer: PeerCredentials | None = None) -> None:
        self._sock = sock
        self.peer = peer

    async def send_some(self, buffers: Sequence[ipc.Buffer]) -> int:
        return await self._sock.sendmsg(buffers)

    async def receive_into(self, view: memoryview) -> int:
        return await self._sock.recv_into(view)

    def close(self) -> None:
        self._sock.close()


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


@dataclass(slots=True)
class _Item:
    bufs: list[ipc.Buffer]
    packets: int
    nbytes: int
    done: trio.Event | None


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
        self._packets_received = 0
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
        )

    # --- sending ----------------------------------------------------------------------------------------------------
    def send_packets_nowait(self, packets: Sequence[ipc.Buffer], families: Sequence[int] | int) -> bool:
        """Queue a batch for the writer; never blocks. False (and counted) if dropped.

        The channel owns the packet buffers until they are written: do not mutate them afterwards (pass ``bytes``,
        or use `send_packets`, which returns only once they are on the socket).
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
        self._enqueue(_Item(bufs, n, nbytes, None))
        return True

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
        item = _Item(bufs, n, nbytes, trio.Event())
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
        """The single writer: control first, then packet batches coalesced up to IOV_MAX, then the final closer."""
        try:
            while True:
                if self._control:
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

    async def _fail_remote(self, exc: RemoteProtocolError) -> None:
        log.log(self._level(logging.WARNING), "IPC peer %s violated the protocol: %s; closing", self.peer, exc)
        if self._broken is None:
            try:
                code = _ERROR_CODES.get(exc.reason, ipc.ErrorCode.PROTOCOL)
                bufs = self.connection.send(ipc.Error(code, str(exc)[:512]))
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
        """Provider: send HELLO, wait for HELLO_ACK. Helper: wait for HELLO, send HELLO_ACK. Returns the peer's.

        Raises `RemoteProtocolError` if the peer answers anything else (an ERROR frame is reported with its code).
        """
        conn = self.connection
        send_failed: TunnelDown | None = None
        if conn.role is ipc.Role.PROVIDER:
            try:
                await self.send(conn.hello())
            except TunnelDown as exc:
                send_failed = exc  # a refusing helper writes ERROR and closes: read its reason first
        ev = await self.receive_event()
        if isinstance(ev, ipc.Error):
            self.close()
            reason = "peer_busy" if ev.code == ipc.ErrorCode.BUSY else "peer_error"
            raise RemoteProtocolError(reason, f"code {ev.code}: {ev.message}")
        if send_failed is not None:
            raise send_failed
        if conn.role is ipc.Role.PROVIDER and isinstance(ev, ipc.HelloAck):
            self.start_liveness()
            return ev
        if conn.role is ipc.Role.HELPER and isinstance(ev, ipc.Hello):
            await self.send(conn.hello_ack())
            self.start_liveness()
            return ev
        self.close()
        raise RemoteProtocolError("handshake_failed", f"expected a handshake message, got {ev!r}")


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


# --- server -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """Counters of a `UnixIpcServer`."""

    accepted: int
    rejected_uid: int
    rejected_busy: int
    handshake_failed: int
    protocol_errors: int
    sessions_done: int
    active: int
    rejected_auth: int = 0
    pending: int = 0
    log_suppressed: int = 0


class _RejectionLog:
    """Rate-limited WARNING lines for rejected connections: the first ``burst`` individually, then one summary line
    per ``interval`` with the count. The server's counters stay exact; only the log is bounded (a flood of 10k
    connections writes about ``burst`` + one line per interval, not 10k)."""

    def __init__(self, burst: int = 10, interval: float = 10.0) -> None:
        self.burst = burst
        self.interval = interval
        self.logged = 0
        self.suppressed = 0  # total, for statistics
        self._pending: dict[str, int] = {}
        self._window_start: float | None = None

    def warn(self, kind: str, msg: str, *args: object) -> None:
        now = trio.current_time()
        if self._window_start is None or now - self._window_start >= self.interval:
            self.flush()
            self._window_start = now
            self.logged = 0
        if self.logged < self.burst:
            self.logged += 1
            log.warning(msg, *args)
            return
        self.suppressed += 1
        self._pending[kind] = self._pending.get(kind, 0) + 1

    def flush(self) -> None:
        """Write the summary of what was suppressed since the last one (called every ``interval`` and at exit)."""
        if self._pending:
            detail = ", ".join(f"{n} {kind}" for kind, n in sorted(self._pending.items()))
            log.warning("IPC: %s more rejected connection(s) not logged individually (rate limit)", detail)
            self._pending.clear()

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.flush()


def _prepare_socket_dir(directory: Path, mode: int) -> None:
    """Create ``directory`` with ``mode`` under a tight umask; refuse one that others can reach or we do not own."""
    if mode & 0o007:
        raise ConfigError(f"socket directory mode {mode:#o} gives access to all users; use 0o700 (or 0o750)")
    # The umask lets exactly ``mode`` through (a fixed 077 would silently turn 0o750 into 0o700).
    old = os.umask((0o777 & ~mode) | 0o007)
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
    finally:
        os.umask(old)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{directory} is not a directory (symlinks are refused)", source=str(directory))
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{directory} is owned by uid {st.st_uid}, not by us ({os.geteuid()})")
    if stat.S_IMODE(st.st_mode) & ~mode & 0o777 or stat.S_IMODE(st.st_mode) & 0o007:
        raise ConfigError(
            f"{directory} has mode {stat.S_IMODE(st.st_mode):#o}; chmod it to {mode:#o}", source=str(directory)
        )


def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise LabError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise LabError(f"another process is already listening on {path}")


class UnixIpcServer:
    """The helper's listening socket: credential-checked, one session at a time by default.

    Args:
        socket_path: where to bind; its parent directory is created with ``dir_mode``.
        allowed_uids: uids accepted by SO_PEERCRED (default: our own effective uid only).
        max_clients: concurrent sessions; extra clients get an ERROR BUSY frame and are closed. One is the
            default because the helper's tunnel state belongs to a single provider.
        connection_factory: builds the helper-side `ipc.Connection` for each session (e.g. with an
            ``expected_token``).
        handshake_timeout: seconds a client gets to send HELLO.
        max_pending: connections allowed to be in the handshake at once (they do not hold a session slot: the
            slot is taken only by a client whose HELLO passed the token check, so an impostor cannot lock the
            real provider out by connecting first and staying silent).
        log_burst / log_interval: rejection WARNINGs: the first ``log_burst`` per ``log_interval`` seconds are
            logged one by one, the rest as one summary line per interval (counters stay exact).
        dir_mode: 0o700 (default) or a group mode such as 0o750.
        channel_options: passed to `IpcChannel`.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        allowed_uids: Collection[int] | None = None,
        max_clients: int = 1,
        connection_factory: Callable[[], ipc.Connection] | None = None,
        handshake_timeout: float = 5.0,
        dir_mode: int = 0o700,
        backlog: int = 8,
        max_pending: int = 8,
        log_burst: int = 10,
        log_interval: float = 10.0,
        **channel_options: Any,
    ) -> None:
        if max_clients < 1:
            raise ConfigError("max_clients must be >= 1")
        self.socket_path = Path(socket_path)
        self.allowed_uids = frozenset(allowed_uids if allowed_uids is not None else {os.geteuid()})
        self.max_clients = max_clients
        self._factory = connection_factory or (lambda: ipc.Connection(ipc.Role.HELPER))
        self.handshake_timeout = handshake_timeout
        self.dir_mode = dir_mode
        self.backlog = backlog
        self._channel_options = channel_options
        self._listener: trio.socket.SocketType | None = None
        self._inode: tuple[int, int] | None = None
        self.active = 0
        self.accepted = 0
        self.rejected_uid = 0
        self.rejected_busy = 0
        self.handshake_failed = 0
        self.protocol_errors = 0
        self.sessions_done = 0
        self.rejected_auth = 0
        self.max_pending = max_pending
        self.pending = 0
        self._rejections = _RejectionLog(log_burst, log_interval)

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            self.accepted,
            self.rejected_uid,
            self.rejected_busy,
            self.handshake_failed,
            self.protocol_errors,
            self.sessions_done,
            self.active,
            self.rejected_auth,
            self.pending,
            self._rejections.suppressed,
        )

    def _bind(self) -> trio.socket.SocketType:
        _prepare_socket_dir(self.socket_path.parent, self.dir_mode)
        _remove_stale_socket(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The umask makes the socket file 0600 (0660 with a group dir mode) from the moment it exists.
        old = os.umask(0o117 if self.dir_mode & 0o070 else 0o177)
        try:
            sock.bind(str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise LabError(f"cannot bind {self.socket_path}: {exc}") from exc
        finally:
            os.umask(old)
        st = os.stat(self.socket_path)
        self._inode = (st.st_dev, st.st_ino)
        sock.listen(self.backlog)
        return trio.socket.from_stdlib_socket(sock)

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
        self._listener = listener = self._bind()
        log.info("IPC server listening on %s (allowed uids %s)", self.socket_path, sorted(self.allowed_uids))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._rejections.run)
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    self._admit(sock, handler, nursery)
        finally:
            self._rejections.flush()
            listener.close()
            self._unlink()

    def _admit(
        self, sock: trio.socket.SocketType, handler: Callable[[IpcChannel], Awaitable[None]], nursery: trio.Nursery
    ) -> None:
        try:
            peer = peer_credentials(sock)
        except OSError as exc:
            self._rejections.warn("uid", "IPC: cannot read SO_PEERCRED: %r; rejecting", exc)
            self.rejected_uid += 1
            sock.close()
            return
        if peer.uid not in self.allowed_uids:
            # Decided on the kernel's record of the connecting uid, before a single byte is read (B8).
            self.rejected_uid += 1
            self._rejections.warn(
                "uid", "IPC: rejected pid %d uid %d gid %d (uid not allowed)", peer.pid, peer.uid, peer.gid
            )
            sock.close()
            return
        if self.active >= self.max_clients or self.pending >= self.max_pending:
            self.rejected_busy += 1
            self._rejections.warn(
                "busy", "IPC: rejected pid %d: %d session(s) active, %d pending", peer.pid, self.active, self.pending
            )
            nursery.start_soon(self._reject_busy, sock)
            return
        self.accepted += 1
        self.pending += 1
        nursery.start_soon(self._session, sock, peer, handler)

    async def _reject_busy(self, sock: trio.socket.SocketType) -> None:
        """Tell a second provider why it is refused (an ERROR frame needs no handshake), then close."""
        frame = ipc.Connection(ipc.Role.HELPER).send(ipc.Error(ipc.ErrorCode.BUSY, "helper is serving another client"))
        with trio.move_on_after(0.5):
            try:
                await sock.sendmsg(frame)
            except OSError:
                pass
        sock.close()

    async def _session(
        self, sock: trio.socket.SocketType, peer: PeerCredentials, handler: Callable[[IpcChannel], Awaitable[None]]
    ) -> None:
        log.debug("IPC: connection from pid %d uid %d", peer.pid, peer.uid)
        in_session = False
        try:
            async with open_ipc_channel(SocketStream(sock, peer), self._factory(), **self._channel_options) as ch:
                if not await self._handshake(ch, peer):
                    return
                self.pending -= 1
                self.active += 1
                in_session = True
                await ch.send(ch.connection.hello_ack())
                ch.start_liveness()
                log.info("IPC: session from pid %d uid %d", peer.pid, peer.uid)
                await handler(ch)
        except RemoteProtocolError as exc:
            self.protocol_errors += 1
            self._rejections.warn("protocol", "IPC: session with pid %d closed on protocol error: %s", peer.pid, exc)
        except TunnelDown as exc:
            log.info("IPC: session with pid %d lost: %s", peer.pid, exc)
        finally:
            sock.close()
            if in_session:
                self.active -= 1
            else:
                self.pending -= 1
            self.sessions_done += 1

    async def _handshake(self, ch: IpcChannel, peer: PeerCredentials) -> bool:
        """Wait for a HELLO that passes the checks (token in constant time); take the session slot only then.

        Returns False (counted, logged with rate limit, the client told why) for a client that may not have it.
        """
        try:
            with trio.fail_after(self.handshake_timeout):
                ev = await ch.receive_event()
        except trio.TooSlowError:
            self.handshake_failed += 1
            self._rejections.warn(
                "handshake", "IPC: pid %d sent no HELLO within %g s", peer.pid, self.handshake_timeout
            )
            return False
        except RemoteProtocolError as exc:  # the channel already sent ERROR (AUTH for a bad token) and closed
            if exc.reason == "auth_failed":
                self.rejected_auth += 1
                self._rejections.warn("auth", "IPC: rejected pid %d uid %d: bad or missing token", peer.pid, peer.uid)
            else:
                self.handshake_failed += 1
                self._rejections.warn("handshake", "IPC: handshake with pid %d failed: %s", peer.pid, exc)
            return False
        if not isinstance(ev, ipc.Hello):
            self.handshake_failed += 1
            self._rejections.warn("handshake", "IPC: pid %d sent %s instead of HELLO", peer.pid, type(ev).__name__)
            return False
        if self.active >= self.max_clients:
            self.rejected_busy += 1
            self._rejections.warn("busy", "IPC: rejected pid %d: %d session(s) already active", peer.pid, self.active)
            with trio.move_on_after(0.5):
                try:
                    await ch.send(ipc.Error(ipc.ErrorCode.BUSY, "helper is serving another client"))
                except TunnelDown:
                    pass
            return False
        return True

    def _unlink(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:  # only our own socket, never a successor's
            os.unlink(self.socket_path)


# --- client -------------------------------------------------------------------------------------------------------
async def _connect_with_backoff(
    path: str, retry_for: float, backoff_initial: float, backoff_max: float
) -> trio.socket.SocketType:
    deadline = trio.current_time() + retry_for
    delay = backoff_initial
    attempts = 0
    while True:
        attempts += 1
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            retriable = exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
            if not retriable or trio.current_time() + delay > deadline:
                raise TunnelDown(f"cannot connect to helper at {path} after {attempts} attempt(s): {exc}") from exc
        await trio.sleep(delay)
        delay = min(delay * 2, backoff_max)


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

    Raises `TunnelDown` when the helper stays unreachable for ``retry_for`` seconds, `RemoteProtocolError` when the
    handshake fails (including an ERROR BUSY from a helper serving another provider), and `LabError` when the
    server runs as a uid outside ``allowed_server_uids``.
    """
    deadline = trio.current_time() + retry_for
    delay = backoff_initial
    while True:
        remaining = max(0.0, deadline - trio.current_time())
        sock = await _connect_with_backoff(str(socket_path), remaining, backoff_initial, backoff_max)
        try:
            peer = peer_credentials(sock)
            if allowed_server_uids is not None and peer.uid not in allowed_server_uids:
                raise LabError(
                    f"helper at {socket_path} runs as uid {peer.uid}, not one of {sorted(allowed_server_uids)}"
                )
            conn = connection or ipc.Connection(ipc.Role.PROVIDER)
            async with open_ipc_channel(SocketStream(sock, peer), conn, **channel_options) as channel:
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
            sock.close()
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
