"""ns per packet to parse a seeded IPv4/IPv6 TCP/UDP/ICMP mix and read its 5-tuple: netsim vs scapy.

Run: ``python -m netsim.bench.bench_packet [--quick] [--json FILE]``. Each case runs in a fresh interpreter.
Cases, at 64, 576 and 1400-byte packets:

* ``netsim load+5tuple``: one reused `PacketView`, ``load_untrusted`` then ``five_tuple()`` (the hot path).
* ``netsim load+5tuple mv``: the same over memoryview slices of one bytearray pool (what a TUN batch read gives).
* ``netsim parse_untrusted``: a new view per packet.
* ``scapy dissect``: ``IP(raw)`` / ``IPv6(raw)`` and the same 5-tuple read from the layers, on a smaller sample.
* ``loop baseline``: the bare ``for`` loop over the corpus (included in every number above).
* ``checksum full`` / ``NAT rewrite src+port/id``: `internet_checksum` over each packet, and an in-place source
  address plus port (or ICMP id) rewrite with incremental checksum updates (no target; for the NAT's budget).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from netsim.bench._common import Result, measure, parse_args, report, rng, run_isolated, write_json

SIZES = (64, 576, 1400)
TARGET_NS = 1000.0
TARGET_RATIO = 100.0


def corpus(size: int, count: int, seed: int) -> list[bytes]:
    """``count`` packets of exactly ``size`` bytes: a seeded even mix of v4/v6 x TCP/UDP/ICMP echo."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.packet import Raw

    r = rng(seed)
    out: list[bytes] = []
    for i in range(count):
        v6 = r.random() < 0.5
        kind = i % 3
        ip: Any
        if v6:
            ip = IPv6(src=f"2001:db8::{r.randrange(1, 0xFFFF):x}", dst=f"fd00::{r.randrange(1, 0xFFFF):x}")
        else:
            ip = IP(src=f"10.0.{r.randrange(256)}.{r.randrange(1, 255)}", dst=f"192.0.2.{r.randrange(1, 255)}")
        if kind == 0:
            l4: Any = TCP(sport=r.randrange(1024, 65536), dport=r.choice([80, 443, 22]), flags="PA")
        elif kind == 1:
            l4 = UDP(sport=r.randrange(1024, 65536), dport=r.choice([53, 443, 51820]))
        else:
            l4 = ICMPv6EchoRequest(id=r.randrange(65536)) if v6 else ICMP(type=8, id=r.randrange(65536))
        head = len(bytes(ip / l4))
        pkt = bytes(ip / l4 / Raw(bytes(r.randrange(256) for _ in range(size - head))))
        assert len(pkt) == size
        out.append(pkt)
    return out


def case_netsim(size: int, count: int, reps: int, seed: int, variant: str) -> dict[str, Any]:
    from netsim.core.packet import PacketView

    packets: list[Any] = corpus(size, count, seed)
    if variant == "mv":
        pool = bytearray(b"".join(packets))
        mv = memoryview(pool)
        packets = [mv[i * size : (i + 1) * size] for i in range(count)]
    view = PacketView()
    load = view.load_untrusted
    five = view.five_tuple
    parse = PacketView.parse_untrusted

    def run_reused() -> None:
        for p in packets:
            load(p)
            five()

    def run_new() -> None:
        for p in packets:
            parse(p).five_tuple()

    def run_loop() -> None:
        for _p in packets:
            pass

    fn, name = {
        "bytes": (run_reused, "netsim load+5tuple"),
        "mv": (run_reused, "netsim load+5tuple mv"),
        "new": (run_new, "netsim parse_untrusted"),
        "loop": (run_loop, "loop baseline"),
    }[variant]
    return measure(f"{name} {size}B", fn, items=count, reps=reps, params={"size": size, "seed": seed}).as_dict()


def case_checksum(size: int, count: int, reps: int, seed: int, variant: str) -> dict[str, Any]:
    """NAT-side costs on the same corpus: a full RFC 1071 checksum, or an address + port/id rewrite (RFC 1624)."""
    from netsim.core.checksum import internet_checksum, rewrite_address, rewrite_icmp_id, rewrite_port
    from netsim.core.packet import PacketView

    packets = [bytearray(p) for p in corpus(size, count, seed)]
    views = [PacketView.parse_untrusted(p) for p in packets]
    new4, new6 = bytes([100, 64, 0, 1]), bytes(15) + b"\x01"

    def run_full() -> None:
        for p in packets:
            internet_checksum(p)

    def run_rewrite() -> None:
        for v in views:
            rewrite_address(v, new4 if v.version == 4 else new6, source=True)
            if v.sport:
                rewrite_port(v, 40000, source=True)
            else:
                rewrite_icmp_id(v, 40000)

    fn, name = {"full": (run_full, "checksum full"), "rewrite": (run_rewrite, "NAT rewrite src+port/id")}[variant]
    return measure(f"{name} {size}B", fn, items=count, reps=reps, params={"size": size, "seed": seed}).as_dict()


def case_scapy(size: int, count: int, reps: int, seed: int) -> dict[str, Any]:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    packets = corpus(size, count, seed)

    def run() -> None:
        for p in packets:
            if p[0] >> 4 == 4:
                pkt: Any = IP(p)
                proto = pkt.proto
            else:
                pkt = IPv6(p)
                proto = pkt.nh
            l4 = pkt.payload
            (pkt.version, proto, pkt.src, pkt.dst, getattr(l4, "sport", 0), getattr(l4, "dport", 0))

    return measure(f"scapy dissect {size}B", run, items=count, reps=reps, params={"size": size}).as_dict()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    count, scapy_count, reps = (500, 50, 5) if args.quick else (3000, 200, 25)
    results: list[Result] = []
    summary: dict[str, Any] = {}
    for size in SIZES:
        ours = {
            v: run_isolated(
                "netsim.bench.bench_packet", "case_netsim", size=size, count=count, reps=reps, seed=args.seed, variant=v
            )
            for v in ("bytes", "mv", "new", "loop")
        }
        theirs = run_isolated(
            "netsim.bench.bench_packet", "case_scapy", size=size, count=scapy_count, reps=5, seed=args.seed
        )
        extra = [
            run_isolated(
                "netsim.bench.bench_packet",
                "case_checksum",
                size=size,
                count=count,
                reps=reps,
                seed=args.seed,
                variant=v,
            )
            for v in ("full", "rewrite")
        ]
        results += [*ours.values(), theirs, *extra]
        summary[f"{size}B"] = {
            "netsim_ns_median": ours["bytes"].ns_median,
            "netsim_ns_best": ours["bytes"].ns_min,
            "scapy_ns_median": theirs.ns_median,
            "scapy_ns_best": theirs.ns_min,
            "ratio_median": theirs.ns_median / ours["bytes"].ns_median,
            "ratio_best": theirs.ns_min / ours["bytes"].ns_min,
        }
    report(results)
    print(f"\nload average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for label, s in summary.items():
        met = s["netsim_ns_median"] <= TARGET_NS and s["ratio_median"] >= TARGET_RATIO
        print(
            f"{label:>6}: netsim {s['netsim_ns_median']:.0f} ns/pkt (best {s['netsim_ns_best']:.0f}), "
            f"scapy {s['scapy_ns_median']:.0f} (best {s['scapy_ns_best']:.0f}), "
            f"scapy/netsim {s['ratio_median']:.0f}x  "
            f"[{'meets' if met else 'MISSES'} <= {TARGET_NS:.0f} ns and >= {TARGET_RATIO:.0f}x, CPU-time medians]"
        )
    if args.json:
        write_json(args.json, results, {"summary": summary, "targets": {"ns": TARGET_NS, "ratio": TARGET_RATIO}})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
