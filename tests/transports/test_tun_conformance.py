"""One conformance suite for every PacketDevice: the Linux TUN (in a fresh namespace) and MemoryTun.

The harness plays "the kernel side": for the real device it sends UDP through the namespace's stack (routed into
the TUN) and receives what the device writes on a bound socket; for MemoryTun it injects/takes packets. The test
bodies are identical (wireguard-go tun/tuntest style).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from netsim.errors import TunnelDown
from netsim.lab.netns import set_sysctl, socket_in_netns
from netsim.testing import MemoryTun
from netsim.testing.require import require_tun
from netsim.transports.base import PacketDevice
from netsim.transports.tun import TunDevice

DEV_V4, PEER_V4 = "10.77.0.1", "10.77.0.2"
DEV_V6, PEER_V6 = "2001:db8:77::1", "2001:db8:77::2"
PORT = 9999
MTU = 1400


def packet(payload: bytes, v6: bool = False, src_peer: bool = True) -> bytes:
    """A UDP packet as the kernel emits into the TUN (src = our stack) or as a peer writes (src = peer)."""
    if v6:
        src, dst = (PEER_V6, DEV_V6) if src_peer else (DEV_V6, PEER_V6)
        return bytes(IPv6(src=src, dst=dst, hlim=64) / UDP(sport=PORT, dport=PORT) / payload)
    src, dst = (PEER_V4, DEV_V4) if src_peer else (DEV_V4, PEER_V4)
    return bytes(IP(src=src, dst=dst, ttl=64, flags="DF") / UDP(sport=PORT, dport=PORT) / payload)


def payload_of(pkt: bytes) -> bytes:
    return bytes(IPv6(pkt)[UDP].payload) if pkt[0] >> 4 == 6 else bytes(IP(pkt)[UDP].payload)


class MemoryHarness:
    def __init__(self, utun_framing: bool) -> None:
        self.dev = MemoryTun("utun0", MTU, utun_framing=utun_framing)

    def kernel_send(self, payloads: list[bytes], v6: bool = False) -> None:
        self.dev.inject([packet(p, v6, src_peer=False) for p in payloads])

    async def kernel_recv(self, n: int, v6: bool = False) -> list[bytes]:
        await trio.lowlevel.checkpoint()
        return [payload_of(p) for p in self.dev.take_written()]

    def delete(self) -> None:
        self.dev.delete()

    def close(self) -> None:
        self.dev.close()


class TunHarness:
    def __init__(self, ns: str, utun_framing: bool) -> None:
        self.ns = ns
        # keep the kernel quiet on the device: no router solicitations, no link-local (so no MLD reports)
        set_sysctl(ns, {"net.ipv6.conf.default.router_solicitations": "0", "net.ipv6.conf.default.addr_gen_mode": "1"})
        self.dev = TunDevice.create(ns, mtu=MTU, utun_framing=utun_framing)
        ip = ["ip", "-n", ns]
        subprocess.run([*ip, "link", "set", self.dev.name, "multicast", "off"], check=True)
        subprocess.run([*ip, "addr", "add", f"{DEV_V4}/24", "dev", self.dev.name], check=True)
        subprocess.run([*ip, "addr", "add", f"{DEV_V6}/64", "dev", self.dev.name, "nodad"], check=True)
        self.tx4 = socket_in_netns(ns, socket.AF_INET)
        self.tx4.bind((DEV_V4, PORT))
        self.tx6 = socket_in_netns(ns, socket.AF_INET6)
        self.tx6.bind((DEV_V6, PORT))
        for s in (self.tx4, self.tx6):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def kernel_send(self, payloads: list[bytes], v6: bool = False) -> None:
        sock, dst = (self.tx6, PEER_V6) if v6 else (self.tx4, PEER_V4)
        for p in payloads:
            sock.sendto(p, (dst, PORT))

    async def kernel_recv(self, n: int, v6: bool = False) -> list[bytes]:
        out: list[bytes] = []
        with trio.socket.from_stdlib_socket((self.tx6 if v6 else self.tx4).dup()) as sock:
            with trio.move_on_after(5):
                while len(out) < n:
                    out.append(await sock.recv(65535))
        return out

    def delete(self) -> None:
        subprocess.run(["ip", "-n", self.ns, "link", "del", self.dev.name], check=True)

    def close(self) -> None:
        self.dev.close()
        self.tx4.close()
        self.tx6.close()


Harness = MemoryHarness | TunHarness


@pytest.fixture(params=["memory", "tun", "memory-utun", "tun-utun"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    framing = request.param.endswith("-utun")
    h: Harness
    if request.param.startswith("memory"):
        h = MemoryHarness(framing)
    else:
        require_tun()
        ns = request.getfixturevalue("netns")
        h = TunHarness(ns, framing)
    try:
        yield h
    finally:
        h.close()


def hdr(h: Harness) -> int:
    return 4 if h.dev.utun_framing else 0


async def read_all(h: Harness, n: int, batch: int = 64) -> list[bytes]:
    """Read until n packets arrived (waiting with wait_readable), return them without utun headers."""
    out: list[bytes] = []
    with trio.fail_after(5):
        while len(out) < n:
            await h.dev.wait_readable()
            out += [p[hdr(h) :] for p in h.dev.read_packets(batch)]
    return out


def test_is_packet_device(harness: Harness) -> None:
    assert isinstance(harness.dev, PacketDevice)
    assert harness.dev.mtu == MTU
    assert harness.dev.name.startswith("utun")


def test_empty_read_is_eagain_not_error(harness: Harness) -> None:
    assert harness.dev.read_packets(8) == []


async def _ordering(h: Harness) -> None:
    payloads = [b"seq-%04d" % i for i in range(50)]
    h.kernel_send(payloads)
    got = await read_all(h, 50)
    assert [payload_of(p) for p in got] == payloads
    assert h.dev.statistics().packets_read == 50


def test_ordering(harness: Harness) -> None:
    trio.run(_ordering, harness)


async def _batching(h: Harness) -> None:
    payloads = [b"b%d" % i for i in range(10)]
    h.kernel_send(payloads)
    await h.dev.wait_readable()
    first: list[bytes] = []
    with trio.fail_after(5):
        while not first:
            first = h.dev.read_packets(4)
            await trio.sleep(0)
    # all ten were queued before the read (kernel_send returns after the kernel queued them): a batch read returns
    # as many as the limit allows, no fewer
    assert len(first) == 4
    assert [len(p) for p in first] == [hdr(h) + len(packet(p)) for p in payloads[:4]]
    for i, p in enumerate(first):
        assert payload_of(p[hdr(h) :]) == payloads[i]
    rest = await read_all(h, 10 - len(first))
    assert [payload_of(p) for p in rest] == payloads[len(first) :]


def test_batching(harness: Harness) -> None:
    trio.run(_batching, harness)


async def _utun_header(h: Harness) -> None:
    h.kernel_send([b"four"])
    h.kernel_send([b"six"], v6=True)
    with trio.fail_after(5):
        got: list[bytes] = []
        while len(got) < 2:
            await h.dev.wait_readable()
            got += h.dev.read_packets(8)
    if h.dev.utun_framing:
        assert {p[:4] for p in got} == {b"\x00\x00\x00\x02", b"\x00\x00\x00\x1e"}
        for p in got:
            assert (p[4] >> 4 == 6) == (p[:4] == b"\x00\x00\x00\x1e")
    else:
        assert {p[0] >> 4 for p in got} == {4, 6}


def test_family_header(harness: Harness) -> None:
    trio.run(_utun_header, harness)


async def _write(h: Harness) -> None:
    offset = 8
    frame = (lambda p: (b"\x00\x00\x00\x1e" if p[0] >> 4 == 6 else b"\x00\x00\x00\x02") + p) if hdr(h) else bytes
    v4 = [b"\xaa" * offset + frame(packet(b"w%d" % i)) for i in range(5)]
    assert h.dev.write_packets(v4, offset) == 5
    assert await h.kernel_recv(5) == [b"w%d" % i for i in range(5)]
    assert h.dev.write_packets([frame(packet(b"six", v6=True))]) == 1
    assert await h.kernel_recv(1, v6=True) == [b"six"]
    # MTU-sized passes, MTU+1 is dropped and counted, never raised
    full = packet(b"m" * (MTU - 28))
    assert len(full) == MTU
    assert h.dev.write_packets([frame(full)]) == 1
    assert await h.kernel_recv(1) == [b"m" * (MTU - 28)]
    assert h.dev.write_packets([frame(packet(b"m" * (MTU - 27)))]) == 0
    assert h.dev.statistics().dropped.get("too_big") == 1
    assert h.dev.statistics().packets_written == 7
    if hdr(h):
        assert h.dev.write_packets([b"\x00\x00\x00\x07" + packet(b"x")]) == 0
        assert h.dev.statistics().dropped.get("bad_family") == 1


def test_write_batch_mtu_and_oversize(harness: Harness) -> None:
    trio.run(_write, harness)


async def _validated_write(h: Harness) -> None:
    # validated=True: the caller (PacketTunnelFlow) already checked emptiness and MTU; the packets still arrive and
    # are counted like any write. With utun framing the flag is ignored and the header is still checked.
    frame = (lambda p: b"\x00\x00\x00\x02" + p) if hdr(h) else bytes
    full = packet(b"v" * (MTU - 28))
    assert h.dev.write_packets([frame(packet(b"v0")), frame(full)], validated=True) == 2
    assert await h.kernel_recv(2) == [b"v0", b"v" * (MTU - 28)]
    st_ = h.dev.statistics()
    assert st_.packets_written == 2 and st_.bytes_written == len(packet(b"v0")) + MTU and st_.dropped == {}
    if hdr(h):
        assert h.dev.write_packets([b"\x00\x00\x00\x07" + packet(b"x")], validated=True) == 0
        assert h.dev.statistics().dropped.get("bad_family") == 1


def test_validated_write_skips_checks_but_delivers_and_counts(harness: Harness) -> None:
    trio.run(_validated_write, harness)


async def _mtu_read(h: Harness) -> None:
    h.kernel_send([b"r" * (MTU - 28)])
    got = await read_all(h, 1)
    assert len(got[0]) == MTU
    assert payload_of(got[0]) == b"r" * (MTU - 28)


def test_mtu_sized_read(harness: Harness) -> None:
    trio.run(_mtu_read, harness)


async def _close_wakes_waiter(h: Harness) -> None:
    woke: list[BaseException] = []

    async def waiter() -> None:
        try:
            await h.dev.wait_readable()
            h.dev.read_packets(1)
        except TunnelDown as exc:
            woke.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            h.dev.close()
    assert len(woke) == 1


def test_close_semantics(harness: Harness) -> None:
    trio.run(_close_wakes_waiter, harness)
    harness.dev.close()  # idempotent
    with pytest.raises(TunnelDown):
        harness.dev.read_packets(1)
    with pytest.raises(TunnelDown):
        harness.dev.write_packets([packet(b"x")])


async def _deleted(h: Harness) -> None:
    async def waiter() -> None:
        await h.dev.wait_readable()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            h.delete()
    # the waiter woke (possibly by raising TunnelDown); reading now must raise TunnelDown, not spin on EAGAIN
    with pytest.raises(TunnelDown):
        h.dev.read_packets(1)
    with pytest.raises(TunnelDown):
        h.dev.write_packets([b"\x00\x00\x00\x02" * (hdr(h) // 4) + packet(b"x")])


def test_device_deleted_under_reader(harness: Harness) -> None:
    try:
        trio.run(_deleted, harness)
    except* TunnelDown:
        pass  # raised by the waiter: also acceptable
    with pytest.raises(TunnelDown):
        harness.dev.read_packets(1)


# ---------------------------------------------------------------- MemoryTun ledger property (pure, fast)

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("inject"), st.lists(st.integers(20, MTU + 40), max_size=12)),
        st.tuples(st.just("read"), st.integers(1, 8)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops, capacity=st.integers(1, 16))
def test_memory_tun_ledger_and_order(ops: list[tuple[str, object]], capacity: int) -> None:
    """injected == read + dropped + queued at every step, and reads come out in injection order."""
    dev = MemoryTun("utun0", MTU, capacity=capacity)
    sent: list[bytes] = []
    got: list[bytes] = []
    injected = 0
    seq = 0
    for op, arg in ops:
        if op == "inject":
            pkts = []
            for size in arg:  # type: ignore[attr-defined]
                seq += 1
                pkts.append(bytes([0x45]) + seq.to_bytes(4, "big") + b"\0" * (size - 5))
            accepted = dev.inject(pkts)
            sent += [p for p in pkts if len(p) <= MTU][:accepted] if accepted else []
            injected += len(pkts)
        else:
            got += dev.read_packets(int(arg))  # type: ignore[call-overload]
        st_ = dev.statistics()
        queued = injected - st_.packets_read - sum(st_.dropped.values())
        assert 0 <= queued <= capacity
    assert got == sent[: len(got)]


async def _mtu_shrank(h: Harness) -> None:
    # Queued at the old MTU: small, MTU-sized, small. Then the MTU shrinks and the reader reads for the new one:
    # the big packet is dropped as "truncated" (never handed out cut short) and the others keep their order.
    h.kernel_send([b"first", b"x" * (MTU - 28), b"third"])
    with trio.fail_after(5):
        await h.dev.wait_readable()
    await trio.sleep(0.05)  # the three datagrams are queued together (TUN: sent back to back by the kernel)
    small = MTU - 200
    h.dev.set_mtu(small)
    got = [payload_of(p[hdr(h) :]) for p in h.dev.read_packets(4)]
    assert got == [b"first", b"third"]
    assert h.dev.statistics().dropped.get("truncated") == 1


def test_packet_longer_than_the_buffer_is_dropped_not_cut(harness: Harness) -> None:
    trio.run(_mtu_shrank, harness)
