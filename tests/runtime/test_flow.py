"""PacketTunnelFlow behaviour, one suite over both backends: MemoryTun and a real TUN in a namespace.

The real backend injects packets the way the kernel would (a raw socket in the namespace sends to an address
routed into the utun) and checks writes by receiving them on a UDP socket bound in the namespace.
"""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from netsim.apple import AF_INET, AF_INET6, Packet, TrafficDirection
from netsim.errors import LocalProtocolError, TunnelDown
from netsim.runtime.flow import PacketTunnelFlow
from netsim.testing.memory_tun import MemoryTun
from netsim.testing.require import require_tun

LOCAL4, PEER4 = "10.8.0.2", "10.8.0.9"  # utun address / an address routed into the utun
LOCAL6, PEER6 = "fd00:8::2", "fd00:8::9"
MTU = 1400


def outbound4(i: int, size: int = 0) -> bytes:
    """A packet an app would send into the tunnel."""
    return bytes(IP(src=LOCAL4, dst=PEER4, id=i + 1) / UDP(sport=40000, dport=9000 + i) / (b"o%d" % i + bytes(size)))


def outbound6(i: int) -> bytes:
    return bytes(IPv6(src=LOCAL6, dst=PEER6) / UDP(sport=40000, dport=9000 + i) / (b"o%d" % i))


def inbound4(i: int, port: int, size: int = 0) -> bytes:
    """A packet the provider writes back: towards the utun's own address."""
    return bytes(IP(src=PEER4, dst=LOCAL4) / UDP(sport=53, dport=port) / (b"i%d" % i + bytes(size)))


class MemoryBackend:
    capacity = 50

    def __init__(self) -> None:
        self.device = MemoryTun("utun0", MTU, capacity=self.capacity)
        self.port = 5555

    def inject(self, packets: list[bytes]) -> None:
        self.device.inject(packets)

    def delivered(self, count: int) -> list[bytes]:
        out = [bytes(IP(p)[UDP].payload) for p in self.device.take_written()]
        assert len(out) == count
        return out

    def queue_drops(self) -> int:
        return self.device.statistics().dropped.get("queue_full", 0)

    def close(self) -> None:
        self.device.close()


class TunBackend:
    capacity = 500  # the TUN's tx_queue_len

    def __init__(self) -> None:
        from netsim.lab.netns import socket_in_netns
        from netsim.transports.tun import TunDevice

        self.ns = f"netsim-{uuid.uuid4().hex[:6]}-flow"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        try:
            # No router solicitations or link-local addresses: only the test's packets enter the utun.
            for knob in ("router_solicitations=0", "accept_ra=0", "addr_gen_mode=1"):
                sysctl = ["ip", "netns", "exec", self.ns, "sysctl", "-qw", f"net.ipv6.conf.default.{knob}"]
                subprocess.run(sysctl, check=True)
            self.device = TunDevice.create(self.ns, "utun%d", mtu=MTU)
            ip = ["ip", "-n", self.ns]
            subprocess.run([*ip, "addr", "add", f"{LOCAL4}/24", "dev", self.device.name], check=True)
            subprocess.run([*ip, "addr", "add", f"{LOCAL6}/64", "dev", self.device.name, "nodad"], check=True)
            self.raw4 = socket_in_netns(self.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.raw6 = socket_in_netns(self.ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.udp = socket_in_netns(self.ns, socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind((LOCAL4, 0))
            self.udp.settimeout(5)
            self.port = self.udp.getsockname()[1]
        except BaseException:
            self.close()
            raise

    def inject(self, packets: list[bytes]) -> None:
        for p in packets:
            if p[0] >> 4 == 4:
                self.raw4.sendto(p, (PEER4, 0))
            else:
                self.raw6.sendto(p, (PEER6, 0))

    def delivered(self, count: int) -> list[bytes]:
        return [self.udp.recv(65535) for _ in range(count)]

    def queue_drops(self) -> int:
        return self.device.kernel_statistics().kernel_tx_dropped or 0

    def close(self) -> None:
        for name in ("raw4", "raw6", "udp"):
            if hasattr(self, name):
                getattr(self, name).close()
        if hasattr(self, "device"):
            self.device.close()
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


@pytest.fixture(params=["memory", pytest.param("tun", marks=pytest.mark.tun)])
def backend(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "tun":
        require_tun()
        b: Any = TunBackend()
    else:
        b = MemoryBackend()
    try:
        yield b
    finally:
        b.close()


@trio.testing.trio_test
async def test_one_read_is_one_batch_of_everything_ready(backend: Any) -> None:
    flow = PacketTunnelFlow(backend.device, batch_limit=4)
    backend.inject([outbound4(i) for i in range(10)])
    batches = []
    with trio.fail_after(5):
        for _ in range(3):
            batches.append(await flow.read_packet_objects())
    assert [len(b) for b in batches] == [4, 4, 2]
    packets = [p for b in batches for p in b]
    assert [bytes(IP(bytes(p.data))[UDP].payload) for p in packets] == [b"o%d" % i for i in range(10)]
    assert all(p.protocol_family == AF_INET and p.direction is TrafficDirection.OUTBOUND for p in packets)
    stats = flow.statistics()
    assert (stats.read_batches, stats.packets_read) == (3, 10)
    assert stats.bytes_read == sum(len(p.data) for p in packets)


class StepCounter(trio.abc.Instrument):
    """Counts how often the scheduler runs each task (a step = one wakeup)."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


def test_one_wakeup_per_batch_when_packets_are_ready(backend: Any) -> None:
    counter = StepCounter()
    flow = PacketTunnelFlow(backend.device, batch_limit=5)
    backend.inject([outbound4(i) for i in range(20)])
    sizes: list[int] = []

    async def reader() -> None:
        for _ in range(4):
            sizes.append(len(await flow.read_packet_objects()))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, name="reader")

    trio.run(main, instruments=[counter])
    assert sizes == [5, 5, 5, 5]
    assert counter.steps["reader"] == 1 + 4  # the first step starts the task; then one per batch


@trio.testing.trio_test
async def test_read_waits_only_when_nothing_is_ready(backend: Any) -> None:
    flow = PacketTunnelFlow(backend.device)
    got: list[list[Packet]] = []

    async def reader() -> None:
        got.append(await flow.read_packet_objects())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            backend.inject([outbound4(0), outbound6(1)])
    assert [p.protocol_family for p in got[0]] == [AF_INET, AF_INET6]


@trio.testing.trio_test
async def test_read_packets_returns_parallel_lists(backend: Any) -> None:
    flow = PacketTunnelFlow(backend.device)
    backend.inject([outbound6(0), outbound4(1)])
    with trio.fail_after(5):
        packets, protocols = await flow.read_packets()
    assert protocols == [AF_INET6, AF_INET] and packets[0][0] >> 4 == 6


@trio.testing.trio_test
async def test_write_true_when_every_packet_is_accepted(backend: Any) -> None:
    flow = PacketTunnelFlow(backend.device)
    assert flow.write_packet_objects([Packet(inbound4(i, backend.port), AF_INET) for i in range(3)]) is True
    assert flow.write_packets([inbound4(3, backend.port)], [AF_INET]) is True
    assert sorted(backend.delivered(4)) == [b"i0", b"i1", b"i2", b"i3"]
    assert flow.write_packet_objects([]) is True
    stats = flow.statistics()
    assert (stats.write_calls, stats.packets_written) == (3, 4)


@trio.testing.trio_test
async def test_family_not_matching_version_is_rejected_and_counted(backend: Any) -> None:
    flow = PacketTunnelFlow(backend.device)
    good = inbound4(0, backend.port)
    batch = [
        Packet(good, AF_INET),
        Packet(inbound4(1, backend.port), AF_INET6),  # v4 bytes labelled v6
        Packet(outbound6(2), AF_INET),  # v6 bytes labelled v4
        Packet(inbound4(3, backend.port), 10),  # Linux AF_INET6 is not a Darwin family
        Packet(b"", AF_INET),
    ]
    assert flow.write_packet_objects(batch) is False
    assert backend.delivered(1) == [b"i0"]  # the good packet of the same call still went in
    stats = flow.statistics()
    assert (stats.write_dropped_family, stats.write_dropped_malformed, stats.packets_written) == (3, 1, 1)


@trio.testing.trio_test
async def test_packet_too_short_to_be_ip_is_a_counted_drop(backend: Any) -> None:
    """Regression (issue 13): a 1-byte b"\\x45" passed the family check and was written to the utun."""
    flow = PacketTunnelFlow(backend.device)
    good = inbound4(0, backend.port)
    short6 = outbound6(1)[:39]  # version nibble 6, one byte short of an IPv6 header
    batch = [Packet(b"\x45", AF_INET), Packet(good[:19], AF_INET), Packet(short6, AF_INET6), Packet(good, AF_INET)]
    assert flow.write_packet_objects(batch) is False
    assert backend.delivered(1) == [b"i0"]
    stats = flow.statistics()
    assert (stats.write_dropped_malformed, stats.write_dropped_family, stats.packets_written) == (3, 0, 1)


@trio.testing.trio_test
async def test_write_api_misuse_raises_a_clear_error_at_once(backend: Any) -> None:
    """Regression (issue 13): raw bytes to write_packet_objects gave AttributeError ... 'data'."""
    flow = PacketTunnelFlow(backend.device)
    good = inbound4(0, backend.port)
    with pytest.raises(TypeError, match=r"write_packet_objects takes Packet objects.*write_packets"):
        flow.write_packet_objects([good])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"packet 1 is str"):
        flow.write_packets([good, "45000014"], [AF_INET, AF_INET])  # type: ignore[list-item]
    assert flow.statistics().packets_written == 0  # nothing of a refused call went in
    backend.delivered(0)


def test_packet_checks_its_arguments() -> None:
    """Regression (issue 13): Packet("str", 2) failed later with a TypeError from a shift."""
    with pytest.raises(TypeError, match="Packet data must be bytes, bytearray or memoryview, not str"):
        Packet("4500", AF_INET)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="protocol_family must be an int"):
        Packet(b"\x45" * 20, "AF_INET")  # type: ignore[arg-type]
    assert Packet(memoryview(b"\x45" * 20), AF_INET).protocol_family == AF_INET


@trio.testing.trio_test
async def test_count_mismatch_raises(backend: Any) -> None:
    flow = PacketTunnelFlow(backend.device)
    with pytest.raises(LocalProtocolError, match="2 packets but 1 protocols"):
        flow.write_packets([inbound4(0, backend.port)] * 2, [AF_INET])


@trio.testing.trio_test
async def test_device_refusal_is_false_and_counted(backend: Any) -> None:
    flow = PacketTunnelFlow(backend.device)
    too_big = inbound4(0, backend.port, size=MTU)
    assert len(too_big) > MTU
    assert flow.write_packets([too_big, inbound4(1, backend.port)], [AF_INET, AF_INET]) is False
    assert backend.delivered(1) == [b"i1"]
    assert flow.statistics().write_dropped_too_big == 1


@pytest.mark.reliability("F9")
@trio.testing.trio_test
async def test_backpressure_when_the_provider_stops_reading(backend: Any) -> None:
    flow = PacketTunnelFlow(backend.device, batch_limit=1000)
    extra = 30
    backend.inject([outbound4(i % 200) for i in range(backend.capacity + extra)])
    with trio.fail_after(5):
        batch = await flow.read_packet_objects()
    assert len(batch) == backend.capacity
    assert backend.queue_drops() == extra
    assert flow.statistics().device.kernel_tx_dropped == extra  # visible through the flow's statistics()


# -- backend-independent flow semantics (MemoryTun) ---------------------------------------------------------
@trio.testing.trio_test
async def test_no_device_yet_reads_wait_and_writes_drop() -> None:
    flow = PacketTunnelFlow()
    assert flow.write_packet_objects([Packet(outbound4(0), AF_INET)]) is False
    assert flow.statistics().write_dropped_no_device == 1
    device = MemoryTun("utun0", MTU)
    got: list[list[Packet]] = []

    async def reader() -> None:
        got.append(await flow.read_packet_objects())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        device.inject([outbound4(0)])
        flow.attach(device)
    assert len(got[0]) == 1


@trio.testing.trio_test
async def test_second_concurrent_reader_is_refused() -> None:
    flow = PacketTunnelFlow(MemoryTun("utun0", MTU))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flow.read_packet_objects)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(LocalProtocolError, match="already awaiting"):
            await flow.read_packets()
        nursery.cancel_scope.cancel()


@pytest.mark.reliability("B5")
@trio.testing.trio_test
async def test_non_ip_packets_from_the_device_are_counted_not_delivered() -> None:
    device = MemoryTun("utun0", MTU)
    flow = PacketTunnelFlow(device)
    device.inject([b"\x00" * 20, outbound4(0), b"\x50" * 20])
    with trio.fail_after(1):
        batch = await flow.read_packet_objects()
    assert len(batch) == 1 and flow.statistics().read_dropped_malformed == 2


@pytest.mark.reliability("F7")
@trio.testing.trio_test
async def test_closed_device_wakes_reader_with_tunnel_down() -> None:
    device = MemoryTun("utun0", MTU)
    flow = PacketTunnelFlow(device)
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await flow.read_packet_objects()
        except TunnelDown as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        device.close()
    assert len(errors) == 1


def test_batch_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_limit"):
        PacketTunnelFlow(batch_limit=0)


PACKETS = [outbound4(0), outbound6(1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.sampled_from([AF_INET, AF_INET6, 10, 0])), max_size=12))
def test_write_bool_and_counters_account_for_every_packet(spec: list[tuple[int, int]]) -> None:
    device = MemoryTun("utun0", MTU)
    flow = PacketTunnelFlow(device)
    datas = [PACKETS[k] if k < 2 else b"" for k, _ in spec]
    families = [f for _, f in spec]
    ok = flow.write_packets(datas, families)
    valid = [d for d, f in zip(datas, families) if d and ((d[0] >> 4 == 4 and f == 2) or (d[0] >> 4 == 6 and f == 30))]
    s = flow.statistics()
    assert ok == (len(valid) == len(datas))
    assert device.take_written() == valid
    assert s.packets_written + s.write_dropped_family + s.write_dropped_malformed == len(datas)


class InstrumentedTun(MemoryTun):
    """A MemoryTun that counts kernel-counter reads (I/O on a real TUN) and records how it is written to."""

    def __init__(self) -> None:
        super().__init__("utun0", MTU)
        self.kernel_reads = 0
        self.writes: list[tuple[int, bool]] = []  # (packets offered, validated)

    def kernel_statistics(self) -> Any:
        self.kernel_reads += 1
        return self.statistics()

    def write_packets(self, packets: Any, offset: int = 0, *, validated: bool = False) -> int:
        self.writes.append((len(packets), validated))
        return super().write_packets(packets, offset, **({"validated": True} if validated else {}))


def test_statistics_never_read_kernel_counters_kernel_statistics_does() -> None:
    device = InstrumentedTun()
    flow = PacketTunnelFlow(device)
    for _ in range(3):
        assert flow.statistics().device == device.statistics()
    assert device.kernel_reads == 0  # statistics() is safe on the event loop: no /proc read
    assert flow.kernel_statistics().device == device.statistics()
    assert device.kernel_reads == 1  # the explicit, separately named call is the one that reads


def test_written_packets_are_checked_once_by_the_flow() -> None:
    device = InstrumentedTun()
    flow = PacketTunnelFlow(device)
    good = outbound4(0)
    too_big = outbound4(1, size=MTU)
    assert flow.write_packets([good, b"", too_big, good], [AF_INET, AF_INET, AF_INET, AF_INET6]) is False
    s = flow.statistics()
    assert (s.write_dropped_malformed, s.write_dropped_too_big, s.write_dropped_family) == (1, 1, 1)
    # the device got only what the flow had already checked, marked so, and had nothing left to drop
    assert device.writes == [(1, True)]
    assert device.take_written() == [good] and device.statistics().dropped == {}
    assert flow.packets_written == s.packets_written == 1
