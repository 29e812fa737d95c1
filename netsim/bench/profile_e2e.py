"""Profile the processes of one end-to-end path under load with py-spy: where a packet's time goes.

    python -m netsim.bench.profile_e2e --path netsim-loop [--size 64] [--seconds 8] [--out DIR] [--strace]
                                       [--json FILE]

Brings up a lab, starts the path exactly as `netsim.bench.bench_e2e` does, drives it with ``udpload blast`` and
samples each Python process of the path with ``py-spy record --format raw`` (collapsed stacks; 200 Hz, native
frames off, GIL-idle samples dropped). Writes ``<proc>.txt`` (the stacks, for flame graphs) and prints, per
process, the functions with the most *self* samples and the largest *inclusive* shares. py-spy is a sampling
profiler, so the loop runs at (nearly) full speed while it is watched. Needs root and ``pip install py-spy``.
``--strace`` counts syscalls per packet instead. ``--json FILE`` writes the result as JSON (`profile`), which
``netsim bench --profile PATHS`` puts into the report's ``profiles`` (rendered in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

__all__ = ["profile", "shares", "summarize"]


def shares(raw: str, top: int = 12) -> dict[str, Any]:
    """``{"samples", "self", "inclusive"}`` from py-spy's collapsed-stack output: the ``top`` functions by self
    samples and the ``top + 8`` by inclusive samples, each as ``[function (file), share of all samples]``."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
            for f in stack.split(";")
        ]
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return {
        "samples": total,
        "self": [[f, n / total] for f, n in self_c.most_common(top)] if total else [],
        "inclusive": [[f, n / total] for f, n in incl.most_common(top + 8)] if total else [],
    }


def summarize(raw: str, top: int = 12) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed-stack output, as text."""
    got = shares(raw, top)
    if not got["samples"]:
        return "  (no samples)"
    out = [f"  {got['samples']} samples", "  self:"]
    out += [f"    {100 * share:5.1f}%  {f}" for f, share in got["self"]]
    out.append("  inclusive:")
    out += [f"    {100 * share:5.1f}%  {f}" for f, share in got["inclusive"]]
    return "\n".join(out)


async def _main(path: str, size: int, seconds: float, out: Path, strace: bool) -> dict[str, Any]:
    from netsim.bench.bench_e2e import E2E, build_tools
    from netsim.lab.lab import Lab

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    tools = build_tools()
    work = Path(tempfile.mkdtemp(prefix="netsim-bench-"))
    try:
        async with Lab() as lab:
            run = E2E(lab, tools, False, work)
            async with run.path_context(path) as setup:
                await run.blast(setup.udp_dst, size, 0.5)
                procs = {k: v for k, v in setup.procs.items() if k in ("provider", "helper")}
                if strace:
                    per = await _strace(run, setup, procs, size, seconds, out / path)
                    return {"tool": "strace", "processes": per}
                spies = {
                    name: await trio.lowlevel.open_process(
                        [
                            pyspy,
                            "record",
                            "--pid",
                            str(pid),
                            "--duration",
                            str(int(seconds)),
                            "--rate",
                            "200",
                            "--format",
                            "raw",
                            "--output",
                            str(out / f"{path}-{name}.txt"),
                            "--nonblocking",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for name, pid in procs.items()
                }
                result = await run.blast(setup.udp_dst, size, seconds + 1)
                for spy in spies.values():
                    await spy.wait()
                print(f"{path} {size}B under py-spy: {result}")
                found: dict[str, Any] = {}
                for name in procs:
                    f = out / f"{path}-{name}.txt"
                    print(f"\n{path} {name}:")
                    print(summarize(f.read_text()) if f.exists() else "  (py-spy wrote nothing)")
                    found[name] = shares(f.read_text()) if f.exists() else {"samples": 0, "self": [], "inclusive": []}
                return {"tool": "py-spy", "blast": result, "processes": found}
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _strace(
    run: Any, setup: Any, procs: dict[str, int], size: int, seconds: float, out: Path
) -> dict[str, dict[str, Any]]:
    """Syscalls per packet of each process (``strace -c -f``): slows the loop, but the counts are what matter."""
    tracers = {
        name: await trio.lowlevel.open_process(
            ["strace", "-c", "-f", "-o", f"{out}-{name}.strace", "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in procs.items()
    }
    await trio.sleep(0.5)
    result = await run.blast(setup.udp_dst, size, seconds)
    for t in tracers.values():
        t.send_signal(signal.SIGINT)
        await t.wait()
    packets = result["received"]
    print(f"blast under strace: {result}")
    found: dict[str, dict[str, Any]] = {}
    for name in procs:
        print(f"\n{name}: syscalls per packet ({packets} packets)")
        text = await trio.Path(f"{out}-{name}.strace").read_text()
        per: dict[str, float] = {}
        for line in text.splitlines()[2:]:
            cols = line.split()
            if len(cols) >= 5 and cols[3].isdigit() and cols[-1] != "total":
                per[cols[-1]] = int(cols[3]) / packets if packets else float("nan")
                print(f"  {cols[-1]:<16} {per[cols[-1]]:8.3f}")
        found[name] = {"packets": packets, "syscalls_per_packet": per}
    return found


def profile(
    path: str, size: int = 64, seconds: float = 8.0, out: Path | None = None, strace: bool = False
) -> dict[str, Any]:
    """Profile ``path`` under load (root): ``{"path", "size", "seconds", "tool", "machine", "processes"}``.

    ``processes`` maps ``provider``/``helper`` to `shares` (py-spy) or to ``{"packets", "syscalls_per_packet"}``
    (``strace``). The raw files go to ``out`` (a temporary directory when None).
    """
    from netsim.bench._common import machine_info

    with tempfile.TemporaryDirectory(prefix="netsim-profile-") as tmp:
        where = Path(out) if out is not None else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        got = trio.run(_main, path, size, seconds, where, strace)
    return {"path": path, "size": size, "seconds": seconds, "machine": machine_info(), **got}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--path", default="netsim-loop")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default="netsim-profiles")
    parser.add_argument("--strace", action="store_true", help="count syscalls per packet instead of sampling")
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON (what netsim bench --profile reads)")
    args = parser.parse_args(argv)
    got = profile(args.path, args.size, args.seconds, Path(args.out), args.strace)
    if args.json:
        Path(args.json).write_text(json.dumps(got, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
