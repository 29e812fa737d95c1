"""`netsim clean` removes a dead run's helper and tunnel directories, found by run id only (docs/reliability.md R3).

No root needed: the run directory and the temp dir are pointed at ``tmp_path``. The run ids are random, so the
real namespaces and wireguard sockets `remove_run` also looks at can only be this test's (there are none).
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

import pytest

from netsim.lab import cleanup
from netsim.lab.cleanup import RunRecord, clean, helper_dir, tunnel_dir_prefix
from netsim.lab.process import process_start_time


def _run_id(prefix: str) -> str:
    return prefix + secrets.token_hex(2)


def _tunnel_dirs(run_dir: Path, run_id: str) -> tuple[Path, Path, Path]:
    helper = helper_dir(run_id)
    helper.mkdir(mode=0o700)
    (helper / "helper.sock").write_text("")
    conf = Path(tempfile.mkdtemp(prefix=tunnel_dir_prefix(run_id), dir=run_dir))
    (conf / "client.conf").write_text("[Interface]\nPrivateKey = secret\n")
    dns = cleanup.DNS_STATE_DIR / f"netsim-{run_id}-mac"  # the Mac resolver's state (a crashed provider's tunnel.json)
    dns.mkdir(parents=True)
    (dns / "tunnel.json").write_text("{}")
    return helper, conf, dns


@pytest.mark.reliability("R3")
def test_clean_removes_only_dead_runs_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    run_dir.mkdir()
    tmp.mkdir()
    monkeypatch.setattr(cleanup, "RUN_DIR", run_dir)
    monkeypatch.setattr(cleanup, "DNS_STATE_DIR", tmp_path / "dns")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead, live, lost = _run_id("d"), _run_id("l"), _run_id("o")
    near = dead[:-1]  # a run id that is a prefix of another: its dirs must not be taken for the other's
    for run_id, owner in ((dead, 2**22 + 1), (live, os.getpid())):
        RunRecord(run_id, owner, process_start_time(owner), time.time(), []).save()
    dead_dirs = _tunnel_dirs(run_dir, dead)
    live_dirs = _tunnel_dirs(run_dir, live)
    lost_dirs = _tunnel_dirs(run_dir, lost)  # no run file at all: SIGKILLed after the run file was removed
    RunRecord(near, os.getpid(), process_start_time(os.getpid()), time.time(), []).save()
    near_dirs = _tunnel_dirs(run_dir, near)
    legacy = Path(tempfile.mkdtemp(prefix=f"netsim-{dead}-tunnel-"))  # where older versions kept client.conf
    other = tmp / "unrelated"
    other.mkdir()

    report = clean(dead)
    assert all(not d.exists() for d in (*dead_dirs, legacy))
    assert f"dir {dead_dirs[1]}" in report.removed and f"dir {legacy}" in report.removed
    assert f"dir {dead_dirs[2]}" in report.removed
    assert not (run_dir / f"{dead}.json").exists()
    assert all(d.exists() for d in (*live_dirs, *lost_dirs, *near_dirs, other))  # --run: that run only

    report = clean()
    assert all(not d.exists() for d in lost_dirs)
    assert all(d.exists() for d in (*live_dirs, *near_dirs, other))  # live owners' dirs are never touched
    assert set(report.active) == {live, near}
