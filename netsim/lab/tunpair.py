"""Two namespaces joined by a Python relay between their TUNs: real TCP through TUN offloads, checked and timed.

Namespace ``a`` holds ``utunA`` (10.201.0.1/24), namespace ``b`` holds ``utunB`` (10.201.0.2/24); a relay thread
moves every packet read from one device to the other. A TCP connection from ``a`` to ``b`` therefore leaves the
kernel of ``a`` through ``utunA`` and enters the kernel of ``b`` through ``utunB``, as the provider's traffic
leaves a utun and the server's enters its TUN, with nothing but netsim's own code in between. Either device can be
opened with TUN offloads (`netsim.transports.tun.TunDevice.create` ``offload=True``): then the kernel of that
side hands the relay TCP super-packets (TSO, cut by `TunDevice.read_offload_packets`) and takes coalesced writes
(GRO on writes, `TunDevice.write_coalesced`). `transfer` sends seeded bytes through it, checks they arrived
byte-identical, and reports the relay's CPU time per packet; ``python -m netsim.lab.tunpair`` prints the
offloads-on/off comparison quoted in docs/helper.md, "TUN offloads" (root).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import secrets
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from netsim.lab.netns import create_netns, delete_netns
from netsim.transports.netns import run_in_netns, socket_in_netns
from netsim.transports.tun import TUN_F_ALL, TunDevice

__all__ = ["ADDR_A", "ADDR_B", "TransferResult", "TunPair", "transfer", "tun_pair"]

ADDR_A, ADDR_B = "10.201.0.1", "10.201.0.2"
PORT = 5201
MTU = 1420
_BATCH = 64


@dataclass
class TunPair:
    """The two devices and their namespaces (`tun_pair`)."""

    a: TunDevice
    b: TunDevice
    netns_a: str
    netns_b: str
    coalesce: bool = True  # GRO on writes into an offload device


@dataclass(frozen=True)
class TransferResult:
    """One `transfer`: what went through and what it cost the relay."""

    nbytes: int
    identical: bool
    seconds: float
    relay_cpu: float  # CPU seconds of the relay thread (user + system: its syscalls' kernel work included)
    packets: int  # wire packets relayed from the sender's side (segments, after cutting super-packets)
    reads: int  # TUN reads on the sender's side (a super-packet is one read)
    writes: int  # TUN writes on the receiver's side (a coalesced super-packet is one write)
    stats_a: Any
    stats_b: Any

    @property
    def gbit_per_s(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e9

    @property
    def relay_us_per_packet(self) -> float:
        return self.relay_cpu / max(1, self.packets) * 1e6


@contextlib.contextmanager
def tun_pair(
    offload_a: bool, offload_b: bool, *, read_offload: int | None = None, run: str | None = None
) -> Iterator[TunPair]:
    """Create namespaces ``netsim-<run>-a`` / ``-b`` with a TUN each; everything is deleted on exit.

    ``offload_a`` / ``offload_b``: that side's TUN has a vnet header; ``read_offload``: the ``TUN_F_*`` flags its
    reads get (`TunDevice.set_offload`; None: checksum, TSO and USO; 0: whole packets, coalesced writes only).
    """
    run = run or f"tp{secrets.token_hex(2)}"
    ns_a, ns_b = f"netsim-{run}-a", f"netsim-{run}-b"
    made: list[str] = []
    devs: list[TunDevice] = []
    try:
        for ns, addr, offload in ((ns_a, ADDR_A, offload_a), (ns_b, ADDR_B, offload_b)):
            create_netns(ns)
            made.append(ns)
            flags = TUN_F_ALL if read_offload is None else read_offload
            dev = TunDevice.create(ns, "utun%d", mtu=MTU, offload=offload, offload_flags=flags)
            devs.append(dev)
            _address(ns, dev.name, addr)
        yield TunPair(devs[0], devs[1], ns_a, ns_b)
    finally:
        for dev in devs:
            dev.close()
        for ns in made:
            delete_netns(ns)


def _address(ns: str, ifname: str, addr: str) -> None:
    def configure() -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=idx, txqlen=1000)
            ipr.addr("add", index=idx, address=addr, prefixlen=24)

    run_in_netns(ns, configure)


def _move(src: TunDevice, dst: TunDevice, coalesce: bool) -> tuple[int, int]:
    """One batch ``src`` -> ``dst``: (packets, reads)."""
    if src.offload:
        packets: list[bytes] = []
        reads = src.read_offload_packets(_BATCH, packets)
    else:
        packets = src.read_packets(_BATCH)
        reads = len(packets)
    if packets:
        if not dst.offload:
            dst.write_packets(packets, validated=True)
        elif coalesce:
            dst.write_coalesced(packets)
        else:
            dst.write_offload_packets(packets)
    return len(packets), reads


def _relay(pair: TunPair, stop: threading.Event, totals: list[int], cpu: list[float]) -> None:
    poll = select.poll()
    fa, fb = pair.a.fileno(), pair.b.fileno()
    poll.register(fa, select.POLLIN)
    poll.register(fb, select.POLLIN)
    t0 = time.thread_time()
    while not stop.is_set():
        for fd, _ in poll.poll(50):
            if fd == fa:
                n, r = _move(pair.a, pair.b, pair.coalesce)
                totals[0] += n
                totals[1] += r
            else:
                n, r = _move(pair.b, pair.a, pair.coalesce)
                totals[2] += n
                totals[3] += r
    cpu.append(time.thread_time() - t0)


def transfer(
    pair: TunPair,
    nbytes: int,
    *,
    reverse: bool = False,
    seed: int = 0,
    timeout: float = 60.0,
    relay: bool = True,
) -> TransferResult:
    """Send ``nbytes`` of seeded data over TCP from ``a`` to ``b`` (``reverse``: from ``b`` to ``a``) through the
    relay; return whether they arrived byte-identical and what the relay spent.

    ``relay=False``: the caller moves the packets itself (e.g. through two `PacketTunnelFlow` objects); the
    relay figures are then 0. Blocking: run it in a thread from trio.
    """
    sender_ns, receiver_ns = (pair.netns_b, pair.netns_a) if reverse else (pair.netns_a, pair.netns_b)
    receiver_addr = ADDR_A if reverse else ADDR_B
    rng = random.Random(seed)
    block = rng.randbytes(1 << 16)
    chunks = [block[i:] + block[:i] for i in range(0, 1 << 16, 4099)]
    listener = socket_in_netns(receiver_ns, socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((receiver_addr, PORT))
    listener.listen(1)
    listener.settimeout(timeout)
    client = socket_in_netns(sender_ns, socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(timeout)
    stop = threading.Event()
    totals = [0, 0, 0, 0]
    cpu: list[float] = []
    mover = threading.Thread(target=_relay, args=(pair, stop, totals, cpu), daemon=True)
    sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
    received = [0]
    sa, sb = pair.a.statistics(), pair.b.statistics()

    def receive() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(timeout)
            buf = bytearray(1 << 18)
            view = memoryview(buf)
            while received[0] < nbytes:
                k = conn.recv_into(buf)
                if not k:
                    break
                got_hash.update(view[:k])
                received[0] += k

    if relay:
        mover.start()
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    try:
        start = time.perf_counter()
        client.connect((receiver_addr, PORT))
        left, i = nbytes, 0
        while left > 0:
            chunk = chunks[i % len(chunks)][: min(left, 1 << 16)]
            client.sendall(chunk)
            sent_hash.update(chunk)
            left -= len(chunk)
            i += 1
        receiver.join(timeout)
        seconds = time.perf_counter() - start
    finally:
        client.close()
        listener.close()
        stop.set()
        if relay:
            mover.join(5)
    packets, reads = (totals[2], totals[3]) if reverse else (totals[0], totals[1])
    dst = pair.a if reverse else pair.b
    before = sa if reverse else sb
    after = dst.statistics()
    writes = (
        (after.packets_written - before.packets_written)
        - (after.segments_written - before.segments_written)
        + (after.super_packets_written - before.super_packets_written)
    )
    return TransferResult(
        nbytes=received[0],
        identical=received[0] == nbytes and sent_hash.digest() == got_hash.digest(),
        seconds=seconds,
        relay_cpu=cpu[0] if cpu else 0.0,
        packets=packets,
        reads=reads,
        writes=writes,
        stats_a=pair.a.statistics(),
        stats_b=pair.b.statistics(),
    )


#: `main`'s cases: (label, read_offload of a's TUN; "off": no vnet header on either side)
MODES: tuple[tuple[str, int | None], ...] = (("off", None), ("gro", 0), ("tso", TUN_F_ALL))


def main(argv: list[str] | None = None) -> int:
    """Print the relay's CPU per packet and the throughput for each of `MODES`, upload and download."""
    args = sys.argv[1:] if argv is None else argv
    nbytes = int(float(args[0]) * 1e6) if args else 100_000_000
    reps = int(args[1]) if len(args) > 1 else 3
    print(f"{nbytes / 1e6:.0f} MB per transfer, best of {reps} by relay CPU per packet (data direction)")
    for label, flags in MODES:
        for reverse in (False, True):
            results = []
            for rep in range(reps):
                with tun_pair(label != "off", False, read_offload=flags) as pair:
                    res = transfer(pair, nbytes, reverse=reverse, seed=rep)
                if not res.identical:
                    raise SystemExit(f"{label}: the data differed")
                results.append(res)
            best = min(results, key=lambda r: r.relay_us_per_packet)
            way = "download b->a" if reverse else "upload a->b"
            print(
                f"{label:4s} {way:14s} {best.relay_us_per_packet:6.2f} us/packet  {best.gbit_per_s:5.2f} Gbit/s  "
                f"packets {best.packets}  reads {best.reads}  writes {best.writes}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
