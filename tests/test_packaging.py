"""The package's metadata and shipped files as the checkout defines them (issue 14, "Packaging").

tests/test_wheel.py checks the same things in a built wheel installed in a fresh venv; these run in the
development install, fast.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import netsim
from netsim.cli import example_files

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXAMPLES = ROOT / "examples"


def test_one_version_source() -> None:
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"] == {"path": "netsim/__init__.py"}
    assert metadata.version("netsim") == netsim.__version__


def test_license_file_and_metadata_say_mit() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "netsim authors" in text
    assert PROJECT["license"] == {"text": "MIT"}
    wanted = {
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Framework :: Pytest",
        "Topic :: System :: Networking",
        "Topic :: Software Development :: Testing",
        "Typing :: Typed",
    }
    assert wanted <= set(PROJECT["classifiers"])
    assert PROJECT["keywords"]


def test_the_testing_extra_brings_pytest_and_dev_includes_it() -> None:
    extras = PROJECT["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0] for req in extras["testing"]}
    assert names == {"pytest", "pytest-trio"}
    assert "netsim[testing]" in extras["dev"]
    assert not any(dep.startswith(("pytest", "pytest-trio")) for dep in PROJECT["dependencies"])
    assert PROJECT["entry-points"]["pytest11"] == {"netsim": "netsim.testing.plugin"}


@pytest.mark.parametrize("module", ["netsim.testing.require", "netsim.testing.fixtures"])
def test_the_pytest_helpers_name_the_extra_when_pytest_is_missing(module: str) -> None:
    code = f"import sys\nsys.modules['pytest'] = None  # as if not installed\nimport {module}\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: ") and module in last, proc.stderr
    assert "pip install 'netsim[testing]'" in last, proc.stderr


def _repo_examples() -> set[str]:
    return {
        p.name
        for p in EXAMPLES.iterdir()
        if p.is_file() and p.suffix in {".py", ".toml", ".yaml", ".yml"} and p.name != "__init__.py"
    }


def test_netsim_examples_ships_every_example_of_the_repo_byte_equal() -> None:
    shipped = example_files()
    assert set(shipped) == _repo_examples()
    for name, f in shipped.items():
        assert filecmp.cmp(Path(str(f)), EXAMPLES / name, shallow=False), name
    assert {"policy.toml", "helper_tunnel.py", "ping_responder.py"} <= set(shipped)


def _netsim(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netsim", *argv], capture_output=True, text=True, timeout=60, check=False
    )


def test_netsim_examples_lists_them_and_prints_a_path() -> None:
    listing = _netsim("examples")
    assert listing.returncode == 0, listing.stderr
    for name in _repo_examples():
        assert name in listing.stdout
    assert "Example provider: answers ping and UDP echo" in listing.stdout  # the module's docstring line
    path = _netsim("examples", "--path", "policy.toml").stdout.strip()
    assert Path(path).is_absolute() and Path(path).read_bytes() == (EXAMPLES / "policy.toml").read_bytes()
    assert _netsim("examples", "--path", "helper_tunnel").stdout.strip().endswith("helper_tunnel.py")
    explain = _netsim("explain", "--policy", path, "--dst", "203.0.113.20", "--dport", "80")
    assert "BYPASS: rule #0 'direct-host'" in explain.stdout, explain.stderr
    missing = _netsim("examples", "--path", "nope.toml")
    assert missing.returncode == 2 and "no example 'nope.toml'; one of: " in missing.stderr


def test_python_dash_m_netsim_is_the_netsim_command() -> None:
    proc = _netsim("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: netsim "), proc.stdout + proc.stderr
    assert _netsim("--version").stdout.strip() == f"netsim, version {netsim.__version__}"
