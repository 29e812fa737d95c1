"""The provider <-> helper loop: round trips with 64 packets in flight, batch sweep 1/8/32/64/128.

Run: ``python -m benchmarks.bench_loop [--quick] [--json FILE]`` (or ``netsim bench --only 'loop/*'``).

In-process cases (one trio run each, in a fresh interpreter): a provider task keeps ``max(64, batch)`` packets in
flight as ``batch``-packet PACKETS frames through a pair of `netsim.transports.uds.IpcChannel` objects; a helper
task receives each `ipc.PacketBatch`, "forwards" every packet by reflecting it in place (addresses and ports
swapped, as the C floor does) and sends the batch back. A round trip per packet is the number: ns/packet,
packets/s, CPU seconds per packet (``getrusage``; provider and helper share the process here) and allocations per
packet (tracemalloc, one untimed pass). Transports:

* ``memory``: `netsim.testing.ipc_pair.open_ipc_pair` (in-memory byte pipes, the in-memory backend);
* ``uds``: a real ``AF_UNIX`` stream socketpair under the same channels (kernel copies and wakeups, one process).

The same provider and helper also run as two processes over a real TUN and Unix socket for the end-to-end
``netsim-loop`` path (`provider_main`, `helper_main`, spawned by `benchmarks.bench_e2e`), next to the C floor and
the naive loop doing the same job.
"""

from __future__ import annotations

import resource
import socket
import statistics
import struct
import sys
import time
from typing import Any

import trio

from benchmarks._common import Result, parse_args, report, run_isolated, write_json
from benchmarks.bench_micro import udp_corpus

__all__ = ["BATCHES", "INFLIGHT", "helper_main", "provider_main", "reflect"]

BATCHES = (1, 8, 32, 64, 128)
INFLIGHT = 64
_ADDR4 = struct.Struct("!4s4s")
_ADDR6 = struct.Struct("!16s16s")
_PORTS = struct.Struct("!HH")


def reflect(pkt: memoryview) -> None:
    """Swap source/destination address (and TCP/UDP ports) in place: a checksum-neutral stand-in for forwarding.

    RFC 1071: the one's-complement sum does not depend on word order, so the IP and L4 checksums stay valid.
    """
    n = len(pkt)
    version = pkt[0] >> 4
    if version == 4 and n >= 20:
        s, d = _ADDR4.unpack_from(pkt, 12)
        _ADDR4.pack_into(pkt, 12, d, s)
        l4, proto = (pkt[0] & 15) * 4, pkt[9]
    elif version == 6 and n >= 40:
        s, d = _ADDR6.unpack_from(pkt, 8)
        _ADDR6.pack_into(pkt, 8, d, s)
        l4, proto = 40, pkt[6]
    else:
        return
    if proto in (6, 17) and n >= l4 + 4:
        sp, dp = _PORTS.unpack_from(pkt, l4)
        _PORTS.pack_into(pkt, l4, dp, sp)


async def _reflector(channel: Any) -> None:
    """Helper side: every PACKETS frame comes back reflected, zero copy (views into the receive buffer)."""
    from netsim.core import ipc

    receive, send = channel.receive_event, channel.send_packets_nowait
    while True:
        ev = await receive()
        if isinstance(ev, ipc.PacketBatch):
            views = ev.packets()
            for v in views:
                reflect(v)
            send(views, ev.families)
        elif isinstance(ev, ipc.ConnectionClosed | ipc.Goodbye | ipc.Error):
            return


async def _pump(channel: Any, batch_pkts: list[bytes], total: int, inflight: int) -> None:
    """Provider side: keep ``inflight`` packets outstanding until ``total`` came back."""
    from netsim.core import ipc

    b = len(batch_pkts)
    sent = received = 0
    send, receive = channel.send_packets_nowait, channel.receive_event
    while sent < total and sent - received + b <= inflight:
        if not send(batch_pkts, ipc.AF_INET):
            raise RuntimeError("IPC queue full: the benchmark must never drop")
        sent += b
    while received < total:
        ev = await receive()
        if not isinstance(ev, ipc.PacketBatch):
            raise RuntimeError(f"unexpected IPC event {ev!r}")
        received += len(ev)
        while sent < total and sent - received + b <= inflight:
            if not send(batch_pkts, ipc.AF_INET):
                raise RuntimeError("IPC queue full: the benchmark must never drop")
            sent += b


async def _uds_pair(nursery_stack: Any, options: dict[str, Any]) -> tuple[Any, Any]:
    from netsim.core import ipc
    from netsim.transports.uds import SocketStream, open_ipc_channel, peer_credentials

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chans = []
    for sock, role in ((a, ipc.Role.PROVIDER), (b, ipc.Role.HELPER)):
        tsock = trio.socket.from_stdlib_socket(sock)
        stream = SocketStream(tsock, peer_credentials(sock))
        chans.append(await nursery_stack.enter_async_context(open_ipc_channel(stream, ipc.Connection(role), **options)))
    prov, helper = chans
    async with trio.open_nursery() as n:
        n.start_soon(helper.handshake)
        await prov.handshake()
    return prov, helper


def case_loop(transport: str, batch: int, size: int, packets: int, reps: int, seed: int) -> dict[str, Any]:
    """Round trips through the in-process provider <-> helper loop; see the module docstring."""
    from contextlib import AsyncExitStack

    from netsim.testing.ipc_pair import open_ipc_pair

    inflight = max(INFLIGHT, batch)
    total = packets - packets % batch
    corpus = udp_corpus(size, batch, seed)
    options = {"max_queued_batches": 1024, "max_queued_bytes": 64 << 20}
    out: dict[str, Any] = {}

    async def main() -> None:
        async with AsyncExitStack() as stack:
            if transport == "memory":
                prov, helper = await stack.enter_async_context(open_ipc_pair(capacity=1 << 20, **options))
            else:
                prov, helper = await _uds_pair(stack, options)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_reflector, helper)
                await _pump(prov, corpus, total, inflight)  # warm-up
                per_item: list[float] = []
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                for _ in range(reps):
                    t0 = time.perf_counter_ns()
                    await _pump(prov, corpus, total, inflight)
                    per_item.append((time.perf_counter_ns() - t0) / total)
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                out["per_item"] = per_item
                out["cpu_ns_per_pkt"] = cpu * 1e9 / (total * reps)
                # allocations: one more, untimed pass under tracemalloc (see bench_micro.alloc_profile)
                import tracemalloc

                blocks0 = sys.getallocatedblocks()
                tracemalloc.start()
                base, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                await _pump(prov, corpus, total, inflight)
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                out["alloc_bytes_per_pkt"] = (peak - base) / total
                out["blocks_per_pkt"] = (sys.getallocatedblocks() - blocks0) / total
                nursery.cancel_scope.cancel()

    trio.run(main)
    per_item = out.pop("per_item")
    med = statistics.median(per_item)
    params = {"transport": transport, "batch": batch, "size": size, "inflight": inflight, **out}
    return Result(
        f"loop/{transport} b{batch} {size}B", total, reps, med, min(per_item), max(per_item), 1e9 / med, params
    ).as_dict()


def forwarding_available() -> str | None:
    """None if the real helper loop can be benchmarked, else the reason it cannot."""
    try:
        import netsim.runtime.forwarding  # noqa: F401
    except ImportError as exc:
        return f"netsim.runtime.forwarding is not available yet ({exc})"
    return "netsim.runtime.forwarding exists but its benchmark case is not wired yet"


# --------------------------------------------------------------------------------------------------- processes
async def helper_main(path: str) -> None:
    """Helper process for the end-to-end ``netsim-loop`` path: `UnixIpcServer` + the reflector."""
    from netsim.transports.uds import UnixIpcServer

    server = UnixIpcServer(path, max_queued_batches=1024, max_queued_bytes=64 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, _reflector)
        print(f"READY helper {path}", flush=True)


async def provider_main(tun_name: str, path: str, batch: str = "64") -> None:
    """Provider process: TUN -> `PacketTunnelFlow.read_packets` -> IPC batch; IPC batch -> `write_packets`.

    Exactly the loop a netsim provider runs (one wakeup per batch, one frame per batch), minus the user's code.
    """
    from netsim.core import ipc
    from netsim.runtime.flow import PacketTunnelFlow
    from netsim.transports.tun import TunDevice
    from netsim.transports.uds import connect_ipc_unix

    dev = TunDevice.create(None, tun_name)
    flow = PacketTunnelFlow(dev, batch_limit=int(batch))
    async with connect_ipc_unix(path, max_queued_batches=1024, max_queued_bytes=64 << 20) as channel:
        print(f"READY provider {dev.name}", flush=True)

        async def outbound() -> None:
            read, send = flow.read_packets, channel.send_packets_nowait
            while True:
                pkts, fams = await read()
                send(pkts, fams)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbound)
            receive, write = channel.receive_event, flow.write_packets
            while True:
                ev = await receive()
                if isinstance(ev, ipc.PacketBatch):
                    write(ev.packets(), ev.families)
                elif isinstance(ev, ipc.ConnectionClosed | ipc.Goodbye | ipc.Error):
                    nursery.cancel_scope.cancel()
                    return


# --------------------------------------------------------------------------------------------------- plan
def plan(quick: bool, seed: int = 1) -> list[tuple[str, str, dict[str, Any]]]:
    """``(case name, function, kwargs)`` of every loop case."""
    packets = 4096 if quick else 16384
    reps = 5 if quick else 7
    out: list[tuple[str, str, dict[str, Any]]] = []
    for transport in ("memory", "uds"):
        for batch in (1, 64) if quick else BATCHES:
            kw = {"transport": transport, "batch": batch, "size": 64, "packets": packets, "reps": reps, "seed": seed}
            if batch == 1:
                kw["packets"] = packets // 4  # one frame per packet is slow; keep the case short
            out.append((f"loop/{transport}/b{batch}", "case_loop", kw))
    if not quick:
        for transport in ("memory", "uds"):
            kw = {"transport": transport, "batch": 64, "size": 1400, "packets": packets, "reps": reps, "seed": seed}
            out.append((f"loop/{transport}/b64/1400", "case_loop", kw))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    results = [run_isolated("benchmarks.bench_loop", fn, **kw) for _, fn, kw in plan(args.quick, args.seed)]
    report(results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("helper", "provider"):
        fn = helper_main if sys.argv[1] == "helper" else provider_main
        try:
            trio.run(fn, *sys.argv[2:])
        except KeyboardInterrupt:
            pass
        sys.exit(0)
    sys.exit(main())
