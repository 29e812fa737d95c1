"""``netsim lab up|status|exec|down`` and ``netsim clean``.

Register in netsim/cli.py with ``main.add_command(lab_group)`` and ``main.add_command(clean_command)``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import click
import trio

from netsim.errors import LabError
from netsim.lab.addressing import ADDR, ROLES
from netsim.lab.cleanup import RunRecord, clean, find_runs, owner_alive
from netsim.lab.netns import list_netns

__all__ = ["clean_command", "demo_lab", "lab_group"]


def _need_root() -> None:
    if os.geteuid() != 0:
        raise click.ClickException("the lab needs root (network namespaces, veth, nftables): run with sudo")


def _live_runs() -> list[RunRecord]:
    return [r for r in find_runs() if owner_alive(r)]


def _pick_run(run_id: str | None) -> RunRecord:
    runs = _live_runs()
    if run_id is not None:
        runs = [r for r in runs if r.run_id == run_id]
    elif len(cli_runs := [r for r in runs if r.cli]) == 1:
        runs = cli_runs  # labs started by tests/other tools are only picked with --run
    if not runs:
        stale = [r.run_id for r in find_runs() if not owner_alive(r)]
        hint = f" (stale runs {stale}: run `netsim clean`)" if stale else " (start one with `netsim lab up`)"
        raise click.ClickException(f"no running lab{f' {run_id!r}' if run_id else ''}{hint}")
    if len(runs) > 1:
        raise click.ClickException(f"several labs are running ({[r.run_id for r in runs]}): pass --run ID")
    return runs[0]


@click.group("lab")
def lab_group() -> None:
    """The simulated Mac / home router / VPN server / internet / LAN world."""


@lab_group.command("up")
@click.option("--pcap", "pcap_dir", type=click.Path(file_okay=False), help="write one pcap per link here")
@click.option("--run", "run_id", help="run id (1-6 lowercase letters/digits); random by default")
@click.option("--nat", type=click.Choice(["cone", "symmetric"]), default="cone", show_default=True)
@click.option("--no-services", is_flag=True, help="skip HTTP/DNS/echo/iperf3 servers")
@click.option("--tunnel", is_flag=True, help="also bring up the tunnel (wireguard-go, helper, provider) in mac")
def up(pcap_dir: str | None, run_id: str | None, nat: str, no_services: bool, tunnel: bool) -> None:
    """Bring the lab up and keep it up until Ctrl-C, SIGTERM, SIGHUP or `netsim lab down`.

    Every one of those tears the lab down in order (tunnel, processes, namespaces, run file, key material),
    whether the command runs in the foreground or in the background (``&``, ``setsid``, a service manager).
    """
    _need_root()
    from netsim.lab.lab import Lab

    async def main() -> None:
        # Signals are taken before anything exists, so one arriving during bring-up is acted on right after it.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            lab = Lab(run_id, pcap_dir, services=not no_services, nat=nat, cli=True)  # type: ignore[arg-type]
            t0 = time.monotonic()
            async with lab, contextlib.AsyncExitStack() as stack:
                if tunnel:
                    from netsim.lab.tunnel import netsim_tunnel

                    t = await stack.enter_async_context(netsim_tunnel(lab))
                took = time.monotonic() - t0
                click.echo(f"lab {lab.run_id} up in {took:.2f} s: namespaces {lab.prefix}{{{','.join(ROLES)}}}")
                if tunnel:
                    click.echo(f"  tunnel CONNECTED; client config {t.config_path}")
                click.echo("  try: netsim lab exec mac -- curl -s http://www.lab.test/whoami")
                click.echo("  stop with Ctrl-C or `netsim lab down`")
                async for signum in signals:
                    click.echo(f"lab {lab.run_id}: {signal.Signals(signum).name}, tearing down")
                    break
        click.echo("lab down")

    try:
        trio.run(main)
    except KeyboardInterrupt:
        click.echo("lab down (interrupted)")
    except LabError as exc:
        raise click.ClickException(str(exc)) from exc


@lab_group.command("down")
@click.option("--run", "run_id", help="which lab, if several are up")
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


@lab_group.command("status")
def status() -> None:
    """Show labs: namespaces, addresses, services and processes."""
    from rich.table import Table

    from netsim.console import make_console

    console = make_console()  # no wrapping in a pipe or a CI log
    runs = find_runs()
    if not runs:
        console.print("no lab runs (start one with `netsim lab up`)")
    for run in runs:
        alive = owner_alive(run)
        state = "[green]up[/]" if alive else "[red]stale: owner gone, run `netsim clean`[/]"
        console.print(f"lab [bold]{run.run_id}[/] owner pid {run.owner_pid} {state}; pcap {run.pcap_dir or '-'}")
        ns = Table("namespace", "present")
        for name in run.namespaces:
            ns.add_row(name, "yes" if name in list_netns(name) else "[red]missing[/]")
        console.print(ns)
        procs = Table("process", "role", "pid", "running", "command")
        for p in run.processes:
            running = os.path.exists(f"/proc/{p.pid}")
            procs.add_row(p.name, p.role, str(p.pid), "yes" if running else "no", " ".join(p.argv)[:60])
        console.print(procs)
    addrs = Table("role", "interface", "IPv4", "IPv6", title="addressing (same for every run)")
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
    orphans = [n for n in list_netns("netsim-") if n.split("-")[1] not in {r.run_id for r in runs}]
    if orphans:
        console.print(f"[yellow]namespaces without a run file: {orphans} (`netsim clean --orphans`)[/]")


@lab_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--run", "run_id", help="which lab, if several are up")
@click.argument("role", type=click.Choice(ROLES))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(run_id: str | None, role: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in ROLE's namespace, e.g. `netsim lab exec mac -- ping www.lab.test`."""
    _need_root()
    run = _pick_run(run_id)
    argv = ["ip", "netns", "exec", f"netsim-{run.run_id}-{role}", *command]
    sys.stdout.flush()
    os.execvp("ip", argv)


@click.command("clean")
@click.option("--run", "run_id", help="only this run")
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
    if not (report.removed or report.active or report.orphans):
        click.echo("nothing to clean")


async def demo_lab() -> None:
    """Bring the lab up and show it working (ping, DNS, HTTP, NAT) -- `make demo` until the tunnel exists."""
    import hashlib

    from netsim.lab.lab import Lab
    from netsim.lab.services import HTTP_SHA256

    async with Lab() as lab:
        print(f"lab {lab.run_id} up: {', '.join(lab.netns(r) for r in ROLES)}")
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
