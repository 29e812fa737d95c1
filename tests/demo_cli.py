"""Run ``netsim demo ...`` as a user does, in a subprocess (the demo test files share this)."""

from __future__ import annotations

import subprocess
import sys


def run_demo(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m netsim.cli demo *args``, output captured, never raising on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", "netsim.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
