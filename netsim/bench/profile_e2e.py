"""Profile the processes of one end-to-end path under load with py-spy: where a packet's time goes.

    python -m netsim.bench.profile_e2e --path netsim-loop [--size 64] [--seconds 8] [--out DIR]

Brings up a lab, starts the path exactly as `netsim.bench.bench_e2e` does, drives it with ``udpload blast`` and
samples each Python process of the path with ``py-spy record --format raw`` (collapsed stacks; 200 Hz, native
frames off, GIL-idle samples dropped). Writes ``<proc>.txt`` (the stacks, for flame graphs) and prints, per
process, the functions with the most *self* samples and the largest *inclusive* shares. py-spy is a sampling
profiler, so the loop runs at (nearly) full speed while it is watched. Needs root and ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

__all__ = ["summarize"]


def summarize(raw: str, top: int = 12) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed-stack output."""
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
    if not total:
        return "  (no samples)"
    out = [f"  {total} samples", "  self:"]
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in self_c.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top + 8)]
    return "\n".join(out)


async def _main(path: str, size: int, seconds: float, out: Path, strace: bool) -> None:
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
                    await _strace(run, setup, procs, size, seconds, out / path)
                    return
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
                for name in procs:
                    f = out / f"{path}-{name}.txt"
                    print(f"\n{path} {name}:")
                    print(summarize(f.read_text()) if f.exists() else "  (py-spy wrote nothing)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _strace(run: Any, setup: Any, procs: dict[str, int], size: int, seconds: float, out: Path) -> None:
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
    for name in procs:
        print(f"\n{name}: syscalls per packet ({packets} packets)")
        text = await trio.Path(f"{out}-{name}.strace").read_text()
        for line in text.splitlines()[2:]:
            cols = line.split()
            if len(cols) >= 5 and cols[3].isdigit():
                print(f"  {cols[-1]:<16} {int(cols[3]) / packets:8.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--path", default="netsim-loop")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default="netsim-profiles")
    parser.add_argument("--strace", action="store_true", help="count syscalls per packet instead of sampling")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trio.run(_main, args.path, args.size, args.seconds, out, args.strace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
