"""Micro-benchmarks of each hot-path step, ns per packet: the pieces the loop and end-to-end numbers are made of.

Run: ``python -m netsim.bench.bench_micro [--quick] [--json FILE]`` (or ``netsim bench --only 'micro/*'``).
Every case runs in a fresh interpreter (`netsim.bench._common.run_isolated`), on a seeded corpus, after a warm-up,
and reports the median/min/max of >= 5 timed passes.

Cases written here:

* ``micro/ipc-encode``: `ipc.Connection.send_packets` of a 64-packet batch (header + descriptors; payloads are
  not copied: the frame is a scatter-gather list).
* ``micro/ipc-decode``: the frame bytes copied into the receiving `ipc.Connection` (as ``recv_into`` would),
  `next_event`, and every packet view taken out of the `ipc.PacketBatch`.
* ``micro/uds``: a 64-packet frame through a real ``AF_UNIX`` stream socketpair: one ``sendmsg`` of the
  scatter-gather list, ``recv_into`` until the frame is in (both ends in one thread, so this is syscall and copy
  cost, not scheduling).
* ``micro/tun-read`` / ``micro/tun-write`` (root): `TunDevice.read_packets` (what `PacketTunnelFlow` uses; a
  ``read_into`` over reused buffers measured slower, 1.28 against 1.00 us/packet, and was removed) and
  `TunDevice.write_packets` on a real TUN in a private ``netsim-b<hex>-tun`` namespace. Reads drain 256 packets
  queued beforehand by a UDP socket routed into the TUN (the queueing is not timed); writes inject UDP packets
  whose destination the namespace does not own, with forwarding off, so the kernel routes and drops them (it
  never queues them anywhere).

Cases wrapped from the existing modules (so the runner reports them all, unchanged): ``micro/parse``
(`bench_packet.case_netsim`), ``micro/policy`` (`bench_policy.case_classify`, 100 rules) and
``micro/wireguard`` (`bench_wireguard.bench_wireguard`: encapsulate + decapsulate of 64-packet batches).

Allocation figures (``alloc_bytes_per_pkt``, ``blocks_per_pkt`` in ``params``) come from `alloc_profile`: one
extra, untimed pass under tracemalloc.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from netsim.bench._common import Result, measure, parse_args, report, rng, run_isolated, write_json

__all__ = ["alloc_profile", "result_from_samples", "udp4_packet", "udp_corpus"]

BATCH = 64
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def udp4_packet(src: bytes, dst: bytes, sport: int, dport: int, size: int, fill: int = 0) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` bytes (valid IPv4 header checksum, UDP checksum 0 = none)."""
    head = bytearray(_IP4.pack(0x45, 0, size, 0, 0x4000, 64, 17, 0, src, dst))
    s = sum(struct.unpack("!10H", head))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("!H", head, 10, ~s & 0xFFFF)
    return bytes(head) + _UDP.pack(sport, dport, size - 20, 0) + bytes([fill & 0xFF]) * (size - 28)


def udp_corpus(size: int, count: int, seed: int) -> list[bytes]:
    """``count`` seeded IPv4/UDP packets of ``size`` bytes between 10.77.0.2 and 10.77.0.9 (the loop's TUN net)."""
    r = rng(seed)
    return [
        udp4_packet(bytes([10, 77, 0, 2]), bytes([10, 77, 0, 9]), r.randrange(1024, 65536), 9, size, r.randrange(256))
        for _ in range(count)
    ]


def alloc_profile(run: Callable[[], object], items: int) -> dict[str, float]:
    """Allocation cost of one pass of ``run``: tracemalloc peak above the start, and net blocks, per item.

    ``alloc_bytes_per_pkt`` is the transient high-water mark (what the pass had to allocate at once) divided by
    the items; ``blocks_per_pkt`` the net change of ``sys.getallocatedblocks()`` (retained objects: ~0 unless the
    path leaks or grows a cache). CPython 3.11 has no allocation counter, so churn below the peak is invisible.
    """
    run()  # warm caches so they are not counted
    blocks0 = sys.getallocatedblocks()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {
        "alloc_bytes_per_pkt": (peak - base) / items,
        "blocks_per_pkt": (sys.getallocatedblocks() - blocks0) / items,
    }


def result_from_samples(
    name: str, items: int, cpu: list[float], wall: list[float], params: dict[str, Any]
) -> dict[str, Any]:
    """A `Result` dict from per-repetition ns/item samples, with `measure`'s convention: CPU time is the figure
    (``ns_*``, items/s), the wall-clock median rides along."""
    med = statistics.median(cpu)
    return Result(
        name, items, len(cpu), med, min(cpu), max(cpu), 1e9 / med, wall_ns_median=statistics.median(wall),
        params=params,
    ).as_dict()  # fmt: skip


def _open_pair() -> tuple[Any, Any]:
    from netsim.core import ipc

    p, h = ipc.Connection(ipc.Role.PROVIDER), ipc.Connection(ipc.Role.HELPER)
    h.receive_data(b"".join(map(bytes, p.send(p.hello()))))
    h.next_event()
    p.receive_data(b"".join(map(bytes, h.send(h.hello_ack()))))
    p.next_event()
    return p, h


def _with_alloc(result: Result, run: Callable[[], object], items: int) -> dict[str, Any]:
    d = result.as_dict()
    d["params"].update(alloc_profile(run, items))
    return d


# --------------------------------------------------------------------------------------------------- IPC codec
def case_ipc(direction: str, size: int, batches: int, reps: int, seed: int) -> dict[str, Any]:
    from netsim.core import ipc

    prov, helper = _open_pair()
    corpus = udp_corpus(size, BATCH, seed)
    frame = b"".join(map(bytes, prov.send_packets(corpus, ipc.AF_INET)))
    items = batches * BATCH
    send_packets = prov.send_packets

    def run_encode() -> None:
        for _ in range(batches):
            send_packets(corpus, ipc.AF_INET)

    nbytes = len(frame)

    def run_decode() -> None:
        for _ in range(batches):
            view = helper.receive_buffer(nbytes)
            view[:nbytes] = frame
            view.release()
            helper.receive_commit(nbytes)
            ev = helper.next_event()
            for _fam, _pkt in ev:
                pass

    run = run_encode if direction == "encode" else run_decode
    res = measure(f"micro/ipc-{direction} {size}B", run, items=items, reps=reps, params={"size": size, "batch": BATCH})
    return _with_alloc(res, run, items)


# --------------------------------------------------------------------------------------------------- UDS
def case_uds(size: int, batches: int, reps: int, seed: int) -> dict[str, Any]:
    from netsim.core import ipc

    prov, _ = _open_pair()
    corpus = udp_corpus(size, BATCH, seed)
    bufs = prov.send_packets(corpus, ipc.AF_INET)
    total = sum(map(len, bufs))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rx = bytearray(max(total, 1 << 16))
    rxv = memoryview(rx)
    sendmsg, recv_into = a.sendmsg, b.recv_into

    def run() -> None:
        for _ in range(batches):
            sent = sendmsg(bufs)
            if sent != total:
                raise RuntimeError(f"partial sendmsg {sent}/{total}")
            got = 0
            while got < total:
                got += recv_into(rxv[got:total])

    try:
        res = measure(
            f"micro/uds {size}B", run, items=batches * BATCH, reps=reps, params={"size": size, "batch": BATCH}
        )
        return _with_alloc(res, run, batches * BATCH)
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------------------------------- TUN
@contextlib.contextmanager
def _tun_namespace() -> Iterator[tuple[Any, str]]:
    """A private namespace with a TUN at 10.78.0.2/24 (forwarding off); deleted on exit whatever happens."""
    import secrets

    from netsim.lab.netns import create_netns, delete_netns, run_in_netns
    from netsim.transports.tun import TunDevice

    ns = f"netsim-b{secrets.token_hex(2)}-tun"
    create_netns(ns)
    dev = None
    try:
        dev = TunDevice.create(ns, "utun%d", mtu=1500)
        name = dev.name

        def configure() -> None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=idx, txqlen=4096)
                ipr.addr("add", index=idx, address="10.78.0.2", prefixlen=24)

        run_in_netns(ns, configure)
        yield dev, ns
    finally:
        if dev is not None:
            dev.close()
        delete_netns(ns)


def case_tun(op: str, size: int, batches: int, reps: int, seed: int) -> dict[str, Any]:
    from netsim.lab.netns import run_in_netns

    with _tun_namespace() as (dev, ns):
        if op == "write":
            corpus = [
                udp4_packet(bytes([10, 78, 1, 2]), bytes([10, 79, 0, 9]), 40000 + i, 9, size) for i in range(BATCH)
            ]
            write = dev.write_packets

            def run() -> None:
                for _ in range(batches):
                    if write(corpus) != BATCH:
                        raise RuntimeError(f"TUN refused packets: {dev.statistics()}")

            res = measure(
                f"micro/tun-write {size}B", run, items=batches * BATCH, reps=reps, params={"size": size, "batch": BATCH}
            )
            return _with_alloc(res, run, batches * BATCH)

        sender = run_in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        payload = bytes(size - 28)
        queued = 256
        read_packets = dev.read_packets

        def fill() -> None:
            for i in range(queued):
                sender.sendto(payload, ("10.78.0.9", 9000 + (i & 7)))

        def drain() -> int:
            got = 0
            while got < queued:
                n = len(read_packets(BATCH))
                if n == 0:
                    raise RuntimeError(f"TUN queue ran dry after {got} of {queued} packets: {dev.statistics()}")
                got += n
            return got

        cpu: list[float] = []
        wall: list[float] = []
        for i in range(reps + 1):  # the first pass is the warm-up
            fill()
            w0, c0 = time.perf_counter_ns(), time.process_time_ns()
            drain()
            c1, w1 = time.process_time_ns(), time.perf_counter_ns()
            if i:
                cpu.append((c1 - c0) / queued)
                wall.append((w1 - w0) / queued)
        res = Result.from_dict(
            result_from_samples(f"micro/tun-{op} {size}B", queued, cpu, wall, {"size": size, "batch": BATCH})
        )

        def one() -> None:
            fill()
            drain()

        try:
            return _with_alloc(res, one, queued)
        finally:
            sender.close()


# --------------------------------------------------------------------------------------------------- wrapped
def case_parse(size: int, count: int, reps: int, seed: int) -> dict[str, Any]:
    from netsim.bench.bench_packet import case_netsim

    d = case_netsim(size=size, count=count, reps=reps, seed=seed, variant="bytes")
    d["name"] = f"micro/parse {size}B"
    return d


def case_policy(rules: int, size: int, reps: int, seed: int) -> dict[str, Any]:
    from netsim.bench.bench_policy import case_classify

    d = case_classify(n=rules, size=size, reps=reps, seed=seed)
    d["name"] = f"micro/policy {rules} rules"
    return d


def case_wireguard(size: int, rounds: int, reps: int) -> dict[str, Any]:
    from netsim.bench import bench_wireguard as bw

    a, b = bw._pair()

    def run() -> None:
        bw.bench_wireguard(size, rounds, a, b)

    res = measure(
        f"micro/wireguard {size}B", run, items=rounds * bw.BATCH, reps=reps, params={"size": size, "batch": bw.BATCH}
    )
    return _with_alloc(res, run, rounds * bw.BATCH)


# --------------------------------------------------------------------------------------------------- plan
def plan(quick: bool, seed: int = 1) -> list[tuple[str, str, dict[str, Any]]]:
    """``(case name, function, kwargs)`` for every micro case; the runner filters and runs them isolated."""
    sizes = (64,) if quick else (64, 1400)
    reps = 5 if quick else 9
    batches = 40 if quick else 200
    out: list[tuple[str, str, dict[str, Any]]] = []
    for size in sizes:
        out.append((f"micro/parse/{size}", "case_parse", {"size": size, "count": 500 if quick else 3000}))
        out.append((f"micro/ipc-encode/{size}", "case_ipc", {"direction": "encode", "size": size, "batches": batches}))
        out.append((f"micro/ipc-decode/{size}", "case_ipc", {"direction": "decode", "size": size, "batches": batches}))
        out.append((f"micro/uds/{size}", "case_uds", {"size": size, "batches": batches}))
        out.append((f"micro/wireguard/{size}", "case_wireguard", {"size": size, "rounds": 5 if quick else 20}))
        for op in ("read", "write"):
            out.append((f"micro/tun-{op}/{size}", "case_tun", {"op": op, "size": size, "batches": batches // 4}))
    out.append(("micro/policy/100", "case_policy", {"rules": 100, "size": 2000 if quick else 10000}))
    for _, fn, kw in out:
        kw["reps"] = reps
        if fn not in ("case_wireguard",):
            kw["seed"] = seed
    return out


def needs_root(name: str) -> bool:
    """Cases that need a TUN (root)."""
    return name.startswith("micro/tun-")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    results: list[Result] = []
    for name, fn, kw in plan(args.quick, args.seed):
        if needs_root(name) and os.geteuid() != 0:
            print(f"skipped {name}: needs root for a TUN device")
            continue
        results.append(run_isolated("netsim.bench.bench_micro", fn, **kw))
    report(results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
