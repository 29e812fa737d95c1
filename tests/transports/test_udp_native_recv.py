"""The helper socket's native batch receive (`UdpTransport.recv_batch` through the accelerator's ``udp_recv``:
one ``recvmmsg`` per batch) against its pure-Python path (``recvfrom_into`` / ``recvmsg_into`` per datagram).

Over loopback, with and without UDP GRO, IPv4 and IPv6: the same datagrams, sizes, sources and counters either
way; the positive control is the syscall counter (one per batch natively, one per datagram in Python). Then what
only the native path must get right: a datagram cut to a short buffer is dropped by name and the next one moved
into the free buffer, a source tuple is reused only while the source repeats, more coalesced datagrams than the
lists have slots grow the lists instead of being lost, and bad arguments raise instead of touching memory.
Without a built accelerator the native tests skip (CI requires it: ``NETSIM_NATIVE=1``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

import netsim.accel
from netsim.testing.require import require
from netsim.transports import udp
from netsim.transports.udp import GRO_MAX_SEGMENTS, UdpTransport

native = netsim.accel.native
needs_native = pytest.mark.skipif(native is None, reason=f"native accelerator not active: {netsim.accel.describe()}")


def _lists(batch: int = 64, size: int = 2048, extra: int = GRO_MAX_SEGMENTS - 1) -> tuple[list[Any], ...]:
    slab = memoryview(bytearray(batch * size))
    views = [slab[i * size : (i + 1) * size] for i in range(batch)] + [slab[:0]] * extra
    return views, [0] * len(views), [None] * len(views)


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def family(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def _host(family: int) -> str:
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


@pytest.fixture
def senders(family: int) -> Iterator[list[socket.socket]]:
    out = []
    for _ in range(2):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((_host(family), 0))
        out.append(s)
    yield out
    for s in out:
        s.close()


def _receiver(family: int, *, gro: bool) -> UdpTransport:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((_host(family), 0))
    return UdpTransport(sock, gro=gro)


def _receive_all(rx: UdpTransport, lists: tuple[list[Any], ...]) -> list[tuple[bytes, Any]]:
    views, sizes, addrs = lists
    out = []
    while n := rx.recv_batch(views, sizes, addrs):
        out += [(bytes(views[i][: sizes[i]]), addrs[i]) for i in range(n)]
    return out


def _run(family: int, senders: list[socket.socket], *, gro: bool, use_native: bool) -> tuple[Any, ...]:
    rx = _receiver(family, gro=gro)
    saved = udp._native_udp_recv
    udp._native_udp_recv = saved if use_native else None
    try:
        dst = rx.sock.getsockname()[:2]
        for i in range(100):  # two sources interleaved in runs, sizes varying
            senders[(i // 7) % 2].sendto(bytes([i]) * (40 + i), dst)
        got = _receive_all(rx, _lists(extra=GRO_MAX_SEGMENTS - 1 if gro else 0))  # as the driver sizes them
        counters = (rx.rx_reads, rx.rx_datagrams, rx.gro_reads, {k: v for k, v in rx.rx_drops.items() if v})
        return got, counters, rx.rx_syscalls
    finally:
        udp._native_udp_recv = saved
        rx.close()


@needs_native
@pytest.mark.parametrize("gro", [False, True], ids=["plain", "gro"])
def test_native_and_python_receive_the_same_datagrams_and_counters(
    family: int, senders: list[socket.socket], gro: bool
) -> None:
    got_n, counters_n, syscalls_n = _run(family, senders, gro=gro, use_native=True)
    got_p, counters_p, syscalls_p = _run(family, senders, gro=gro, use_native=False)
    assert len(got_n) == 100
    assert got_n == got_p
    assert [a[:2] for _, a in got_n] == [senders[(i // 7) % 2].getsockname()[:2] for i in range(100)]
    assert counters_n == counters_p == (100, 100, 0, {})
    assert syscalls_p == 100  # the control: one receive per datagram in Python ...
    assert syscalls_n == 2  # ... one recvmmsg per batch of 64 natively


@needs_native
def test_a_source_tuple_is_reused_only_while_the_source_repeats(family: int, senders: list[socket.socket]) -> None:
    rx = _receiver(family, gro=False)
    try:
        dst = rx.sock.getsockname()[:2]
        for s in (senders[0], senders[0], senders[1], senders[0]):
            s.sendto(b"x", dst)
        views, sizes, addrs = _lists()
        assert rx.recv_batch(views, sizes, addrs) == 4
        a, b, c, d = addrs[:4]
        assert a is b and a == d and c != a
        assert (a, c) == (senders[0].getsockname()[:2], senders[1].getsockname()[:2])
    finally:
        rx.close()


@needs_native
def test_a_datagram_longer_than_its_buffer_is_dropped_and_the_next_moves_into_its_place() -> None:
    rx = _receiver(socket.AF_INET, gro=False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dst = rx.sock.getsockname()
        for data in (b"a" * 50, b"b" * 200, b"c" * 60):
            tx.sendto(data, dst)
        views, sizes, addrs = _lists(batch=4, size=100, extra=0)
        assert rx.recv_batch(views, sizes, addrs) == 2
        assert [bytes(views[i][: sizes[i]]) for i in range(2)] == [b"a" * 50, b"c" * 60]
        assert rx.rx_drops["truncated"] == 1 and rx.rx_datagrams == 2
    finally:
        rx.close()
        tx.close()


@needs_native
def test_more_coalesced_datagrams_than_slots_grow_the_lists_instead_of_being_lost() -> None:
    rx = _receiver(socket.AF_INET, gro=True)
    tx = UdpTransport(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), gso=True)
    tx.sock.bind(("127.0.0.1", 0))
    try:
        require(rx.gro and tx.gso, "this kernel has no UDP GRO/GSO on loopback (Linux >= 5.0)")
        dst = rx.sock.getsockname()
        for k in range(3):  # three GSO sends of 64 datagrams: three coalesced reads, 192 datagrams
            assert tx.send_segments([bytes([k]) * 500] * 64, dst) is None
        views, sizes, addrs = _lists(batch=3, size=65535)  # what the driver gives a batch of 3: 66 slots
        base = list(views)
        n = rx.recv_batch(views, sizes, addrs)
        assert n == 192 and len(views) == len(sizes) == len(addrs) == 192 and rx.gro_reads == 3
        assert [bytes(views[i][: sizes[i]]) for i in range(n)] == [
            bytes([k]) * 500 for k in range(3) for _ in range(64)
        ]
        assert rx.recv_batch(views, sizes, addrs) == 0
        assert all(v is b for v, b in zip(views[: len(base)], base, strict=True))  # the driver's buffers are back
    finally:
        rx.close()
        tx.close()


@needs_native
def test_udp_recv_refuses_bad_arguments() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    fd = sock.fileno()
    views, sizes, addrs = _lists(batch=4, extra=0)
    try:
        for limit in (0, -1, 257, 5):  # out of range, or longer than the lists
            with pytest.raises(ValueError):
                native.udp_recv(fd, views, sizes, addrs, limit, False)
        with pytest.raises((TypeError, BufferError)):
            native.udp_recv(fd, [b"read-only"] * 4, sizes, addrs, 4, False)  # bytes: not writable
        with pytest.raises(TypeError):
            native.udp_recv(fd, tuple(views), sizes, addrs, 4, False)
        assert native.udp_recv(fd, views, sizes, addrs, 4, False) == (0, None, 0, 0, 0)  # nothing ready
        assert native.udp_recv(-1, views, sizes, addrs, 4, False)[4] != 0  # EBADF comes back as an errno
    finally:
        sock.close()


@needs_native
def test_a_closed_transport_raises_instead_of_reading_another_socket() -> None:
    rx = _receiver(socket.AF_INET, gro=False)
    rx.close()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # may get the closed socket's fd number
    other.bind(("127.0.0.1", 0))
    try:
        other.sendto(b"not yours", other.getsockname())
        views, sizes, addrs = _lists(extra=0)
        with pytest.raises(OSError):
            rx.recv_batch(views, sizes, addrs)
        assert other.recv(100) == b"not yours"  # still queued on its own socket
    finally:
        other.close()
