"""The Unix-socket IPC transport on real sockets: permissions, peer credentials, scatter-gather, backpressure."""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from netsim.core import ipc
from netsim.errors import ConfigError, LabError, RemoteProtocolError, TunnelDown
from netsim.runtime.channel import IpcChannel, UnixIpcServer, connect_ipc_unix, open_ipc_channel
from netsim.testing.require import require_root
from netsim.transports.uds import IOV_MAX, SocketStream, peer_credentials


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # short path: sun_path holds 108 bytes, pytest's tmp_path can be longer
    base = Path(tempfile.mkdtemp(prefix="netsim-ipc-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


def batches(seed: int, count: int, size: int = 64) -> list[list[bytes]]:
    rng = random.Random(seed)
    return [[rng.randbytes(rng.randint(20, 1400)) for _ in range(size)] for _ in range(count)]


@asynccontextmanager
async def serving(
    server: UnixIpcServer, handler: Callable[[IpcChannel], Awaitable[None]]
) -> AsyncIterator[UnixIpcServer]:
    async with trio.open_nursery() as n:
        await n.start(server.serve, handler)
        yield server
        n.cancel_scope.cancel()


async def sink(received: list[bytes]) -> Callable[[IpcChannel], Awaitable[None]]:
    async def handler(ch: IpcChannel) -> None:
        while True:
            ev = await ch.receive_event()
            if isinstance(ev, ipc.PacketBatch):
                received.extend(ev.copy_packets())
            elif isinstance(ev, ipc.ConnectionClosed | ipc.Goodbye):
                return

    return handler


@pytest.mark.reliability("S2")
def test_socket_dir_and_file_permissions(sock_dir: Path) -> None:
    path = sock_dir / "run" / "helper.sock"

    async def main() -> None:
        async with serving(UnixIpcServer(path), await sink([])):
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert not path.exists()  # removed on shutdown

    run(main)


@pytest.mark.reliability("S2")
def test_group_dir_mode_is_honoured(sock_dir: Path) -> None:
    path = sock_dir / "grp" / "helper.sock"

    async def main() -> None:
        async with serving(UnixIpcServer(path, dir_mode=0o750), await sink([])):
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

    run(main)


def test_refuses_open_directory_and_foreign_files(sock_dir: Path) -> None:
    open_dir = sock_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="chmod"):
        UnixIpcServer(open_dir / "h.sock")._bind()
    with pytest.raises(ConfigError):
        UnixIpcServer(sock_dir / "x" / "h.sock", dir_mode=0o777)._bind()
    ok = sock_dir / "ok"
    ok.mkdir(mode=0o700)
    (ok / "h.sock").write_text("not a socket")
    with pytest.raises(LabError, match="not a socket"):
        UnixIpcServer(ok / "h.sock")._bind()


def test_stale_socket_replaced_live_one_refused(sock_dir: Path) -> None:
    d = sock_dir / "d"
    d.mkdir(mode=0o700)
    path = d / "h.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # file left behind, nobody listening

    async def main() -> None:
        async with serving(UnixIpcServer(path), await sink([])):
            with pytest.raises(LabError, match="already listening"):
                UnixIpcServer(path)._bind()

    run(main)


def test_64_packet_batches_intact_over_uds(sock_dir: Path) -> None:
    path = sock_dir / "h.sock"
    sent = batches(7, 50)

    async def main() -> None:
        received: list[bytes] = []
        server = UnixIpcServer(path)
        async with serving(server, await sink(received)):
            async with connect_ipc_unix(path) as ch:
                assert ch.peer is not None and ch.peer.pid == os.getpid()
                for b in sent:
                    await ch.send_packets(b, [2, 30] * 32)
                stats = ch.statistics()
            while server.statistics().sessions_done < 1:
                await trio.sleep(0.01)
        assert received == [p for b in sent for p in b]
        assert stats.ipc_out.forwarded == 50 * 64 and stats.ipc_out.unattributed() == 0
        assert stats.sendmsg_calls >= 51  # at least hello + one sendmsg per batch, no per-packet writes

    run(main)


def test_partial_sends_and_iov_max_over_socketpair() -> None:
    """A tiny send buffer forces partial sendmsg; a batch with more than IOV_MAX buffers is split correctly."""

    async def main() -> None:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = [bytes([i % 256]) * 40 for i in range(IOV_MAX + 300)]
        sent = [*batches(9, 6), big]
        async with (
            open_ipc_channel(SocketStream(a), ipc.Connection(ipc.Role.PROVIDER)) as prov,
            open_ipc_channel(SocketStream(b), ipc.Connection(ipc.Role.HELPER)) as helper,
        ):
            async with trio.open_nursery() as n:
                n.start_soon(helper.handshake)
                await prov.handshake()
            got: list[bytes] = []

            async def reader() -> None:
                while len(got) < sum(map(len, sent)):
                    await trio.sleep(0.001)  # a slow reader keeps the socket buffer full
                    ev = await helper.receive_event()
                    assert isinstance(ev, ipc.PacketBatch)
                    got.extend(ev.copy_packets())

            async with trio.open_nursery() as n:
                n.start_soon(reader)
                for bt in sent:
                    await prov.send_packets(bt, 2)
            assert got == [p for bt in sent for p in bt]
            assert prov.statistics().partial_sends > 0

    run(main)


@pytest.mark.reliability("LD3", "F9")
def test_slow_reader_counted_drops_no_unbounded_growth() -> None:
    async def main() -> None:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        async with (
            open_ipc_channel(
                SocketStream(a), ipc.Connection(ipc.Role.PROVIDER), max_queued_batches=8, max_queued_bytes=1 << 20
            ) as prov,
            open_ipc_channel(SocketStream(b), ipc.Connection(ipc.Role.HELPER)) as helper,
        ):
            async with trio.open_nursery() as n:
                n.start_soon(helper.handshake)
                await prov.handshake()
            pk = [b"\x45" * 1400] * 64
            accepted = 0
            for _ in range(400):  # ~36 MB offered while nobody reads
                accepted += prov.send_packets_nowait(pk, 2)
                st = prov.statistics()
                assert st.queued_batches <= 8 and st.queued_bytes <= 1 << 20
                await trio.sleep(0)
            out = prov.statistics().ipc_out
            assert out.dropped_for("ipc_queue_full") == (400 - accepted) * 64 > 0
            assert out.unattributed() == 0
            got = 0
            while got < accepted * 64:
                ev = await helper.receive_event()
                assert isinstance(ev, ipc.PacketBatch)
                got += len(ev)
            assert got == accepted * 64
            assert helper.connection.receive_capacity <= 4 << 20

    run(main)


@pytest.mark.reliability("B7")
def test_malformed_client_disconnected_good_client_served(sock_dir: Path) -> None:
    path = sock_dir / "h.sock"

    async def main() -> None:
        received: list[bytes] = []
        server = UnixIpcServer(path, handshake_timeout=5)
        async with serving(server, await sink(received)):
            bad = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await bad.connect(str(path))
            await bad.send(struct.pack("!HBBHHI", 0x4E53, 1, 3, 0, 0, 0x7FFFFFFF))  # absurd length
            reply = b""
            while chunk := await bad.recv(4096):
                reply += chunk
            bad.close()
            c = ipc.Connection(ipc.Role.PROVIDER)
            c.receive_data(reply)
            err = c.next_event()
            assert isinstance(err, ipc.Error) and err.code == ipc.ErrorCode.TOO_BIG
            async with connect_ipc_unix(path) as ch:
                await ch.send_packets([b"\x45" * 40], 2)
            while server.statistics().sessions_done < 2:
                await trio.sleep(0.01)
            s = server.statistics()
            assert s.handshake_failed == 1 and s.accepted == 2 and s.active == 0
            assert received == [b"\x45" * 40]

    run(main)


def test_second_client_told_busy(sock_dir: Path) -> None:
    path = sock_dir / "h.sock"

    async def main() -> None:
        server = UnixIpcServer(path)
        async with serving(server, await sink([])):
            async with connect_ipc_unix(path):
                with pytest.raises(RemoteProtocolError, match="code 5"):
                    async with connect_ipc_unix(path, retry_for=0):
                        pass  # pragma: no cover
                assert server.statistics().rejected_busy == 1

    run(main)


def test_client_retries_until_server_appears(sock_dir: Path) -> None:
    path = sock_dir / "late" / "h.sock"

    async def main() -> None:
        server = UnixIpcServer(path)
        async with trio.open_nursery() as n:

            async def late_start() -> None:
                await trio.sleep(0.3)
                await n.start(server.serve, await sink([]))

            n.start_soon(late_start)
            async with connect_ipc_unix(path, retry_for=10, backoff_initial=0.02) as ch:
                await ch.send(ipc.Ping(1))
            n.cancel_scope.cancel()
        with pytest.raises(TunnelDown, match="attempt"):
            async with connect_ipc_unix(sock_dir / "nobody.sock", retry_for=0.1, backoff_initial=0.02):
                pass  # pragma: no cover

    run(main)


_CHILD = r"""
import os, socket, struct, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
try:
    s.sendall(struct.pack("!HBBHHI", 0x4E53, 1, 1, 0, 0, 12) + struct.pack("!BBIIH", 1, 1, 0, 1 << 20, 0) + b"\x01")
    data = s.recv(4096)
except (BrokenPipeError, ConnectionResetError):  # closed on us before or after our HELLO
    data = b""
print("EOF" if data == b"" else "DATA")
"""


@pytest.mark.reliability("S1")
def test_peer_uid_rejected_before_any_frame(sock_dir: Path) -> None:
    require_root()
    path = sock_dir / "h.sock"

    async def child() -> str:
        # the system python: the venv's interpreter may live under /root, out of reach of uid 65534
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        r = await trio.run_process([python, "-c", _CHILD, str(path)], capture_stdout=True, check=True)
        return r.stdout.decode().strip()

    async def main() -> None:
        server = UnixIpcServer(path)
        async with serving(server, await sink([])):
            # gate 1: the 0700 directory alone keeps uid 65534 out
            assert await child() == "EACCES"
            # gate 2: open the filesystem path up; SO_PEERCRED still rejects the uid before reading a byte
            sock_dir.chmod(0o711)
            path.chmod(0o666)
            assert await child() == "EOF"
            s = server.statistics()
            assert s.rejected_uid == 1 and s.accepted == 0 and s.handshake_failed == 0

    run(main)


def test_peer_credentials_of_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        cred = peer_credentials(a)
        assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_socket_inline_sends_wake_no_writer_and_eagain_keeps_order() -> None:
    """Over a real AF_UNIX socketpair: a prompt reader means every batch leaves by the caller's own sendmsg (no
    writer wakeup); with nobody reading, EAGAIN hands batches to the writer and order is kept."""

    async def main() -> None:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        async with (
            open_ipc_channel(
                SocketStream(a), ipc.Connection(ipc.Role.PROVIDER), max_queued_batches=256, max_queued_bytes=64 << 20
            ) as prov,
            open_ipc_channel(SocketStream(b), ipc.Connection(ipc.Role.HELPER)) as helper,
        ):
            async with trio.open_nursery() as n:
                n.start_soon(helper.handshake)
                await prov.handshake()
            small = [[bytes([i, j]) * 10 for j in range(4)] for i in range(30)]
            w0 = prov.statistics().writer_wakeups
            for bt in small:
                assert prov.send_packets_nowait(bt, 2)
                ev = await helper.receive_event()
                assert isinstance(ev, ipc.PacketBatch) and ev.copy_packets() == bt
            st = prov.statistics()
            assert st.writer_wakeups == w0 and st.inline_sends == 30

            sent = batches(13, 100)  # ~4.5 MB while nobody reads: EAGAIN after the socket buffer fills
            for bt in sent:
                assert prov.send_packets_nowait(bt, 2)
            assert prov.statistics().queued_batches > 0
            got: list[bytes] = []
            while len(got) < 100 * 64:
                ev = await helper.receive_event()
                assert isinstance(ev, ipc.PacketBatch)
                got.extend(ev.copy_packets())
            assert got == [p for bt in sent for p in bt]
            st = prov.statistics()
            assert st.writer_wakeups > w0 and st.ipc_out.unattributed() == 0

    run(main)
