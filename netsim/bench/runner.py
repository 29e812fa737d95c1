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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsim.bench._common import child_env, machine_info, run_isolated

__all__ = [
    "TARGETS",
    "BenchInputs",
    "NoCaseSelected",
    "case_names",
    "check_inputs",
    "compute_ratios",
    "render_markdown",
    "render_text",
    "run_bench",
    "selector",
]

ROOT = Path(__file__).resolve().parents[2]  # the directory netsim is imported from

#: The issue's targets: ratio label -> minimum. The loop targets apply at every size; the wireguard-go one is
#: set for 64-byte UDP and TCP only, as in the issue.
TARGETS: dict[str, float] = {
    "netsim / wireguard-go (udp64 pkt/s)": 0.5,
    "netsim / wireguard-go (tcp Gbit/s)": 0.5,
    **{f"netsim-loop / c-floor (udp{s} pkt/s)": 0.5 for s in (64, 512, 1400)},
    **{f"netsim-loop / naive (udp{s} pkt/s)": 20.0 for s in (64, 512, 1400)},
}
#: CPU-per-packet ratios (the load-independent view): label stem -> (path, its processes, netsim path, its processes)
_CPU_RATIOS = (
    ("c-floor CPU / netsim-loop CPU", "c-floor", ("provider", "helper"), "netsim-loop", ("provider", "helper")),
    ("naive CPU / netsim-loop CPU", "naive", ("provider", "helper"), "netsim-loop", ("provider", "helper")),
    ("wireguard-go client CPU / netsim CPU", "wireguard-go", ("wg-client",), "netsim", ("provider", "helper")),
    ("netsim-nogso helper CPU / netsim helper CPU", "netsim-nogso", ("helper",), "netsim", ("helper",)),
)


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


def compute_ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Ratios between paths of the same run (medians), each against its target where the issue sets one.

    Also CPU seconds per packet of the client-side processes, path against path: what each path costs per packet
    regardless of how the scheduler shared the cores during the run.
    """
    e2e = {r["name"]: r for r in results if r.get("group") == "e2e"}
    out: dict[str, dict[str, Any]] = {}

    def add(label: str, num: str, den: str) -> None:
        if num in e2e and den in e2e:
            n, d = _e2e_record_value(e2e[num]), _e2e_record_value(e2e[den])
            value = n / d if d else float("inf")
            target = TARGETS.get(label)
            out[label] = {"value": value, "numerator": num, "denominator": den, "target": target}
            if target is not None:
                out[label]["met"] = value >= target

    for size in (64, 512, 1400):
        unit = f"udp{size} pkt/s"
        add(f"netsim / wireguard-go ({unit})", f"e2e/netsim/udp{size}", f"e2e/wireguard-go/udp{size}")
        add(f"netsim-loop / c-floor ({unit})", f"e2e/netsim-loop/udp{size}", f"e2e/c-floor/udp{size}")
        add(f"netsim-loop / naive ({unit})", f"e2e/netsim-loop/udp{size}", f"e2e/naive/udp{size}")
        add(f"wireguard-go / direct ({unit})", f"e2e/wireguard-go/udp{size}", f"e2e/direct/udp{size}")
        add(
            f"netsim / netsim-nogso, the UDP GSO lever ({unit})", f"e2e/netsim/udp{size}", f"e2e/netsim-nogso/udp{size}"
        )
    add("netsim / wireguard-go (tcp Gbit/s)", "e2e/netsim/tcp", "e2e/wireguard-go/tcp")
    add("netsim / netsim-nogso, the UDP GSO lever (tcp Gbit/s)", "e2e/netsim/tcp", "e2e/netsim-nogso/tcp")
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
                out[label] = {
                    "value": mine / theirs if theirs else float("inf"),
                    "numerator": case,
                    "denominator": base.get("case", base["name"]),
                    "target": None,
                }
    for stem, other, other_procs, ours, our_procs in _CPU_RATIOS:
        for size in (64, 512, 1400):
            a, b = e2e.get(f"e2e/{other}/udp{size}"), e2e.get(f"e2e/{ours}/udp{size}")
            if a and b:
                ca = sum(v for k, v in a["cpu_s_per_packet"].items() if k in other_procs)
                cb = sum(v for k, v in b["cpu_s_per_packet"].items() if k in our_procs)
                if cb:
                    out[f"{stem} per packet (udp{size})"] = {
                        "value": ca / cb,
                        "numerator": a["name"],
                        "denominator": b["name"],
                        "target": None,
                    }
    return out


def _run_e2e(quick: bool, only: str | None, log: Callable[[str], None], inputs: BenchInputs) -> dict[str, Any]:
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
        proc = subprocess.run(
            argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, check=False, timeout=3600
        )
        for line in proc.stdout.splitlines():
            if not line.startswith("skipped "):
                log(line)
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout)[-3000:]
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
) -> dict[str, Any]:
    """Run the selected cases and return the report document (also written as JSON/PNG/Markdown if asked).

    ``inputs`` (from `check_inputs`): the user's providers and policy. ``faults``: run the faults group instead
    (`netsim.bench.bench_faults`). A pattern ``only`` that matches no case is a `NoCaseSelected` error that
    lists the case names.
    """
    from netsim.bench import bench_e2e, bench_micro

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
    if faults:
        log("faults (lab) ...")
        done = _run_faults(quick, only, log)
        results += done["results"]
        skipped += done["skipped"]
    for module, group, plan in [] if faults else _plans(quick, seed, inputs):
        for case, fn, kw in plan:
            if not selected(case):
                continue
            if group == "micro" and bench_micro.needs_root(case) and not root:
                skipped.append({"name": case, "reason": "needs root (a TUN device in a private namespace)"})
                continue
            log(f"{case} ...")
            try:
                results.append(_isolated(module, case, group, fn, kw))
            except RuntimeError as exc:
                skipped.append({"name": case, "reason": f"failed: {str(exc)[-1500:]}"})
    if not faults and any(selected(n) for n in bench_e2e.case_names(quick, _e2e_extra_paths(inputs))):
        log("e2e (lab) ...")
        e2e = _run_e2e(quick, only, log, inputs)
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
        "wall_seconds": round(time.monotonic() - t0, 1),
        "results": results,
        "skipped": skipped,
        "ratios": compute_ratios(results),
        "targets": TARGETS,
    }
    for target in (json_path, plot_path, markdown_path):
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
    if plot_path:
        from netsim.bench.plot import plot

        plot(doc, plot_path)
    if markdown_path:
        Path(markdown_path).write_text(render_markdown(doc))
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


def render_markdown(doc: dict[str, Any]) -> str:
    """The report as Markdown tables (what docs/benchmarks.md quotes)."""
    m = doc["machine"]
    lines = [
        f"Measured {m['timestamp']} on {m['cpu_model']} ({m['cpu_count']} cores), Linux {m['kernel']}, "
        f"Python {m['python']}; load average {', '.join(f'{x:.1f}' for x in m['load_average'])} at the end; "
        f"{'quick' if doc['quick'] else 'full'} run, {doc['wall_seconds']} s, git {str(m.get('git_commit'))[:10]}.",
        "",
    ]
    for title, head, rows in [*zip(_TITLES, _HEADS, _rows(doc), strict=True), *_fault_tables(doc)]:
        if not rows:
            continue
        lines += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    if doc["ratios"]:
        lines += ["**ratios (same run, medians)**", "", "| ratio | value | target | met |", "|---|---|---|---|"]
        for name, r in doc["ratios"].items():
            target = f">= {r['target']:g}" if r.get("target") is not None else ""
            met = ("yes" if r["met"] else "**no**") if "met" in r else ""
            lines.append(f"| {name} | {r['value']:.3f} | {target} | {met} |")
        lines.append("")
    if doc.get("conformance"):
        lines += ["**IPC conformance of the --helper**", "", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in doc["conformance"]] + [""]
    if doc["skipped"]:
        lines += ["**skipped**", ""] + [f"- `{s['name']}`: {s['reason']}" for s in doc["skipped"]] + [""]
    return "\n".join(lines)


def render_text(doc: dict[str, Any]) -> str:
    """The report as plain aligned tables for the terminal."""
    out: list[str] = []
    tables = [*zip(_TITLES, _HEADS, _rows(doc), strict=True), *_fault_tables(doc)]
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
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--plot", metavar="FILE")
    parser.add_argument("--markdown", metavar="FILE")
    parser.add_argument("--only", metavar="PATTERN")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", action="store_true", help="the faults group (recovery measured) instead")
    parser.add_argument("--from-json", metavar="FILE", help="re-render an earlier run instead of measuring")
    args = parser.parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        doc["ratios"], doc["targets"] = compute_ratios(doc["results"]), TARGETS  # today's ratio definitions
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
            )
        except NoCaseSelected as exc:
            parser.error(str(exc))  # exit 2, as `netsim bench` (which also has --list, --provider, --policy)
    print(render_text(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
