"""`netsim demo`: the README's main command."""

from __future__ import annotations

import os

import trio


def run_demo(*, pcap_dir: str | None = None, force_memory: bool = False) -> int:
    """Run the demo; returns the process exit code."""
    from netsim.lab.cli import demo_lab

    if force_memory or os.geteuid() != 0:
        print("netsim demo needs root for the lab (network namespaces, TUN); run `sudo make demo`.")
        return 2
    trio.run(demo_lab)
    return 0
