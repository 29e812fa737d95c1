"""netsim works as users install it: from a wheel, in a fresh venv, run from outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).parent / "uv"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_in_a_fresh_venv_runs_help_demo_and_bench(tmp_path: Path) -> None:
    # No PYTHONPATH, no editable install, no checkout on the path: only what the wheel ships.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    dist = tmp_path / "dist"
    _run([str(UV), "build", "-q", "--wheel", "-o", str(dist), str(ROOT)], tmp_path, env)
    (wheel,) = dist.glob("netsim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"netsim/py.typed", "netsim/bench/c/floor.c", "netsim/bench/c/udpload.c", "netsim/bench/runner.py"} <= names
    venv = tmp_path / "venv"
    _run([str(UV), "venv", "-q", "-p", sys.executable, str(venv)], tmp_path, env)
    _run([str(UV), "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(wheel)], tmp_path, env)

    where = tmp_path / "elsewhere"
    where.mkdir()
    origin = _run([str(venv / "bin" / "python"), "-c", "import netsim; print(netsim.__file__)"], where, env)
    assert origin.stdout.strip().startswith(str(venv)), origin.stdout
    netsim = str(venv / "bin" / "netsim")
    assert "Usage: netsim" in _run([netsim, "--help"], where, env).stdout
    demo = _run([netsim, "demo", "--memory"], where, env)
    assert "probes succeeded" in demo.stdout, demo.stdout
    bench = _run([netsim, "bench", "--quick", "--only", "micro/*"], where, env)
    assert "micro/ipc" in bench.stdout and "micro/wireguard" in bench.stdout, bench.stdout
