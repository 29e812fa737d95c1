"""The helper socket under a flood: its receive buffer, the datagrams the kernel drops at it
(`UdpTransport.socket_drops`), and the kernel filter that sheds handshake initiations
(`UdpTransport.filter_initiations`, driven by `Helper` from `WireGuardDevice.initiations_shed_until`).

Over loopback: a receiver with a deliberately small buffer is sent more than it can hold; what it did not read
is exactly what SO_MEMINFO says the kernel dropped (control: sent less than it holds, no drops). The filter drops
exactly the datagrams `classify_datagram` calls initiations, IPv4 and IPv6, and nothing once it is off. Two
helpers over loopback show the whole loop: a flood past the budget turns the filter on, the kernel drops the rest
of the second's initiations (every forged initiation has exactly one outcome), data keeps flowing, and when the
window ends the filter goes off and an initiation is read again.

Found by the CI at 879f81f (S10 lost 1.75 % of pings): at a 4 MiB buffer a Python flood sharing the helper's CPU
overflowed the socket, and the transport datagrams queued behind it were lost with it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from loopback_helpers import a_to_b_packets, batch_of, helper_pair, wait_live

from netsim.core.wireguard import messages as m
from netsim.core.wireguard import noise
from netsim.core.wireguard.device import HANDSHAKE_BUDGET
from netsim.testing.require import require_root
from netsim.transports.udp import SOCKET_BUFFER, UdpTransport

DATAGRAM = bytes(148)  # a handshake initiation's size


@pytest.fixture
def small() -> Iterator[tuple[socket.socket, UdpTransport]]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # the kernel doubles it: ~39 datagrams
    rx_sock.bind(("127.0.0.1", 0))
    rx = UdpTransport(rx_sock, gro=False)
    yield tx, rx
    tx.close()
    rx.close()


def _read_all(rx: UdpTransport) -> int:
    views = [memoryview(bytearray(2048)) for _ in range(64)]
    sizes = [0] * 64
    addrs: list[Any] = [None] * 64
    total = 0
    while n := rx.recv_batch(views, sizes, addrs):
        total += n
    return total


def test_what_the_buffer_could_not_hold_is_counted_as_socket_drops(small: tuple[socket.socket, UdpTransport]) -> None:
    tx, rx = small
    dst = rx.sock.getsockname()
    for _ in range(500):
        tx.sendto(DATAGRAM, dst)  # loopback delivers (or drops) synchronously
    read = _read_all(rx)
    assert 0 < read < 500
    assert rx.socket_drops() == 500 - read
    assert rx.statistics()["socket_drops"] == 500 - read


def test_no_socket_drops_when_the_buffer_holds_everything(small: tuple[socket.socket, UdpTransport]) -> None:
    tx, rx = small
    for _ in range(5):
        tx.sendto(DATAGRAM, rx.sock.getsockname())
    assert _read_all(rx) == 5
    assert rx.socket_drops() == 0


def test_socket_drops_is_none_for_a_stand_in_socket() -> None:
    class StandIn:
        def setblocking(self, flag: bool) -> None:
            pass

    assert UdpTransport(StandIn(), gro=False).socket_drops() is None  # type: ignore[arg-type]


def test_open_asks_for_wireguard_gos_receive_buffer() -> None:
    require_root()  # SO_RCVBUFFORCE, past net.core.rmem_max
    assert SOCKET_BUFFER == 7 << 20
    t = UdpTransport.open(interface=None)
    try:
        # socket(7): the kernel doubles the value set and reports the doubled one
        assert t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * SOCKET_BUFFER
    finally:
        t.close()


def _initiations(responder_public: bytes, count: int) -> list[bytes]:
    """Forged initiations with a valid mac1 (as tests/core/wireguard/test_cookie.py and the S10 lab flood)."""
    key = noise.hash_(noise.LABEL_MAC1, responder_public)
    out = []
    for i in range(count):
        body = m.INITIATION.pack(m.MSG_INITIATION, i, bytes(32), bytes(48), bytes(28), b"", b"")
        body = body[: m.INITIATION_SIZE - 32]
        out.append(body + noise.mac(key, body) + bytes(16))
    return out


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_the_filter_drops_exactly_initiations_and_only_while_on(family: int) -> None:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    rx_sock = socket.socket(family, socket.SOCK_DGRAM)
    rx_sock.bind((host, 0))
    rx, tx = UdpTransport(rx_sock, gro=False), socket.socket(family, socket.SOCK_DGRAM)
    dst = rx_sock.getsockname()[:2]
    initiation = bytes([1, 0, 0, 0]) + bytes(144)
    others = [
        bytes([4, 0, 0, 0]) + bytes(144),  # transport data of an initiation's size
        bytes([1, 0, 0, 1]) + bytes(144),  # reserved byte set: not an initiation (classify_datagram: junk)
        bytes([1, 0, 0, 0]) + bytes(143),  # one byte short
        bytes([2, 0, 0, 0]) + bytes(88),  # a response
        bytes([3, 0, 0, 0]) + bytes(60),  # a cookie reply
    ]
    try:
        assert rx.filter_initiations(True)
        assert rx.filter_initiations(True)  # already on: nothing changes
        for d in [initiation, *others, initiation, initiation]:
            tx.sendto(d, dst)
        got = []
        views, sizes, addrs = [memoryview(bytearray(2048)) for _ in range(16)], [0] * 16, [None] * 16
        while n := rx.recv_batch(views, sizes, addrs):  # type: ignore[arg-type]
            got += [bytes(views[i][: sizes[i]]) for i in range(n)]
        assert got == others
        assert rx.statistics()["initiations_filtered"] == 3  # counted while on ...
        assert rx.filter_initiations(False)
        assert rx.initiations_filtered == 3 and rx.filter_spans == 1  # ... and kept when it goes off
        tx.sendto(initiation, dst)  # the control: off means off
        assert rx.recv_batch(views, sizes, addrs) == 1 and bytes(views[0][: sizes[0]]) == initiation  # type: ignore[arg-type]
        assert rx.statistics()["initiations_filtered"] == 3
    finally:
        rx.close()
        tx.close()


@pytest.mark.reliability("S10")
def test_a_flood_past_the_budget_is_shed_in_the_kernel_until_the_window_ends() -> None:
    async def main() -> None:
        a, b = helper_pair()
        bt: UdpTransport = b.transport  # type: ignore[assignment]
        dst = ("127.0.0.1", bt.local_port)
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood = _initiations(b.device.public_key, HANDSHAKE_BUDGET + 310)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            await wait_live(a, b)
            b.device.under_load = True  # as if the flood had tripped the load already (no DH for any of them)
            cookies_before = b.device.statistics().cookie_replies_sent
            for d in flood[: HANDSHAKE_BUDGET + 10]:  # the budget, then ten the device sheds itself
                attacker.sendto(d, dst)
            with trio.fail_after(10):
                while bt.filter_spans == 0:
                    await trio.sleep(0.005)
            for d in flood[HANDSHAKE_BUDGET + 10 :]:  # the rest of the second's flood: dropped by the kernel
                attacker.sendto(d, dst)
            a._outbound(batch_of(a_to_b_packets(20)))  # the session's data still gets through meanwhile
            with trio.fail_after(10):
                while b.ledger.snapshot()["wg_decrypt"].forwarded < 20:
                    await trio.sleep(0.01)
            s = b.device.statistics()
            assert s.cookie_replies_sent - cookies_before == HANDSHAKE_BUDGET
            # every forged initiation has one outcome: a cookie reply, shed by the device, or shed by the kernel
            assert s.drops["handshake_overload"] + bt.statistics()["initiations_filtered"] == 310
            assert bt.statistics()["initiations_filtered"] == 300
            assert bt.socket_drops() == 300  # nothing else was lost at the socket
            with trio.fail_after(5):  # the budget's window ends within a second: the filter goes off
                while b._filter_until is not None:
                    await trio.sleep(0.01)
            assert bt.filter_spans == 1 and bt.initiations_filtered == 300
            attacker.sendto(flood[0], dst)  # read again: a fresh window, so a cookie reply
            with trio.fail_after(5):
                while b.device.statistics().cookie_replies_sent - cookies_before == HANDSHAKE_BUDGET:
                    await trio.sleep(0.01)
            assert b.stats_json()["udp"]["filter_spans"] == 1
            nursery.cancel_scope.cancel()
        attacker.close()
        a.close()
        b.close()

    trio.run(main)
