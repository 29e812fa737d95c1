"""Unix-domain-socket transport for the provider <-> helper IPC (trio): sockets, the server, connect.

The protocol lives in `netsim.core.ipc` (sans-IO); the channel that schedules it (queues, writer task, handshake,
liveness) is `netsim.runtime.channel.IpcChannel`. This module only deals with sockets:

* `IpcStream` is what a channel needs from a byte stream; `SocketStream` is one over a connected AF_UNIX socket
  (``sendmsg`` scatter-gather, a non-blocking `SocketStream.send_nowait` for the channel's inline send, and
  ``recv_into``).
* `UnixIpcServer` binds a ``SOCK_STREAM`` socket in a directory created 0700 under a tight umask, reads the peer's
  ``SO_PEERCRED`` and rejects uids outside ``allowed_uids`` *before reading a single byte*, and serves at most
  ``max_clients`` sessions at once (default 1: a second provider is told BUSY and closed). A client takes the
  session slot only once its HELLO passed the connection's checks (the per-tunnel token, compared in constant
  time), so an impostor that connects first cannot lock the provider out. Rejections are counted exactly and
  logged with a rate limit; a session that violates the protocol is closed and the server keeps accepting.
  `UnixIpcServer.serve_sessions` hands each admitted session on as an `AcceptedSession` (stream + connection);
  `netsim.runtime.channel.UnixIpcServer` wraps it in a channel.
* `connect_unix` connects with exponential backoff (the helper may be restarting) and checks the server's uid;
  `netsim.runtime.channel.connect_ipc_unix` adds the channel and the handshake.

Abstract sockets (``"\\0name"``) are deliberately not offered: they have no filesystem permissions, and they are
scoped per network namespace, so any process in the simulated Mac's namespace could reach the helper
(docs/reliability.md, lesson B8). A path in a 0700 directory gives two independent gates: the directory mode
and SO_PEERCRED.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from netsim.core import ipc
from netsim.errors import ConfigError, LabError, RemoteProtocolError, TunnelDown

__all__ = [
    "IOV_MAX",
    "AcceptedSession",
    "IpcStream",
    "PeerCredentials",
    "ServerStatistics",
    "SocketStream",
    "UnixIpcServer",
    "connect_unix",
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
_HELLO_RECV = 4096  # a HELLO is at most ~300 bytes


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


def new_token() -> bytes:
    """A fresh per-tunnel IPC secret: 32 random bytes as 64 hex digits, which a token file carries unchanged."""
    return secrets.token_hex(32).encode()


def write_token_file(path: str | os.PathLike[str], token: bytes) -> None:
    """Create ``path`` (must not exist) mode 0600 holding ``token``: the per-tunnel IPC secret, handed to both
    ends out of band (a file in a private directory, not argv, which every user can read in /proc)."""
    if not 0 < len(token) <= _MAX_TOKEN_FILE:
        raise ConfigError(f"an IPC token is 1..{_MAX_TOKEN_FILE} bytes")
    if token != token.strip():
        # read_token_file strips (a file written with `echo` ends in a newline): such a token would not survive
        raise ConfigError("an IPC token must not start or end with whitespace (read_token_file strips it); new_token()")
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
    """A reliable byte stream with scatter-gather send and receive-into; what an IPC channel needs."""

    peer: PeerCredentials | None

    async def send_some(self, buffers: Sequence[ipc.Buffer]) -> int:
        """Send a prefix of the concatenation of ``buffers`` (at most IOV_MAX of them); return bytes sent (> 0)."""
        ...

    def send_nowait(self, buffers: Sequence[ipc.Buffer]) -> int:
        """Like `send_some` without waiting: bytes sent (> 0), or `BlockingIOError` if none fit right now."""
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

    def send_nowait(self, buffers: Sequence[ipc.Buffer]) -> int:
        # writev(2) on the non-blocking socket trio set up: sendmsg(2) without ancillary data or flags, one syscall,
        # scatter-gather like send_some; EAGAIN surfaces as BlockingIOError (man 7 unix, man 2 writev).
        return os.writev(self._sock.fileno(), buffers)

    async def receive_into(self, view: memoryview) -> int:
        return await self._sock.recv_into(view)

    def close(self) -> None:
        self._sock.close()


@dataclass(frozen=True, slots=True)
class AcceptedSession:
    """A client `UnixIpcServer` admitted: its credentials passed, its HELLO passed ``connection``'s checks (the
    token), and it holds a session slot. ``connection`` has received the HELLO and owes the HELLO_ACK
    (`ipc.Connection.handshake_reply`); bytes the client sent after HELLO are still in its buffer."""

    stream: SocketStream
    connection: ipc.Connection
    peer: PeerCredentials
    hello: ipc.Hello


async def _send_best_effort(sock: trio.socket.SocketType, bufs: Sequence[ipc.Buffer], timeout: float = 0.5) -> None:
    """Tell a refused client why (one small frame), without letting it stall us."""
    with trio.move_on_after(timeout):
        try:
            await sock.sendmsg(bufs)
        except OSError:
            pass


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

    async def serve_sessions(
        self,
        session: Callable[[AcceptedSession], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients forever, calling ``session(accepted)`` for each admitted one; use with ``nursery.start``.

        A session ends when ``session`` returns (the socket is then closed) and the server accepts the next client.
        `RemoteProtocolError` and `TunnelDown` from ``session`` end only that session (counted, logged).
        """
        self._listener = listener = self._bind()
        log.info("IPC server listening on %s (allowed uids %s)", self.socket_path, sorted(self.allowed_uids))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._rejections.run)
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    self._admit(sock, session, nursery)
        finally:
            self._rejections.flush()
            listener.close()
            self._unlink()

    def _admit(
        self,
        sock: trio.socket.SocketType,
        session: Callable[[AcceptedSession], Awaitable[None]],
        nursery: trio.Nursery,
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
        nursery.start_soon(self._session, sock, peer, session)

    async def _reject_busy(self, sock: trio.socket.SocketType) -> None:
        """Tell a second provider why it is refused (an ERROR frame needs no handshake), then close."""
        frame = ipc.Connection(ipc.Role.HELPER).send(ipc.Error(ipc.ErrorCode.BUSY, "helper is serving another client"))
        await _send_best_effort(sock, frame)
        sock.close()

    async def _session(
        self,
        sock: trio.socket.SocketType,
        peer: PeerCredentials,
        session: Callable[[AcceptedSession], Awaitable[None]],
    ) -> None:
        log.debug("IPC: connection from pid %d uid %d", peer.pid, peer.uid)
        in_session = False
        try:
            conn = self._factory()
            hello = await self._handshake(sock, conn, peer)
            if hello is None:
                return
            self.pending -= 1
            self.active += 1
            in_session = True
            log.info("IPC: session from pid %d uid %d", peer.pid, peer.uid)
            await session(AcceptedSession(SocketStream(sock, peer), conn, peer, hello))
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

    async def _read_first_event(self, sock: trio.socket.SocketType, conn: ipc.Connection) -> ipc.Event:
        """Receive until ``conn`` parses one event (sans-IO: the connection bounds and checks every byte)."""
        while True:
            ev = conn.next_event()
            if not isinstance(ev, ipc.NeedData):
                return ev
            view = conn.receive_buffer(_HELLO_RECV)
            try:
                n = await sock.recv_into(view, _HELLO_RECV)
            except OSError as exc:
                n = 0
                log.debug("IPC receive before HELLO failed: %r", exc)
            finally:
                view.release()
            conn.receive_commit(n)

    async def _handshake(
        self, sock: trio.socket.SocketType, conn: ipc.Connection, peer: PeerCredentials
    ) -> ipc.Hello | None:
        """Wait for a HELLO that passes the checks (token in constant time); take the session slot only then.

        Returns None (counted, logged with rate limit, the client told why) for a client that may not have it.
        """
        try:
            with trio.fail_after(self.handshake_timeout):
                ev = await self._read_first_event(sock, conn)
        except trio.TooSlowError:
            self.handshake_failed += 1
            self._rejections.warn(
                "handshake", "IPC: pid %d sent no HELLO within %g s", peer.pid, self.handshake_timeout
            )
            return None
        except RemoteProtocolError as exc:
            # Before the handshake a refused client is logged once by the rate-limited line below, not per client.
            log.debug("IPC peer %s violated the protocol: %s; closing", peer, exc)
            await _send_best_effort(sock, conn.send(conn.error_for(exc)))  # e.g. ERROR AUTH for a bad token
            if exc.reason == "auth_failed":
                self.rejected_auth += 1
                self._rejections.warn("auth", "IPC: rejected pid %d uid %d: bad or missing token", peer.pid, peer.uid)
            else:
                self.handshake_failed += 1
                self._rejections.warn("handshake", "IPC: handshake with pid %d failed: %s", peer.pid, exc)
            return None
        if not isinstance(ev, ipc.Hello):
            self.handshake_failed += 1
            self._rejections.warn("handshake", "IPC: pid %d sent %s instead of HELLO", peer.pid, type(ev).__name__)
            return None
        if self.active >= self.max_clients:
            self.rejected_busy += 1
            self._rejections.warn("busy", "IPC: rejected pid %d: %d session(s) already active", peer.pid, self.active)
            await _send_best_effort(sock, conn.send(ipc.Error(ipc.ErrorCode.BUSY, "helper is serving another client")))
            return None
        return ev

    def _unlink(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:  # only our own socket, never a successor's
            os.unlink(self.socket_path)


# --- client -------------------------------------------------------------------------------------------------------
async def connect_unix(
    socket_path: str | os.PathLike[str],
    *,
    retry_for: float = 10.0,
    backoff_initial: float = 0.05,
    backoff_max: float = 1.0,
    allowed_server_uids: Collection[int] | None = None,
) -> SocketStream:
    """Connect to the helper's socket, retrying with exponential backoff while it is absent (restarting).

    Raises `TunnelDown` when it stays unreachable for ``retry_for`` seconds and `LabError` when the server runs as
    a uid outside ``allowed_server_uids`` (read from SO_PEERCRED, as the server reads ours).
    """
    path = str(socket_path)
    deadline = trio.current_time() + retry_for
    delay = backoff_initial
    attempts = 0
    while True:
        attempts += 1
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
            break
        except OSError as exc:
            sock.close()
            retriable = exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
            if not retriable or trio.current_time() + delay > deadline:
                raise TunnelDown(f"cannot connect to helper at {path} after {attempts} attempt(s): {exc}") from exc
        await trio.sleep(delay)
        delay = min(delay * 2, backoff_max)
    try:
        peer = peer_credentials(sock)
    except OSError:
        sock.close()
        raise
    if allowed_server_uids is not None and peer.uid not in allowed_server_uids:
        sock.close()
        raise LabError(f"helper at {socket_path} runs as uid {peer.uid}, not one of {sorted(allowed_server_uids)}")
    return SocketStream(sock, peer)
