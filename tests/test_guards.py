"""Guards on the test suite itself: a test must not be able to pass without running its body.

netsim drives trio by hand (``trio.run(main)`` or a MockClock runner), so a test that defines ``async def main``
and forgets to run it passes with none of its assertions executed. The scan below finds every coroutine function
defined inside a test and requires the test to use it (call it, or hand it to a runner).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def unused_coroutines(source: str, filename: str = "<test>") -> list[str]:
    """Names ``test::inner`` of coroutine functions defined in a test function and never referenced in it."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.name.startswith("test_"):
            continue
        inner = [n for n in ast.walk(node) if isinstance(n, ast.AsyncFunctionDef) and n is not node]
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        found += [f"{node.name}::{f.name}" for f in inner if f.name not in used]
    return found


def test_no_test_defines_a_coroutine_it_never_runs() -> None:
    offenders = [
        f"{path.relative_to(TESTS.parent)}::{name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in unused_coroutines(path.read_text(), str(path))
    ]
    assert not offenders, f"tests define coroutines they never run (their assertions never execute): {offenders}"


def test_the_scan_sees_the_forgotten_runner() -> None:
    src = (
        "def test_forgot():\n"
        "    async def main():\n"
        "        assert False\n"
        "def test_ran():\n"
        "    async def main():\n"
        "        assert True\n"
        "    trio.run(main)\n"
    )
    assert unused_coroutines(src) == ["test_forgot::main"]


def test_tests_skip_only_through_the_gate() -> None:
    """A direct ``pytest.skip`` bypasses ``netsim.testing.require``, which turns skips into failures under CI."""
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{node.lineno}"
        for path in sorted(TESTS.rglob("*.py"))
        if path.name != "test_guards.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute)
        and node.attr in {"skip", "importorskip"}
        and isinstance(node.value, ast.Name | ast.Attribute)
        and (getattr(node.value, "id", None) == "pytest" or getattr(node.value, "attr", None) == "mark")
    ]
    assert not offenders, f"skip through netsim.testing.require instead: {offenders}"
