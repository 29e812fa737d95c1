"""``netsim lab up|status|exec|fault|down`` and ``netsim clean``.

Register in netsim/cli.py with ``main.add_command(lab_group)`` and ``main.add_command(clean_command)``.

Scriptable (docs/lab.md, "Scripting the lab"): ``lab up --detach`` prints only the run id on stdout and returns
once the lab (and ``--tunnel``) is up, leaving a background owner process; progress goes to stderr; ``lab status
--json`` is machine-readable; exit codes follow shell conventions (0 ok, 1 failed, 2 usage error such as a bad or
ambiguous ``--run``, 126/127 a command under ``lab exec`` not executable / not found, else the command's own).
``--run`` completes live run ids (click's ``shell_complete``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import click
import trio
from click.shell_completion import CompletionItem

from netsim.errors import NetsimError
from netsim.lab.addressing import ADDR, ALL_ROLES
from netsim.lab.cleanup import RUN_DIR, RunRecord, clean, find_runs, invoking_uid, owner_alive, valid_run_id
from netsim.lab.faults import (
    PROCESS_SIGNALS,
    UPLINKS,
    change_public_address,
    flap,
    freeze,
    lab_netns,
    lab_process,
    link_down,
    link_plan,
    link_up,
    move_default,
    nat_flush,
    signal_process,
    uplink_down,
    uplink_up,
)
from netsim.lab.netns import list_netns
from netsim.lab.pcap import CaptureStats, capture_report_lines, read_capture_summary

__all__ = ["clean_command", "complete_run_ids", "demo_lab", "lab_group", "run_status"]

#: exit codes (shell conventions: bash(1) "EXIT STATUS"; click uses 2 for usage errors)
EXIT_USAGE = 2
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

_STATUS_FILE = "cli.json"  # in the run's log dir (removed with the run): what the owner knows (tunnel, detach)
_READY = "\x00netsim-ready "  # detach: the owner's "lab is up" line on the pipe to the parent


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the lab needs root (network namespaces, veth, nftables): run with sudo")


def _live_runs() -> list[RunRecord]:
    return [r for r in find_runs() if owner_alive(r)]


def complete_run_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """``shell_complete`` for ``--run``: the ids of live labs starting with ``incomplete`` (run files are readable
    without root, so completion works before ``sudo``)."""
    items = []
    for run in _live_runs():
        if run.run_id.startswith(incomplete):
            who = f"uid {run.owner_uid}" if run.owner_uid is not None else "uid ?"
            how = "netsim lab up" if run.cli else "a program/test"
            items.append(CompletionItem(run.run_id, help=f"owner pid {run.owner_pid}, {who}, {how}"))
    return items


def _describe(runs: list[RunRecord]) -> str:
    parts = []
    for r in runs:
        how = "`netsim lab up`" if r.cli else "a program"
        parts.append(f"{r.run_id} (uid {r.owner_uid if r.owner_uid is not None else '?'}, {how})")
    return ", ".join(parts)


def _pick_run(run_id: str | None) -> RunRecord:
    """The lab to act on: ``--run`` if given (it must be live), else the one live lab this user started with
    ``netsim lab up`` (named on stderr). Never another user's or a program's lab without ``--run`` (issue 13)."""
    runs = _live_runs()
    if run_id is not None:
        match = [r for r in runs if r.run_id == run_id]
        if match:
            return match[0]
        if any(r.run_id == run_id for r in find_runs()):
            why = f"its owner is gone: run `netsim clean --run {run_id}`"
        else:
            why = f"running: {_describe(runs)}" if runs else "no lab is running; start one with `netsim lab up`"
        raise click.BadParameter(f"no running lab {run_id!r} ({why})", param_hint="--run")
    me = invoking_uid()
    mine = [r for r in runs if r.cli and r.owner_uid == me]
    if len(mine) == 1:
        click.echo(f"using lab {mine[0].run_id} (the one you started with `netsim lab up`)", err=True)
        return mine[0]
    if len(mine) > 1:
        raise click.UsageError(f"several of your labs are running ({_describe(mine)}): pass --run ID")
    if runs:
        raise click.UsageError(
            f"no lab started by you (uid {me}) with `netsim lab up` is running; other labs: {_describe(runs)}. "
            "Pass --run ID to use one of them"
        )
    stale = [r.run_id for r in find_runs()]
    hint = f" (stale runs {stale}: run `netsim clean`)" if stale else " (start one with `netsim lab up`)"
    raise click.ClickException(f"no running lab{hint}")


def _write_owner_status(run_id: str, data: dict[str, Any]) -> None:
    """The owner's own view (tunnel state, detached) next to the run file, written atomically."""
    path = RUN_DIR / run_id / _STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_owner_status(run_id: str) -> dict[str, Any]:
    try:
        data = json.loads((RUN_DIR / run_id / _STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@click.group("lab")
def lab_group() -> None:
    """The simulated Mac / home router / VPN server / internet / LAN world."""


class _Progress:
    """``lab up`` progress: one line per bring-up step on stderr (stdout stays for results and the run id)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.t0 = time.monotonic()
        self._write = write

    def __call__(self, what: str) -> None:
        self._write(f"  - [{time.monotonic() - self.t0:5.2f} s] {what}")


def _run_lab(
    *,
    run_id: str | None,
    pcap_dir: str | None,
    nat: str,
    services: bool,
    tunnel: bool,
    second_uplink: bool = False,
    progress: _Progress,
    on_up: Callable[[Any, Any], None],
    detached: bool,
) -> int:
    """Bring the lab up, call ``on_up(lab, tunnel_or_None)``, keep it up until SIGTERM/SIGHUP/Ctrl-C, tear down."""
    from netsim.lab.lab import Lab

    try:  # bad options (capture buffer, run id) are refused before anything starts
        lab = Lab(
            run_id,
            pcap_dir,
            services=services,
            nat=nat,  # type: ignore[arg-type]
            cli=True,
            progress=progress,
            second_uplink=second_uplink,
        )
    except NetsimError as exc:
        click.echo(f"Error: {exc}", err=True)
        return 1

    async def main() -> None:
        # Signals are taken before anything exists, so one arriving during bring-up is acted on right after it.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            # the nursery is outside the stack, so the tunnel's own scopes nest inside it
            async with lab, trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
                t = None
                state: dict[str, Any] = {"detached": detached, "tunnel": None}
                if tunnel:
                    from netsim.lab.tunnel import netsim_tunnel

                    progress("tunnel: starting (WireGuard server, helper, provider)")
                    watch = trio.CancelScope()
                    nursery.start_soon(_watch_tunnel_steps, lab, progress, watch)
                    try:
                        t = await stack.enter_async_context(netsim_tunnel(lab))
                    finally:
                        watch.cancel()
                    progress("tunnel: CONNECTED")
                    state["tunnel"] = {"state": "connected", "client_config": str(t.config_path)}
                _write_owner_status(lab.run_id, state)
                on_up(lab, t)
                async for signum in signals:
                    click.echo(f"lab {lab.run_id}: {signal.Signals(signum).name}, tearing down")
                    break
                if state["tunnel"] is not None:
                    state["tunnel"]["state"] = "stopping"
                    _write_owner_status(lab.run_id, state)
        click.echo("lab down")

    try:
        trio.run(main)
    except KeyboardInterrupt:
        click.echo("lab down (interrupted)")
    except NetsimError as exc:  # LabError, MissingDependency, a tunnel's ConfigError: a message, no traceback
        click.echo(f"Error: {exc}", err=True)
        return 1
    finally:
        _echo_captures(lab.capture_history)  # after teardown: tcpdump's drop counts per file
    return 0


# what `netsim_tunnel` starts, in order, recognised by the names of the processes it spawns through the lab
_TUNNEL_STEPS = (("wireguard-go", "tunnel: wireguard-go started in vpn"), ("helper", "tunnel: helper started in mac"))


async def _watch_tunnel_steps(lab: Any, progress: _Progress, scope: trio.CancelScope) -> None:
    """Report the tunnel's bring-up steps as their processes appear (polled: `netsim_tunnel` has no hook)."""
    with scope:
        pending = list(_TUNNEL_STEPS)
        while pending:
            names = [p.name for p in list(lab.processes)]
            while pending and any(n.startswith(pending[0][0]) for n in names):
                progress(pending.pop(0)[1])
            await trio.sleep(0.05)
        progress("tunnel: provider connecting")


@lab_group.command("up")
@click.option("--pcap", "pcap_dir", type=click.Path(file_okay=False), help="write one pcap per link here")
@click.option("--run", "run_id", help="run id (1-6 lowercase letters/digits); random by default")
@click.option("--nat", type=click.Choice(["cone", "symmetric"]), default="cone", show_default=True)
@click.option("--no-services", is_flag=True, help="skip HTTP/DNS/echo/iperf3 servers")
@click.option("--tunnel", is_flag=True, help="also bring up the tunnel (wireguard-go, helper, provider) in mac")
@click.option(
    "--second-uplink", is_flag=True, help="also give mac an en1 behind a second ISP router (isp2), for path changes"
)
@click.option(
    "--detach",
    is_flag=True,
    help="return once the lab is up, print only its run id; a background owner keeps it until `netsim lab down`",
)
def up(
    *,
    pcap_dir: str | None,
    run_id: str | None,
    nat: str,
    no_services: bool,
    tunnel: bool,
    second_uplink: bool,
    detach: bool,
) -> None:
    """Bring the lab up and keep it up until Ctrl-C, SIGTERM, SIGHUP or `netsim lab down`.

    Every one of those tears the lab down in order (tunnel, processes, namespaces, run file, key material),
    whether the command runs in the foreground or in the background (``&``, ``setsid``, a service manager).
    With ``--detach`` the command returns once the lab (and ``--tunnel``) is up and prints the run id alone on
    stdout (``RUN=$(netsim lab up --detach)``); progress goes to stderr in both modes.
    """
    _need_root()
    if run_id is not None and not valid_run_id(run_id):
        raise click.BadParameter(f"{run_id!r} must be 1-6 lowercase letters/digits", param_hint="--run")
    live = [r for r in _live_runs() if r.run_id == run_id]
    if live:  # refuse before anything is touched (issue 13: the lab was destroyed)
        raise click.ClickException(
            f"lab {run_id} is already running (owner pid {live[0].owner_pid}): choose another --run, or stop it "
            f"with `netsim lab down --run {run_id}`"
        )
    options: dict[str, Any] = {
        "run_id": run_id,
        "pcap_dir": pcap_dir,
        "nat": nat,
        "services": not no_services,
        "tunnel": tunnel,
        "second_uplink": second_uplink,
    }
    if detach:
        sys.exit(_detach(options))

    def on_up(lab: Any, t: Any) -> None:
        took = time.monotonic() - progress.t0
        click.echo(f"lab {lab.run_id} up in {took:.2f} s: namespaces {lab.prefix}{{{','.join(lab.roles)}}}")
        if t is not None:
            click.echo(f"  tunnel CONNECTED; client config {t.config_path}")
        click.echo("  try: netsim lab exec mac -- curl -s http://www.lab.test/whoami")
        click.echo("  stop with Ctrl-C or `netsim lab down`")

    progress = _Progress(lambda line: click.echo(line, err=True))
    code = _run_lab(**options, progress=progress, on_up=on_up, detached=False)
    if code:
        sys.exit(code)


def _detach(options: dict[str, Any]) -> int:
    """Fork a background owner (own session, no terminal), relay its progress, print the run id once it is up.

    The owner writes its progress lines and, once up, a ready line with the run id to a pipe; then it points
    its stdout/stderr at ``/run/netsim/<run>/owner.log`` and lives on until SIGTERM (``netsim lab down``).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the owner
        code = 1
        try:
            os.close(read_fd)
            os.setsid()  # no controlling terminal: the shell's Ctrl-C and hang-up are not ours
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.close(null)
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)  # until up, everything (progress, errors, tracebacks) reaches the parent
            pipe = os.fdopen(write_fd, "w", buffering=1)

            def on_up(lab: Any, t: Any) -> None:
                sys.stdout.flush()
                sys.stderr.flush()
                log = os.open(RUN_DIR / lab.run_id / "owner.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.close(log)
                pipe.write(f"{_READY}{lab.run_id} {os.getpid()}\n")
                pipe.close()

            progress = _Progress(lambda line: print(line, file=sys.stderr, flush=True))
            code = _run_lab(**options, progress=progress, on_up=on_up, detached=True)
        except BaseException:  # the owner must never return into the parent's click
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    t0 = time.monotonic()
    with os.fdopen(read_fd, "r") as pipe:
        try:
            for line in pipe:
                if line.startswith(_READY):
                    run_id, owner = line[len(_READY) :].split()
                    click.echo(
                        f"lab {run_id} up in {time.monotonic() - t0:.2f} s (owner pid {owner}, log "
                        f"{RUN_DIR / run_id / 'owner.log'}); stop it with `netsim lab down --run {run_id}`",
                        err=True,
                    )
                    click.echo(run_id)
                    return 0
                click.echo(line.rstrip("\n"), err=True)
        except KeyboardInterrupt:  # Ctrl-C while waiting: the owner (in its own session) is told to tear down
            os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    click.echo(f"Error: the lab did not come up (owner exited with {code})", err=True)
    return code if code > 0 else 1


@lab_group.command("down")
@click.option("--run", "run_id", help="which lab (default: the one you started)", shell_complete=complete_run_ids)
@click.option("--timeout", default=30.0, show_default=True)
def down(run_id: str | None, timeout: float) -> None:
    """Stop a lab started with `netsim lab up` (signals its owner, which tears it down)."""
    _need_root()
    run = _pick_run(run_id)
    os.kill(run.owner_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while owner_alive(run):
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"lab {run.run_id} owner (pid {run.owner_pid}) did not exit; kill it, then `netsim clean`"
            )
        time.sleep(0.05)
    click.echo(f"lab {run.run_id} down")
    if run.pcap_dir:
        _echo_captures(read_capture_summary(run.pcap_dir, run.run_id))


def _echo_captures(history: list[CaptureStats]) -> None:
    """One line per capture file with its packet count; a partial one is marked (docs/lab.md, Captures)."""
    if history:
        click.echo("captures:")
        for line in capture_report_lines(history):
            click.echo(line)


def run_status(run: RunRecord) -> dict[str, Any]:
    """One run as `netsim lab status --json` shows it (see docs/lab.md for the fields)."""
    alive = owner_alive(run)
    owner = _read_owner_status(run.run_id) if alive else {}
    present = set(list_netns(f"netsim-{run.run_id}-"))
    pcaps: list[str] = []
    if run.pcap_dir:
        with contextlib.suppress(OSError):
            pcaps = sorted(str(p) for p in Path(run.pcap_dir).glob("*.pcap"))
    return {
        "run_id": run.run_id,
        "alive": alive,
        "owner_pid": run.owner_pid,
        "owner_uid": run.owner_uid,
        "cli": run.cli,
        "detached": owner.get("detached"),
        "created": run.created,
        "namespaces": [{"name": n, "present": n in present} for n in run.namespaces],
        "processes": [
            {**asdict(p), "argv": list(p.argv), "running": os.path.exists(f"/proc/{p.pid}")} for p in run.processes
        ],
        "tunnel": owner.get("tunnel"),
        "pcap_dir": run.pcap_dir,
        "pcaps": pcaps,
    }


@lab_group.command("status")
@click.option("--run", "run_id", help="only this lab", shell_complete=complete_run_ids)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (docs/lab.md)")
def status(run_id: str | None, as_json: bool) -> None:
    """Show labs: namespaces, addresses, services and processes."""
    runs = [r for r in find_runs() if run_id is None or r.run_id == run_id]
    if run_id is not None and not runs:
        raise click.BadParameter(f"no lab run {run_id!r}", param_hint="--run")
    orphans = [n for n in list_netns("netsim-") if n.split("-")[1] not in {r.run_id for r in find_runs()}]
    if as_json:
        doc = {"runs": [run_status(r) for r in runs], "orphan_namespaces": orphans if run_id is None else []}
        click.echo(json.dumps(doc, indent=1))
        return
    from rich.table import Table

    from netsim.console import make_console

    console = make_console()  # no wrapping in a pipe or a CI log
    if not runs:
        console.print("no lab runs (start one with `netsim lab up`)")
    for run in runs:
        info = run_status(run)
        state = "[green]up[/]" if info["alive"] else "[red]stale: owner gone, run `netsim clean`[/]"
        tunnel = info["tunnel"]
        extra = f"; tunnel {tunnel['state']}" if tunnel else ""
        console.print(
            f"lab [bold]{run.run_id}[/] owner pid {run.owner_pid} uid {run.owner_uid} {state}; "
            f"pcap {run.pcap_dir or '-'}{extra}"
        )
        ns = Table("namespace", "present")
        for item in info["namespaces"]:
            ns.add_row(item["name"], "yes" if item["present"] else "[red]missing[/]")
        console.print(ns)
        procs = Table("process", "role", "pid", "running", "command")
        for p in info["processes"]:
            procs.add_row(
                p["name"], p["role"], str(p["pid"]), "yes" if p["running"] else "no", " ".join(p["argv"])[:60]
            )
        console.print(procs)
    addrs = Table(
        "role", "interface", "IPv4", "IPv6", title="addressing (same for every run; mac en1 and isp2: --second-uplink)"
    )
    for row in ADDR.table():
        addrs.add_row(*row)
    console.print(addrs)
    names = Table("name", "A", "AAAA", title="lab.test names")
    for host in ADDR.names():
        names.add_row(host.name, str(host.v4), str(host.v6))
    console.print(names)
    console.print(
        "services: inet www HTTP :80 / UDP echo :7 / iperf3 :5201, inet dns :53, isp router DNS :53, "
        "lan printer HTTP :80 / UDP echo :7"
    )
    if orphans and run_id is None:
        console.print(f"[yellow]namespaces without a run file: {orphans} (`netsim clean --orphans`)[/]")


def _resolve_command(prog: str) -> tuple[str | None, int, str]:
    """Find ``prog`` as the shell would: ``(path, 0, "")``, or ``(None, 127|126, why)`` (bash(1), EXIT STATUS).

    The lab's namespaces share the root mount namespace (``ip netns exec`` only bind-mounts /etc/netns files),
    so what is found here is what runs there.
    """
    if "/" in prog:
        candidates = [prog]
    else:
        found = shutil.which(prog)
        if found is not None:
            return found, 0, ""
        dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
        candidates = [os.path.join(d or ".", prog) for d in dirs if os.path.isfile(os.path.join(d or ".", prog))]
        if not candidates:
            return None, EXIT_NOT_FOUND, "command not found"
    path = candidates[0]
    if not os.path.exists(path):
        return None, EXIT_NOT_FOUND, "No such file or directory"
    if os.path.isdir(path):
        return None, EXIT_NOT_EXECUTABLE, "Is a directory"
    if not os.access(path, os.X_OK):
        return None, EXIT_NOT_EXECUTABLE, "Permission denied"
    return path, 0, ""


@lab_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--run", "run_id", help="which lab (default: the one you started)", shell_complete=complete_run_ids)
@click.argument("role", type=click.Choice(ALL_ROLES))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx: click.Context, run_id: str | None, role: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in ROLE's namespace, e.g. `netsim lab exec mac -- ping www.lab.test`.

    Exit status: the command's own; 127 if it is not found, 126 if it is not executable, 2 for a usage error.
    """
    _need_root()
    run = _pick_run(run_id)
    path, code, why = _resolve_command(command[0])
    if path is None:
        click.echo(f"netsim lab exec: {command[0]}: {why}", err=True)
        ctx.exit(code)
    argv = ["ip", "netns", "exec", f"netsim-{run.run_id}-{role}", path, *command[1:]]
    sys.stdout.flush()
    os.execvp("ip", argv)


@click.command("clean")
@click.option("--run", "run_id", help="only this run", shell_complete=complete_run_ids)
@click.option("--force", is_flag=True, help="also remove runs whose owner is still alive")
@click.option("--orphans", is_flag=True, help="also remove netsim-* namespaces that have no run file")
def clean_command(run_id: str | None, force: bool, orphans: bool) -> None:
    """Remove labs left behind by killed processes (only objects named netsim-<run>-*)."""
    _need_root()
    report = clean(run_id, force=force, orphans=orphans)
    for item in report.removed:
        click.echo(f"removed {item}")
    for run in report.active:
        click.echo(f"kept running lab {run} (owner alive; `netsim lab down` or --force)")
    if report.orphans:
        click.echo(f"left {len(report.orphans)} namespaces without a run file: {report.orphans} (use --orphans)")
    for run in report.corrupt:
        click.echo(f"kept run {run}: its run file is corrupt, its owner cannot be checked (--run {run} --force)")
    if not (report.removed or report.active or report.orphans or report.corrupt):
        click.echo("nothing to clean")


async def demo_lab() -> None:
    """Bring the lab up and show it working (ping, DNS, HTTP, NAT) -- `make demo` until the tunnel exists."""
    import hashlib

    from netsim.lab.lab import Lab
    from netsim.lab.services import HTTP_SHA256

    async with Lab() as lab:
        print(f"lab {lab.run_id} up: {', '.join(lab.netns(r) for r in lab.roles)}")
        steps = [
            ("mac", ["ping", "-c1", "-W2", "printer.lab.test"], "LAN host, no router hop"),
            ("mac", ["ping", "-6", "-c1", "-W2", "www.lab.test"], "internet over IPv6 (NAT66)"),
            ("mac", ["dig", "+short", "vpn.lab.test", "AAAA"], "DNS through the home router"),
            ("mac", ["curl", "-s", "http://www.lab.test/whoami"], "the web server sees the ISP's address"),
        ]
        for role, argv, why in steps:
            res = await lab.run(role, argv, check=False)
            line = res.stdout.decode().strip().splitlines()
            shown = line[1] if argv[0] == "ping" and len(line) > 1 else " ".join(line)
            print(f"[{role}] {' '.join(argv)}  # {why}\n    {shown}")
        body = (await lab.run("mac", ["curl", "-s", "http://www.lab.test/"])).stdout
        ok = hashlib.sha256(body).hexdigest() == HTTP_SHA256
        print(f"[mac] GET http://www.lab.test/ -> {len(body)} bytes, sha256 {'matches' if ok else 'MISMATCH'}")


# -- faults (issue 16; docs/faults.md) ------------------------------------------------------------------------
@lab_group.group("fault")
def fault_group() -> None:
    """Inject a fault into a running lab: links down/up/flapping, NAT mappings forgotten, processes frozen.

    Each acts on the lab's own namespaces only (`netsim.lab.faults`); `--run` picks the lab as for `exec`.
    """


def _fault_ns(run_id: str | None, role: str) -> str:
    _need_root()
    return lab_netns(_pick_run(run_id).run_id, role)


_RUN_OPTION = click.option(
    "--run", "run_id", help="which lab (default: the one you started)", shell_complete=complete_run_ids
)


@fault_group.command("link-down")
@_RUN_OPTION
@click.argument("role", type=click.Choice(ALL_ROLES))
@click.argument("ifname")
def fault_link_down(run_id: str | None, role: str, ifname: str) -> None:
    """Take ROLE's IFNAME down, e.g. `netsim lab fault link-down mac en0`."""
    link_down(_fault_ns(run_id, role), ifname)
    click.echo(f"{role}:{ifname} down")


@fault_group.command("link-up")
@_RUN_OPTION
@click.argument("role", type=click.Choice(ALL_ROLES))
@click.argument("ifname")
def fault_link_up(run_id: str | None, role: str, ifname: str) -> None:
    """Bring ROLE's IFNAME up and give back the lab's addresses and default routes on it (DHCP's part)."""
    link_up(_fault_ns(run_id, role), ifname, link_plan(role, ifname))
    click.echo(f"{role}:{ifname} up")


@fault_group.command("flap")
@_RUN_OPTION
@click.argument("role", type=click.Choice(ALL_ROLES))
@click.argument("ifname")
@click.option("--down-for", type=float, default=5.0, show_default=True, help="seconds down each time")
@click.option("--times", type=int, default=1, show_default=True)
@click.option("--up-for", type=float, default=5.0, show_default=True, help="seconds up between flaps")
def fault_flap(run_id: str | None, role: str, ifname: str, *, down_for: float, times: int, up_for: float) -> None:
    """Take ROLE's IFNAME down for --down-for seconds, --times times (bounded: 100 x 60 s)."""
    ns = _fault_ns(run_id, role)
    spans = trio.run(
        partial(flap, ns, ifname, down_for=down_for, times=times, up_for=up_for, plan=link_plan(role, ifname))
    )
    click.echo(f"{role}:{ifname} flapped {len(spans)} time(s), {down_for:g} s down each")


@fault_group.command("nat-flush")
@_RUN_OPTION
@click.argument("role", type=click.Choice(ALL_ROLES), default="isp")
def fault_nat_flush(run_id: str | None, role: str) -> None:
    """Make ROLE (default: the home router) forget its NAT mappings (conntrack -F)."""
    click.echo(f"{role}: {nat_flush(_fault_ns(run_id, role))} conntrack entries flushed")


@fault_group.command("signal")
@_RUN_OPTION
@click.argument("name")
@click.argument("sig", metavar="SIGNAL", type=click.Choice(sorted(PROCESS_SIGNALS), case_sensitive=False))
def fault_signal(run_id: str | None, name: str, sig: str) -> None:
    """Send SIGNAL (STOP, CONT, TERM or KILL) to the lab process NAME, e.g. `netsim lab fault signal helper STOP`.

    NAME is as `netsim lab status` lists it (helper, provider, wireguard-go-<ifname>-<n>, svc-inet ...); the pid
    is checked against the run file's start time first, so a reused pid is never signalled.
    """
    _need_root()
    info = lab_process(_pick_run(run_id), name)
    signal_process(info, PROCESS_SIGNALS[sig.upper()])
    click.echo(f"{name} (pid {info.pid}): SIG{sig.upper()} sent")


@fault_group.command("freeze")
@_RUN_OPTION
@click.argument("name")
@click.option("--for", "seconds", type=float, default=3.0, show_default=True, help="seconds frozen (at most 300)")
def fault_freeze(run_id: str | None, name: str, seconds: float) -> None:
    """Freeze the lab process NAME (SIGSTOP) for --for seconds, then continue it (SIGCONT), even on Ctrl-C."""
    _need_root()
    info = lab_process(_pick_run(run_id), name)
    trio.run(freeze, info, seconds)
    click.echo(f"{name} (pid {info.pid}) frozen for {seconds:g} s and continued")


# -- mtu faults (issue 16; docs/faults.md, "MTU and PMTU black hole") --------------------------------------------
@fault_group.command("mtu")
@_RUN_OPTION
@click.option("--role", type=click.Choice(ALL_ROLES), default="isp", show_default=True)
@click.option("--ifname", default="wan", show_default=True)
@click.option("--mtu", type=int, required=True, help="1280-65535 (1500 is the lab's own)")
def fault_mtu(run_id: str | None, role: str, ifname: str, mtu: int) -> None:
    """Set the MTU of ROLE's IFNAME and its veth peer, e.g. `--role isp --ifname wan --mtu 1400`."""
    from netsim.lab.faults import set_mtu

    _fault_ns(run_id, role)
    ends = set_mtu(_pick_run(run_id).run_id, role, ifname, mtu)
    click.echo(f"mtu {mtu} on {', '.join(f'{r}:{i}' for r, i in ends)}")


@fault_group.command("blackhole")
@_RUN_OPTION
@click.argument("address")
@click.option("--role", type=click.Choice(ALL_ROLES), default="inet", show_default=True, help="where to drop")
@click.option("--for", "seconds", type=click.FloatRange(0.1, 600), default=5.0, show_default=True)
def fault_blackhole(run_id: str | None, address: str, role: str, seconds: float) -> None:
    """Drop every packet to or from ADDRESS in ROLE for --for seconds, counted, then restore, e.g.
    `netsim lab fault blackhole 192.0.2.2 --for 10` (the VPN server unreachable, its process alive)."""
    import time

    from netsim.lab.faults import Blackhole

    hole = Blackhole(_fault_ns(run_id, role), address)
    with hole:
        try:
            time.sleep(seconds)
        finally:
            dropped = hole.dropped()
    click.echo(f"{role}: {address} blackholed for {seconds:g} s, {dropped} packets dropped")


@fault_group.command("pmtu-blackhole")
@_RUN_OPTION
@click.option("--role", type=click.Choice(ALL_ROLES), default="isp", show_default=True)
@click.option("--remove", is_flag=True, help="remove the black hole this command installed")
def fault_pmtu_blackhole(run_id: str | None, role: str, remove: bool) -> None:
    """Drop ICMP frag-needed / ICMPv6 packet-too-big on ROLE (a counted nft table named after the run)."""
    from netsim.lab.faults import PmtuBlackhole

    _fault_ns(run_id, role)
    hole = PmtuBlackhole(_pick_run(run_id).run_id, role)
    if remove:
        v4, v6 = hole.adopt().dropped_by_type()
        hole.remove()
        click.echo(f"{role}: PMTU black hole removed ({v4} frag-needed, {v6} packet-too-big dropped)")
    else:
        hole.install()
        click.echo(f"{role}: PMTU black hole installed (table inet {hole.table}); --remove takes it away")


# ---- path change ----
@fault_group.command("path")
@_RUN_OPTION
@click.option("--to", "to", type=click.Choice(UPLINKS), required=True, help="the uplink that becomes the primary")
def fault_path(run_id: str | None, to: str) -> None:
    """Move the Mac's default routes (IPv4 and IPv6) to uplink --to, e.g. `netsim lab fault path --to en1`
    (a lab from `netsim lab up --second-uplink`); the Mac's system DNS follows the primary's router."""
    before = move_default(_fault_ns(run_id, "mac"), to)
    click.echo(f"mac: default routes moved from {before or 'none'} to {to}")


@fault_group.command("uplink-down")
@_RUN_OPTION
@click.argument("ifname", type=click.Choice(UPLINKS))
def fault_uplink_down(run_id: str | None, ifname: str) -> None:
    """Take the Mac's uplink IFNAME away; the default routes move to the other uplink if it was the primary."""
    primary = uplink_down(_fault_ns(run_id, "mac"), ifname)
    click.echo(f"mac:{ifname} down; primary uplink {primary or 'none (offline)'}")


@fault_group.command("uplink-up")
@_RUN_OPTION
@click.argument("ifname", type=click.Choice(UPLINKS))
@click.option("--primary", is_flag=True, help="make it the primary uplink again (first in the service order)")
def fault_uplink_up(run_id: str | None, ifname: str, primary: bool) -> None:
    """Bring the Mac's uplink IFNAME back with its addresses (and the default routes with --primary)."""
    now = uplink_up(_fault_ns(run_id, "mac"), ifname, primary=primary)
    click.echo(f"mac:{ifname} up; primary uplink {now or 'none (offline)'}")


@fault_group.command("public-address")
@_RUN_OPTION
@click.argument("role", type=click.Choice(["isp", "isp2"]), default="isp")
@click.option("--to", "to", multiple=True, help="new WAN address addr/prefix (once per family); default: the next one")
def fault_public_address(run_id: str | None, role: str, to: tuple[str, ...]) -> None:
    """Change ROLE's (default: the home router's) public WAN address; NAT follows, conntrack is flushed."""
    change = change_public_address(_fault_ns(run_id, role), to or None)
    click.echo(f"{role}: public address {', '.join(change.old)} -> {', '.join(change.new)} ({change.flushed} flushed)")


@fault_group.command("impair")
@_RUN_OPTION
@click.option("--role", type=click.Choice(ALL_ROLES), default="isp", show_default=True)
@click.option("--ifname", default="wan", show_default=True)
@click.option("--direction", type=click.Choice(["egress", "ingress"]), default="egress", show_default=True)
@click.option("--loss", default="0", help="probability a packet is dropped: 0.1 or 10%")
@click.option("--delay", default="0", help="added delay: 50ms, 1.5s")
@click.option("--jitter", default="0", help="uniform +- jitter on the delay: 5ms")
@click.option("--reorder", default="0", help="probability a packet skips the delay (needs --delay)")
@click.option("--duplicate", default="0", help="probability a packet is sent twice")
@click.option("--rate", default="0", help="rate limit: 10mbit, 512kbit (0: none)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--protocol", type=click.Choice(["udp", "tcp"]), help="impair only this protocol")
@click.option("--port", type=int, help="...and only this source or destination port")
@click.option("--duration", type=float, help="seconds, then stop (default: until Ctrl-C; at most 3600)")
def fault_impair(
    run_id: str | None, role: str, ifname: str, direction: str, duration: float | None, **opts: Any
) -> None:
    """Impair one direction of ROLE's IFNAME (loss, delay, jitter, reorder, duplication, rate), seeded, until
    Ctrl-C or --duration; prints the counters at the end (docs/impairment.md)."""
    from netsim.core.impairment import Impairment, parse_duration, parse_probability, parse_rate
    from netsim.lab.impair import Impairer

    try:
        spec = Impairment(
            loss=parse_probability(opts["loss"]),
            delay=parse_duration(opts["delay"]),
            jitter=parse_duration(opts["jitter"]),
            reorder=parse_probability(opts["reorder"]),
            duplicate=parse_probability(opts["duplicate"]),
            rate=parse_rate(opts["rate"]),
            seed=opts["seed"],
        )
    except NetsimError as exc:
        raise click.UsageError(str(exc)) from exc
    if duration is not None and not 0 < duration <= 3600:
        raise click.BadParameter("between 0 and 3600 seconds", param_hint="--duration")
    limit = duration if duration is not None else 3600.0
    ns = _fault_ns(run_id, role)
    try:
        imp = Impairer(ns, ifname, direction, spec, protocol=opts["protocol"], port=opts["port"], max_duration=limit)  # type: ignore[arg-type]
        imp.start()
    except NetsimError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{role}:{ifname} {direction} impaired ({spec.describe()}); pid {imp.pid}, chain {imp.chain}", err=True)
    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and imp.statistics().running:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        stats = imp.stop()
    m = stats.model
    click.echo(
        f"{role}:{ifname} {direction}: seen {m.seen} passed {m.passed} dropped {m.dropped} overflow {m.overflow} "
        f"duplicated {m.duplicated} delayed {m.delayed} reordered {m.reordered} kernel_dropped {stats.kernel_dropped}"
    )
