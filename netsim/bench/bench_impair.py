"""What an impaired link costs: UDP packets per second through ``isp``'s ``wan``, with and without the impairer.

    sudo python -m netsim.bench.bench_impair [--seconds 2] [--reps 3] [--json FILE]

One lab (no services). A sender process in ``mac`` sends 64-byte UDP datagrams as fast as it can for
``--seconds`` to a receiver process in ``inet``, through the home router, whose WAN egress is, in turn:

* ``none``: not queued at all (the kernel forwarding alone);
* ``identity``: queued to the impairer with `Impairment()` (every packet accepted at once): the NFQUEUE round
  trip and the Python loop, which is what every impairment costs;
* ``loss10``: ``Impairment(loss=0.1)``, for the cost of a drop verdict.

Each case reports, best of ``--reps`` (by received pps): packets sent and received per second, the impairer's own
counters (``kernel_dropped``: what the kernel dropped because the impairer's queue was full, i.e. the offered load
beyond its capacity), and the impairer's CPU seconds. The one-way delay the impairer adds is in
docs/impairment.md (tests/lab/test_impairment_lab.py's figures).

Caveats: a shared 2-core machine; the sender, the kernel's forwarding, the impairer and the receiver compete for
the same cores, so the impairer's pps is a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
payload = bytes(64)
end = time.monotonic() + float(sys.argv[3])
n = 0
while time.monotonic() < end:
    for _ in range(64):
        try:
            s.send(payload)
            n += 1
        except OSError:  # ENOBUFS: not sent, not counted
            pass
print(n)
"""
_RECEIVER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(float(sys.argv[3]) + 10)
s.recv(2048)
first = last = time.monotonic()
n = 1
s.settimeout(1.0)
try:
    while True:
        s.recv(2048)
        n += 1
        last = time.monotonic()
except TimeoutError:
    pass
print(n, last - first)
"""
PORT = 9100


def _cpu_seconds(pid: int) -> float:
    import os

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _one(lab: Any, spec: Any, seconds: float) -> dict[str, Any]:
    import trio

    from netsim.lab.impair import Impairer

    dst = str(lab.addr.www_v4)
    rx = lab.spawn("inet", [sys.executable, "-c", _RECEIVER, dst, str(PORT), str(seconds)], name="bench-rx")
    await rx.wait_output("ready", timeout=30)
    impairer = None
    if spec is not None:
        impairer = await trio.to_thread.run_sync(
            Impairer(lab.netns("isp"), "wan", "egress", spec, protocol="udp", port=PORT).start
        )
    sent = await lab.run("mac", [sys.executable, "-c", _SENDER, dst, str(PORT), str(seconds)], timeout=seconds + 60)
    await rx.wait(timeout=30)
    received, span = rx.stdout().split()[1:3]
    record: dict[str, Any] = {
        "sent_pps": int(sent.stdout.split()[0]) / seconds,
        "received_pps": int(received) / max(float(span), 1e-9),
        "received": int(received),
    }
    if impairer is not None:
        assert impairer.pid is not None
        record["impairer_cpu_s"] = _cpu_seconds(impairer.pid)
        stats = await trio.to_thread.run_sync(impairer.stop)
        record["impairer"] = {**stats.model.to_dict(), "kernel_dropped": stats.kernel_dropped}
    return record


def run(seconds: float = 2.0, reps: int = 3) -> dict[str, Any]:
    """Bring up a lab and measure every case; returns ``{"cases": {name: best record}, "machine": ...}``."""
    import trio

    from netsim.bench._common import machine_info
    from netsim.core.impairment import Impairment
    from netsim.lab.lab import Lab

    cases = {"none": None, "identity": Impairment(), "loss10": Impairment(loss=0.1, seed=1)}
    out: dict[str, Any] = {}

    async def main() -> None:
        async with Lab(services=False) as lab:
            for name, spec in cases.items():
                runs = [await _one(lab, spec, seconds) for _ in range(reps)]
                best = max(runs, key=lambda r: r["received_pps"])
                out[name] = {**best, "runs_received_pps": [round(r["received_pps"]) for r in runs]}

    trio.run(main)
    return {"cases": out, "seconds": seconds, "reps": reps, "machine": machine_info()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netsim.bench.bench_impair", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not (0 < args.seconds <= 30 and 1 <= args.reps <= 10):
        parser.error("--seconds 0-30, --reps 1-10")
    result = run(args.seconds, args.reps)
    for name, rec in result["cases"].items():
        extra = ""
        if "impairer" in rec:
            extra = f"  impairer cpu {rec['impairer_cpu_s']:.2f} s, kernel_dropped {rec['impairer']['kernel_dropped']}"
        print(f"{name:9s} sent {rec['sent_pps']:9.0f} pkt/s  received {rec['received_pps']:9.0f} pkt/s{extra}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
