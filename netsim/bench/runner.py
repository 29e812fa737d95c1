"""The orchestrator behind ``netsim bench``: micro, loop and end-to-end cases, ratios, JSON, plot, tables.

    netsim bench [--quick] [--json FILE] [--plot FILE] [--only PATTERN] [--markdown FILE] [--list]
                 [--provider module:Class]... [--policy FILE] [--faults]
    python -m netsim.bench.runner ...            (the same, without the netsim CLI)

Every micro and loop case runs in a fresh interpreter (`netsim.bench._common.run_isolated`); the end-to-end cases
run in one child process that brings up one lab and starts fresh provider/helper processes per path
(`netsim.bench.bench_e2e`). Cases that cannot run here (no root, no wireguard-go, no compiler) are listed under
``skipped`` with the reason -- never silently left out. ``--only`` takes globs over case names (``micro/*``,
``loop/uds/*``, ``e2e/c-floor/*``; a bare word matches as a substring; commas separate alternatives); a pattern
that matches no case is an error naming the cases (`case_names`, also ``--list``).

``--provider module:Class`` runs the user's provider beside the built-in one: ``loop/provider:<Class>/b64`` next to
``loop/builtin-provider/b64`` (the in-memory tunnel, `netsim.bench.bench_loop.case_provider`) and
``e2e/provider:<Class>/...`` next to ``e2e/netsim/...`` (the lab tunnel), with ``provider:<Class> / built-in``
ratios. ``--policy FILE`` goes to the helper of those cases. Both are checked by `check_inputs` before anything
runs.

The JSON holds ``machine`` (Python, kernel, CPU, cores, load), ``results`` (one record per case, see
`netsim.bench._common.Result` and `netsim.bench.bench_e2e`), ``skipped``, and ``ratios`` measured in the same run
against the issue's targets (`TARGETS`).

``--faults`` runs the faults group instead (`netsim.bench.bench_faults`: recovery, loss and its ledger account,
en0 leaks and a download's sha256 per fault scenario, and the LD5 soak), in one child process with one lab and
one tunnel; ``--only`` picks among its cases, and its records are ``results`` with ``group`` ``"faults"``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

from netsim.bench._common import child_env, machine_info, run_isolated

__all__ = [
    "TARGETS",
    "TARGET_SPECS",
    "BenchInputs",
    "NoCaseSelected",
    "Progress",
    "TargetSpec",
    "case_names",
    "check_inputs",
    "compute_ratios",
    "evaluate_targets",
    "lever_paths",
    "lever_sides",
    "load_report",
    "publish_docs",
    "render_comparison",
    "render_docs",
    "render_markdown",
    "render_text",
    "run_bench",
    "run_profiles",
    "selector",
    "write_docs",
    "write_json",
]

ROOT = Path(__file__).resolve().parents[2]  # the directory netsim is imported from

#: Ratio label -> the minimum issue 17 sets for it (the loop ones at every size measured). `TARGET_SPECS` adds the
#: absolute ones; `evaluate_targets` gives the verdicts with the margin.
TARGETS: dict[str, float] = {
    "netsim / wireguard-go (udp64 pkt/s)": 1.0,
    "netsim / wireguard-go (tcp Gbit/s)": 1.0,
    **{f"netsim-loop / c-floor (udp{s} pkt/s)": 0.5 for s in (64, 512, 1400)},
    **{f"c-floor CPU / netsim-loop CPU per packet (udp{s})": 0.5 for s in (64, 512, 1400)},
}


@dataclass(frozen=True)
class TargetSpec:
    """One of issue 17's targets: what is measured, the bound, and where the value comes from.

    Attributes:
        name: the target as the report states it.
        op: ``">="`` (at least) or ``"<="`` (at most).
        bound: the target value, in ``unit``.
        unit: ``"x"`` for ratios, else the unit of the value (``"Gbit/s"``, ``"µs"``).
        ratio: the label in ``ratios`` the value is, or None.
        case: for an absolute target, the e2e case name the value is read from.
        field: for an absolute target: ``"gbps"`` (median), or ``"cpu:<process>"`` (µs of CPU per packet).
    """

    name: str
    op: str
    bound: float
    unit: str
    ratio: str | None = None
    case: str | None = None
    field: str | None = None


TARGET_SPECS: tuple[TargetSpec, ...] = (
    TargetSpec(
        "netsim end to end / wireguard-go, UDP 64 B pkt/s", ">=", 1.0, "x", ratio="netsim / wireguard-go (udp64 pkt/s)"
    ),
    TargetSpec(
        "netsim end to end / wireguard-go, TCP Gbit/s", ">=", 1.0, "x", ratio="netsim / wireguard-go (tcp Gbit/s)"
    ),
    TargetSpec("netsim end to end, TCP", ">=", 1.0, "Gbit/s", case="e2e/netsim/tcp", field="gbps"),
    *(
        TargetSpec(
            f"netsim loop / C floor, UDP {s} B pkt/s", ">=", 0.5, "x", ratio=f"netsim-loop / c-floor (udp{s} pkt/s)"
        )
        for s in (64, 512, 1400)
    ),
    *(
        TargetSpec(
            f"netsim loop / C floor, UDP {s} B CPU per packet (C floor CPU / netsim CPU)",
            ">=",
            0.5,
            "x",
            ratio=f"c-floor CPU / netsim-loop CPU per packet (udp{s})",
        )
        for s in (64, 512, 1400)
    ),
    TargetSpec(
        "helper CPU per packet end to end, UDP 64 B", "<=", 10.0, "µs", case="e2e/netsim/udp64", field="cpu:helper"
    ),
    TargetSpec(
        "provider CPU per packet end to end, UDP 64 B", "<=", 6.0, "µs", case="e2e/netsim/udp64", field="cpu:provider"
    ),
)

#: CPU-per-packet ratios (the load-independent view): label stem -> (path, its processes, netsim path, its processes)
_CPU_RATIOS = (
    ("c-floor CPU / netsim-loop CPU", "c-floor", ("provider", "helper"), "netsim-loop", ("provider", "helper")),
    ("naive CPU / netsim-loop CPU", "naive", ("provider", "helper"), "netsim-loop", ("provider", "helper")),
    (
        "naive-careful CPU / netsim-loop CPU",
        "naive-careful",
        ("provider", "helper"),
        "netsim-loop",
        ("provider", "helper"),
    ),
    ("wireguard-go client CPU / netsim CPU", "wireguard-go", ("wg-client",), "netsim", ("provider", "helper")),
)
#: The processes a lever can change (their CPU per packet is compared on and off).
_LEVER_PROCS = ("provider", "helper")


def selector(pattern: str | None) -> Callable[[str], bool]:
    """A predicate over case names for ``--only`` (globs; a bare word is a substring; commas = or)."""
    if not pattern:
        return lambda name: True
    pats = [p if any(c in p for c in "*?[") else f"*{p}*" for p in pattern.split(",") if p]
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in pats)


@dataclass(frozen=True)
class BenchInputs:
    """The user's code under test, checked by `check_inputs`.

    Attributes:
        providers: ``module:Class`` specs of `PacketTunnelProvider` subclasses, run beside the built-in one.
        policy: a bypass policy file (absolute path) for the helper of the loop and end-to-end cases.
    """

    providers: tuple[str, ...] = ()
    policy: str | None = None
    helper: str | None = None
    conformance: bool = False


def check_inputs(
    providers: tuple[str, ...] = (),
    policy: str | os.PathLike[str] | None = None,
    helper: str | None = None,
    conformance: bool = False,
) -> BenchInputs:
    """Check ``--provider`` specs, the ``--policy`` file and the ``--helper`` command before anything starts.

    A provider spec must import here, name a `netsim.runtime.provider.PacketTunnelProvider` subclass and be
    constructible with no arguments (how a provider host makes it); two specs may not share a class name (the
    case names would collide). The policy file must exist and parse (docs/policy.md). The helper command must
    name ``{socket}``, use only known placeholders and start with an executable that exists;
    ``conformance`` needs a helper.

    Raises:
        ConfigError: what is wrong and what to fix.
    """
    import inspect

    from netsim.bench.bench_loop import provider_label
    from netsim.errors import ConfigError
    from netsim.runtime.tunnelspec import resolve_policy, resolve_provider

    seen: dict[str, str] = {}
    for spec in providers:
        cls = resolve_provider(spec)
        try:
            inspect.signature(cls).bind()
        except TypeError as exc:
            raise ConfigError(
                f"{spec!r} must be constructible with no arguments ({exc})", source="--provider"
            ) from None
        except ValueError:  # no signature to inspect (a C type): let the provider host find out
            pass
        label = provider_label(spec)
        if label in seen:
            raise ConfigError(f"{spec!r} and {seen[label]!r} have the same class name {label!r}", source="--provider")
        seen[label] = spec
    policy_path: str | None = None
    if policy is not None:
        _, path, _ = resolve_policy(Path(policy))
        policy_path = str(path)
    if helper is not None:
        import shutil

        from netsim.bench.bench_netsim import helper_argv

        values = {"socket": "S", "config": "C", "token_file": "T", **({"policy": "P"} if policy_path else {})}
        exe = helper_argv(helper, **values)[0]
        if shutil.which(exe) is None:
            raise ConfigError(f"{exe!r} is not an executable (on PATH or as a path)", source="--helper")
    elif conformance:
        raise ConfigError("--conformance checks a helper of yours: give it with --helper CMD", source="--conformance")
    return BenchInputs(tuple(providers), policy_path, helper, conformance)


def _plans(quick: bool, seed: int, inputs: BenchInputs) -> list[tuple[str, str, list[tuple[str, str, dict[str, Any]]]]]:
    from netsim.bench import bench_loop, bench_micro

    return [
        ("netsim.bench.bench_micro", "micro", bench_micro.plan(quick, seed)),
        ("netsim.bench.bench_loop", "loop", bench_loop.plan(quick, seed, inputs.providers, inputs.policy)),
    ]


def case_names(
    quick: bool = False, seed: int = 1, inputs: BenchInputs | None = None, *, faults: bool = False
) -> list[str]:
    """Every case name ``netsim bench`` would run with these options, in run order (``--list``); with
    ``faults``, the faults group's (``--faults``)."""
    from netsim.bench import bench_e2e

    if faults:
        from netsim.bench import bench_faults

        return bench_faults.case_names(quick)
    inputs = inputs or BenchInputs()
    names = [case for _, _, plan in _plans(quick, seed, inputs) for case, _, _ in plan]
    return names + bench_e2e.case_names(quick, _e2e_extra_paths(inputs))


def _e2e_extra_paths(inputs: BenchInputs) -> list[str]:
    from netsim.bench.bench_loop import provider_label

    return [f"provider:{provider_label(p)}" for p in inputs.providers] + ["user-helper"] * bool(inputs.helper)


def _isolated(module: str, case: str, group: str, fn: str, kw: dict[str, Any]) -> dict[str, Any]:
    rec = run_isolated(module, fn, **kw).as_dict()
    rec["case"] = case
    rec["group"] = group
    return rec


def _e2e_record_value(rec: dict[str, Any]) -> float:
    return float(rec["pps"]["median"] if rec["proto"] == "udp" else rec["gbps"]["median"])


def lever_paths(results: list[dict[str, Any]]) -> list[str]:
    """The lever paths of a run: e2e paths whose records carry ``lever_env``, or that `LEVER_PATHS` names."""
    from netsim.bench.bench_e2e import LEVER_PATHS

    seen = {r["path"] for r in results if r.get("group") == "e2e" and ("lever_env" in r or r["path"] in LEVER_PATHS)}
    return [p for p in LEVER_PATHS if p in seen] + sorted(seen - set(LEVER_PATHS))


def lever_sides(
    lever: str, e2e: dict[str, dict[str, Any]], kind: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(on, off) records of lever path ``lever`` for case ``kind``: ``netsim`` is the "on" side, the lever path
    the "off" side, except for an opt-in lever (`bench_e2e.OPT_IN_LEVERS`, or a record marked ``lever_on``),
    whose path turns the optimisation on."""
    from netsim.bench.bench_e2e import OPT_IN_LEVERS

    lever_rec, base = e2e.get(f"e2e/{lever}/{kind}"), e2e.get(f"e2e/netsim/{kind}")
    if lever in OPT_IN_LEVERS or bool(lever_rec and lever_rec.get("lever_on")):
        return lever_rec, base
    return base, lever_rec


def _cpu_sum(rec: dict[str, Any], procs: tuple[str, ...]) -> float:
    per = rec["cpu_s_per_packet"] if rec["proto"] == "udp" else rec["cpu_s_per_gbit"]
    return float(sum(v for k, v in per.items() if k in procs and v == v))  # v == v drops NaN


def compute_ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Ratios between paths of the same run (medians), each against its target where the issue sets one.

    Also CPU seconds per packet of the client-side processes, path against path: what each path costs per packet
    regardless of how the scheduler shared the cores during the run. Every lever path (`lever_paths`) gets
    ``lever <path>: netsim / <path> (...)`` (on/off, throughput) and ``lever <path>: <path> CPU / netsim CPU
    (...)`` (off/on, provider + helper CPU per packet, or per Gbit for TCP) for each case both paths ran.
    """
    e2e = {r["name"]: r for r in results if r.get("group") == "e2e"}
    out: dict[str, dict[str, Any]] = {}

    def put(label: str, value: float, num: str, den: str) -> None:
        target = TARGETS.get(label)
        out[label] = {"value": value, "numerator": num, "denominator": den, "target": target}
        if target is not None:
            out[label]["met"] = value >= target

    def add(label: str, num: str, den: str) -> None:
        if num in e2e and den in e2e:
            n, d = _e2e_record_value(e2e[num]), _e2e_record_value(e2e[den])
            put(label, n / d if d else float("inf"), num, den)

    for size in (64, 512, 1400):
        unit = f"udp{size} pkt/s"
        add(f"netsim / wireguard-go ({unit})", f"e2e/netsim/udp{size}", f"e2e/wireguard-go/udp{size}")
        add(f"netsim-loop / c-floor ({unit})", f"e2e/netsim-loop/udp{size}", f"e2e/c-floor/udp{size}")
        add(f"netsim-loop / naive ({unit})", f"e2e/netsim-loop/udp{size}", f"e2e/naive/udp{size}")
        add(f"netsim-loop / naive-careful ({unit})", f"e2e/netsim-loop/udp{size}", f"e2e/naive-careful/udp{size}")
        add(f"wireguard-go / direct ({unit})", f"e2e/wireguard-go/udp{size}", f"e2e/direct/udp{size}")
    add("netsim / wireguard-go (tcp Gbit/s)", "e2e/netsim/tcp", "e2e/wireguard-go/tcp")
    for lever in lever_paths(results):
        for kind in ("udp64", "udp512", "udp1400", "tcp"):
            on, off = lever_sides(lever, e2e, kind)
            if on is None or off is None:
                continue
            unit = "tcp Gbit/s" if kind == "tcp" else f"{kind} pkt/s"
            add(f"lever {lever}: {on['path']} / {off['path']} ({unit})", on["name"], off["name"])
            cpu_on, cpu_off = _cpu_sum(on, _LEVER_PROCS), _cpu_sum(off, _LEVER_PROCS)
            per = "per Gbit (tcp)" if kind == "tcp" else f"per packet ({kind})"
            if cpu_on:
                label = f"lever {lever}: {off['path']} CPU / {on['path']} CPU {per}"
                put(label, cpu_off / cpu_on, off["name"], on["name"])
    for name in sorted(e2e):  # the user's provider against the built-in one, same run (docs/benchmarks.md)
        path, _, kind = name[len("e2e/") :].rpartition("/")
        unit = "tcp Gbit/s" if kind == "tcp" else f"{kind} pkt/s"
        if path.startswith("provider:"):
            add(f"{path} / built-in (e2e {unit})", name, f"e2e/netsim/{kind}")
        elif path == "user-helper":
            add(f"user-helper / netsim helper (e2e {unit})", name, f"e2e/netsim/{kind}")
    loops = {r.get("case", r["name"]): r for r in results if r.get("group") == "loop"}
    for case in sorted(loops):
        if case.startswith("loop/provider:"):
            base = loops.get(case.replace(case.split("/")[1], "builtin-provider", 1))
            if base is not None:
                label = f"{case.split('/')[1]} / built-in (loop {case.split('/')[2]} pkt/s)"
                mine, theirs = loops[case]["items_per_s"], base["items_per_s"]
                put(label, mine / theirs if theirs else float("inf"), case, base.get("case", base["name"]))
    for stem, other, other_procs, ours, our_procs in _CPU_RATIOS:
        for size in (64, 512, 1400):
            a, b = e2e.get(f"e2e/{other}/udp{size}"), e2e.get(f"e2e/{ours}/udp{size}")
            if a and b:
                ca, cb = _cpu_sum(a, other_procs), _cpu_sum(b, our_procs)
                if cb:
                    put(f"{stem} per packet (udp{size})", ca / cb, a["name"], b["name"])
    return out


def evaluate_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 17's targets (`TARGET_SPECS`) against the run: value, bound, met or missed and by how much.

    A target whose value the run did not measure has ``value`` None and ``met`` None ("not measured"), never a
    verdict. ``margin`` is the signed distance from the bound relative to it (+0.25: 25 % better than needed,
    -0.34: 34 % short of a minimum or 34 % over a maximum... in the direction that is worse).
    """
    ratios = doc.get("ratios") or compute_ratios(doc["results"])
    e2e = {r["name"]: r for r in doc["results"] if r.get("group") == "e2e"}
    out: list[dict[str, Any]] = []
    for spec in TARGET_SPECS:
        value: float | None = None
        source = spec.ratio or spec.case
        if spec.ratio is not None:
            if spec.ratio in ratios:
                value = float(ratios[spec.ratio]["value"])
        elif spec.case in e2e and spec.field is not None:
            rec = e2e[spec.case]
            if spec.field == "gbps":
                value = float(rec["gbps"]["median"])
            elif spec.field.startswith("cpu:"):
                v = rec["cpu_s_per_packet"].get(spec.field[4:])
                value = None if v is None or v != v else float(v) * 1e6
        row: dict[str, Any] = {
            "name": spec.name,
            "op": spec.op,
            "bound": spec.bound,
            "unit": spec.unit,
            "source": source,
            "value": value,
            "met": None,
            "margin": None,
        }
        if value is not None:
            better = value - spec.bound if spec.op == ">=" else spec.bound - value
            row["met"] = better >= 0
            row["margin"] = better / spec.bound
        out.append(row)
    return out


def _stream_child(argv: list[str], on_line: Callable[[str], None], timeout: float) -> tuple[int, str]:
    """Run ``argv``, handing each stdout line to ``on_line`` as it comes; (exit status, stderr)."""
    import threading

    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            with proc.stdout:
                for line in proc.stdout:
                    on_line(line.rstrip("\n"))
            status = proc.wait()
        finally:
            watchdog.cancel()
        err.seek(0)
        return status, err.read()


def _run_e2e(
    quick: bool, only: str | None, log: Callable[[str], None], inputs: BenchInputs, progress: Progress | None = None
) -> dict[str, Any]:
    from netsim.bench.bench_e2e import progress_line

    start, done = progress_line("start", ""), progress_line("done", "")
    with tempfile.TemporaryDirectory(prefix="netsim-bench-") as tmp:
        out_path = Path(tmp) / "e2e.json"
        argv = [sys.executable, "-m", "netsim.bench.bench_e2e", "--json", str(out_path)]
        if quick:
            argv.append("--quick")
        if only:
            argv += ["--only", only]
        for spec in inputs.providers:
            argv += ["--provider", spec]
        if inputs.policy:
            argv += ["--policy", inputs.policy]
        if inputs.helper:
            argv += ["--helper", inputs.helper] + ["--conformance"] * inputs.conformance
        lines: list[str] = []

        def on_line(line: str) -> None:
            lines.append(line)
            if line.startswith(start):
                if progress is not None:
                    progress.start(line[len(start) :])
            elif line.startswith(done):
                if progress is not None:
                    progress.done(line[len(done) :])
            elif not line.startswith("skipped "):
                log(line)

        status, stderr = _stream_child(argv, on_line, timeout=3600)
        if status != 0 or not out_path.exists():
            tail = (stderr or "\n".join(lines))[-3000:]
            return {"results": [], "skipped": [{"name": "e2e/*", "reason": f"bench_e2e failed: {tail}"}]}
        return dict(json.loads(out_path.read_text()))


def _run_faults(quick: bool, only: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="netsim-bench-") as tmp:
        out_path = Path(tmp) / "faults.json"
        argv = [sys.executable, "-m", "netsim.bench.bench_faults", "--json", str(out_path)]
        argv += ["--quick"] * quick + (["--only", only] if only else [])
        proc = subprocess.run(
            argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, check=False, timeout=3600
        )
        for line in proc.stdout.splitlines():
            if line.startswith("  ") or line.startswith("lab "):
                log(line)
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout)[-3000:]
            return {"results": [], "skipped": [{"name": "faults/*", "reason": f"bench_faults failed: {tail}"}]}
        return dict(json.loads(out_path.read_text()))


_INSTALL = {"py-spy": "pip install py-spy", "strace": "apt-get install strace"}


PROFILE_TOOLS = ("py-spy", "strace")


def run_profiles(
    paths: list[str], quick: bool = False, log: Callable[[str], None] = print, progress: Progress | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """``--profile``: each path profiled under load with py-spy and with strace (`netsim.bench.profile_e2e`),
    each in a lab of its own; (profiles, skipped). Needs root; py-spy and strace where installed."""
    import shutil

    profiles: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    tools = dict(zip(PROFILE_TOOLS, (Path(pyspy).exists(), shutil.which("strace") is not None), strict=True))
    for path in paths:
        for tool, present in tools.items():
            name = f"profile/{path}/{tool}"
            if progress is not None:
                progress.start(name)
            _profile_one(path, tool, present, quick, log, profiles, skipped)
            if progress is not None:
                progress.done(name)
    return profiles, skipped


def _profile_one(
    path: str,
    tool: str,
    present: bool,
    quick: bool,
    log: Callable[[str], None],
    profiles: list[dict[str, Any]],
    skipped: list[dict[str, str]],
) -> None:
    """One profile of ``path`` with ``tool`` into ``profiles``, or the reason it could not run into ``skipped``."""
    name = f"profile/{path}/{tool}"
    if os.geteuid() != 0:
        skipped.append({"name": name, "reason": "needs root (a lab)"})
        return
    if not present:
        skipped.append({"name": name, "reason": f"needs {tool} ({_INSTALL[tool]})"})
        return
    log(f"{name} ...")
    with tempfile.TemporaryDirectory(prefix="netsim-bench-") as tmp:
        out = Path(tmp) / "profile.json"
        argv = [sys.executable, "-m", "netsim.bench.profile_e2e", "--path", path, "--json", str(out)]
        argv += ["--out", tmp, "--seconds", "3" if quick else "8"] + ["--strace"] * (tool == "strace")
        status, stderr = _stream_child(argv, lambda line: None, timeout=600)
        if status != 0 or not out.exists():
            skipped.append({"name": name, "reason": f"failed: {stderr[-1500:]}"})
            return
        profiles.append(json.loads(out.read_text()))


class Progress:
    """The progress display of a run on stderr: cases done of total, the current case, elapsed time and an ETA.

    On a terminal it is one status line redrawn in place (``\\r``), with the run's log lines printed above it
    (`log`); elsewhere (a pipe, a CI log) nothing but the log lines, each prefixed with ``[done/total]``. The ETA
    weighs cases by their group (an end-to-end case takes several times a micro case; `WEIGHTS`), scaled by
    the time the cases done so far took. On a terminal a daemon thread redraws the line every ``tick`` seconds
    (None: only on events), so the elapsed time moves during a case that takes minutes.
    """

    #: Relative duration of a case, by the first part of its name.
    WEIGHTS: ClassVar[dict[str, float]] = {"micro": 1.0, "loop": 2.0, "e2e": 6.0, "faults": 10.0, "profile": 6.0}

    def __init__(
        self,
        names: list[str],
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick: float | None = 1.0,
    ) -> None:
        import threading

        self.names = list(names)
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.clock = clock
        self.t0 = clock()
        self.finished: set[str] = set()
        self.current = ""
        self._drawn = False
        self._lock = threading.RLock()
        self._closed = threading.Event()
        if self.tty and tick:
            threading.Thread(target=self._ticker, args=(tick,), name="bench-progress", daemon=True).start()

    def _ticker(self, tick: float) -> None:
        while not self._closed.wait(tick):
            with self._lock:
                if self._drawn:
                    self._draw()

    def _weight(self, name: str) -> float:
        return self.WEIGHTS.get(name.split("/", 1)[0], 1.0)

    @property
    def total(self) -> int:
        return len(self.names)

    def eta(self) -> float | None:
        """Seconds left, from the weighted share of the cases done; None before the first is done."""
        done_w = sum(self._weight(n) for n in self.finished)
        if not done_w:
            return None
        left_w = sum(self._weight(n) for n in self.names if n not in self.finished)
        return (self.clock() - self.t0) / done_w * left_w

    def status(self) -> str:
        """The status line: ``[done/total] elapsed, ETA, current case``."""
        eta = self.eta()
        return (
            f"[{len(self.finished)}/{self.total}] {_clock(self.clock() - self.t0)} elapsed, "
            f"ETA {'?' if eta is None else _clock(eta)}  {self.current}"
        ).rstrip()

    def _draw(self) -> None:
        if self.tty and not self._closed.is_set():
            with self._lock:
                self.stream.write("\r\x1b[K" + self.status())
                self.stream.flush()
                self._drawn = True

    def start(self, name: str) -> None:
        """``name`` (a case, or a description of an interleaved group) is running now."""
        with self._lock:
            self.current = name
            if not self.tty:
                self.stream.write(f"[{len(self.finished)}/{self.total}] {name} ...\n")
                self.stream.flush()
            self._draw()

    def done(self, name: str) -> None:
        """Case ``name`` is done (measured, skipped or failed); a name twice counts once."""
        with self._lock:
            if name in self.names:
                self.finished.add(name)
            self._draw()

    def log(self, line: str) -> None:
        """Print a line of the run's log above the status line."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
            self.stream.write(line + "\n")
            self.stream.flush()
            self._draw()

    def close(self) -> None:
        """Stop redrawing; leave the terminal on a fresh line with the final count."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K" + self.status() + "\n")
                self.stream.flush()
                self._drawn = False
            self._closed.set()


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class NoCaseSelected(ValueError):
    """``--only`` matched no case; ``names`` are the cases there are."""

    def __init__(self, pattern: str | None, names: list[str]) -> None:
        super().__init__(f"--only {pattern!r} matches no benchmark case; the cases are:\n  " + "\n  ".join(names))
        self.pattern = pattern
        self.names = names


def run_bench(
    *,
    quick: bool = False,
    only: str | None = None,
    json_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    markdown_path: str | os.PathLike[str] | None = None,
    seed: int = 1,
    log: Callable[[str], None] = print,
    inputs: BenchInputs | None = None,
    faults: bool = False,
    progress: Callable[[list[str]], Progress] | None = None,
    profile: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the selected cases and return the report document (also written as JSON/PNG/Markdown if asked).

    ``progress``: makes the `Progress` display for the selected case names (``netsim bench`` passes one on
    stderr); the run's log lines then go through it. ``profile``: end-to-end paths to profile afterwards
    (`run_profiles`; the report's ``profiles``).

    ``inputs`` (from `check_inputs`): the user's providers and policy. ``faults``: run the faults group instead
    (`netsim.bench.bench_faults`). A pattern ``only`` that matches no case is a `NoCaseSelected` error that
    lists the case names.
    """
    inputs = inputs or BenchInputs()
    t0 = time.monotonic()
    selected = selector(only)
    names = case_names(quick, seed, inputs, faults=faults)
    if not any(selected(n) for n in names):
        raise NoCaseSelected(only, names)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    conformance: list[dict[str, Any]] = []
    root = os.geteuid() == 0
    profiled = [f"profile/{p}/{tool}" for p in profile for tool in PROFILE_TOOLS]
    shown = progress([n for n in names if selected(n)] + profiled) if progress is not None else None
    if shown is not None:
        log = shown.log
    try:
        doc = _run_selected(
            quick, only, seed, inputs, faults, selected, root, log, shown, results, skipped, conformance
        )
        if profile:
            doc["profiles"], skipped_profiles = run_profiles(list(profile), quick, log, shown)
            doc["skipped"] += skipped_profiles
    finally:
        if shown is not None:
            shown.close()
    doc["wall_seconds"] = round(time.monotonic() - t0, 1)
    for target in (json_path, plot_path, markdown_path):
        if target and str(target) != "-":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    if json_path and str(json_path) != "-":
        write_json(doc, json_path)
    if plot_path:
        from netsim.bench.plot import plot

        plot(doc, plot_path)
    if markdown_path:
        Path(markdown_path).write_text(render_markdown(doc))
    return doc


def _run_selected(
    quick: bool,
    only: str | None,
    seed: int,
    inputs: BenchInputs,
    faults: bool,
    selected: Callable[[str], bool],
    root: bool,
    log: Callable[[str], None],
    shown: Progress | None,
    results: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    conformance: list[dict[str, Any]],
) -> dict[str, Any]:
    from netsim.bench import bench_e2e, bench_micro

    if faults:
        if shown is not None:
            shown.start("faults (lab)")
        log("faults (lab) ...")
        done = _run_faults(quick, only, log)
        if shown is not None:
            for rec in done["results"] + done["skipped"]:
                shown.done(rec.get("case", rec["name"]))
        results += done["results"]
        skipped += done["skipped"]
    for module, group, plan in [] if faults else _plans(quick, seed, inputs):
        for case, fn, kw in plan:
            if not selected(case):
                continue
            if group == "micro" and bench_micro.needs_root(case) and not root:
                skipped.append({"name": case, "reason": "needs root (a TUN device in a private namespace)"})
                if shown is not None:
                    shown.done(case)
                continue
            if shown is not None:
                shown.start(case)
            else:
                log(f"{case} ...")
            try:
                results.append(_isolated(module, case, group, fn, kw))
            except RuntimeError as exc:
                skipped.append({"name": case, "reason": f"failed: {str(exc)[-1500:]}"})
            if shown is not None:
                shown.done(case)
    if not faults and any(selected(n) for n in bench_e2e.case_names(quick, _e2e_extra_paths(inputs))):
        if shown is not None:
            shown.start("e2e: bringing the lab up")
        log("e2e (lab) ...")
        e2e = _run_e2e(quick, only, log, inputs, shown)
        if shown is not None:
            for rec in e2e["results"]:
                shown.done(rec["name"])
            for rec in e2e["skipped"]:  # "e2e/<path>/*" when the whole group could not run
                for n in fnmatch.filter(shown.names, rec["name"]):
                    shown.done(n)
        results += e2e["results"]
        skipped += e2e["skipped"]
        conformance += e2e.get("conformance", [])
    doc = {
        "machine": machine_info(),
        "quick": quick,
        "only": only,
        "seed": seed,
        "providers": list(inputs.providers),
        "policy": inputs.policy,
        "helper": inputs.helper,
        "conformance": conformance,
        "faults": faults,
        "wall_seconds": 0.0,  # set by run_bench
        "results": results,
        "skipped": skipped,
        "ratios": compute_ratios(results),
        "targets": TARGETS,
    }
    doc["verdicts"] = evaluate_targets(doc)
    return doc


# ------------------------------------------------------------------------------------------------ rendering
def _fmt_pps(v: float) -> str:
    return f"{v:,.0f}"


def _cpu_us(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1e6:.1f}" for k, v in d.items() if v == v)  # v == v drops NaN


def _rows(doc: dict[str, Any]) -> tuple[list[list[str]], list[list[str]], list[list[str]], list[list[str]]]:
    micro, loop, udp, tcp = [], [], [], []
    for r in doc["results"]:
        g = r.get("group")
        if g in ("micro", "loop"):
            p = r["params"]
            alloc = f"{p['alloc_bytes_per_pkt']:.0f}" if "alloc_bytes_per_pkt" in p else "-"
            row = [r["name"], f"{r['ns_median']:,.0f}", f"{r['ns_min']:,.0f}", f"{r['ns_max']:,.0f}"]
            row += [_fmt_pps(r["items_per_s"]), f"{r.get('wall_ns_median', 0):,.0f}", alloc]
            if g == "loop":
                server = p.get("server_cpu_ns_per_pkt")
                row.append(f"in-process WireGuard server {server:,.0f} ns/pkt" if server is not None else "")
                loop.append(row)
            else:
                micro.append(row)
        elif g == "e2e" and r["proto"] == "udp":
            pps = r["pps"]
            udp.append(
                [
                    r["path"],
                    str(r["size"]),
                    _fmt_pps(pps["median"]),
                    _fmt_pps(pps["min"]),
                    _fmt_pps(pps["max"]),
                    f"{r['gbps']:.3f}",
                    f"{r['loss']['median']:.2%}",
                    _cpu_us(r["cpu_s_per_packet"]),
                ]
            )
        elif g == "e2e":
            gb = r["gbps"]
            tcp.append(
                [
                    r["path"],
                    f"{gb['median']:.3f}",
                    f"{gb['min']:.3f}",
                    f"{gb['max']:.3f}",
                    ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s_per_gbit"].items()),
                ]
            )
    return micro, loop, udp, tcp


_HEADS = (
    ["case", "CPU ns/pkt (median)", "min", "max", "pkt/s (CPU)", "wall ns/pkt", "alloc B/pkt"],
    ["case", "CPU ns/pkt (median)", "min", "max", "pkt/s (CPU)", "wall ns/pkt", "alloc B/pkt", "of which"],
    ["path", "size B", "pkt/s (median)", "min", "max", "Gbit/s", "loss", "CPU µs/pkt per process"],
    ["path", "Gbit/s (median)", "min", "max", "CPU s/Gbit per process"],
)
_TITLES = ("micro", "loop (provider <-> helper round trip, in process)", "end to end, UDP", "end to end, TCP (iperf3)")


def _fault_tables(doc: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    from netsim.bench.bench_faults import table_rows

    return table_rows(doc["results"])


def _lever_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per lever and case: the lever on against off (`lever_sides`), throughput and CPU."""
    from netsim.bench.bench_e2e import LEVER_PATHS

    e2e = {r["name"]: r for r in doc["results"] if r.get("group") == "e2e"}
    rows = []
    for lever in lever_paths(doc["results"]):
        for kind in ("udp64", "udp512", "udp1400", "tcp"):
            rec = e2e.get(f"e2e/{lever}/{kind}")
            if rec is None:
                continue
            on, off = lever_sides(lever, e2e, kind)
            env_vars = rec.get("lever_env") or LEVER_PATHS.get(lever, (0, {}))[1]
            env = " ".join(f"`{k}={v}`" for k, v in env_vars.items()) or "-"
            tcp = kind == "tcp"
            fmt = (lambda v: f"{v:.3f}") if tcp else _fmt_pps
            cpu_scale, cpu_fmt = (1.0, "{:.2f}") if tcp else (1e6, "{:.1f}")
            row = [lever, env, kind, *(fmt(_e2e_record_value(r)) if r else "-" for r in (on, off))]
            row.append(
                f"{_e2e_record_value(on) / _e2e_record_value(off):.2f}"
                if on and off and _e2e_record_value(off)
                else "-"
            )
            cpu_on, cpu_off = (_cpu_sum(r, _LEVER_PROCS) if r else 0.0 for r in (on, off))
            row += [cpu_fmt.format(c * cpu_scale) if r else "-" for c, r in ((cpu_on, on), (cpu_off, off))]
            row.append(f"{cpu_off / cpu_on:.2f}" if cpu_on and off else "-")
            rows.append(row)
    return rows


_LEVER_HEAD = [
    "lever path",
    "its environment",
    "case",
    "on (pkt/s or Gbit/s)",
    "off",
    "on / off",
    "CPU on (provider + helper; µs/pkt, TCP s/Gbit)",
    "CPU off",
    "CPU off / on",
]


def _margin_text(t: dict[str, Any]) -> str:
    if t["margin"] is None:
        return ""
    pct = abs(t["margin"]) * 100
    if t["met"]:
        return f"{pct:.0f} % to spare"
    return f"{pct:.0f} % {'short' if t['op'] == '>=' else 'over'}"


def _target_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in evaluate_targets(doc):
        unit = "x" if t["unit"] == "x" else f" {t['unit']}"
        value = "-" if t["value"] is None else f"{t['value']:.2f}{unit}"
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "**missed**")
        rows.append([t["name"], value, f"{t['op']} {t['bound']:g}{unit}", verdict, _margin_text(t)])
    return rows


_TARGET_HEAD = ["target (issue 17)", "value", "target", "verdict", "by how much"]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _md_run_line(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    line = (
        f"Measured {m['timestamp']} on {m['cpu_model']} ({m['cpu_count']} cores), Linux {m['kernel']}, "
        f"Python {m['python']}; load average {', '.join(f'{x:.1f}' for x in m['load_average'])} at the end; "
        f"{'quick' if doc['quick'] else 'full'} run, {doc['wall_seconds']} s, git {str(m.get('git_commit'))[:10]}."
    )
    if doc["quick"]:
        line += " **A quick run** (64-byte packets only, fewer repetitions): not the figures to quote."
    if m["load_average"] and m["load_average"][0] > m["cpu_count"]:
        line += " **The machine was loaded** (load average above its core count): read CPU per packet, not pkt/s."
    return line


def _md_results(doc: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for title, head, rows in [*zip(_TITLES, _HEADS, _rows(doc), strict=True), *_fault_tables(doc)]:
        if rows:
            lines += [f"**{title}**", "", *_md_table(head, rows), ""]
    return lines


def _md_levers(doc: dict[str, Any]) -> list[str]:
    rows = _lever_rows(doc)
    if not rows:
        return ["No lever path ran in this run.", ""]
    title = "**levers (each turned off, or an opt-in one on, in one path; same run)**"
    return [title, "", *_md_table(_LEVER_HEAD, rows), ""]


def _md_targets(doc: dict[str, Any]) -> list[str]:
    return ["**targets (issue 17), from this run**", "", *_md_table(_TARGET_HEAD, _target_rows(doc)), ""]


def _md_ratios(doc: dict[str, Any]) -> list[str]:
    if not doc["ratios"]:
        return []
    lines = ["**ratios (same run, medians)**", "", "| ratio | value | target | met |", "|---|---|---|---|"]
    for name, r in doc["ratios"].items():
        target = f">= {r['target']:g}" if r.get("target") is not None else ""
        met = ("yes" if r["met"] else "**no**") if "met" in r else ""
        lines.append(f"| {name} | {r['value']:.3f} | {target} | {met} |")
    return [*lines, ""]


def _md_profiles(doc: dict[str, Any]) -> list[str]:
    profiles = doc.get("profiles") or []
    if not profiles:
        return ["No profile was taken in this run (`netsim bench --profile PATHS`)."]
    lines: list[str] = []
    for prof in profiles:
        for proc, got in prof["processes"].items():
            head = f"**profile: {prof['path']} {proc}, UDP {prof['size']} B, {prof['tool']}"
            if prof["tool"] == "strace":
                rows = sorted(got["syscalls_per_packet"].items(), key=lambda kv: -kv[1])
                lines += [f"{head} ({got['packets']:,} packets)**", "", "| syscall | calls per packet |", "|---|---|"]
                lines += [f"| `{sc}` | {v:.3f} |" for sc, v in rows]
                lines.append(f"| total | {sum(v for _, v in rows):.3f} |")
            else:
                lines += [f"{head} ({got['samples']:,} samples; a C call's time is its caller's)**", ""]
                lines += ["| function (file) | self share |", "|---|---|"]
                lines += [f"| `{f}` | {100 * share:.1f} % |" for f, share in got["self"]]
            lines.append("")
    return lines


def _md_skipped(doc: dict[str, Any]) -> list[str]:
    if not doc["skipped"]:
        return ["Nothing was skipped.", ""]
    return ["**skipped**", "", *(f"- `{s['name']}`: {s['reason']}" for s in doc["skipped"]), ""]


def render_markdown(doc: dict[str, Any]) -> str:
    """The report as Markdown tables (``--markdown``; docs/benchmarks.md's sections are the same pieces)."""
    lines = [_md_run_line(doc), "", *_md_results(doc), *_md_levers(doc), *_md_targets(doc), *_md_ratios(doc)]
    if doc.get("conformance"):
        lines += ["**IPC conformance of the --helper**", "", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in doc["conformance"]] + [""]
    if doc["skipped"]:
        lines += _md_skipped(doc)
    return "\n".join(lines)


def _fmt_target_value(t: dict[str, Any]) -> str:
    if t["value"] is None:
        return "-"
    return f"{t['value']:.2f}{'x' if t['unit'] == 'x' else ' ' + t['unit']}"


def render_comparison(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A before/after Markdown table of two reports (``--compare``): each target's value and verdict in both,
    then every ratio either has. Both reports' ratios are recomputed with today's definitions."""
    runs = []
    for doc in (before, after):
        doc = {**doc, "ratios": compute_ratios(doc["results"])}
        m = doc["machine"]
        label = f"{m['timestamp'][:16]} git {str(m.get('git_commit'))[:8]} ({'quick' if doc['quick'] else 'full'})"
        runs.append((label, doc, {t["name"]: t for t in evaluate_targets(doc)}))
    (b_label, b_doc, b_targets), (a_label, a_doc, a_targets) = runs
    lines = [f"**before: {b_label}; after: {a_label}**", ""]
    lines += _md_table(
        ["target (issue 17)", "bound", "before", "after", "after / before", "verdict after"],
        [
            [
                name,
                f"{t['op']} {t['bound']:g}{'x' if t['unit'] == 'x' else ' ' + t['unit']}",
                _fmt_target_value(b_targets[name]),
                _fmt_target_value(t),
                f"{t['value'] / b_targets[name]['value']:.2f}"
                if t["value"] is not None and b_targets[name]["value"]
                else "-",
                "not measured" if t["met"] is None else ("met" if t["met"] else "**missed**") + f", {_margin_text(t)}",
            ]
            for name, t in a_targets.items()
        ],
    )
    labels = list(b_doc["ratios"]) + [k for k in a_doc["ratios"] if k not in b_doc["ratios"]]
    rows = [
        [
            label,
            f"{b_doc['ratios'][label]['value']:.3f}" if label in b_doc["ratios"] else "-",
            f"{a_doc['ratios'][label]['value']:.3f}" if label in a_doc["ratios"] else "-",
        ]
        for label in labels
    ]
    lines += ["", *_md_table(["ratio (same run, medians)", "before", "after"], rows), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the docs page
#: ``<!-- bench:KEY -->...<!-- /bench -->`` in docs/benchmarks.md: `render_docs` replaces what is between.
_MARKER = re.compile(r"<!-- bench:(?P<key>.+?) -->(?P<body>.*?)<!-- /bench -->", re.DOTALL)
_SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "run": lambda doc: [_md_run_line(doc)],
    "results": _md_results,
    "levers": _md_levers,
    "targets": _md_targets,
    "ratios": _md_ratios,
    "profiles": _md_profiles,
    "skipped": _md_skipped,
}
NOT_MEASURED = "n/a (not in this run)"


def _by_case(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r.get("case", r["name"]): r for r in doc["results"]}


def _figure(doc: dict[str, Any], key: str) -> str:
    """The figure an inline marker names (see docs/benchmarks.md, "How this page is made")."""
    kind, _, rest = key.partition(":")
    if kind == "section":
        if rest not in _SECTIONS:
            raise KeyError(f"unknown section {rest!r} (known: {', '.join(_SECTIONS)})")
        return "\n" + "\n".join(_SECTIONS[rest](doc)).rstrip("\n") + "\n"
    if kind == "ratio":
        r = doc["ratios"].get(rest)
        return NOT_MEASURED if r is None else f"{r['value']:.2f}x"
    if kind == "target":
        found = [t for t in evaluate_targets(doc) if t["name"] == rest]
        if not found:
            raise KeyError(f"unknown target {rest!r}")
        t = found[0]
        if t["met"] is None:
            return "not measured"
        return f"{'met' if t['met'] else 'missed'}, {_margin_text(t)}"
    if kind == "case":  # case:<name>:<field>, field pps | gbps | loss | cpu.<process> | sys.<process> | ns
        name, _, field = rest.rpartition(":")
        rec = _by_case(doc).get(name)
        if rec is None:
            return NOT_MEASURED
        if field == "pps":
            return _fmt_pps(rec["pps"]["median"])
        if field == "gbps":
            return f"{rec['gbps']['median']:.3f}" if isinstance(rec["gbps"], dict) else f"{rec['gbps']:.3f}"
        if field == "ns":
            return f"{rec['ns_median']:,.0f}"
        if field.startswith("cpu."):  # UDP: µs per packet; TCP: CPU seconds per Gbit
            if "cpu_s_per_gbit" in rec:
                v = rec["cpu_s_per_gbit"].get(field[4:])
                return NOT_MEASURED if v is None or v != v else f"{v:.2f}"
            v = rec.get("cpu_s_per_packet", {}).get(field[4:])
            return NOT_MEASURED if v is None or v != v else f"{v * 1e6:.1f}"
        if field.startswith("sys."):  # the share of a process's CPU that was system time (in the kernel)
            v = rec.get("cpu_sys_share", {}).get(field[4:])
            return NOT_MEASURED if v is None or v != v else f"{v * 100:.0f} %"
        raise KeyError(f"unknown field {field!r} in {key!r}")
    if kind == "machine":
        value = doc["machine"].get(rest)
        return ", ".join(f"{x:.1f}" for x in value) if isinstance(value, list) else str(value)
    if kind == "run":
        return {"kind": "quick" if doc["quick"] else "full", "wall_seconds": str(doc["wall_seconds"])}[rest]
    raise KeyError(f"unknown marker {key!r}")


def render_docs(page: str, doc: dict[str, Any]) -> str:
    """Fill every ``<!-- bench:KEY -->...<!-- /bench -->`` of ``page`` from the report ``doc``.

    The page is its own template: the prose between markers is kept, what is between a marker pair is replaced,
    so rendering a rendered page again from the same JSON gives the same page (tests/test_bench_docs.py checks
    that docs/benchmarks.md is what this gives from docs/benchmarks.json). Ratios are recomputed with today's
    definitions (`compute_ratios`), as ``--from-json`` does. Keys: ``section:<run|results|levers|targets|ratios|
    profiles|skipped>``, ``ratio:<label>`` (``0.76x``), ``target:<name>``,
    ``case:<case name>:<pps|gbps|ns|cpu.<process>|sys.<process>>`` (``cpu``: µs per packet, TCP: CPU s per
    Gbit; ``sys``: the system-time share of that CPU),
    ``machine:<field>``, ``run:<kind|wall_seconds>``.

    Raises:
        KeyError: a marker names something the renderer does not know (a typo in the page).
    """
    doc = {**doc, "ratios": compute_ratios(doc["results"])}
    return _MARKER.sub(lambda m: f"<!-- bench:{m['key']} -->{_figure(doc, m['key'])}<!-- /bench -->", page)


def write_docs(doc: dict[str, Any], page: str | os.PathLike[str] = ROOT / "docs" / "benchmarks.md") -> Path:
    """Re-render the docs page ``page`` in place from ``doc`` (`render_docs`); its plot beside it, if it has one."""
    path = Path(page)
    path.write_text(render_docs(path.read_text(), doc))
    return path


def render_text(doc: dict[str, Any]) -> str:
    """The report as plain aligned tables for the terminal."""
    out: list[str] = []
    tables = [*zip(_TITLES, _HEADS, _rows(doc), strict=True), *_fault_tables(doc)]
    levers = _lever_rows(doc)
    if levers:
        tables.append(("levers (each turned off, or an opt-in one on, in one path; same run)", _LEVER_HEAD, levers))
    for title, head, rows in tables:
        if not rows:
            continue
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        out += ["", title, "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if doc["ratios"]:
        out += ["", "ratios (same run)"]
        for name, r in doc["ratios"].items():
            verdict = ""
            if "met" in r:
                verdict = f"  target >= {r['target']:g}: {'met' if r['met'] else 'MISSED'}"
            out.append(f"  {name:<58} {r['value']:8.3f}{verdict}")
    targets = [t for t in _target_rows(doc) if t[3] != "not measured"]
    if targets:
        out += ["", "targets (issue 17)"]
        for n, v, b, verdict, m in targets:
            word = "MISSED" if "missed" in verdict else verdict
            out.append(f"  {n:<72} {v:>12}  {b:<12} {word:<7} {m}".rstrip())
    checks = doc.get("conformance") or []
    if checks:
        out += ["", "IPC conformance of the --helper (netsim.testing.conformance)"]
        out += [f"  {c['status'].upper():<4} {c['name']:<22} {c['detail']}".rstrip() for c in checks]
    for s in doc["skipped"]:
        out.append(f"skipped {s['name']}: {s['reason']}")
    out.append(f"\n{doc['wall_seconds']} s; load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="netsim benchmark suite")
    parser.add_argument("--quick", action="store_true", help="fewer runs and sizes (under two minutes)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': to stdout, no text report)")
    parser.add_argument("--plot", metavar="FILE")
    parser.add_argument("--markdown", metavar="FILE")
    parser.add_argument("--only", metavar="PATTERN")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", action="store_true", help="the faults group (recovery measured) instead")
    parser.add_argument("--from-json", metavar="FILE", help="re-render an earlier run instead of measuring")
    parser.add_argument("--compare", metavar="FILE", help="print a before/after table against an earlier run's JSON")
    parser.add_argument("--profile", metavar="PATHS", help="profile these e2e paths afterwards (comma separated)")
    parser.add_argument(
        "--write-docs", action="store_true", help="re-render docs/benchmarks.md (and its plot) from this report"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        doc = load_report(args.from_json)
        if args.plot:
            from netsim.bench.plot import plot

            plot(doc, args.plot)
        if args.markdown:
            Path(args.markdown).write_text(render_markdown(doc))
    else:
        try:
            doc = run_bench(
                quick=args.quick,
                only=args.only,
                json_path=args.json,
                plot_path=args.plot,
                markdown_path=args.markdown,
                seed=args.seed,
                faults=args.faults,
                log=lambda line: print(line, file=sys.stderr, flush=True),
                progress=Progress,
                profile=tuple(p for p in (args.profile or "").split(",") if p),
            )
        except NoCaseSelected as exc:
            parser.error(str(exc))  # exit 2, as `netsim bench` (which also has --list, --provider, --policy)
    if args.write_docs:
        publish_docs(doc, log=lambda line: print(line, file=sys.stderr))
    if args.json == "-":
        print(json.dumps(doc, indent=2))
    else:
        print(render_text(doc))
        if args.compare:
            print("\n" + render_comparison(load_report(args.compare), doc))
    return 0


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An earlier run's JSON, its ratios and verdicts recomputed with today's definitions."""
    doc = dict(json.loads(Path(path).read_text()))
    doc["ratios"], doc["targets"] = compute_ratios(doc["results"]), TARGETS
    doc["verdicts"] = evaluate_targets(doc)
    return doc


def write_json(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """The report as indented JSON (NaN where a process's CPU could not be read)."""
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def publish_docs(
    doc: dict[str, Any], docs_dir: str | os.PathLike[str] | None = None, log: Callable[[str], None] = print
) -> None:
    """``--write-docs``: ``docs/benchmarks.json`` (unless ``doc`` is read from it), the page and its plot.

    The JSON written is the report as measured; the page is `render_docs` of it, so the test that compares the
    committed page with the renderer's output holds until the next run.

    Raises:
        FileNotFoundError: ``docs_dir`` (default: the checkout's docs/) has no benchmarks.md to render into.
    """
    base = Path(docs_dir) if docs_dir is not None else ROOT / "docs"
    if not (base / "benchmarks.md").exists():
        raise FileNotFoundError(base / "benchmarks.md")
    data = base / "benchmarks.json"
    write_json(doc, data)
    page = write_docs(json.loads(data.read_text()), base / "benchmarks.md")
    log(f"wrote {data} and {page}")
    try:
        from netsim.bench.plot import plot

        plot(doc, base / "benchmarks.png")
        log(f"wrote {base / 'benchmarks.png'}")
    except ImportError as exc:  # matplotlib is a dev extra
        log(f"no plot ({exc})")


if __name__ == "__main__":
    sys.exit(main())
