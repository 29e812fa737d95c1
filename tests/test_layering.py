"""The sans-IO rule: netsim.core imports no I/O machinery (docs/design.md, Layers)."""

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


# ---------------------------------------------------------------------------------------- the import graph
PACKAGE = CORE.parent
CLI_MODULES = {
    "netsim.cli",
    "netsim.benchcli",
    "netsim.checkcli",
    "netsim.helpercli",
    "netsim.demo",
    "netsim.lab.cli",
    "netsim.__main__",
}
# The package root is the public facade: its lazy exports (and their TYPE_CHECKING imports) name every layer.
FACADE = "netsim"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every netsim module ``module``'s source imports: module level, in functions, under TYPE_CHECKING, relative."""
    found: list[tuple[int, str]] = []
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                target = ".".join(stem + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]  # `from netsim import lab`
    return [(line, name) for line, name in found if name == "netsim" or name.startswith("netsim.")]


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rule_broken(importer: str, imported: str) -> str | None:
    """The layering rule (docs/design.md) that ``importer`` importing ``imported`` breaks, or None."""
    src, dst = _layer(importer), _layer(imported)
    if dst in ("", "errors", src) or importer in CLI_MODULES or importer == FACADE:
        return None
    if src == "errors":
        return "errors imports no other netsim module"
    if src in ("accel", "_native"):
        return None if dst in ("accel", "_native") else "accel imports only its extension and errors"
    if dst == "_native":
        return "only netsim.accel imports netsim._native"
    if dst == "accel":  # the optional native accelerator is pure computation: any layer may use it
        return None
    if src == "core":
        return "core/ imports no other layer"
    if src == "apple" and dst != "core":  # the Apple mirrors read the core's one home of family numbers
        return "apple/ imports only core and errors"
    if src == "transports" and dst not in ("core", "apple"):
        return "transports/ import only core, apple and errors"
    if src == "runtime" and (dst in ("lab", "testing", "bench") or imported in CLI_MODULES):
        return "runtime/ never imports lab, testing, bench or the CLI"
    if dst == "testing" and src not in ("bench",):
        return "only tests, the CLI and the bench import testing/"
    return None


def test_the_import_graph_keeps_every_layer() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for line, imported in imports_of(path.read_text(), module, path.name == "__init__.py"):
            # a name imported from a package may be a submodule or an attribute; judge by the package path
            why = _rule_broken(module, imported)
            if why is not None:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}: {why}")
    assert offenders == [], "\n".join(offenders)


def test_the_graph_scanner_sees_every_import_form() -> None:
    src = (
        "from __future__ import annotations\n"
        "import netsim.lab.netns\n"
        "from netsim import testing\n"
        "from ..lab import tunnel\n"
        "from . import sibling\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from netsim.bench import runner\n"
        "def f():\n"
        "    from netsim.cli import main\n"
    )
    names = {n for _, n in imports_of(src, "netsim.runtime.mod")}
    assert {"netsim.lab.netns", "netsim.testing", "netsim.lab.tunnel", "netsim.runtime.sibling"} <= names
    assert {"netsim.bench.runner", "netsim.cli.main"} <= names
    assert _rule_broken("netsim.runtime.mod", "netsim.lab.netns") is not None
    assert _rule_broken("netsim.transports.tun", "netsim.runtime.flow") is not None
    assert _rule_broken("netsim.core.x", "netsim.apple.packet") is not None
    assert _rule_broken("netsim.apple.packet", "netsim.runtime.flow") is not None
    assert _rule_broken("netsim.lab.lab", "netsim.testing.fixtures") is not None
    assert _rule_broken("netsim.lab.lab", "netsim.runtime.spawn") is None
    assert _rule_broken("netsim.demo", "netsim.testing.memory_tunnel") is None
    assert _rule_broken("netsim", "netsim.testing.memory_tun") is None  # the facade
    assert _rule_broken("netsim.console", "netsim.testing.memory_tun") is not None


def test_design_page_maps_every_module() -> None:
    """docs/design.md has one line per module: a new or moved module must appear there."""
    page = (PACKAGE.parent / "docs" / "design.md").read_text()
    missing = [name for name in sorted(_module_name(p) for p in PACKAGE.rglob("*.py")) if f"| `{name}` |" not in page]
    assert missing == [], f"add these modules to the module map in docs/design.md: {missing}"
