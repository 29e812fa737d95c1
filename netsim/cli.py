"""The ``netsim`` command: lab, demo, helper, explain, bench, clean, examples.

Every command takes ``-v/--verbose`` (repeatable), ``-q/--quiet`` (repeatable) and ``--log-format text|json``,
before the command name (``netsim -v lab up``) or after it (``netsim lab up -v``); the counts add up. They set
the standard `logging` level of the ``netsim`` loggers (WARNING by default, ``-v`` INFO, ``-vv`` DEBUG, ``-q``
errors only) and the format of their lines on stderr (`netsim.runtime.logs.configure_logging`). A command's
own output (tables, explanations) stays on stdout. Two commands take them only before their name: ``lab exec``
(whose COMMAND keeps its own ``-v``) and ``helper`` (JSON lines at its ``--log-level``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from importlib import resources
from typing import Any

import click

from netsim import __version__
from netsim.benchcli import bench_command
from netsim.checkcli import check_group
from netsim.helpercli import helper as helper_command
from netsim.lab.cli import clean_command, lab_group
from netsim.runtime.logs import LOG_FORMATS, configure_logging, verbosity_level
from netsim.runtime.policy_file import explain_command

__all__ = ["example_files", "main"]

_STATE = "netsim.logging"


def _logging_option(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Add this option's value to the command line's logging settings and (re)configure logging.

    On the ``netsim`` group it always applies (so every command logs the same way); on a subcommand only when
    given, so a command invoked on its own (a test's ``CliRunner``) leaves logging alone unless asked.
    """
    if ctx.resilient_parsing:  # shell completion
        return
    state = ctx.meta.setdefault(_STATE, {"verbose": 0, "quiet": 0, "log_format": "text"})
    at_root = ctx.parent is None
    source = ctx.get_parameter_source(param.name or "")
    if not at_root and source is not click.core.ParameterSource.COMMANDLINE:
        return
    if param.name == "log_format":
        if value is not None:
            state["log_format"] = value
    else:
        state[param.name or ""] += value
    # propagate: records also reach the root logger's handlers (pytest's capture); a CLI process has none of them.
    configure_logging(verbosity_level(state["verbose"], state["quiet"]), state["log_format"], propagate=True)


def logging_options() -> list[click.Option]:
    """``-v``, ``-q`` and ``--log-format`` (fresh objects: click binds a parameter to one command)."""
    common: dict[str, Any] = {"expose_value": False, "callback": _logging_option, "is_eager": True}
    return [
        click.Option(["-v", "--verbose"], count=True, help="more log lines on stderr (-v INFO, -vv DEBUG)", **common),
        click.Option(["-q", "--quiet"], count=True, help="fewer log lines (-q errors only)", **common),
        click.Option(
            ["--log-format"],
            type=click.Choice(LOG_FORMATS),
            default=None,
            help="log lines as text (default) or JSON objects, one per line",
            **common,
        ),
    ]


def _add_logging_options(command: click.Command) -> None:
    """Give ``command`` and every subcommand the logging options, unless they would change its parsing or lie.

    A command that passes unknown options through (``lab exec``'s COMMAND) must not start eating ``-v``/``-q``
    meant for the program it runs; the group's options (``netsim -v lab exec ...``) still apply there. A command
    with its own ``--log-level`` (``helper``: JSON lines at that level, the format the lab reads) configures its
    logging itself, so ``-v`` there would be ignored: it does not offer it.
    """
    taken = {opt for p in command.params for opt in p.opts}
    if not command.context_settings.get("ignore_unknown_options") and "--log-level" not in taken:
        command.params += [o for o in logging_options() if not taken & set(o.opts)]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_logging_options(sub)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netsim")
def main() -> None:
    """Prototype, test and benchmark a macOS packet-tunnel data plane on Linux."""


@main.command("demo")
@click.argument("what", required=False, type=click.Choice(["proxy", "dns", "filter", "packet-filter"]))
@click.option("--pcap", "pcap_dir", type=click.Path(file_okay=False), help="write one pcap per link here")
@click.option("--memory", is_flag=True, help="run the in-memory backend even when root")
def demo_command(what: str | None, pcap_dir: str | None, memory: bool) -> None:
    """Bring up the lab and the tunnel, run probes, print each probe's path, latency and result.

    ``netsim demo proxy`` runs the transparent proxy demo instead, ``netsim demo dns`` the DNS proxy's (docs/proxy.md),
    ``netsim demo filter`` the content filter's (a data filter blocking a host by name, docs/filters.md),
    ``netsim demo packet-filter`` the packet filter's (dropping a host's packets on the Mac's en0, docs/filters.md).
    """
    if what == "packet-filter":  # ---- the packet filter ----
        from netsim.demo import run_packet_filter_demo

        raise SystemExit(run_packet_filter_demo(pcap_dir=pcap_dir, force_memory=memory))
    if what == "filter":  # ---- the data filter ----
        from netsim.demo import run_filter_demo

        raise SystemExit(run_filter_demo(pcap_dir=pcap_dir, force_memory=memory))
    if what is not None:  # ---- proxy providers ----
        from netsim.demo import run_proxy_demo

        raise SystemExit(run_proxy_demo(what, pcap_dir=pcap_dir, force_memory=memory))
    from netsim.demo import run_demo

    raise SystemExit(run_demo(pcap_dir=pcap_dir, force_memory=memory))


# ------------------------------------------------------------------------------------------------ examples
_EXAMPLE_SUFFIXES = (".py", ".toml", ".yaml", ".yml")


def example_files() -> dict[str, resources.abc.Traversable]:
    """Every example shipped in `netsim.examples` (file name -> file): providers, scripts and policies.

    Found by listing the package, so a new file in the repo's ``examples/`` (which ``netsim/examples`` links to)
    ships and shows here without being named anywhere.
    """
    root = resources.files("netsim.examples")
    return {
        f.name: f
        for f in sorted(root.iterdir(), key=lambda f: f.name)
        if f.is_file() and f.name.endswith(_EXAMPLE_SUFFIXES) and f.name != "__init__.py"
    }


def _summary(name: str, text: str) -> str:
    """The first line of a module's docstring, or of a policy file's leading comment."""
    if name.endswith(".py"):
        try:
            doc = ast.get_docstring(ast.parse(text)) or ""
        except SyntaxError:
            doc = ""
    else:
        doc = "\n".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _lookup(name: str) -> resources.abc.Traversable:
    files = example_files()
    for candidate in (name, f"{name}.py"):
        if candidate in files:
            return files[candidate]
    raise click.BadParameter(f"no example {name!r}; one of: {', '.join(files)}", param_hint="--path")


def _rows() -> Iterator[tuple[str, str]]:
    for name, f in example_files().items():
        yield name, _summary(name, f.read_text(encoding="utf-8"))


@main.command("examples")
@click.option("--path", "path_of", metavar="NAME", help="print the absolute path of one example (e.g. policy.toml)")
def examples_command(path_of: str | None) -> None:
    """List the examples shipped with netsim, or print where one is (``--path policy.toml``).

    \b
    netsim explain --policy "$(netsim examples --path policy.toml)" --dst 203.0.113.20 --dport 80
    python -m netsim.examples.helper_tunnel --memory
    """
    if path_of is not None:
        click.echo(str(_lookup(path_of)))
        return
    rows = list(_rows())
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        click.echo(f"{name:<{width}}  {summary}")
    click.echo(
        f"\nin {resources.files('netsim.examples')}; run a provider example with "
        "`python -m netsim.examples.<name>`, print a path with `netsim examples --path NAME`"
    )


main.add_command(lab_group)
main.add_command(clean_command)
main.add_command(explain_command)
main.add_command(helper_command)
main.add_command(bench_command)
main.add_command(check_group)
_add_logging_options(main)


if __name__ == "__main__":  # pragma: no cover - `python -m netsim.cli`
    main()
