"""IPC benchmarks: codec round trip per packet, and packets/s through a real Unix socket with `IpcChannel`.

* ``ipc/roundtrip <size>B``: `Connection.send_packets` of a 64-packet batch, the frame written into the receiver's
  buffer as ``recv_into`` would (one copy, standing in for the kernel's), `next_event`, and every ``(family,
  view)`` taken out of the batch. ns per packet.
* ``ipc/uds <size>B``: a provider `IpcChannel` sends 64-packet batches (`send_packets`, waiting for room) to a
  helper `IpcChannel` over an AF_UNIX socketpair in the same trio run (one process, so both sides share a core:
  a lower bound on what two processes reach). Packets/s from wall time.

Run: ``.venv/bin/python -m netsim.bench.bench_ipc [--quick] [--json FILE]``.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from netsim.bench._common import Result, measure, parse_args, report, rng, run_isolated, write_json

BATCH = 64


def _corpus(size: int, seed: int) -> list[bytes]:
    r = rng(seed)
    return [b"\x45" + r.randbytes(size - 1) for _ in range(BATCH)]


def case_roundtrip(size: int, batches: int, reps: int, seed: int) -> dict[str, Any]:
    from netsim.core import ipc

    p, h = ipc.Connection(ipc.Role.PROVIDER), ipc.Connection(ipc.Role.HELPER)
    h.receive_data(b"".join(map(bytes, p.send(p.hello()))))
    h.next_event()
    p.receive_data(b"".join(map(bytes, h.send(h.hello_ack()))))
    p.next_event()
    corpus = _corpus(size, seed)

    def run() -> None:
        for _ in range(batches):
            bufs = p.send_packets(corpus, ipc.AF_INET)
            n = sum(map(len, bufs))
            view = h.receive_buffer(n)
            pos = 0
            for b in bufs:  # what the kernel does between sendmsg and recv_into
                view[pos : pos + len(b)] = b
                pos += len(b)
            view.release()
            h.receive_commit(n)
            for _fam, _pkt in h.next_event():  # type: ignore[union-attr]
                pass

    return measure(f"ipc/roundtrip {size}B", run, items=batches * BATCH, reps=reps, params={"size": size}).as_dict()


def case_uds(size: int, batches: int, reps: int, seed: int) -> dict[str, Any]:
    import statistics

    import trio

    from netsim.core import ipc
    from netsim.runtime.channel import open_ipc_channel
    from netsim.transports.uds import SocketStream

    corpus = _corpus(size, seed)
    walls: list[float] = []
    cpus: list[float] = []

    async def once() -> None:
        a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        async with (
            open_ipc_channel(SocketStream(a), ipc.Connection(ipc.Role.PROVIDER)) as prov,
            open_ipc_channel(SocketStream(b), ipc.Connection(ipc.Role.HELPER)) as helper,
        ):
            async with trio.open_nursery() as n:
                n.start_soon(helper.handshake)
                await prov.handshake()
            t0, c0 = time.perf_counter_ns(), time.process_time_ns()

            async def sender() -> None:
                for _ in range(batches):
                    await prov.send_packets(corpus, ipc.AF_INET)

            got = 0
            async with trio.open_nursery() as n:
                n.start_soon(sender)
                while got < batches * BATCH:
                    ev = await helper.receive_event()
                    assert isinstance(ev, ipc.PacketBatch)
                    got += len(ev)
            walls.append((time.perf_counter_ns() - t0) / got)
            cpus.append((time.process_time_ns() - c0) / got)

    for _ in range(reps + 1):
        trio.run(once)
    walls, cpus = walls[1:], cpus[1:]  # first run is the warm-up
    med = statistics.median(walls)
    return Result(
        f"ipc/uds {size}B",
        batches * BATCH,
        reps,
        med,
        min(walls),
        max(walls),
        1e9 / med,
        wall_ns_median=med,
        params={"size": size, "cpu_ns_median": statistics.median(cpus), "figure": "wall"},
    ).as_dict()


def main() -> None:
    args = parse_args(__doc__ or "")
    reps = 5 if args.quick else 7
    batches = 200 if args.quick else 1000
    results: list[Result] = []
    for size in (64, 1400):
        results.append(
            run_isolated("netsim.bench.bench_ipc", "case_roundtrip", size=size, batches=batches, reps=reps, seed=1)
        )
    for size in (64, 1400):
        results.append(
            run_isolated("netsim.bench.bench_ipc", "case_uds", size=size, batches=batches, reps=reps, seed=2)
        )
    report(results)
    print("(ipc/uds: ns per packet of wall time for both ends in one process; items/s = packets/s)")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
