"""UDP GSO on the helper's socket (`UdpTransport.send_segments`, udp(7) UDP_SEGMENT), over loopback: one sendmsg
becomes one datagram per segment, byte for byte; the control sends one datagram per call; a kernel that refuses
the segmentation falls back to single sends without losing a datagram."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from netsim.transports.udp import UdpTransport


@pytest.fixture
def pair() -> Iterator[tuple[UdpTransport, socket.socket]]:
    tx = UdpTransport.open(interface=None)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2.0)
    yield tx, rx
    tx.close()
    rx.close()


def _receive(rx: socket.socket, n: int) -> list[bytes]:
    return [rx.recv(4096) for _ in range(n)]


def test_one_gso_send_becomes_one_datagram_per_segment(pair: tuple[UdpTransport, socket.socket]) -> None:
    tx, rx = pair
    segments = [bytes([i]) * 1200 for i in range(10)] + [b"\xff" * 300]  # a shorter last one is allowed
    assert tx.send_segments([memoryview(s) for s in segments], rx.getsockname()) is None
    assert _receive(rx, len(segments)) == segments
    assert (tx.gso_sends, tx.gso_datagrams) == (1, 11)


def test_without_gso_each_segment_is_its_own_send(pair: tuple[UdpTransport, socket.socket]) -> None:
    tx, rx = pair
    tx.gso = False
    segments = [bytes([i]) * 200 for i in range(5)]
    assert tx.send_segments(segments, rx.getsockname()) is None
    assert _receive(rx, 5) == segments
    assert tx.gso_sends == 0


def test_the_kernel_cuts_by_the_first_size_so_the_caller_groups_equal_sizes(
    pair: tuple[UdpTransport, socket.socket],
) -> None:
    """Why the helper only groups equal-sized datagrams (a shorter one last): the kernel splits the payload every
    ``len(segments[0])`` bytes whatever the scatter list's boundaries, so a longer datagram after the first would
    be cut in pieces. This is the control for the helper's grouping test."""
    tx, rx = pair
    segments = [b"a" * 100, b"b" * 300]
    assert tx.send_segments(segments, rx.getsockname()) is None
    assert _receive(rx, 4) == [b"a" * 100, b"b" * 100, b"b" * 100, b"b" * 100]


class _RefusingSocket:
    """A socket whose kernel has no UDP GSO: sendmsg with UDP_SEGMENT fails with EIO (udp(7))."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def setblocking(self, flag: bool) -> None:
        pass

    def sendmsg(self, buffers: Any, ancdata: Any, flags: int, addr: Any) -> int:
        raise OSError(errno.EIO, "no GSO")

    def sendto(self, data: Any, addr: Any) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def close(self) -> None:
        pass


def test_a_kernel_without_gso_falls_back_to_single_sends_for_good() -> None:
    sock = _RefusingSocket()
    tx = UdpTransport(sock, gso=True, gro=False)  # type: ignore[arg-type]
    segments = [b"x" * 50, b"y" * 50, b"z" * 20]
    assert tx.send_segments(segments, ("192.0.2.2", 51820)) is None
    assert sock.sent == segments and tx.gso is False


def test_the_environment_turns_gso_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETSIM_UDP_GSO", "0")
    tx = UdpTransport.open(interface=None)
    try:
        assert tx.gso is False
    finally:
        tx.close()
