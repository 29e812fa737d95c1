"""UDP GRO on the helper's socket (`UdpTransport.recv_batch`, udp(7) UDP_GRO), over loopback.

A sender with UDP_SEGMENT (`UdpTransport.send_segments`) hands loopback one GSO packet; a receiver with UDP_GRO
gets it whole in one ``recvmsg`` with the segment size in a cmsg, and `recv_batch` splits it into the caller's
list as memoryview slices of that one read. The positive control is the read counter: fewer ``recvmsg`` calls
than datagrams with GRO, one per datagram without it. The last test runs two helpers against each other over
loopback: the receiving helper's device sees the same per-datagram batch, GRO or not.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from loopback_helpers import a_to_b_packets, batch_of, helper_pair, wait_live

from netsim.runtime.driver import DatagramDriver
from netsim.testing.require import require
from netsim.transports.udp import GRO_MAX_SEGMENTS, UdpTransport


def _lists(batch: int = 64, size: int = 65535) -> tuple[list[memoryview], list[int], list[Any]]:
    """What `DatagramDriver` gives a GRO transport: ``batch`` buffers plus room for one more full GRO read."""
    slab = memoryview(bytearray(batch * size))
    views = [slab[i * size : (i + 1) * size] for i in range(batch)] + [slab[:0]] * (GRO_MAX_SEGMENTS - 1)
    return views, [0] * len(views), [None] * len(views)


@pytest.fixture
def pair() -> Iterator[tuple[UdpTransport, UdpTransport]]:
    tx = UdpTransport(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), gso=True)
    tx.sock.bind(("127.0.0.1", 0))
    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock.bind(("127.0.0.1", 0))
    rx = UdpTransport(rx_sock, gro=True)
    yield tx, rx
    tx.close()
    rx.close()


def _drain(rx: UdpTransport, lists: tuple[list[memoryview], list[int], list[Any]], want: int) -> list[bytes]:
    """Receive until ``want`` datagrams arrived (loopback delivers at once; the bound keeps a bug from hanging)."""
    views, sizes, addrs = lists
    out: list[bytes] = []
    for _ in range(1000):
        n = rx.recv_batch(views, sizes, addrs)
        out += [bytes(views[i][: sizes[i]]) for i in range(n)]
        if len(out) >= want:
            break
    return out


def _require_gro(rx: UdpTransport) -> None:
    require(rx.gro, "this kernel has no UDP_GRO (Linux >= 5.0)")


def test_equal_sized_datagrams_arrive_in_one_read_split_into_the_callers_list(
    pair: tuple[UdpTransport, UdpTransport],
) -> None:
    tx, rx = pair
    _require_gro(rx)
    segments = [bytes([i]) * 1200 for i in range(10)]
    assert tx.send_segments(segments, rx.sock.getsockname()) is None
    lists = _lists()
    views, sizes, addrs = lists
    n = rx.recv_batch(views, sizes, addrs)
    assert n == 10
    assert [bytes(views[i][: sizes[i]]) for i in range(n)] == segments
    assert addrs[:n] == [tx.sock.getsockname()] * 10
    # positive control: one recvmsg brought all ten, and the slices share the one buffer it read into (no copy)
    assert (rx.rx_reads, rx.rx_datagrams, rx.gro_reads) == (1, 10, 1)
    assert views[1].obj is views[0].obj and views[5].nbytes == 1200


def test_a_shorter_last_datagram_is_its_own_segment(pair: tuple[UdpTransport, UdpTransport]) -> None:
    tx, rx = pair
    _require_gro(rx)
    segments = [bytes([i]) * 1200 for i in range(7)] + [b"\xff" * 300]
    assert tx.send_segments(segments, rx.sock.getsockname()) is None
    got = _drain(rx, _lists(), len(segments))
    assert got == segments
    assert rx.rx_reads == 1 and rx.gro_reads == 1


def test_two_gro_reads_and_plain_datagrams_in_one_batch_and_the_list_is_restored(
    pair: tuple[UdpTransport, UdpTransport],
) -> None:
    tx, rx = pair
    _require_gro(rx)
    dst = rx.sock.getsockname()
    first = [b"a" * 500] * 5
    second = [b"b" * 800] * 3 + [b"c" * 10]
    assert tx.send_segments(first, dst) is None
    assert tx.send(b"plain", dst) is None
    assert tx.send_segments(second, dst) is None
    lists = _lists()
    views, sizes, addrs = lists
    base = list(views)
    n = rx.recv_batch(views, sizes, addrs)
    assert [bytes(views[i][: sizes[i]]) for i in range(n)] == [*first, b"plain", *second]
    assert (rx.rx_reads, rx.gro_reads) == (3, 2)
    assert views[1] is not base[1]  # a segment view of the first read
    # the next call reads into the caller's own buffers again: a full-size datagram fits slot 1's original
    assert tx.send(b"x" * 1400, dst) is None
    assert tx.send(b"y" * 1400, dst) is None
    assert _drain(rx, lists, 2) == [b"x" * 1400, b"y" * 1400]
    assert views[:2] == base[:2] and all(v is b for v, b in zip(views, base, strict=True))


def test_many_single_datagrams_still_fill_a_batch(pair: tuple[UdpTransport, UdpTransport]) -> None:
    """GRO reads only while a whole GRO read still fits: with uncoalesced datagrams a batch is still 64."""
    tx, rx = pair
    _require_gro(rx)
    dst = rx.sock.getsockname()
    for i in range(100):
        assert tx.send(i.to_bytes(2, "big") * 50, dst) is None
    views, sizes, addrs = _lists()
    assert rx.recv_batch(views, sizes, addrs) == 64
    assert rx.recv_batch(views, sizes, addrs) == 36
    assert (rx.rx_reads, rx.gro_reads) == (100, 0)


def test_without_gro_each_datagram_is_its_own_read(
    pair: tuple[UdpTransport, UdpTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The off switch, and the control of the coalescing tests: the same send costs one read per datagram."""
    tx, _ = pair
    monkeypatch.setenv("NETSIM_UDP_GRO", "0")
    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock.bind(("127.0.0.1", 0))
    rx = UdpTransport(rx_sock)
    try:
        assert rx.gro is False and rx.segments_per_read == 1
        assert rx_sock.getsockopt(17, 104) == 0  # the socket option itself was left off
        segments = [bytes([i]) * 1200 for i in range(10)] + [b"\xff" * 300]
        assert tx.send_segments(segments, rx_sock.getsockname()) is None
        assert _drain(rx, _lists(), len(segments)) == segments
        assert (rx.rx_reads, rx.gro_reads) == (11, 0)
    finally:
        rx.close()


def test_a_gro_read_larger_than_the_buffer_is_a_counted_drop(pair: tuple[UdpTransport, UdpTransport]) -> None:
    tx, rx = pair
    _require_gro(rx)
    dst = rx.sock.getsockname()
    assert tx.send_segments([b"z" * 1200] * 10, dst) is None  # 12000 bytes into 2000-byte buffers
    assert tx.send(b"after", dst) is None
    views, sizes, addrs = _lists(size=2000)
    got = _drain(rx, (views, sizes, addrs), 1)
    assert got == [b"after"]  # the next datagram is unharmed
    assert rx.rx_drops["gro_truncated"] == 10  # all ten datagrams of the cut read, by name


class _GroSocket:
    """A socket whose reads carry a crafted UDP_GRO cmsg (what a kernel would never say, but must not crash us)."""

    type = socket.SOCK_DGRAM
    family = socket.AF_INET

    def __init__(self, reads: list[tuple[int, int]], *, refuse_gro: bool = False) -> None:
        self.reads = list(reads)  # (payload bytes, segment size in the cmsg)
        self.refuse_gro = refuse_gro
        self.plain = 0

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        if self.refuse_gro:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    def recvmsg_into(self, buffers: Any, ancbufsize: int, flags: int) -> tuple[int, list[Any], int, Any]:
        if not self.reads:
            raise BlockingIOError
        nbytes, seg = self.reads.pop(0)
        buffers[0][: min(nbytes, 100)] = b"q" * min(nbytes, 100)
        return nbytes, [(17, 104, struct.pack("=i", seg))], 0, ("192.0.2.2", 51820)

    def recvfrom_into(self, buf: Any) -> tuple[int, Any]:
        if self.plain:
            raise BlockingIOError
        self.plain += 1
        buf[:3] = b"abc"
        return 3, ("192.0.2.2", 51820)

    def close(self) -> None:
        pass


def test_a_segment_size_that_cannot_describe_the_read_is_a_counted_drop() -> None:
    reads = [(1000, 0), (1000, -5), (65000, 10), (300, 100)]  # zero, negative, 6500 segments, then a good one
    rx = UdpTransport(_GroSocket(reads), gro=True)  # type: ignore[arg-type]
    views, sizes, addrs = _lists()
    n = rx.recv_batch(views, sizes, addrs)
    assert n == 3 and sizes[:3] == [100, 100, 100]
    assert rx.rx_drops == {"gro_truncated": 0, "gro_bad_segment": 3, "gro_no_room": 0, "truncated": 0}


def test_a_list_too_short_for_the_read_is_a_counted_drop_not_an_overflow() -> None:
    rx = UdpTransport(_GroSocket([(1000, 100)]), gro=True)  # type: ignore[arg-type]
    views, sizes, addrs = _lists(batch=4)
    views, sizes, addrs = views[:4], sizes[:4], addrs[:4]  # a caller that did not leave the GRO slots
    assert rx.recv_batch(views, sizes, addrs) == 0
    assert rx.rx_drops["gro_no_room"] == 10


def test_a_kernel_that_refuses_gro_falls_back_to_one_datagram_per_read() -> None:
    sock = _GroSocket([(1000, 100)], refuse_gro=True)
    rx = UdpTransport(sock, gro=True)  # type: ignore[arg-type]
    assert rx.gro is False and rx.segments_per_read == 1
    views, sizes, addrs = _lists()
    assert rx.recv_batch(views, sizes, addrs) == 1 and bytes(views[0][: sizes[0]]) == b"abc"


def test_the_driver_leaves_room_for_a_full_gro_read(pair: tuple[UdpTransport, UdpTransport]) -> None:
    _, rx = pair
    driver = DatagramDriver(object(), rx, batch=8, send=lambda d, a: None)  # type: ignore[arg-type]
    assert len(driver.views) == len(driver.sizes) == len(driver.addrs) == 8 + (rx.segments_per_read - 1)


# ------------------------------------------------------------------------------------ two helpers, loopback
@pytest.mark.parametrize("gro", [True, False])
def test_a_helper_decrypts_the_same_batch_with_and_without_gro(gro: bool) -> None:
    """Helper A sends 40 equal-sized packets (one GSO sendmsg); helper B's device decrypts all 40. With GRO, B
    read them in fewer recvmsg calls than datagrams (the positive control); without, one each."""
    batch = batch_of(a_to_b_packets(40))

    async def main() -> None:
        a, b = helper_pair(gro=gro)
        bt: UdpTransport = b.transport  # type: ignore[assignment]
        require(bt.gro or not gro, "this kernel has no UDP_GRO (Linux >= 5.0)")
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await wait_live(a, b)
            before, reads_before = bt.rx_datagrams, bt.rx_reads
            a._outbound(batch)
            with trio.fail_after(10):
                while b.ledger.snapshot()["wg_decrypt"].forwarded < 40:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        wg = b.ledger.snapshot()["wg_decrypt"]
        assert wg.forwarded == 40 and "decrypt_failed" not in dict(wg.dropped)
        assert dict(b.ledger.snapshot()["ipc_out"].dropped) == {"no_provider": 40}  # all 40, as packets
        datagrams, reads = bt.rx_datagrams - before, bt.rx_reads - reads_before
        assert datagrams == 40
        if gro:
            assert reads < datagrams and bt.gro_reads >= 1
        else:
            assert reads == datagrams
        assert b.stats_json()["udp"]["gro"] is gro
        a.close()
        b.close()

    trio.run(main)
