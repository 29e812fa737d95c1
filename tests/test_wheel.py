"""netsim works as users install it: from a wheel, in a fresh venv, run from outside the source tree.

One test (one build, one venv), in steps: the wheel's files and metadata; the commands and the shipped examples
with the base install (no pytest: the test kit says which extra to install); then the ``testing`` extra (the
pytest plugin loads from its entry point) and mypy (users' type checkers see netsim's real types).
"""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import netsim
from netsim.testing.require import require_binary, require_root, require_tun

ROOT = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).parent / "uv"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(argv: list[str], cwd: Path, env: dict[str, str], rc: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == rc, f"{argv} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _check_wheel_files(wheel: Path) -> None:
    """LICENSE in the dist-info, the version from netsim/__init__.py, every example of the repo shipped."""
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    dist_info = f"netsim-{netsim.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names, sorted(n for n in names if ".dist-info/" in n)
    assert z.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    meta = email.message_from_bytes(z.read(f"{dist_info}/METADATA"))
    assert meta["Version"] == netsim.__version__ and meta["License"] == "MIT"
    assert "License :: OSI Approved :: MIT License" in meta.get_all("Classifier", [])
    assert "Provides-Extra: testing" in z.read(f"{dist_info}/METADATA").decode()
    examples = {
        p.name for p in (ROOT / "examples").iterdir() if p.is_file() and p.suffix in {".py", ".toml", ".yaml", ".yml"}
    }
    shipped = {n.removeprefix("netsim/examples/") for n in names if n.startswith("netsim/examples/")}
    assert examples <= shipped, examples - shipped
    for name in examples:
        assert z.read(f"netsim/examples/{name}") == (ROOT / "examples" / name).read_bytes(), name


def _can_build_native() -> bool:
    return (
        shutil.which(os.environ.get("CC", "cc").split()[0]) is not None and Path("/usr/include/openssl/evp.h").is_file()
    )


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    where: Path  # a directory outside the checkout
    env: dict[str, str]

    @property
    def netsim(self) -> str:
        return str(self.venv / "bin" / "netsim")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel (built from the sdist) installed into a fresh venv: one build for the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    # No PYTHONPATH, no editable install, no checkout on the path: only what the wheel ships.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    dist = tmp_path / "dist"
    # sdist first, then the wheel from the sdist (what `uv build` and `python -m build` do, what an index serves)
    _run([str(UV), "build", "-q", "-o", str(dist), str(ROOT)], tmp_path, env)
    (wheel,) = dist.glob("netsim-*.whl")
    (sdist,) = dist.glob("netsim-*.tar.gz")
    with tarfile.open(sdist) as tar:
        assert f"netsim-{netsim.__version__}/LICENSE" in tar.getnames()
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"netsim/py.typed", "netsim/bench/c/floor.c", "netsim/bench/c/udpload.c", "netsim/bench/runner.py"} <= names
    _check_wheel_files(wheel)
    if _can_build_native():  # hatch_build.py compiles the accelerator into the wheel (docs/native.md)
        assert any(n.startswith("netsim/_native/_accel") and n.endswith(".so") for n in names), sorted(names)
        assert "netsim/_native/accel.c" in names and not wheel.name.endswith("-none-any.whl"), wheel.name
    venv = tmp_path / "venv"
    _run([str(UV), "venv", "-q", "-p", sys.executable, str(venv)], tmp_path, env)
    _run([str(UV), "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(wheel)], tmp_path, env)

    where = tmp_path / "elsewhere"
    where.mkdir()
    return Installed(wheel, venv, where, env)


def test_wheel_in_a_fresh_venv_runs_help_demo_and_bench(installed: Installed) -> None:
    wheel, venv, where, env = installed.wheel, installed.venv, installed.where, installed.env
    origin = _run([str(venv / "bin" / "python"), "-c", "import netsim; print(netsim.__file__)"], where, env)
    assert origin.stdout.strip().startswith(str(venv)), origin.stdout
    python, netsim_cmd = str(venv / "bin" / "python"), str(venv / "bin" / "netsim")
    assert "Usage: netsim" in _run([netsim_cmd, "--help"], where, env).stdout
    assert _run([python, "-m", "netsim", "--help"], where, env).stdout.startswith("Usage: netsim ")
    if _can_build_native():  # the wheel's accelerator imports and is chosen (NETSIM_NATIVE=1: required)
        check = "import netsim.accel as a; print(a.ACTIVE, a.describe()['detail'])"
        native = _run([python, "-c", check], where, {**env, "NETSIM_NATIVE": "1"})
        assert native.stdout.startswith("native OpenSSL"), native.stdout
    demo = _run([netsim_cmd, "demo", "--memory"], where, env)
    assert "probes succeeded" in demo.stdout, demo.stdout
    bench = _run([netsim_cmd, "bench", "--quick", "--only", "micro/*"], where, env)
    assert "micro/ipc" in bench.stdout and "micro/wireguard" in bench.stdout, bench.stdout

    # the examples, from the package: listed, a path to pass on, a provider example run as a module
    assert "policy.toml" in _run([netsim_cmd, "examples"], where, env).stdout
    policy = _run([netsim_cmd, "examples", "--path", "policy.toml"], where, env).stdout.strip()
    assert policy.startswith(str(venv)) and policy.endswith("netsim/examples/policy.toml"), policy
    explain = _run(
        [netsim_cmd, "-v", "explain", "--policy", policy, "--dst", "203.0.113.20", "--dport", "80"], where, env
    )
    assert "BYPASS: rule #0 'direct-host'" in explain.stdout and "INFO netsim.policy" in explain.stderr, explain
    bad_dst = _run([netsim_cmd, "explain", "--policy", policy, "--dst", "not-an-address"], where, env, rc=2)
    assert "not-an-address" in bad_dst.stderr, bad_dst  # a usage error: exit 2, saying what is wrong
    example = _run([python, "-m", "netsim.examples.helper_tunnel", "--memory"], where, env)
    assert "in-memory tunnel: 7 probes, 7 replies" in example.stdout, example.stdout

    # no pytest in a base install: the test kit names the extra to install
    for module in ("netsim.testing.require", "netsim.testing.fixtures"):
        missing = _run([python, "-c", f"import {module}"], where, env, rc=1)
        assert "pip install 'netsim[testing]'" in missing.stderr.strip().splitlines()[-1], missing.stderr
    _check_testing_extra_and_types(wheel, venv, where, env)


USES_THE_PLUGIN = """
def test_the_plugin_loaded_from_its_entry_point(netsim_provider):
    assert netsim_provider.__name__ == "HelperForwardingProvider"
"""


def _check_testing_extra_and_types(wheel: Path, venv: Path, where: Path, env: dict[str, str]) -> None:
    """``pip install netsim[testing]``: pytest and the plugin's fixtures; mypy on a user's file sees real types."""
    from test_typed_exports import USER_FILE

    python = str(venv / "bin" / "python")
    _run(
        [str(UV), "pip", "install", "-q", "--python", python, f"netsim[testing] @ {wheel.as_uri()}", "mypy"], where, env
    )
    (where / "test_user.py").write_text(USES_THE_PLUGIN)
    tests = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"], where, env)
    assert "1 passed" in tests.stdout, tests.stdout
    (where / "user.py").write_text(USER_FILE)
    typed = _run([python, "-m", "mypy", "--strict", "--no-incremental", "user.py"], where, env, rc=1)
    revealed = re.findall(r'Revealed type is "(.*)"', typed.stdout)
    assert revealed[:2] == ["netsim.lab.lab.Lab", "netsim.core.packet.PacketView"], typed.stdout


@pytest.mark.lab
@pytest.mark.tun
def test_the_lab_from_the_wheel_detached_status_json_exec_and_down(installed: Installed) -> None:
    """README's lab commands from the installed wheel, outside the checkout: the scripted form (docs/lab.md)."""
    require_root()
    require_tun()
    require_binary("ip", "nft", "tcpdump", "iperf3", "curl")
    up = _run([installed.netsim, "lab", "up", "--detach"], installed.where, installed.env)
    run_id = up.stdout.strip()
    assert re.fullmatch(r"[a-z0-9]{1,6}", run_id), up.stdout
    try:
        status = _run([installed.netsim, "lab", "status", "--json", "--run", run_id], installed.where, installed.env)
        [run] = [r for r in json.loads(status.stdout)["runs"] if r["run_id"] == run_id]
        assert run["alive"] and all(ns["present"] for ns in run["namespaces"]), run
        exec_ = [installed.netsim, "lab", "exec", "--run", run_id, "mac", "--"]
        whoami = _run([*exec_, "curl", "-s", "--max-time", "5", "http://www.lab.test/whoami"], installed.where,
                      installed.env)  # fmt: skip
        assert whoami.stdout.strip(), whoami
        _run([*exec_, "no-such-command-netsim"], installed.where, installed.env, rc=127)
        _run([*exec_, "sh", "-c", "exit 3"], installed.where, installed.env, rc=3)
    finally:
        _run([installed.netsim, "lab", "down", "--run", run_id], installed.where, installed.env)
    status = _run([installed.netsim, "lab", "status", "--json"], installed.where, installed.env)
    assert run_id not in [r["run_id"] for r in json.loads(status.stdout)["runs"]]
