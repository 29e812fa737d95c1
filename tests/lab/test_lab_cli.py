"""`netsim lab up|status|exec|down` and `netsim clean`, driven as a user would (separate processes)."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from netsim.lab import ADDR
from netsim.lab.cli import clean_command, lab_group
from netsim.lab.netns import list_netns
from netsim.testing.require import require_binary, require_root

pytestmark = pytest.mark.lab

# the lab's click commands under a stand-in top-level group (the lead wires them into `netsim`)
_CLI = (
    "import sys, click; from netsim.lab.cli import lab_group, clean_command; g = click.Group('netsim'); "
    "g.add_command(lab_group); g.add_command(clean_command); g(sys.argv[1:])"
)


def netsim(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start_up(run_id: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI, "lab", "up", "--run", run_id], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert f"lab {run_id} up" in line, line
    return proc  # stdout stays open: the CLI keeps printing


def test_up_exec_status_down() -> None:
    require_root()
    require_binary("ip", "nft", "iperf3", "curl")
    run_id = "c" + secrets.token_hex(2)
    proc = start_up(run_id)
    try:
        res = netsim("lab", "exec", "--run", run_id, "mac", "--", "curl", "-4", "-sS", "http://www.lab.test/whoami")
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["inet", str(ADDR.isp_wan_v4)]  # the server sees the NATed source
        status = netsim("lab", "status")
        assert f"netsim-{run_id}-mac" in status.stdout and "svc-inet" in status.stdout
        down = netsim("lab", "down", "--run", run_id)
        assert down.returncode == 0, down.stderr
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None and "lab down" in proc.stdout.read()
        assert not list_netns(f"netsim-{run_id}-")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            netsim("clean", "--run", run_id, "--force")
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.reliability("R1")
def test_clean_after_sigkill_reports_and_removes() -> None:
    require_root()
    require_binary("ip", "nft", "iperf3")
    run_id = "k" + secrets.token_hex(2)
    proc = start_up(run_id)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    status = netsim("lab", "status")
    assert "stale" in status.stdout
    exec_stale = netsim("lab", "exec", "--run", run_id, "mac", "--", "true")
    assert exec_stale.returncode != 0 and "netsim clean" in exec_stale.stderr
    res = netsim("clean", "--run", run_id)
    assert f"removed netns netsim-{run_id}-mac" in res.stdout
    assert not list_netns(f"netsim-{run_id}-")
    assert "nothing to clean" in netsim("clean", "--run", run_id).stdout


def test_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    runner = CliRunner()
    res = runner.invoke(lab_group, ["up"])
    assert res.exit_code != 0 and "sudo" in res.output
    res = runner.invoke(clean_command, [])
    assert res.exit_code != 0 and "root" in res.output
