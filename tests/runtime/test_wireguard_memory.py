"""Two netsim WireGuard peers over a seeded lossy / duplicating / reordering in-memory network.

trio's MockClock with autojump makes minutes of protocol time (rekeys every few seconds, retransmissions,
keepalives) run in well under a second, deterministically for a given seed.
"""

from __future__ import annotations

import random
import struct
from ipaddress import ip_network

import pytest
import trio
import trio.testing

from netsim.core.wireguard import PeerConfig, PrivateKey, Timers, WireGuardDevice
from netsim.core.wireguard.config import Endpoint

A_ADDR, B_ADDR = ("192.0.2.10", 40000), ("192.0.2.20", 51820)
A_TUN, B_TUN = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])


def packet(src: bytes, dst: bytes, seq: int) -> bytes:
    payload = seq.to_bytes(4, "big") * 4
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, src, dst) + payload


def seq_of(pkt: bytes) -> int:
    return int.from_bytes(pkt[20:24], "big")


class FakeNet:
    """Seeded impairment: each datagram may be lost, duplicated, and delayed (which reorders)."""

    def __init__(self, seed: int, loss: float, dup: float, max_delay: float) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.max_delay = loss, dup, max_delay
        self.inboxes: dict[tuple[str, int], trio.MemorySendChannel[tuple[bytes, tuple[str, int]]]] = {}
        self.blackhole = False
        self.nursery: trio.Nursery | None = None

    def send(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        assert self.nursery is not None
        if self.blackhole or self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            self.nursery.start_soon(self._deliver, data, src, dst, self.rng.uniform(0, self.max_delay))

    async def _deliver(self, data: bytes, src: tuple[str, int], dst: tuple[str, int], delay: float) -> None:
        await trio.sleep(delay)
        try:
            self.inboxes[dst].send_nowait((data, src))
        except trio.WouldBlock:
            pass  # a full queue is loss too


class Node:
    """A device plus its driver loop on the fake network (the shape of `netsim.runtime.wgsocket`)."""

    def __init__(self, dev: WireGuardDevice, addr: tuple[str, int], net: FakeNet) -> None:
        self.dev, self.addr, self.net = dev, addr, net
        send, self.inbox = trio.open_memory_channel[tuple[bytes, tuple[str, int]]](4096)
        net.inboxes[addr] = send
        self.delivered: list[int] = []
        self.kick = trio.Event()

    async def run(self) -> None:
        while True:
            deadline = self.dev.get_timer()
            with trio.move_on_at(deadline if deadline is not None else float("inf")) as scope:
                self.kick = trio.Event()
                async with trio.open_nursery() as n:

                    async def wait_kick() -> None:
                        await self.kick.wait()
                        n.cancel_scope.cancel()

                    async def wait_data() -> None:
                        data, src = await self.inbox.receive()
                        self.dev.receive_datagram_untrusted(data, src, trio.current_time())
                        n.cancel_scope.cancel()

                    n.start_soon(wait_kick)
                    n.start_soon(wait_data)
            now = trio.current_time()
            if scope.cancelled_caught or (deadline is not None and deadline <= now):
                self.dev.handle_timer(now)
            self.flush(now)

    def flush(self, now: float) -> None:
        for data, dst in self.dev.datagrams_to_send(now):
            self.net.send(data, self.addr, dst)
        self.delivered.extend(seq_of(p) for _, p in self.dev.take_received())

    def send(self, pkts: list[bytes]) -> None:
        now = trio.current_time()
        bufs = [bytearray(256) for _ in pkts]
        sizes, addrs = [0] * len(pkts), [None] * len(pkts)
        self.dev.encapsulate(pkts, now, bufs, sizes, addrs)  # type: ignore[arg-type]
        for b, n, dst in zip(bufs, sizes, addrs, strict=True):
            if n and dst is not None:
                self.net.send(bytes(b[:n]), self.addr, dst)
        self.flush(now)
        self.kick.set()  # timers may have moved earlier


def make_nodes(net: FakeNet, timers: Timers, seed: int, **b_kwargs: object) -> tuple[Node, Node]:
    rng = random.Random(seed)
    ka, kb = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
    a = WireGuardDevice(
        ka,
        [PeerConfig(public_key=kb.public_key(), endpoint=Endpoint(*B_ADDR), allowed_ips=(ip_network("10.9.0.2/32"),))],
        timers=timers,
        rng=random.Random(seed + 1),
        wall_offset=1.7e9,
    )
    b = WireGuardDevice(
        kb,
        [PeerConfig(public_key=ka.public_key(), allowed_ips=(ip_network("10.9.0.1/32"),))],
        timers=timers,
        rng=random.Random(seed + 2),
        wall_offset=1.7e9,
        **b_kwargs,  # type: ignore[arg-type]
    )
    return Node(a, A_ADDR, net), Node(b, B_ADDR, net)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lossy_duplicating_reordering_network_with_rekeys(seed: int) -> None:
    print(f"seed={seed}")
    timers = Timers(rekey_after_time=8.0, rekey_after_messages=25, rekey_timeout=1.0, keepalive_timeout=2.0)
    net = FakeNet(seed, loss=0.1, dup=0.1, max_delay=0.05)
    a, b = make_nodes(net, timers, seed)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net.nursery = nursery
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            for seq in range(600):
                a.send([packet(A_TUN, B_TUN, seq)])
                if seq % 3 == 0:
                    b.send([packet(B_TUN, A_TUN, seq)])
                await trio.sleep(0.1)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    sa, sb = a.dev.statistics(), b.dev.statistics()
    # nothing delivered twice, despite duplication and retransmissions
    assert len(b.delivered) == len(set(b.delivered)) and len(a.delivered) == len(set(a.delivered))
    # with 10% loss (and packets staged while a session is being set up) most data still arrives
    assert len(b.delivered) > 0.75 * 600, (len(b.delivered), sa, sb)
    assert len(a.delivered) > 0.6 * 200, (len(a.delivered), sa, sb)
    # rekeys on schedule: 60 s of traffic, REKEY_AFTER_TIME 8 s / 25 messages -> many sessions
    assert sa.handshakes_completed >= 60 / 8 - 1
    assert sb.drops["replay"] > 0  # duplicates were seen and rejected
    assert sb.drops["decrypt_failed"] == 0 and sa.drops["decrypt_failed"] == 0
    assert sb.drops["inner_src_not_allowed"] == 0


def test_handshake_retransmission_survives_outage() -> None:
    timers = Timers()
    net = FakeNet(5, loss=0.0, dup=0.0, max_delay=0.01)
    a, b = make_nodes(net, timers, 5)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net.nursery = nursery
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            net.blackhole = True
            a.send([packet(A_TUN, B_TUN, 1)])
            await trio.sleep(23)  # four initiations lost (0, ~5, ~10, ~15, ~20 s)
            net.blackhole = False
            await trio.sleep(6)  # the next jittered retransmission gets through
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert b.delivered == [1]
    assert a.dev.statistics().handshakes_initiated == 6


def test_cookie_reply_path_under_load() -> None:
    net = FakeNet(9, loss=0.0, dup=0.0, max_delay=0.01)
    a, b = make_nodes(net, Timers(), 9)
    b.dev.under_load = True

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net.nursery = nursery
            nursery.start_soon(a.run)
            nursery.start_soon(b.run)
            a.send([packet(A_TUN, B_TUN, 7)])
            await trio.sleep(8)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert b.dev.statistics().cookie_replies_sent == 1
    assert a.dev.statistics().cookie_replies_received == 1
    assert b.delivered == [7]  # the retransmitted initiation carried a valid mac2


def test_wgsocket_driver_over_loopback_udp() -> None:
    """The trio driver (`WireGuardSocket`) end to end over two real UDP sockets on 127.0.0.1 (no root)."""
    import socket

    from netsim.runtime.wgsocket import WireGuardSocket

    rng = random.Random(21)
    ka, kb = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
    sa, sb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sa.bind(("127.0.0.1", 0))
    sb.bind(("127.0.0.1", 0))
    a = WireGuardDevice(
        ka,
        [
            PeerConfig(
                public_key=kb.public_key(),
                endpoint=Endpoint("127.0.0.1", sb.getsockname()[1]),
                allowed_ips=(ip_network("10.9.0.2/32"),),
            )
        ],
    )
    b = WireGuardDevice(kb, [PeerConfig(public_key=ka.public_key(), allowed_ips=(ip_network("10.9.0.1/32"),))])

    async def main() -> None:
        wa, wb = WireGuardSocket(a, sa), WireGuardSocket(b, sb)
        async with trio.open_nursery() as nursery:
            await nursery.start(wa.run)
            await nursery.start(wb.run)
            with trio.fail_after(10):
                await wa.send_packets([packet(A_TUN, B_TUN, i) for i in range(50)])  # staged, then flushed
                got = [seq_of((await wb.received.receive())[1]) for _ in range(50)]
                await wb.send_packets([packet(B_TUN, A_TUN, 99)])
                _, back = await wa.received.receive()
            nursery.cancel_scope.cancel()
        assert got == list(range(50))
        assert seq_of(back) == 99
        assert a.peers[0].tx_bytes == b.peers[0].rx_bytes and a.peers[0].rx_bytes == b.peers[0].tx_bytes

    try:
        trio.run(main)
    finally:
        sa.close()
        sb.close()
