"""The ``netsim`` command."""

from __future__ import annotations

import click

from netsim import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netsim")
def main() -> None:
    """Prototype, test and benchmark a macOS packet-tunnel data plane on Linux."""
