"""Only ``NETSIM_REQUIRE_PRIVILEGED`` turns netsim's gates from skips into failures: never ``CI`` (issue 14).

A user's CI sets ``CI=true`` and may not run as root; netsim's fixtures must skip there with their reason, as on
a laptop. netsim's own ``.ci/run`` sets ``NETSIM_REQUIRE_PRIVILEGED=1`` to require its root tier.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from netsim.testing.require import privileged_required

GATED = """
from netsim.testing.require import require_binary


def test_gated():
    require_binary("netsim-no-such-binary")
"""


@pytest.mark.parametrize(
    ("env", "required"),
    [
        ({"CI": "true"}, False),
        ({"CI": "1"}, False),
        ({}, False),
        ({"NETSIM_REQUIRE_PRIVILEGED": "1"}, True),
        ({"NETSIM_REQUIRE_PRIVILEGED": "1", "CI": "false"}, True),
        ({"NETSIM_REQUIRE_PRIVILEGED": "0", "CI": "true"}, False),
        ({"NETSIM_REQUIRE_PRIVILEGED": "", "CI": "true"}, False),
        ({"NETSIM_REQUIRE_PRIVILEGED": "no"}, False),
    ],
)
def test_only_the_netsim_flag_requires_privileged_tests(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], required: bool
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("NETSIM_REQUIRE_PRIVILEGED", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert privileged_required() is required


@pytest.mark.parametrize("flag", [None, "1"])
def test_a_users_ci_skips_a_gated_test_unless_netsim_is_required(tmp_path: Path, flag: str | None) -> None:
    """A user's suite in a fresh pytest under ``CI=true``: skipped with the reason; failed only with the flag."""
    (tmp_path / "test_user.py").write_text(GATED)
    env = {k: v for k, v in os.environ.items() if k not in {"NETSIM_REQUIRE_PRIVILEGED", "PYTEST_ADDOPTS"}}
    env["CI"] = "true"
    if flag is not None:
        env["NETSIM_REQUIRE_PRIVILEGED"] = flag
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsf", "-q", "test_user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert "needs 'netsim-no-such-binary' on PATH" in out, out
    if flag is None:
        assert proc.returncode == 0 and "1 skipped" in out, out
    else:
        assert proc.returncode == 1 and "1 failed" in out, out
        assert "NETSIM_REQUIRE_PRIVILEGED is set" in out, out
