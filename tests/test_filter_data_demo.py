"""`netsim demo filter` runs end to end: in memory without root, in the lab as root."""

from __future__ import annotations

import subprocess

import pytest
from demo_cli import run_demo

from netsim.testing.require import require_binary, require_root


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return run_demo("filter", *args)


def test_memory_filter_demo() -> None:
    r = _demo("--memory")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 4 probes succeeded" in r.stdout  # blocked: the server never saw the bytes (checked per probe)
    assert '"verdict": "drop"' in r.stderr  # the provider's JSON log lines


@pytest.mark.lab
def test_lab_filter_demo() -> None:
    require_root()
    require_binary("curl", "nft", "openssl", "tcpdump")
    r = _demo()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all 4 probes succeeded" in r.stdout
