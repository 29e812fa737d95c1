"""Per-packet cost of each step of the provider <-> helper forwarding loop (docs/helper.md's table).

    sudo .venv/bin/python -m netsim.bench.bench_helper_steps [--quick] [--json FILE]

Each step is timed alone, on real kernel objects where the step is a syscall, with the same calls and buffers the
loop uses, in batches of 64 packets (the flow's batch limit): a TUN in a private ``netsim-bs<hex>`` namespace
(created and deleted here; nothing touches the root namespace), a Unix socketpair for the IPC, and UDP sockets on
that namespace's loopback. Work that belongs to the *other* side of a step (filling the TUN queue, draining the
socket) happens outside the timed region. Figures: median and best of ``reps`` rounds, ns per packet of wall
time (each round is short and single-threaded, so wall ~ CPU time here; see the caveats in docs/helper.md).

Outbound: flow read -> IPC encode+sendmsg -> helper recv+decode -> WireGuard encrypt -> UDP sendto.
Inbound: UDP recv -> WireGuard decrypt -> IPC encode+sendmsg -> provider recv+decode -> flow write.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from ipaddress import ip_network
from typing import Any

import trio

from netsim.apple.packet import Packet
from netsim.core import ipc
from netsim.core.checksum import fill_checksums
from netsim.core.wireguard import PeerConfig, PrivateKey, WireGuardDevice
from netsim.core.wireguard.config import Endpoint
from netsim.lab import netlink
from netsim.lab.netns import create_netns, delete_netns, run_in_netns
from netsim.runtime.flow import PacketTunnelFlow
from netsim.transports.tun import TunDevice

BATCH = 64


def _udp_packet(size: int, seq: int) -> bytes:
    payload = bytes(size - 28)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, seq & 0xFFFF, 0, 64, 17, 0, bytes([10, 66, 0, 2]),
                       bytes([203, 0, 113, 10]))  # fmt: skip
    buf = bytearray(head + struct.pack("!HHHH", 40000, 7, size - 20, 0) + payload)
    fill_checksums(buf)
    return bytes(buf)


def _time(step: Callable[[], int], rounds: int, iters: int) -> tuple[float, float]:
    """(median, best) ns per packet over ``rounds`` rounds of ``iters`` calls (each returns packets handled)."""
    per: list[float] = []
    step()  # warm-up
    for _ in range(rounds):
        n = 0
        t0 = time.perf_counter_ns()
        for _ in range(iters):
            n += step()
        per.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(per), min(per)


def _device_pair(size: int) -> tuple[WireGuardDevice, WireGuardDevice, tuple[str, int]]:
    a_key, b_key = PrivateKey.generate(), PrivateKey.generate()
    a = WireGuardDevice(
        a_key,
        [PeerConfig(b_key.public_key(), endpoint=Endpoint("127.0.0.1", 9), allowed_ips=(ip_network("0.0.0.0/0"),))],
    )
    b = WireGuardDevice(b_key, [PeerConfig(a_key.public_key(), allowed_ips=(ip_network("10.66.0.2/32"),))])
    now = 1.0
    a.initiate(a.peers[0], now)
    for data, _ in a.datagrams_to_send(now):
        b.receive_datagram_untrusted(data, ("127.0.0.1", 5), now)
    for data, _ in b.datagrams_to_send(now):
        a.receive_datagram_untrusted(data, ("127.0.0.1", 9), now)
    return a, b, ("127.0.0.1", 9)


def _ipc_steps(
    direction: str, packets: list[bytes], families: list[int], rounds: int, iters: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(encode + sendmsg, recv + decode) for one direction: the sender is the provider for "out"."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    prov, helper = ipc.Connection(ipc.Role.PROVIDER), ipc.Connection(ipc.Role.HELPER)
    helper.receive_data(b"".join(map(bytes, prov.send(prov.hello()))))
    helper.next_event()
    prov.receive_data(b"".join(map(bytes, helper.send(helper.hello_ack()))))
    prov.next_event()
    tx, rx = (prov, helper) if direction == "out" else (helper, prov)
    frame = b"".join(map(bytes, tx.send_packets(packets, families)))
    frame_len = len(frame)
    sink = bytearray(frame_len)

    def encode_send() -> int:
        a.sendmsg(tx.send_packets(packets, families))
        b.recv_into(sink, frame_len, socket.MSG_WAITALL)
        return BATCH

    def send_recv_only() -> int:
        a.sendall(frame)
        b.recv_into(sink, frame_len, socket.MSG_WAITALL)
        return BATCH

    def recv_decode() -> int:
        a.sendall(frame)
        view = rx.receive_buffer(frame_len)
        n = b.recv_into(view, frame_len, socket.MSG_WAITALL)
        view.release()
        rx.receive_commit(n)
        ev = rx.next_event()
        assert isinstance(ev, ipc.PacketBatch)
        if direction == "in":
            [Packet(v, f) for f, v in ev]  # the provider builds one Packet per packet
        else:
            ev.packets()
        return BATCH

    enc = _time(encode_send, rounds, iters)
    base = _time(send_recv_only, rounds, iters)
    dec = _time(recv_decode, rounds, iters)
    a.close()
    b.close()
    # Each timed call also pays the other side's syscall; the plain send+recv of the same bytes is split in
    # half between the two steps: encode+sendmsg = enc - base/2, recv+decode = dec - base/2.
    return (enc[0] - base[0] / 2, enc[1] - base[1] / 2), (dec[0] - base[0] / 2, dec[1] - base[1] / 2)


def measure_all(size: int, rounds: int, iters: int, ns: str) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    packets = [_udp_packet(size, i) for i in range(BATCH)]
    families = [ipc.AF_INET] * BATCH

    # --- flow read: the kernel routes 64 datagrams into the TUN (untimed); one read_packet_objects takes them
    tun = TunDevice.create(ns, "utun%d", mtu=1500)
    try:
        netlink.add_address(ns, "10.66.0.2/32", tun.name)
        netlink.add_route(ns, "203.0.113.0/24", ifname=tun.name)

        def setup() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("10.66.0.2", 40000))
            return s

        sender = run_in_netns(ns, setup)
        flow = PacketTunnelFlow(tun, batch_limit=BATCH)
        payload = bytes(size - 28)

        def fill() -> None:
            for _ in range(BATCH):
                sender.sendto(payload, ("203.0.113.10", 7))

        async def flow_read() -> tuple[float, float]:
            per: list[float] = []
            for r in range(rounds + 1):
                total_ns = 0
                count = 0
                for _ in range(iters):
                    fill()
                    t0 = time.perf_counter_ns()
                    got = await flow.read_packet_objects()
                    total_ns += time.perf_counter_ns() - t0
                    count += len(got)
                if r:
                    per.append(total_ns / count)
            return statistics.median(per), min(per)

        out["1 flow read (read_packet_objects)"] = trio.run(flow_read)
        reply_packets = [Packet(p, ipc.AF_INET) for p in packets]
        for p in reply_packets:  # inbound packets for the Mac: addressed to the utun's address
            b = bytearray(p.data)
            b[12:16], b[16:20] = b[16:20], b[12:16]
            fill_checksums(b)
            p.data = bytes(b)

        def flow_write() -> int:
            flow.write_packet_objects(reply_packets)
            return BATCH

        out["10 flow write (write_packet_objects)"] = _time(flow_write, rounds, iters)
        sender.close()
    finally:
        tun.close()

    # --- IPC both ways over a Unix stream socketpair, drained outside the timed region
    for direction, labels in (
        ("out", ("2 IPC encode + sendmsg (provider)", "3 IPC recv + decode (helper)")),
        ("in", ("8 IPC encode + sendmsg (helper)", "9 IPC recv + decode (provider)")),
    ):
        enc, dec = _ipc_steps(direction, packets, families, rounds, iters)
        out[labels[0]], out[labels[1]] = enc, dec

    # --- WireGuard both ways, reused buffers as the helper uses them
    wga, wgb, _ = _device_pair(size)
    bufs = [memoryview(bytearray(size + 64)) for _ in range(BATCH)]
    sizes = [0] * BATCH
    addrs: list[Any] = [None] * BATCH

    def encrypt() -> int:
        wga.encapsulate(packets, 2.0, bufs, sizes, addrs)
        return BATCH

    out["4 WireGuard encrypt (encapsulate)"] = _time(encrypt, rounds, iters)
    src = [("127.0.0.1", 9)] * BATCH

    # the replay window rejects a repeated batch: encrypt a fresh one outside the timing, decrypt it inside
    per: list[float] = []
    for _ in range(rounds):
        total = 0
        for _ in range(iters):
            wga.encapsulate(packets, 2.0, bufs, sizes, addrs)
            dg = [bytes(bufs[i][: sizes[i]]) for i in range(BATCH)]
            t0 = time.perf_counter_ns()
            wgb.receive_datagrams_untrusted(dg, src, 2.0)
            wgb.take_received()
            total += time.perf_counter_ns() - t0
        per.append(total / (iters * BATCH))
    out["7 WireGuard decrypt (receive_datagrams_untrusted)"] = (statistics.median(per), min(per))

    # --- UDP on the namespace's loopback
    netlink.set_link(ns, "lo", up=True)

    def udp_pair() -> tuple[socket.socket, socket.socket]:
        s1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s2.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        s2.setblocking(False)
        return s1, s2

    s1, s2 = run_in_netns(ns, udp_pair)
    dst = s2.getsockname()
    rbuf = memoryview(bytearray(65535))
    wga.encapsulate(packets, 2.0, bufs, sizes, addrs)
    views = [bufs[i][: sizes[i]] for i in range(BATCH)]

    def drain() -> None:
        while True:
            try:
                s2.recv_into(rbuf)
            except BlockingIOError:
                return

    per = []
    for _ in range(rounds):
        total = 0
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            for v in views:
                s1.sendto(v, dst)
            total += time.perf_counter_ns() - t0
            drain()
        per.append(total / (iters * BATCH))
    out["5 UDP sendto"] = (statistics.median(per), min(per))
    per = []
    rviews = [memoryview(bytearray(65535)) for _ in range(BATCH)]
    for _ in range(rounds):
        total = 0
        for _ in range(iters):
            for v in views:
                s1.sendto(v, dst)
            t0 = time.perf_counter_ns()
            n = 0
            while n < BATCH:
                try:
                    s2.recvfrom_into(rviews[n])
                except BlockingIOError:
                    break
                n += 1
            total += time.perf_counter_ns() - t0
        per.append(total / (iters * BATCH))
    out["6 UDP recvfrom_into until EAGAIN"] = (statistics.median(per), min(per))
    s1.close()
    s2.close()
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split()[0])))


def main() -> None:
    quick = "--quick" in sys.argv
    if os.geteuid() != 0:
        sys.exit("needs root (a TUN in a private netsim-* namespace)")
    rounds, iters = (5, 50) if quick else (7, 200)
    ns = f"netsim-bs{secrets.token_hex(2)}-mac"
    create_netns(ns)
    results: dict[str, Any] = {}
    try:
        for size in (100, 1400):
            results[str(size)] = measure_all(size, rounds, iters, ns)
    finally:
        delete_netns(ns)
    print(f"{'step':<52} {'100 B med/best ns':>20} {'1400 B med/best ns':>20}")
    for step in results["100"]:
        a, b = results["100"][step], results["1400"][step]
        print(f"{step:<52} {a[0]:>10.0f}/{a[1]:<9.0f} {b[0]:>10.0f}/{b[1]:<9.0f}")
    if "--json" in sys.argv:
        from netsim.bench._common import machine_info

        path = sys.argv[sys.argv.index("--json") + 1]
        with open(path, "w") as f:
            json.dump({"machine": machine_info(), "ns_per_packet": results}, f, indent=2)


if __name__ == "__main__":
    main()
