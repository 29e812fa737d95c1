"""Shared micro-benchmark harness: fresh processes, warm-up, repetitions, seeded corpora, JSON with machine details.

How a benchmark uses it (see ``bench_packet.py``)::

    from netsim.bench._common import Result, measure, run_isolated, report, write_json, parse_args

    def case_parse(size: int, reps: int) -> dict:          # module-level, JSON-able kwargs, returns a dict
        corpus = seeded_corpus(...)                         # build inputs with `rng(seed)`, outside the timing
        def run() -> None:                                  # one pass over the corpus
            for p in corpus: ...
        return measure("parse", run, items=len(corpus), reps=reps).as_dict()

    results = [run_isolated("netsim.bench.bench_packet", "case_parse", size=64, reps=7)]
    report(results); write_json(path, results)

* `run_isolated` runs one case in a fresh interpreter (``python -c``), so imports, caches and the allocator
  state of one case never flatter another, and returns its `Result`.
* `measure` runs ``warmup`` untimed passes, then ``reps`` (>= 5) timed passes, and reports the median, min and
  max ns per item of CPU time (`time.process_time_ns`: time spent waiting for a core on a shared machine is
  not the code's cost), items/s from that median, and the wall-clock median alongside.
* `machine_info` (put into every JSON file by `write_json`): Python, kernel, CPU model, core count, load
  average, UTC timestamp, git commit if the tree is a git checkout.

Caveats: this is a shared 2-core machine; CPU time still carries cache and frequency effects of neighbours, so
look at the min/max spread. Numbers are per item for a whole pass over a corpus, so they include the Python
loop overhead a real caller also pays.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Result",
    "child_env",
    "machine_info",
    "measure",
    "parse_args",
    "report",
    "rng",
    "run_isolated",
    "write_json",
]

MIN_REPS = 5
_ROOT = Path(__file__).resolve().parents[2]  # the directory netsim is imported from


@dataclass(frozen=True)
class Result:
    """One measured case. ``ns_*`` are nanoseconds per item; ``items_per_s`` follows the median."""

    name: str
    items: int
    reps: int
    ns_median: float
    ns_min: float
    ns_max: float
    items_per_s: float
    params: dict[str, Any] = field(default_factory=dict)
    wall_ns_median: float = 0.0  # 0 when the benchmark did not record wall time
    clock: str = ""  # "cpu" when ``ns_*`` are CPU time (what `measure` records); "" = as the benchmark says

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        return cls(**d)


def rng(seed: int) -> random.Random:
    """A private seeded RNG for corpora (never the global one, so cases stay reproducible)."""
    return random.Random(seed)


def measure(
    name: str,
    run: Callable[[], object],
    *,
    items: int,
    reps: int = 7,
    warmup: int = 1,
    params: dict[str, Any] | None = None,
) -> Result:
    """Time ``run`` (one pass over ``items`` items) ``reps`` times after ``warmup`` untimed passes.

    The per-item figures use this process's CPU time (``time.process_time_ns``), which leaves out the time the
    process waited for a core on a shared machine; the wall-clock median is kept alongside.
    """
    if reps < MIN_REPS:
        raise ValueError(f"reps must be >= {MIN_REPS}, got {reps}")
    for _ in range(warmup):
        run()
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(reps):
        w0 = time.perf_counter_ns()
        c0 = time.process_time_ns()
        run()
        c1 = time.process_time_ns()
        w1 = time.perf_counter_ns()
        cpu.append((c1 - c0) / items)
        wall.append((w1 - w0) / items)
    med = statistics.median(cpu)
    return Result(
        name,
        items,
        reps,
        med,
        min(cpu),
        max(cpu),
        1e9 / med,
        dict(params or {}),
        wall_ns_median=statistics.median(wall),
        clock="cpu",
    )


def child_env() -> dict[str, str]:
    """The environment of a benchmark's child process: this interpreter's ``sys.path`` as ``PYTHONPATH``, so a
    user's ``--provider`` module importable here (e.g. from the current directory) imports there too."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def run_isolated(module: str, function: str, **kwargs: Any) -> Result:
    """Run ``module.function(**kwargs)`` in a fresh interpreter; it must return `Result.as_dict()`."""
    code = (
        "import json, sys, importlib\n"
        f"fn = getattr(importlib.import_module({module!r}), {function!r})\n"
        "sys.stdout.write('\\nRESULT ' + json.dumps(fn(**json.loads(sys.argv[1]))) + '\\n')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        cwd=_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {module}.{function}({kwargs}) failed:\n{proc.stderr}")
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT "))
    return Result.from_dict(json.loads(line[len("RESULT ") :]))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, check=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def write_json(path: str | Path, results: Sequence[Result], extra: dict[str, Any] | None = None) -> None:
    """Write results plus `machine_info` (and any ``extra`` summary) as JSON."""
    doc = {"machine": machine_info(), "results": [r.as_dict() for r in results], **(extra or {})}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def report(results: Sequence[Result]) -> None:
    """Print a plain table of the results."""
    print(f"{'case':<36} {'items':>6} {'median ns':>10} {'min ns':>9} {'max ns':>9} {'items/s':>11} {'wall ns':>9}")
    for r in results:
        print(
            f"{r.name:<36} {r.items:>6} {r.ns_median:>10.0f} {r.ns_min:>9.0f} {r.ns_max:>9.0f} "
            f"{r.items_per_s:>11,.0f} {f'{r.wall_ns_median:.0f}' if r.wall_ns_median else '-':>9}"
        )
    print("(`measure` cases: ns per item of CPU time; 'wall ns' is the wall-clock median, inflated when cores")
    print(" are shared)")


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The common command line: ``--quick`` (smaller corpora, fewer reps) and ``--json FILE``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller corpora and 5 repetitions")
    parser.add_argument("--json", metavar="FILE", help="also write results and machine details as JSON")
    parser.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    return parser.parse_args(argv)
