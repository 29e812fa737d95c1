"""`netsim lab up|status|exec|down` and `netsim clean`, driven as a user would (separate processes)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from netsim.errors import LabError
from netsim.lab import ADDR, Lab
from netsim.lab.cleanup import RUN_DIR
from netsim.lab.cli import clean_command, lab_group
from netsim.lab.netns import list_netns
from netsim.testing.require import require_binary, require_root

pytestmark = pytest.mark.lab

# the lab's click commands under a stand-in top-level group (the lead wires them into `netsim`)
_CLI = (
    "import sys, click; from netsim.lab.cli import lab_group, clean_command; g = click.Group('netsim'); "
    "g.add_command(lab_group); g.add_command(clean_command); g(sys.argv[1:])"
)


def _env(uid: int | None) -> dict[str, str] | None:
    # The "user" a lab belongs to is SUDO_UID when set (the user behind sudo), else the uid: a made-up SUDO_UID
    # keeps these tests apart from labs other people run on the same machine.
    return None if uid is None else {**os.environ, "SUDO_UID": str(uid)}


def netsim(*args: str, timeout: float = 60, uid: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, env=_env(uid)
    )


def start_up(run_id: str, uid: int | None = None, *, services: bool = False) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI, "lab", "up", "--run", run_id, *(() if services else ("--no-services",))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(uid),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert f"lab {run_id} up" in line, line
    return proc  # stdout stays open: the CLI keeps printing


def test_up_exec_status_down() -> None:
    require_root()
    require_binary("ip", "nft", "iperf3", "curl")
    run_id = "c" + secrets.token_hex(2)
    proc = start_up(run_id, services=True)
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
        assert proc.stderr is not None
        progress = proc.stderr.read()  # bring-up steps on stderr, one line each, stdout untouched
        assert f"] namespaces netsim-{run_id}-" in progress and "] services:" in progress, progress
    finally:
        _stop(proc, run_id)


@pytest.mark.reliability("R1")
def test_clean_after_sigkill_reports_and_removes() -> None:
    require_root()
    require_binary("ip", "nft", "iperf3")
    run_id = "k" + secrets.token_hex(2)
    proc = start_up(run_id)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _stop(proc, run_id)
    status = netsim("lab", "status")
    assert "stale" in status.stdout
    exec_stale = netsim("lab", "exec", "--run", run_id, "mac", "--", "true")
    assert exec_stale.returncode == 2 and "netsim clean" in exec_stale.stderr
    # a detached bring-up that fails (the id is held by the stale run) reports the owner's error, changes nothing
    again = netsim("lab", "up", "--detach", "--no-services", "--run", run_id)
    assert again.returncode == 1 and again.stdout == "", again
    assert "already exists" in again.stderr and "did not come up" in again.stderr, again.stderr
    assert len(list_netns(f"netsim-{run_id}-")) == 5
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


def _stop(proc: subprocess.Popen[str], run_id: str) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        netsim("clean", "--run", run_id, "--force")
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.mark.reliability("R4")
def test_up_with_a_live_run_id_refuses_and_changes_nothing() -> None:
    """Issue 13: a second `lab up --run ID` said "already exists", then destroyed the running lab."""
    require_root()
    require_binary("ip", "nft")
    run_id = "d" + secrets.token_hex(2)
    proc = start_up(run_id)
    try:
        again = netsim("lab", "up", "--run", run_id, "--no-services")
        assert again.returncode == 1, (again.stdout, again.stderr)
        assert f"lab {run_id} is already running" in again.stderr
        assert proc.poll() is None  # the first owner still runs ...
        assert len(list_netns(f"netsim-{run_id}-")) == 5  # ... with all its namespaces
        assert (RUN_DIR / f"{run_id}.json").exists()  # ... and its run file
        assert netsim("lab", "exec", "--run", run_id, "mac", "--", "true").returncode == 0
        assert netsim("lab", "down", "--run", run_id).returncode == 0
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc, run_id)


@pytest.mark.reliability("R4")
def test_a_second_lab_with_the_same_id_leaves_the_first_alone() -> None:
    """The library half of the same defect: a failed claim must not tear down what it did not create."""
    require_root()
    require_binary("ip", "nft")
    run_id = "e" + secrets.token_hex(2)
    with Lab(run_id, services=False) as first:
        with pytest.raises(LabError, match="already exists"):
            Lab(run_id, services=False).start()
        assert len(list_netns(first.prefix)) == 5 and (RUN_DIR / f"{run_id}.json").exists()
        first.run_sync("mac", ["true"])
    assert not list_netns(f"netsim-{run_id}-")


def test_exec_and_down_without_run_pick_only_this_users_lab_and_name_it() -> None:
    require_root()
    require_binary("ip", "nft")
    mine, theirs = 60000 + secrets.randbelow(5000), 65100 + secrets.randbelow(300)
    run_id = "f" + secrets.token_hex(2)
    proc = start_up(run_id, uid=mine)
    try:
        res = netsim("lab", "exec", "mac", "--", "true", uid=mine)
        assert res.returncode == 0, res.stderr
        assert f"lab {run_id}" in res.stderr  # the lab used is named (stderr: stdout is the command's)
        other = netsim("lab", "exec", "mac", "--", "true", uid=theirs)
        assert other.returncode == 2, other.stderr  # never another user's lab: --run is required
        assert "--run" in other.stderr and run_id in other.stderr
        down = netsim("lab", "down", uid=mine)
        assert down.returncode == 0 and f"lab {run_id} down" in down.stdout, down.stderr
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc, run_id)


def test_detach_status_json_exit_codes_and_down(tmp_path: Path) -> None:
    """Issue 14: `RUN=$(netsim lab up --detach)`, `lab status --json`, shell exit codes under `lab exec`."""
    require_root()
    require_binary("ip", "nft")
    uid = 60000 + secrets.randbelow(5000)
    up = netsim("lab", "up", "--detach", "--no-services", uid=uid)
    assert up.returncode == 0, up.stderr
    run_id = up.stdout.strip()
    try:
        assert up.stdout == f"{run_id}\n"  # stdout is the run id alone
        assert f"] namespaces netsim-{run_id}-" in up.stderr and f"lab {run_id} up in" in up.stderr
        doc = json.loads(netsim("lab", "status", "--json", "--run", run_id).stdout)
        (run,) = doc["runs"]
        assert run["run_id"] == run_id and run["alive"] and run["detached"] and run["cli"]
        assert run["owner_uid"] == uid and os.path.exists(f"/proc/{run['owner_pid']}")
        assert all(ns["present"] for ns in run["namespaces"]) and len(run["namespaces"]) == 5
        assert run["tunnel"] is None and run["pcaps"] == []

        def code(*argv: str) -> int:
            return netsim("lab", "exec", "--run", run_id, *argv, uid=uid).returncode

        assert code("mac", "--", "sh", "-c", "exit 7") == 7  # the command's own status passes through
        assert code("mac", "--", "no-such-command-netsim") == 127
        assert code("mac", "--", "/no/such/file") == 127
        plain = tmp_path / "not-executable.sh"
        plain.write_text("#!/bin/sh\nexit 0\n")
        plain.chmod(0o644)
        assert code("mac", "--", str(plain)) == 126  # exists, not executable
        assert code("mac", "--", str(tmp_path)) == 126  # a directory
        assert netsim("lab", "exec", "--run", "Bad!", "mac", "--", "true").returncode == 2
        assert netsim("lab", "exec", "--run", "zz9zz9", "mac", "--", "true").returncode == 2
        assert netsim("lab", "exec", "--run", run_id, "nope", "--", "true").returncode == 2  # unknown role
        assert netsim("lab", "up", "--run", "TOO-LONG").returncode == 2
        # the owner is in its own session: it outlives the shell that started it, until `lab down`
        down = netsim("lab", "down", uid=uid)  # no --run: the one lab this user started
        assert down.returncode == 0 and f"lab {run_id} down" in down.stdout, down.stderr
        assert not list_netns(f"netsim-{run_id}-") and not (RUN_DIR / f"{run_id}.json").exists()
    finally:
        if (RUN_DIR / f"{run_id}.json").exists():
            netsim("lab", "down", "--run", run_id)
            netsim("clean", "--run", run_id, "--force")


def test_detach_with_tunnel_reports_tunnel_state(tmp_path: Path) -> None:
    require_root()
    require_binary("ip", "nft", "wireguard-go", "wg", "tcpdump", "iperf3")
    run_id = "t" + secrets.token_hex(2)
    up = netsim("lab", "up", "--detach", "--tunnel", "--run", run_id, "--pcap", str(tmp_path), timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        assert up.stdout == f"{run_id}\n" and "] tunnel: wireguard-go started in vpn" in up.stderr, up.stderr
        assert "] tunnel: helper started in mac" in up.stderr and "] tunnel: CONNECTED" in up.stderr
        (run,) = json.loads(netsim("lab", "status", "--json", "--run", run_id).stdout)["runs"]
        assert run["tunnel"]["state"] == "connected" and Path(run["tunnel"]["client_config"]).exists()
        assert str(tmp_path / "mac-en0.pcap") in run["pcaps"]
        running = [" ".join(p["argv"]) for p in run["processes"] if p["running"]]
        assert any("wireguard-go" in argv for argv in running), running
        # iperf3 -u through the tunnel completes too (issue 13), reports from both ends
        via = netsim("lab", "exec", "--run", run_id, "mac", "--", "ip", "route", "get", str(ADDR.www_v4))
        assert "dev utun" in via.stdout, via.stdout
        argv = ["iperf3", "-u", "-c", str(ADDR.www_v4), "-t", "1", "-b", "1M", "--connect-timeout", "3000"]
        udp = netsim("lab", "exec", "--run", run_id, "mac", "--", *argv, timeout=20)
        assert udp.returncode == 0 and " sender" in udp.stdout and " receiver" in udp.stdout, udp
        assert netsim("lab", "down", "--run", run_id, timeout=90).returncode == 0
        assert not list_netns(f"netsim-{run_id}-")
    finally:
        if (RUN_DIR / f"{run_id}.json").exists():
            netsim("lab", "down", "--run", run_id)
            netsim("clean", "--run", run_id, "--force")


def test_run_ids_complete_for_a_live_lab() -> None:
    require_root()
    require_binary("ip", "nft")
    run_id = "g" + secrets.token_hex(2)
    proc = start_up(run_id)
    try:
        env = {**os.environ, "_NETSIM_COMPLETE": "bash_complete", "COMP_WORDS": f"netsim lab down --run {run_id[:3]}"}
        env["COMP_CWORD"] = "4"
        netsim_bin = Path(sys.executable).parent / "netsim"
        res = subprocess.run([str(netsim_bin)], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert f"plain,{run_id}" in res.stdout.splitlines(), (res.stdout, res.stderr)
        assert netsim("lab", "down", "--run", run_id).returncode == 0
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc, run_id)
