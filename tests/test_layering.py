"""The sans-IO rule: netsim.core imports no I/O machinery (architecture.md section 1)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import netsim

CORE = Path(netsim.__file__).parent / "core"
FORBIDDEN_AT_RUNTIME = ("trio", "socket", "pytun", "pyroute2", "scapy", "select", "subprocess", "asyncio")
FORBIDDEN_IN_SOURCE = (
    *FORBIDDEN_AT_RUNTIME,
    "os",
    "time",
    "threading",
    "netsim.transports",
    "netsim.runtime",
    "netsim.lab",
    "netsim.testing",
    "netsim.cli",
)


def test_import_netsim_core_pulls_in_no_io_modules() -> None:
    modules = sorted(
        "netsim.core." + ".".join(p.relative_to(CORE).with_suffix("").parts)
        for p in CORE.rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "import netsim.core\n"
        f"bad = [m for m in {FORBIDDEN_AT_RUNTIME!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "", f"netsim.core imported I/O modules: {out}"


def test_core_sources_do_not_import_io_modules() -> None:
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_SOURCE):
                    offenders.append(f"{path.relative_to(CORE.parent)}:{getattr(node, 'lineno', 0)} imports {name}")
    assert offenders == []
