"""Micro-benchmark: WireGuard encapsulate + decapsulate per packet vs the raw AEAD calls on the same sizes.

    python -m netsim.bench.bench_wireguard [--quick] [--json results.json]

For each inner size (64, 576, 1400 bytes) it measures, in the same process and run:

* ``aead``: ``ChaCha20Poly1305.encrypt`` + ``.decrypt`` of the padded packet in a tight loop over one buffer
  (the floor any Python WireGuard pays);
* ``aead-batch``: the same two calls shaped as a batch must make them (`bench_aead_batch`: 64 distinct
  datagram buffers, 64 plaintexts kept alive until the batch is handed over);
* ``wireguard``: `WireGuardDevice.encapsulate` of a 64-packet batch into reused buffers plus
  ``receive_datagrams_untrusted`` of the 64 datagrams on the peer (replay window, AllowedIPs source check, inner
  length trim, counters) and ``take_received``. The timed loop also builds the 64 datagram memoryviews the
  receiver is given, as the helper does (about 85 ns per packet of caller code, counted as overhead);
* ``protocol-only``: ``wireguard`` with both AEAD objects replaced by a no-op Python stub (`NullAead`, whose two
  Python-level calls are somewhat slower than the C calls they replace).

``overhead = wireguard - aead`` is the protocol's own cost as the issue defines it; the target is <= 1 us per
packet. ``overhead-vs-batch = wireguard - aead-batch`` separates protocol code from the batch's memory shape.
Each figure is the best of ``--repeat`` timed rounds after a warm-up (the median is reported too): on a shared
machine the best is the least noisy estimate of the code's cost.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import time
from ipaddress import ip_network

from cryptography import __version__ as cryptography_version
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from netsim.bench._common import Result, report, write_json
from netsim.core.wireguard import PeerConfig, PrivateKey, Timers, WireGuardDevice
from netsim.core.wireguard.config import Endpoint

SIZES = (64, 576, 1400)
BATCH = 64


def _packet(size: int) -> bytes:
    return struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0, bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
    ) + bytes(size - 20)


def _pair() -> tuple[WireGuardDevice, WireGuardDevice]:
    rng = random.Random(1)
    ka, kb = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
    timers = Timers(rekey_after_time=1e12, reject_after_time=1e12, keepalive_timeout=1e12)
    a = WireGuardDevice(
        ka,
        [PeerConfig(kb.public_key(), endpoint=Endpoint("192.0.2.2", 51820), allowed_ips=(ip_network("10.9.0.2/32"),))],
        timers=timers,
        rng=random.Random(2),
    )
    b = WireGuardDevice(
        kb, [PeerConfig(ka.public_key(), allowed_ips=(ip_network("10.9.0.1/32"),))], timers=timers, rng=random.Random(3)
    )
    a.initiate(a.peers[0], 0.0)
    for _ in range(3):
        for d, _ in a.datagrams_to_send(0.0):
            b.receive_datagram_untrusted(d, ("192.0.2.1", 40000), 0.0)
        for d, _ in b.datagrams_to_send(0.0):
            a.receive_datagram_untrusted(d, ("192.0.2.2", 51820), 0.0)
    b.take_received()
    assert a.peers[0].current is not None and b.peers[0].current is not None
    return a, b


def bench_aead(size: int, rounds: int) -> float:
    """ns per packet for one encrypt + one decrypt of the padded packet."""
    aead = ChaCha20Poly1305(bytes(32))
    data = _packet((size + 15) & ~15)
    nonces = [struct.pack("<4xQ", i) for i in range(BATCH)]
    enc, dec = aead.encrypt, aead.decrypt
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        for n in nonces:
            dec(n, enc(n, data, None), None)
    return (time.perf_counter_ns() - t0) / (rounds * BATCH)


def bench_aead_batch(size: int, rounds: int) -> float:
    """ns per packet for the AEAD calls shaped as a batched tunnel must make them, and nothing else.

    ``encrypt_into`` each of 64 packets into its own datagram buffer, then ``decrypt`` each ciphertext from a
    memoryview of that buffer, keeping the 64 plaintexts alive until the batch is done (they are what
    ``take_received`` hands over). Compared with `bench_aead` (one buffer, hot in L1, freed at once) this
    shows how much of ``overhead`` is the memory shape of a batch rather than protocol code.
    """
    aead = ChaCha20Poly1305(bytes(32))
    padded = (size + 15) & ~15
    data = _packet(padded)
    nonces = [struct.pack("<4xQ", i) for i in range(BATCH)]
    bufs = [memoryview(bytearray(size + 64)) for _ in range(BATCH)]
    outs = [v[16 : padded + 32] for v in bufs]
    pairs = list(zip(nonces, outs, strict=True))
    enc, dec = aead.encrypt_into, aead.decrypt
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        for n, out in pairs:
            enc(n, data, None, out)
        kept = [dec(n, out, None) for n, out in pairs]
        del kept
    return (time.perf_counter_ns() - t0) / (rounds * BATCH)


def bench_wireguard(size: int, rounds: int, a: WireGuardDevice, b: WireGuardDevice) -> float:
    """ns per packet for encapsulate (batched) + receive_datagram_untrusted + take_received."""
    pkts = [_packet(size)] * BATCH
    bufs = [bytearray(size + 64) for _ in range(BATCH)]
    views = [memoryview(x) for x in bufs]
    sizes = [0] * BATCH
    addrs: list[object] = [None] * BATCH
    src = ("192.0.2.1", 40000)
    srcs = [src] * BATCH
    encap, recv, take = a.encapsulate, b.receive_datagrams_untrusted, b.take_received
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        encap(pkts, 1.0, views, sizes, addrs)  # type: ignore[arg-type]
        recv([views[i][: sizes[i]] for i in range(BATCH)], srcs, 1.0)
        take()
    elapsed = time.perf_counter_ns() - t0
    assert b.statistics().dropped == 0
    return elapsed / (rounds * BATCH)


class NullAead:
    """Stands in for ChaCha20Poly1305 to time the protocol code alone (same call shapes, no cryptography)."""

    def __init__(self, plaintext: bytes) -> None:
        self.plaintext = plaintext

    def encrypt_into(self, nonce: object, data: object, aad: object, buf: memoryview) -> int:
        return len(buf)

    def decrypt(self, nonce: object, data: object, aad: object) -> bytes:
        return self.plaintext


def bench_protocol_only(size: int, rounds: int) -> float:
    """ns per packet of encapsulate + receive with the AEAD calls replaced by `NullAead` (pure overhead)."""
    a, b = _pair()
    plain = _packet(size) + bytes(((size + 15) & ~15) - size)
    ka, kb = a.peers[0].current, b.peers[0].current
    assert ka is not None and kb is not None
    ka.send = kb.recv = NullAead(plain)  # type: ignore[assignment]
    return bench_wireguard(size, rounds, a, b)


def _result(name: str, size: int, per_packet: list[float], rounds: int) -> Result:
    med = statistics.median(per_packet)
    return Result(
        name, rounds * BATCH, len(per_packet), med, min(per_packet), max(per_packet), 1e9 / med, {"size": size}
    )


def run(quick: bool, repeat: int) -> tuple[list[Result], list[dict[str, float]]]:
    """All sizes in one process, the three measurements interleaved round by round.

    Unlike the other benchmarks this does not use `run_isolated` per case: the point is a *ratio* between the
    AEAD call and the protocol on the same machine state, and on a shared machine whose load changes by the
    second, interleaving in one process compares like with like far better than separate processes do.
    """
    rounds = 10 if quick else 30
    a, b = _pair()
    results: list[Result] = []
    summary: list[dict[str, float]] = []
    for size in SIZES:
        bench_aead(size, 5)
        bench_wireguard(size, 5, a, b)
        raw: list[float] = []
        shaped: list[float] = []
        wg: list[float] = []
        proto: list[float] = []
        # many short rounds so the best filters out preemption
        for _ in range(repeat):
            raw.append(bench_aead(size, rounds))
            shaped.append(bench_aead_batch(size, rounds))
            wg.append(bench_wireguard(size, rounds, a, b))
            proto.append(bench_protocol_only(size, rounds))
        results += [
            _result(f"aead encrypt+decrypt {size}B", size, raw, rounds),
            _result(f"aead batch-shaped {size}B", size, shaped, rounds),
            _result(f"wireguard encap+decap {size}B", size, wg, rounds),
            _result(f"protocol only (no-op AEAD) {size}B", size, proto, rounds),
        ]
        summary.append(
            {
                "size": size,
                "aead_ns_best": min(raw),
                "aead_batch_ns_best": min(shaped),
                "wireguard_ns_best": min(wg),
                "overhead_ns_best": min(wg) - min(raw),
                "overhead_ns_median": statistics.median(wg) - statistics.median(raw),
                "ratio_best": min(wg) / min(raw),
                "overhead_vs_batch_aead_ns_best": min(wg) - min(shaped),
                "protocol_only_ns_best": min(proto),
            }
        )
    return results, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run, noisier numbers)")
    parser.add_argument("--repeat", type=int, default=60, help="timed rounds per figure (best and median kept)")
    parser.add_argument("--json", metavar="FILE", help="also write the results and machine details as JSON")
    args = parser.parse_args(argv)
    repeat = 5 if args.quick else args.repeat
    load = os.getloadavg()[0]
    results, summary = run(args.quick, repeat)
    report(results)
    print(f"\nload average before: {load:.2f} on {os.cpu_count()} cpus; best of {repeat} rounds, ns per packet")
    print(
        f"{'size':>6} {'aead':>9} {'wireguard':>10} {'overhead':>9} {'ratio':>6} {'protocol-only':>14} "
        f"{'aead-batch':>11} {'overhead-vs-batch':>18}"
    )
    for r in summary:
        print(
            f"{r['size']:>6} {r['aead_ns_best']:>9.0f} {r['wireguard_ns_best']:>10.0f} "
            f"{r['overhead_ns_best']:>9.0f} {r['ratio_best']:>6.2f} {r['protocol_only_ns_best']:>14.0f} "
            f"{r['aead_batch_ns_best']:>11.0f} {r['overhead_vs_batch_aead_ns_best']:>18.0f}"
        )
    if args.json:
        write_json(
            args.json,
            results,
            {"benchmark": "wireguard", "batch": BATCH, "cryptography": cryptography_version, "summary": summary},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
