"""`netsim demo` (the README's main command) runs end to end on both backends."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from demo_cli import run_demo

from netsim.testing.require import require_binary, require_tun


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return run_demo(*args, timeout=240)


def test_memory_backend_demo_succeeds() -> None:
    r = _demo("--memory")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "in-memory backend" in r.stdout
    assert "all 4 probes succeeded" in r.stdout
    assert "wg_encrypt" in r.stdout  # the helper's ledger is printed


@pytest.mark.lab
@pytest.mark.slow
def test_lab_demo_succeeds_and_writes_pcaps(tmp_path: Path) -> None:
    require_tun()
    require_binary("wireguard-go", "wg", "nft", "iperf3", "tcpdump", "curl", "dig")
    r = _demo("--pcap", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "tunnel connected" in out
    assert "all 16 probes succeeded" in out
    # every path is shown side by side: tunnelled, bypassed (helper NAT), dropped by policy, direct (LAN)
    for path in ("tunnel", "bypass", "dropped", "direct"):
        assert f"({path}, " in out, path
    assert "policy_drop:no-discard=1" in out
    for name in ("mac-en0", "mac-utun0", "isp-wan", "vpn-wan"):
        assert (tmp_path / f"{name}.pcap").stat().st_size > 24, name
