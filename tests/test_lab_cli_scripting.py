"""The scriptable lab CLI without root: run-id completion, run selection, exit codes of `lab exec` (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.shell_completion import ShellComplete

from netsim.cli import main
from netsim.lab import cli as lab_cli
from netsim.lab.cleanup import RunRecord
from netsim.lab.process import process_start_time


def record(run_id: str, *, uid: int | None, cli: bool = True, alive: bool = True) -> RunRecord:
    pid = os.getpid()  # this process: alive, with its real start time; a wrong start time reads as a dead owner
    start = process_start_time(pid)
    assert start is not None
    return RunRecord(run_id, pid, start if alive else start + 1, time.time(), [], cli=cli, owner_uid=uid)


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[RunRecord]:
    found: list[RunRecord] = []
    monkeypatch.setattr(lab_cli, "find_runs", lambda: list(found))
    monkeypatch.setenv("SUDO_UID", "4242")
    return found


def completions(args: list[str], incomplete: str) -> list[str]:
    comp = ShellComplete(main, {}, "netsim", "_NETSIM_COMPLETE")
    return [item.value for item in comp.get_completions(args, incomplete)]


def test_run_option_completes_live_run_ids(runs: list[RunRecord]) -> None:
    runs += [record("ab12", uid=4242), record("ab34", uid=7, cli=False), record("cd56", uid=4242, alive=False)]
    for command in (["lab", "down"], ["lab", "exec"], ["lab", "status"], ["clean"]):
        assert completions([*command, "--run"], "ab") == ["ab12", "ab34"], command  # dead owner: not offered
    assert completions(["lab", "down", "--run"], "") == ["ab12", "ab34"]
    items = lab_cli.complete_run_ids(click.Context(main), click.Option(["--run"]), "ab1")
    assert [i.value for i in items] == ["ab12"] and "uid 4242" in (items[0].help or "")


def test_bash_source_is_the_documented_completion_script() -> None:
    netsim = Path(sys.executable).parent / "netsim"
    env = {**os.environ, "_NETSIM_COMPLETE": "bash_source"}
    res = subprocess.run([str(netsim)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "_netsim_completion()" in res.stdout and "complete -o" in res.stdout


def test_pick_run_only_takes_this_users_cli_lab(runs: list[RunRecord], capsys: pytest.CaptureFixture[str]) -> None:
    runs += [record("theirs", uid=7), record("prog", uid=4242, cli=False)]
    with pytest.raises(click.UsageError, match=r"no lab started by you \(uid 4242\).*theirs.*--run"):
        lab_cli._pick_run(None)
    runs.append(record("mine", uid=4242))
    assert lab_cli._pick_run(None).run_id == "mine"
    assert "using lab mine" in capsys.readouterr().err
    assert lab_cli._pick_run("theirs").run_id == "theirs"  # named explicitly: fine
    runs.append(record("mine2", uid=4242))
    with pytest.raises(click.UsageError, match="several of your labs"):
        lab_cli._pick_run(None)
    with pytest.raises(click.BadParameter, match="no running lab 'zz'") as info:
        lab_cli._pick_run("zz")
    assert info.value.exit_code == 2
    runs.append(record("dead", uid=4242, alive=False))
    with pytest.raises(click.BadParameter, match="netsim clean --run dead"):
        lab_cli._pick_run("dead")


def test_resolve_command_follows_shell_exit_codes(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    assert lab_cli._resolve_command("sh")[0] is not None
    assert lab_cli._resolve_command("no-such-command-netsim")[1:] == (127, "command not found")
    assert lab_cli._resolve_command(str(tmp_path / "missing"))[1] == 127
    assert lab_cli._resolve_command(str(plain))[1:] == (126, "Permission denied")
    assert lab_cli._resolve_command(str(tmp_path))[1:] == (126, "Is a directory")
