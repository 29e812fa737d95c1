"""The ``netsim`` command: lab, demo, helper, explain, bench, clean."""

from __future__ import annotations

import click

from netsim import __version__
from netsim.benchcli import bench_command
from netsim.helpercli import helper as helper_command
from netsim.lab.cli import clean_command, lab_group
from netsim.runtime.policy_file import explain_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netsim")
def main() -> None:
    """Prototype, test and benchmark a macOS packet-tunnel data plane on Linux."""


@main.command("demo")
@click.option("--pcap", "pcap_dir", type=click.Path(file_okay=False), help="write one pcap per link here")
@click.option("--memory", is_flag=True, help="run the in-memory backend even when root")
def demo_command(pcap_dir: str | None, memory: bool) -> None:
    """Bring up the lab and the tunnel, run probes, print each probe's path, latency and result."""
    from netsim.demo import run_demo

    raise SystemExit(run_demo(pcap_dir=pcap_dir, force_memory=memory))


main.add_command(lab_group)
main.add_command(clean_command)
main.add_command(explain_command)
main.add_command(helper_command)
main.add_command(bench_command)


if __name__ == "__main__":  # pragma: no cover - `python -m netsim.cli`
    main()
