"""End to end in the lab: UDP packets/s and loss at 64/512/1400 bytes, TCP Gbit/s, per path, in one run.

Run (root): ``python -m netsim.bench.bench_e2e [--quick] [--json FILE] [--only PATTERN]``, or ``netsim bench``.

One `netsim.lab.Lab` is brought up for the run; every path starts its own *fresh* processes, all paths are up at
once (each with its own destination), and they are measured interleaved after a warm-up (see `E2E`). Paths
(`PATHS`):

* ``direct``: mac -> home NAT -> inet, no tunnel: the limit of the lab itself.
* ``wireguard-go``: wireguard-go as the client in ``mac`` (the native peer a user would pick instead), to
  wireguard-go in ``vpn``, which NATs to inet.
* ``netsim``: utun -> `HelperForwardingProvider` -> UDS -> `netsim.runtime.helper.Helper` (WireGuard) ->
  wireguard-go in ``vpn`` (see `_netsim_path`; skipped with the reason when that stack cannot run).
* ``provider:<Class>`` (``--provider module:Class``, repeatable): path 3 with the user's provider in place of
  `HelperForwardingProvider`, everything else the same (`netsim.bench.bench_netsim.netsim_path`). One namespace
  holds one tunnel, so each such path runs in its own phase after the others, not interleaved with ``netsim``.
  ``--policy FILE`` is given to the helper of ``netsim`` and of every ``provider:`` path.
* ``user-helper`` (``--helper CMD``): path 3 with the user's helper executable in place of netsim's
  (`netsim.bench.bench_netsim.helper_argv` fills in ``{socket}``, ``{config}``, ``{token_file}``, ``{policy}``),
  the built-in provider connecting to it with the token; also a phase of its own. ``--conformance`` runs
  `netsim.testing.conformance` against it first.
* the lever paths (`LEVER_PATHS`, e.g. ``netsim-nogso``): path 3 with one optimisation turned off in its helper
  and provider by an environment variable, each in a phase of its own; the runner reports every lever on/off.
* ``naive``, ``naive-careful``, ``c-floor``, ``netsim-loop``: the provider <-> helper loop alone over a real TUN
  and Unix socket, the helper reflecting each packet back (no crypto): `netsim.bench.naive_loop` (scapy, and the
  careful user's plain per-packet loop), ``netsim/bench/c/floor.c`` and netsim's loop
  (`netsim.bench.bench_loop.provider_main` / `helper_main`). They carry UDP only (a reflector is no TCP peer)
  and never leave ``mac``: they isolate the per-packet cost of the loop design.

UDP load is ``udpload blast`` (C, ``netsim/bench/c/udpload.c``): a closed loop with ``WINDOW`` datagrams in flight,
to the path's own ``udpload echo`` in inet (or to the reflector). Sizes are IP packet sizes (UDP payload =
size - 28). Reported: replies/s (packets/s), loss, and CPU seconds per packet of each process involved
(``/proc/<pid>/stat`` deltas; the blaster's from ``RUSAGE_CHILDREN``; kernel softirq work on veth is nobody's
and is not counted). TCP is ``iperf3 -c`` against the lab's ``iperf3 -s`` in inet.

Everything is bounded: ``MAX_PACKETS`` per run, ``seconds`` per run, and traffic goes only to lab addresses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

__all__ = [
    "LEVER_PATHS",
    "OPT_IN_LEVERS",
    "PATHS",
    "SIZES",
    "base_paths",
    "build_tools",
    "case_names",
    "lever_destination",
    "progress_line",
    "run_e2e",
    "tunnel_destination",
]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the directory netsim is imported from (a checkout, or site-packages)
# Compiled tools go to a per-user cache, never into the package (site-packages may be read-only).
BUILD = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "netsim" / "bench-build"
LOOP_PATHS = ("naive", "naive-careful", "c-floor", "netsim-loop")
SIZES = (64, 512, 1400)
WINDOW = 64
MAX_PACKETS = 5_000_000
ECHO_PORT = 9000
WG_NET = "10.66.0"


def tunnel_destination(path: str, exclusive: list[str]) -> str:
    """The inet address a tunnel path's traffic goes to (``exclusive``: the run's ``provider:``/``user-helper``
    paths, in order). Kept clear of addresses policies name (examples/policy.toml bypasses 203.0.113.20, the
    lab's direct scenario host), so a ``--policy`` does not silently take a path's traffic off its tunnel."""
    if path in DESTINATIONS:
        return DESTINATIONS[path]
    if path in LEVER_PATHS:
        return lever_destination(path)
    return f"203.0.113.{50 + exclusive.index(path)}"


def case_names(quick: bool = False, extra_paths: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every end-to-end case name (``extra_paths``: the ``provider:<Class>`` paths of ``--provider``)."""
    sizes = (64,) if quick else SIZES
    out: list[str] = []
    for path in (*base_paths(), *extra_paths):
        out += [f"e2e/{path}/udp{s}" for s in sizes]
        if path not in LOOP_PATHS:
            out.append(f"e2e/{path}/tcp")
    return out


def build_tools() -> dict[str, Path]:
    """Compile ``netsim/bench/c/*.c`` with ``cc -O2`` into ``~/.cache/netsim/bench-build/`` when stale.

    Raises:
        RuntimeError: no C compiler, or a compile error (its output is in the message).
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc); apt-get install gcc")
    BUILD.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in ("floor", "udpload"):
        src = HERE / "c" / f"{name}.c"
        exe = BUILD / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            proc = subprocess.run(
                [cc, "-O2", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(f"cc failed on {src}:\n{proc.stderr}")
        out[name] = exe
    return out


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads) in seconds, from ``/proc/<pid>/stat`` (proc(5) fields 14
    and 15): the time in its own code, and the time the kernel spent on its behalf (its syscalls)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan"), float("nan")
    fields = text[text.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from ``/proc/<pid>/stat``."""
    return sum(proc_cpu_split(pid))


_SYS = "/sys"  # suffix of a process's kernel-time entry in a case's CPU accumulator


def _add_cpu(cpu: dict[str, float], name: str, before: tuple[float, float], after: tuple[float, float]) -> None:
    """Accumulate a process's CPU (user + system) under ``name`` and its system part under ``name + _SYS``."""
    cpu[name] = cpu.get(name, 0.0) + sum(after) - sum(before)
    cpu[name + _SYS] = cpu.get(name + _SYS, 0.0) + after[1] - before[1]


def split_sys(cpu: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """A CPU accumulator's totals per process, and each process's system share of them (0..1; NaN if no CPU)."""
    totals = {k: v for k, v in cpu.items() if not k.endswith(_SYS)}
    shares = {k: (cpu[k + _SYS] / v if v > 0 else float("nan")) for k, v in totals.items() if k + _SYS in cpu}
    return totals, shares


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class PathSetup:
    """What a running path offers the measurement: where to send, which processes to charge CPU to."""

    udp_dst: tuple[str, int]
    procs: dict[str, int] = field(default_factory=dict)
    tcp_dst: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


#: Per path: the inet address its traffic goes to (each path has its own, so all can be up at once), or for the
#: loop paths the TUN name and its /24.
DESTINATIONS = {
    "direct": "203.0.113.10",
    "wireguard-go": "203.0.113.11",
    "netsim": "203.0.113.12",
    "netsim-nogso": "203.0.113.13",
}
#: Lever paths without an entry in `DESTINATIONS` send to ``203.0.113.<LEVER_DST_BASE + slot>`` (kept below .20).
LEVER_DST_BASE = 4
#: The lever paths: netsim's tunnel with one optimisation turned off in its helper, measured in the same run as
#: ``netsim`` so the ratio shows what the lever buys (issue 17). Path -> (slot, the helper's environment).
#: A new lever is one line here (a free slot, 9-15); `PATHS`, the case names, its destination and the runner's
#: on/off ratios and report rows follow from it.
LEVER_PATHS: dict[str, tuple[int, dict[str, str]]] = {
    "netsim-nogso": (9, {"NETSIM_UDP_GSO": "0"}),
    "netsim-nogro": (10, {"NETSIM_UDP_GRO": "0"}),
}
LEVER_PATHS["netsim-nonative"] = (12, {"NETSIM_NATIVE": "0"})  # the native accelerator off (docs/native.md)
# TUN offloads are off by default (docs/helper.md, "TUN offloads"): this lever path turns GRO on writes *on*
LEVER_PATHS["netsim-tungro"] = (13, {"NETSIM_TUN_OFFLOAD": "gro"})
#: Lever paths that turn an opt-in optimisation on (every other lever path turns a default one off): for these
#: the lever path is the "on" side of the on/off ratios and ``netsim`` the "off" side.
OPT_IN_LEVERS = frozenset({"netsim-tungro"})
PATHS = ("direct", "wireguard-go", "netsim", *LEVER_PATHS, *LOOP_PATHS)
LOOP_TUNS = {
    "c-floor": ("utun7", "10.77.0"),
    "netsim-loop": ("utun8", "10.78.0"),
    "naive": ("utun9", "10.79.0"),
    "naive-careful": ("utun6", "10.76.0"),
}


def base_paths() -> tuple[str, ...]:
    """The built-in paths in run order, with today's `LEVER_PATHS` (`PATHS` as of import)."""
    return ("direct", "wireguard-go", "netsim", *LEVER_PATHS, *LOOP_PATHS)


def lever_destination(path: str) -> str:
    """The inet address lever path ``path`` sends to (its `DESTINATIONS` entry, else one from its slot)."""
    return DESTINATIONS.get(path) or f"203.0.113.{LEVER_DST_BASE + LEVER_PATHS[path][0]}"


def progress_line(kind: str, name: str) -> str:
    """A line the runner reads from this module's stdout for its progress display (not shown as is)."""
    return f"PROGRESS {kind} {name}"


class E2E:
    """The run: one lab, the compiled tools, every path up at once, and the results gathered so far.

    All selected paths are brought up first, then measured *interleaved*: for each size, repetition ``i`` runs
    every path once (in an order rotated by ``i``) before repetition ``i + 1`` starts. On a shared machine the
    load drifts over minutes; interleaving spreads that drift over all paths instead of penalising whichever
    path happened to run during a busy spell, so ratios between paths are fair even when absolute numbers move.
    """

    def __init__(
        self,
        lab: Any,
        tools: dict[str, Path],
        quick: bool,
        workdir: Path,
        providers: dict[str, str] | None = None,
        policy: str | None = None,
        helper_cmd: str | None = None,
        conformance: bool = False,
    ) -> None:
        self.lab = lab
        self.providers = dict(providers or {})  # path name ("provider:<Class>") -> spec
        self.policy = policy
        self.helper_cmd = helper_cmd
        self.conformance_wanted = conformance
        self.conformance: list[dict[str, Any]] = []  # `netsim.testing.conformance` results of the user's helper
        #: the paths that take the mac namespace's one tunnel, each in a phase of its own
        self.exclusive = [*self.providers, *(["user-helper"] if helper_cmd else [])]
        self.tools = tools
        self.quick = quick
        self.workdir = workdir
        self.results: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.seconds = 0.3 if quick else 1.0
        self.reps = 5 if quick else 7
        self.tcp_seconds = 1 if quick else 3
        self.echo_pids: dict[str, int] = {}

    # ------------------------------------------------------------------ measurement
    async def blast(self, dst: tuple[str, int], size: int, seconds: float) -> dict[str, Any]:
        argv = [str(self.tools["udpload"]), "blast", dst[0], str(dst[1]), str(size - 28), f"{seconds:.3f}"]
        argv += [str(WINDOW), str(MAX_PACKETS)]
        result = await self.lab.run("mac", argv, timeout=seconds + 20)
        line = result.stdout.decode().strip().splitlines()[-1]
        return dict(json.loads(line))

    async def _udp_once(self, setup: PathSetup, size: int, cpu: dict[str, float]) -> dict[str, Any]:
        before = {name: proc_cpu_split(pid) for name, pid in setup.procs.items()}
        child0 = children_cpu_seconds()
        run = await self.blast(setup.udp_dst, size, self.seconds)
        cpu["blaster"] = cpu.get("blaster", 0.0) + children_cpu_seconds() - child0
        for name, pid in setup.procs.items():
            _add_cpu(cpu, name, before[name], proc_cpu_split(pid))
        return run

    async def measure_udp(self, setups: dict[str, PathSetup], size: int) -> None:
        active = list(setups)
        for path in list(active):  # warm-up (also proves the path carries traffic before it is timed)
            try:
                await self.blast(setups[path].udp_dst, size, min(0.2, self.seconds))
            except Exception as exc:
                self._fail(path, [f"e2e/{path}/udp{size}"], exc)
                active.remove(path)
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in active}
        cpu: dict[str, dict[str, float]] = {p: {} for p in active}
        for rep in range(self.reps):
            for path in active[rep % len(active) :] + active[: rep % len(active)] if active else []:
                if path not in runs:
                    continue
                try:
                    runs[path].append(await self._udp_once(setups[path], size, cpu[path]))
                except Exception as exc:
                    self._fail(path, [f"e2e/{path}/udp{size}"], exc)
                    del runs[path]
        for path, rs in runs.items():
            self._udp_record(path, setups[path], size, rs, cpu[path])

    def _udp_record(
        self, path: str, setup: PathSetup, size: int, runs: list[dict[str, Any]], cpu: dict[str, float]
    ) -> None:
        pps = [r["pps"] for r in runs]
        loss = [r["loss"] for r in runs]
        received = sum(r["received"] for r in runs)
        cpu, sys_share = split_sys(cpu)
        med = statistics.median(pps)
        self.results.append(
            {
                "name": f"e2e/{path}/udp{size}",
                "group": "e2e",
                "path": path,
                "proto": "udp",
                "size": size,
                "reps": len(runs),
                "seconds_per_run": self.seconds,
                "window": WINDOW,
                "pps": _summary(pps),
                "ns_per_packet": 1e9 / med if med else float("inf"),
                "gbps": med * size * 8 / 1e9,
                "loss": _summary(loss),
                "cpu_s_per_packet": {k: (v / received if received else float("nan")) for k, v in cpu.items()},
                "cpu_sys_share": sys_share,
                "runs": runs,
                **setup.info,
            }
        )
        print(f"  {path:<13} udp {size:>5}B  {med:>12,.0f} pkt/s  loss {statistics.median(loss):.4f}", flush=True)

    async def measure_tcp(self, setups: dict[str, PathSetup]) -> None:
        iperf_pid = next((p.pid for p in self.lab.processes if p.name == "iperf3"), None)
        active = list(setups)
        procs: dict[str, dict[str, int]] = {}
        for path in active:
            procs[path] = {k: v for k, v in setups[path].procs.items() if k != "echo"}
            if iperf_pid is not None:
                procs[path]["iperf3-server"] = iperf_pid
        for path in list(active):
            try:
                await self._iperf(setups[path], 1)  # warm-up
            except Exception as exc:
                self._fail(path, [f"e2e/{path}/tcp"], exc)
                active.remove(path)
        gbps: dict[str, list[float]] = {p: [] for p in active}
        bits: dict[str, float] = dict.fromkeys(active, 0.0)
        cpu: dict[str, dict[str, float]] = {p: dict.fromkeys([*procs[p], "iperf3-client"], 0.0) for p in active}
        for rep in range(self.reps):
            for path in active[rep % len(active) :] + active[: rep % len(active)] if active else []:
                if path not in gbps:
                    continue
                before = {name: proc_cpu_split(pid) for name, pid in procs[path].items()}
                child0 = children_cpu_seconds()
                try:
                    end = await self._iperf(setups[path], self.tcp_seconds)
                except Exception as exc:
                    self._fail(path, [f"e2e/{path}/tcp"], exc)
                    del gbps[path]
                    continue
                cpu[path]["iperf3-client"] += children_cpu_seconds() - child0
                for name, pid in procs[path].items():
                    _add_cpu(cpu[path], name, before[name], proc_cpu_split(pid))
                gbps[path].append(float(end["sum_received"]["bits_per_second"]) / 1e9)
                bits[path] += float(end["sum_received"]["bytes"]) * 8
        for path, values in gbps.items():
            gbit = bits[path] / 1e9
            totals, sys_share = split_sys(cpu[path])
            self.results.append(
                {
                    "name": f"e2e/{path}/tcp",
                    "group": "e2e",
                    "path": path,
                    "proto": "tcp",
                    "reps": len(values),
                    "seconds_per_run": self.tcp_seconds,
                    "gbps": _summary(values),
                    "cpu_s_per_gbit": {k: v / gbit if gbit else float("nan") for k, v in totals.items()},
                    "cpu_sys_share": sys_share,
                    **setups[path].info,
                }
            )
            print(f"  {path:<13} tcp         {statistics.median(values):>9.3f} Gbit/s", flush=True)

    async def _iperf(self, setup: PathSetup, seconds: int) -> dict[str, Any]:
        assert setup.tcp_dst is not None
        argv = ["iperf3", "-c", setup.tcp_dst, "-J", "-t", str(seconds)]
        res = await self.lab.run("mac", argv, timeout=seconds + 30, check=False)
        doc: Any = None
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            pass
        end = doc.get("end") if isinstance(doc, dict) else None
        got = end.get("sum_received") if isinstance(end, dict) else None
        if not (isinstance(got, dict) and "bits_per_second" in got and "bytes" in got):
            # iperf3 -J reports its failures (a refused connection, a busy server) as {"error": ...}
            why = doc.get("error") if isinstance(doc, dict) else None
            raise RuntimeError(f"iperf3 gave no result (status {res.returncode}): {why or res.stdout[-500:]!r}")
        return dict(end)  # type: ignore[arg-type]  # checked just above

    def _fail(self, path: str, names: list[str], exc: BaseException) -> None:
        detail = f"{type(exc).__name__}: {exc}"[:2000]
        self.skipped.extend({"name": n, "reason": f"failed: {detail}"} for n in names)
        print(f"  {path:<13} FAILED: {detail}", flush=True)
        for n in names:
            print(progress_line("done", n), flush=True)

    # ------------------------------------------------------------------ paths
    async def start_echo(self, address: str) -> int:
        """A C UDP echo in inet on ``address`` (added to inet's loopback if it is not there yet)."""
        if address not in self.echo_pids:
            if address != str(self.lab.addr.www_v4):
                await trio.to_thread.run_sync(self.lab.add_address, "inet", f"{address}/32", "lo")
            proc = self.lab.spawn(
                "inet", [str(self.tools["udpload"]), "echo", address, str(ECHO_PORT)], name=f"bench-echo-{address}"
            )
            await proc.wait_output(r"^READY", timeout=10)
            self.echo_pids[address] = proc.pid
        return self.echo_pids[address]

    @asynccontextmanager
    async def path_direct(self) -> AsyncIterator[PathSetup]:
        dst = DESTINATIONS["direct"]
        echo = await self.start_echo(dst)
        yield PathSetup((dst, ECHO_PORT), {"echo": echo}, tcp_dst=dst)

    @asynccontextmanager
    async def path_wireguard_go(self) -> AsyncIterator[PathSetup]:
        from netsim.lab.wireguard import WireGuardGo

        lab, a = self.lab, self.lab.addr
        dst = DESTINATIONS["wireguard-go"]
        echo = await self.start_echo(dst)
        server = WireGuardGo.in_lab(lab, "vpn", stem="bws", listen_port=51820, addresses=[f"{WG_NET}.1/24"])
        client = WireGuardGo.in_lab(lab, "mac", stem="bwc", listen_port=None, addresses=[f"{WG_NET}.2/24"])
        lab.nft("vpn", _vpn_nat(WG_NET))
        async with server, client:
            await server.add_peer(client.public_key, allowed_ips=[f"{WG_NET}.2/32"])
            await client.add_peer(
                server.public_key, allowed_ips=["0.0.0.0/0"], endpoint=f"{a.vpn_wan_v4}:51820", persistent_keepalive=25
            )
            await trio.to_thread.run_sync(partial(lab.add_route, "mac", f"{dst}/32", dev=client.ifname))
            await lab.run("mac", ["ping", "-c", "1", "-W", "2", dst], timeout=10)
            await server.wait_handshake(client.public_key, timeout=10)
            assert client.pid is not None and server.pid is not None
            procs = {"wg-client": client.pid, "wg-server": server.pid, "echo": echo}
            try:
                yield PathSetup((dst, ECHO_PORT), procs, tcp_dst=dst)
            finally:
                await trio.to_thread.run_sync(partial(lab.del_route, "mac", f"{dst}/32", missing_ok=True))
        lab.nft("vpn", "delete table ip netsim_bench_nat\n")

    @asynccontextmanager
    async def path_loop(self, kind: str) -> AsyncIterator[PathSetup]:
        lab = self.lab
        tun, net = LOOP_TUNS[kind]
        sockdir = self.workdir / kind
        sock = str(sockdir / "helper.sock")
        py = [sys.executable, "-m"]
        if kind == "c-floor":
            helper_argv = [str(self.tools["floor"]), "helper", sock]
            provider_argv = [str(self.tools["floor"]), "provider", tun, sock, "64"]
        elif kind == "naive":
            helper_argv = [*py, "netsim.bench.naive_loop", "helper", sock]
            provider_argv = [*py, "netsim.bench.naive_loop", "provider", tun, sock]
        elif kind == "naive-careful":
            helper_argv = [*py, "netsim.bench.naive_loop", "careful-helper", sock]
            provider_argv = [*py, "netsim.bench.naive_loop", "careful-provider", tun, sock]
        else:
            helper_argv = [*py, "netsim.bench.bench_loop", "helper", sock]
            provider_argv = [*py, "netsim.bench.bench_loop", "provider", tun, sock, "64"]
        if kind != "netsim-loop":  # UnixIpcServer creates (and checks) its own 0700 directory
            sockdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {"PYTHONPATH": str(ROOT)}
        helper = lab.spawn("mac", helper_argv, name=f"bench-{kind}-helper", env=env)
        try:
            await helper.wait_output(r"^READY", timeout=20)
            provider = lab.spawn("mac", provider_argv, name=f"bench-{kind}-provider", env=env)
            try:
                await provider.wait_output(r"^READY", timeout=20)
                await trio.to_thread.run_sync(lab.add_address, "mac", f"{net}.2/24", tun)
                await trio.to_thread.run_sync(partial(lab.set_link, "mac", tun, txqueuelen=1000))
                yield PathSetup((f"{net}.9", 9), {"provider": provider.pid, "helper": helper.pid})
            finally:
                await provider.stop(grace=2.0)
        finally:
            await helper.stop(grace=2.0)

    def path_context(self, path: str) -> Any:
        if path == "direct":
            return self.path_direct()
        if path == "wireguard-go":
            return self.path_wireguard_go()
        if path == "netsim":
            return _netsim_path(self, DESTINATIONS["netsim"], "netsim")
        if path in LEVER_PATHS:
            from netsim.bench import bench_netsim

            slot, env = LEVER_PATHS[path]
            return bench_netsim.netsim_path(
                self, lever_destination(path), name=path, policy=self.policy, slot=slot, helper_env=env
            )
        if path in self.providers:
            return _netsim_path(self, tunnel_destination(path, self.exclusive), path, self.providers[path])
        if path == "user-helper":
            from netsim.bench import bench_netsim

            return bench_netsim.netsim_path(
                self,
                tunnel_destination(path, self.exclusive),
                name=path,
                policy=self.policy,
                helper_cmd=self.helper_cmd,
                conformance=self.conformance_wanted,
                slot=1 + self.exclusive.index(path),
            )
        return self.path_loop(path)

    # ------------------------------------------------------------------ driver
    async def run_all(self, paths: list[str], selected: Callable[[str], bool]) -> None:
        """Bring the selected paths up, measure them interleaved, tear them down.

        The ``provider:`` paths and the lever paths (`LEVER_PATHS`) each get a phase of their own afterwards: the
        ``mac`` namespace holds one tunnel (a second provider is refused), so they cannot be up beside ``netsim``.
        """
        alone = [*self.exclusive, *LEVER_PATHS]  # one tunnel per namespace: each in a phase of its own
        shared = [p for p in paths if p not in alone]
        for phase in (shared, *([p] for p in paths if p in alone)):
            await self._run_phase(phase, selected)

    async def _run_phase(self, paths: list[str], selected: Callable[[str], bool]) -> None:
        sizes = (64,) if self.quick else SIZES
        async with AsyncExitStack() as stack:
            setups: dict[str, PathSetup] = {}
            for path in paths:
                names = [f"e2e/{path}/udp{s}" for s in sizes if selected(f"e2e/{path}/udp{s}")]
                if path not in LOOP_PATHS and selected(f"e2e/{path}/tcp"):
                    names.append(f"e2e/{path}/tcp")
                if not names:
                    continue
                reason = self.unavailable(path)
                if reason is not None:
                    self.skipped.extend({"name": n, "reason": reason} for n in names)
                    print(f"  {path:<13} skipped: {reason}", flush=True)
                    for n in names:
                        print(progress_line("done", n), flush=True)
                    continue
                try:
                    setups[path] = await stack.enter_async_context(self.path_context(path))
                except Exception as exc:  # a path that cannot come up is reported; the others still run
                    self._fail(path, names, exc)
                    continue
                if path in LEVER_PATHS:  # what was turned off (or, opt-in, on), in every record of the path
                    setups[path].info.setdefault("lever_env", dict(LEVER_PATHS[path][1]))
                    if path in OPT_IN_LEVERS:
                        setups[path].info.setdefault("lever_on", True)
                print(f"  {path:<13} up", flush=True)
            for size in sizes:
                chosen = {p: st for p, st in setups.items() if selected(f"e2e/{p}/udp{size}")}
                if chosen:
                    print(progress_line("start", f"e2e/{','.join(chosen)}/udp{size}"), flush=True)
                    await self.measure_udp(chosen, size)
                    for p in chosen:
                        print(progress_line("done", f"e2e/{p}/udp{size}"), flush=True)
            chosen = {p: st for p, st in setups.items() if p not in LOOP_PATHS and selected(f"e2e/{p}/tcp")}
            if chosen:
                print(progress_line("start", f"e2e/{','.join(chosen)}/tcp"), flush=True)
                await self.measure_tcp(chosen)
                for p in chosen:
                    print(progress_line("done", f"e2e/{p}/tcp"), flush=True)

    def unavailable(self, path: str) -> str | None:
        if path == "wireguard-go":
            for binary in ("wireguard-go", "wg"):
                if shutil.which(binary) is None:
                    return f"needs {binary} on PATH"
        if path == "naive":
            try:
                import pytun  # noqa: F401
                import scapy  # noqa: F401
            except ImportError as exc:
                return f"needs python-pytun and scapy ({exc})"
        if path == "netsim" or path in LEVER_PATHS or path in self.exclusive:
            return _netsim_unavailable()
        return None


def _vpn_nat(net: str) -> str:
    return (
        "table ip netsim_bench_nat {\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {net}.0/24 oifname "wan" masquerade\n'
        "  }\n"
        "}\n"
    )


def _netsim_unavailable() -> str | None:
    """Why the full netsim tunnel (path 3) cannot run here, or None."""
    try:
        import netsim.runtime.controller
        import netsim.runtime.forwarding
        import netsim.runtime.helper  # noqa: F401
    except ImportError as exc:
        return f"the netsim end-to-end tunnel cannot be imported ({exc})"
    for binary in ("wireguard-go", "wg"):
        if shutil.which(binary) is None:
            return f"needs {binary} on PATH (the VPN server)"
    return None


def _netsim_path(run: E2E, dst: str, name: str, provider: str | None = None) -> Any:
    from netsim.bench import bench_netsim

    slot = 0 if name == "netsim" else 1 + run.exclusive.index(name)
    return bench_netsim.netsim_path(run, dst, name=name, provider=provider, policy=run.policy, slot=slot)


async def _run(
    quick: bool,
    only: str | None,
    providers: tuple[str, ...] = (),
    policy: str | None = None,
    helper_cmd: str | None = None,
    conformance: bool = False,
) -> dict[str, Any]:
    from netsim.bench.bench_loop import provider_label
    from netsim.bench.runner import selector

    selected = selector(only)
    extra = {f"provider:{provider_label(spec)}": spec for spec in providers}
    user = ["user-helper"] if helper_cmd else []
    wanted = [
        p
        for p in (*base_paths(), *extra, *user)
        if any(selected(f"e2e/{p}/{k}") for k in ("udp64", "udp512", "udp1400", "tcp"))
    ]
    out: dict[str, Any] = {"results": [], "skipped": []}
    if not wanted:
        return out

    def skip_all(reason: str) -> dict[str, Any]:
        for p in wanted:
            out["skipped"].append({"name": f"e2e/{p}/*", "reason": reason})
        return out

    if os.geteuid() != 0:
        return skip_all("needs root (network namespaces, TUN devices, nftables)")
    try:
        tools = build_tools()
    except RuntimeError as exc:
        return skip_all(str(exc))
    from netsim.errors import NetsimError
    from netsim.lab.lab import Lab

    workdir = Path(tempfile.mkdtemp(prefix="netsim-bench-"))
    try:
        async with Lab() as lab:
            print(f"lab {lab.run_id} up", flush=True)
            run = E2E(
                lab,
                tools,
                quick,
                workdir,
                providers=extra,
                policy=policy,
                helper_cmd=helper_cmd,
                conformance=conformance,
            )
            await run.run_all(wanted, selected)
            out["results"], out["skipped"] = run.results, run.skipped
            out["conformance"] = run.conformance
    except NetsimError as exc:
        return skip_all(f"lab unavailable: {exc}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def run_e2e(
    quick: bool = False,
    only: str | None = None,
    providers: tuple[str, ...] = (),
    policy: str | None = None,
    helper_cmd: str | None = None,
    conformance: bool = False,
) -> dict[str, Any]:
    """Run the selected end-to-end cases; ``{"results": [...], "skipped": [{"name", "reason"}]}``.

    ``providers``: ``module:Class`` specs run as ``provider:<Class>`` paths; ``policy``: a policy file for the
    helper of the tunnel paths; ``helper_cmd``: a user's helper for the ``user-helper`` path, checked with
    `netsim.testing.conformance` first when ``conformance`` (``"conformance"`` in the answer). All are checked by
    `netsim.bench.runner.check_inputs` first.
    """
    return trio.run(_run, quick, only, providers, policy, helper_cmd, conformance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--only", metavar="PATTERN", help="glob(s) over case names, comma separated")
    parser.add_argument("--provider", action="append", default=[], metavar="MODULE:CLASS")
    parser.add_argument("--policy", metavar="FILE")
    parser.add_argument("--helper", metavar="CMD")
    parser.add_argument("--conformance", action="store_true")
    args = parser.parse_args(argv)
    out = run_e2e(args.quick, args.only, tuple(args.provider), args.policy, args.helper, args.conformance)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for s in out["skipped"]:
        print(f"skipped {s['name']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
