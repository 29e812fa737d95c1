"""`netsim demo proxy` and `netsim demo dns` run end to end: in memory without root, in the lab as root."""

from __future__ import annotations

import subprocess

import pytest
from demo_cli import run_demo

from netsim.testing.require import require_binary, require_root


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return run_demo(*args)


def test_memory_proxy_demo() -> None:
    r = _demo("proxy", "--memory")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "server saw the provider" in r.stdout and "server saw the app" in r.stdout
    assert "all 3 probes succeeded" in r.stdout


@pytest.mark.lab
@pytest.mark.parametrize(("what", "expect"), [("proxy", "all 4 probes"), ("dns", "NXDOMAIN (blocked by the proxy)")])
def test_lab_proxy_demos(what: str, expect: str) -> None:
    require_root()
    require_binary("curl", "dig", "nft")
    r = _demo(what)
    assert r.returncode == 0, r.stdout + r.stderr
    assert expect in r.stdout and "succeeded" in r.stdout
