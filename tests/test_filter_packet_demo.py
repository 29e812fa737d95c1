"""`netsim demo packet-filter` runs end to end: in memory without root, in the lab as root."""

from __future__ import annotations

import subprocess

import pytest
from demo_cli import run_demo

from netsim.testing.require import require_binary, require_root


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return run_demo("packet-filter", *args)


def test_memory_packet_filter_demo() -> None:
    r = _demo("--memory")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 5 probes succeeded" in r.stdout  # each probe checks the verdict the kernel would have got
    assert "drop outbound en0 icmp 192.168.1.10 -> 192.168.1.20" in r.stderr  # the provider's own log line
    assert "outbound en0 icmp 192.168.1.10 -> 192.168.1.20  (x1)" in r.stdout  # and the report's table
    assert "seen=5, allowed=3, dropped=2" in r.stdout


@pytest.mark.lab
def test_lab_packet_filter_demo() -> None:
    require_root()
    require_binary("curl", "ping", "iptables", "tcpdump")
    r = _demo()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 4 probes succeeded" in r.stdout  # allowed ones answered, the printer's got no answer
    assert "outbound en0 icmp 192.168.1.10 -> 192.168.1.20" in r.stdout  # dropped: the row of the log table
    assert "inbound en0 icmp 203.0.113.10 -> 192.168.1.10" in r.stdout  # the replies pass the filter too
