"""``netsim bench``: run the benchmark suite in `netsim.bench` (see docs/benchmarks.md).

The suite ships in the wheel (its C sources as package data, compiled at run time into ``~/.cache/netsim``), so
``pip install netsim`` then ``netsim bench --quick`` works outside a checkout; this command only parses options and
hands over to `netsim.bench.runner.run_bench`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import ModuleType

import click

__all__ = ["bench_command"]


def _import_runner() -> ModuleType:
    # Imported on use: the runner pulls in the lab and the benchmark cases, which `netsim --help` does not need.
    from netsim.bench import runner

    return runner


@click.command("bench")
@click.option("--quick", is_flag=True, help="fewer runs and sizes; every path class that can run (< 2 minutes)")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="write the full report as JSON ('-': to stdout, instead of the text report)",
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write a PNG plot of packets/s")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), help="write the tables as Markdown")
@click.option("--only", "only", metavar="PATTERN", help="globs over case names, e.g. 'micro/*' or 'e2e/*/udp64'")
@click.option("--list", "list_cases", is_flag=True, help="print the case names (respects --quick, --provider) and exit")
@click.option(
    "--provider",
    "providers",
    multiple=True,
    metavar="MODULE:CLASS",
    help="your PacketTunnelProvider subclass, run beside the built-in one in the loop and e2e cases (repeatable)",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False),
    help="bypass policy file (.toml/.yaml, docs/policy.md) for the helper of the loop and e2e cases",
)
@click.option(
    "--helper",
    "helper_cmd",
    metavar="CMD",
    help="your helper executable speaking docs/ipc.md, as a command with {socket} (and {config}, {token_file}, "
    "{policy}); runs e2e/user-helper/* beside netsim's helper",
)
@click.option("--conformance", is_flag=True, help="check the --helper with netsim.testing.conformance first")
@click.option(
    "--faults",
    is_flag=True,
    help="run the faults group instead: recovery, loss, leaks and a download per fault scenario, and the LD5 "
    "soak, in the lab (root; docs/faults.md, 'Recovery measured')",
)
@click.option(
    "--write-docs",
    is_flag=True,
    help="write docs/benchmarks.json from this run and re-render docs/benchmarks.md and its plot from it",
)
@click.option(
    "--from-json",
    "from_json",
    type=click.Path(exists=True, dir_okay=False),
    help="measure nothing: report (and with --write-docs publish) an earlier run's JSON",
)
@click.option(
    "--compare",
    "compare_path",
    type=click.Path(exists=True, dir_okay=False),
    help="also print a before/after Markdown table (targets and ratios) against an earlier run's JSON",
)
@click.option(
    "--profile",
    "profile_paths",
    metavar="PATHS",
    help="after the run, profile these end-to-end paths (comma separated, e.g. 'netsim,netsim-loop') under load "
    "with py-spy and strace, into the report's profiles (root)",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="the status line on stderr (cases done/total, current case, elapsed, ETA); default: when stderr is a terminal",
)
@click.option("--seed", type=int, default=1, show_default=True, help="corpus seed")
def bench_command(
    *,
    quick: bool,
    json_path: str | None,
    plot_path: str | None,
    markdown_path: str | None,
    only: str | None,
    list_cases: bool,
    providers: tuple[str, ...],
    policy_path: str | None,
    helper_cmd: str | None,
    conformance: bool,
    faults: bool,
    write_docs: bool,
    from_json: str | None,
    progress: bool | None,
    profile_paths: str | None,
    compare_path: str | None,
    seed: int,
) -> None:
    """Measure per-packet cost: micro steps, the provider<->helper loop, and end to end in the lab.

    End-to-end cases need root (they bring up a lab); without it they are reported as skipped, with the reason.
    With --provider your provider runs beside the built-in one (loop/provider:<Class>/..., e2e/provider:<Class>/...)
    and the report gives the ratios; see docs/benchmarks.md. With --faults the faults group runs instead (fault
    scenarios under steady traffic and the LD5 soak; docs/faults.md). --write-docs publishes the run as
    docs/benchmarks.json and re-renders docs/benchmarks.md from it (--from-json FILE: from an earlier run).
    """
    runner = _import_runner()
    from netsim.errors import ConfigError

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: a --provider module in the current directory
    if faults and (providers or policy_path or helper_cmd or conformance):
        raise click.UsageError(
            "--faults measures the built-in tunnel; --provider, --policy, --helper and --conformance do not apply"
        )
    try:
        inputs = runner.check_inputs(providers, policy_path, helper_cmd, conformance)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if list_cases:
        for name in runner.case_names(quick, seed, inputs, faults=faults):
            click.echo(name)
        return
    if from_json:
        doc = runner.load_report(from_json)
        if json_path and json_path != "-":
            runner.write_json(doc, json_path)
        if markdown_path:
            Path(markdown_path).write_text(runner.render_markdown(doc))
        if plot_path:
            from netsim.bench.plot import plot

            plot(doc, plot_path)
    else:
        stderr = sys.stderr
        show = stderr.isatty() if progress is None else progress
        try:
            doc = runner.run_bench(
                quick=quick,
                only=only,
                json_path=json_path,
                plot_path=plot_path,
                markdown_path=markdown_path,
                seed=seed,
                log=lambda line: click.echo(line, err=True),
                inputs=inputs,
                faults=faults,
                progress=(lambda names: runner.Progress(names, stderr, tty=True)) if show else None,
                profile=tuple(p for p in (profile_paths or "").split(",") if p),
            )
        except runner.NoCaseSelected as exc:
            raise click.UsageError(str(exc)) from None
    if write_docs:
        try:
            runner.publish_docs(doc, log=lambda line: click.echo(line, err=True))
        except FileNotFoundError as exc:
            raise click.ClickException(f"--write-docs needs a checkout with docs/benchmarks.md ({exc})") from None
    if json_path == "-":
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(runner.render_text(doc))
        if json_path:
            click.echo(f"wrote {json_path}")
        if compare_path:
            click.echo("\n" + runner.render_comparison(runner.load_report(compare_path), doc))
    if plot_path:
        click.echo(f"wrote {plot_path}", err=json_path == "-")
    if not doc["results"]:
        raise click.ClickException("no benchmark case ran (each selected case was skipped; the reasons are above)")
