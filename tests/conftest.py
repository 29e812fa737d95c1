"""Shared test configuration: hypothesis profiles and the netsim pytest fixtures.

The installed netsim pytest plugin (`netsim.testing.plugin`, entry point ``pytest11``) loads here too, with
pytest-trio; its fixtures all start with ``netsim_``, so they do not clash with the ``lab``/``netns`` fixtures
that test modules import from `netsim.testing.fixtures`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# Shared 2-core machines are noisy: per-example deadlines would make property tests flaky, and speed is
# measured by `netsim bench`, not asserted here. Failing examples are printed with a reproduction blob.
# Test modules are imported with --import-mode=importlib (so tiers may reuse basenames such as test_bypass.py);
# shared strategy helpers in tests/core are importable by name.
sys.path.insert(0, str(Path(__file__).parent / "core"))
sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile(
    "netsim",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("ci", parent=settings.get_profile("netsim"), derandomize=False)
settings.load_profile("ci" if os.environ.get("CI") else "netsim")


# The compatibility tiers (`make pytest-lowest`, `make pytest-pythons`) check that the suite runs on other
# dependency floors and Pythons, not to search for new counterexamples: they cap every property test's examples
# (NETSIM_HYPOTHESIS_MAX_EXAMPLES) so `.ci/run` stays inside its time budget; the main run keeps the full counts.
_MAX_EXAMPLES = int(os.environ.get("NETSIM_HYPOTHESIS_MAX_EXAMPLES", "0") or 0)


def _cap_examples(item: object) -> None:
    test = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))  # a method's function
    current = getattr(test, "_hypothesis_internal_use_settings", None)
    if current is not None and current.max_examples > _MAX_EXAMPLES:
        test._hypothesis_internal_use_settings = settings(current, max_examples=_MAX_EXAMPLES)  # type: ignore[union-attr]


def pytest_collection_modifyitems(config: object, items: list[object]) -> None:
    """Reject a ``reliability`` marker that names no row of the matrix (a typo would hide a row's coverage), and a
    test under tests/lab/ without the ``lab`` marker; cap property tests' examples in the compatibility tiers."""
    import pytest
    from reliability_rows import ROWS

    for item in items:
        if _MAX_EXAMPLES > 0:
            _cap_examples(item)
        path = str(getattr(item, "path", ""))
        if "/tests/lab/" in path and item.get_closest_marker("lab") is None:  # type: ignore[attr-defined]
            # the unprivileged tiers deselect by this marker: a lab test without it would run (and skip) there
            raise pytest.UsageError(f"{item.nodeid}: a test in tests/lab/ needs the lab marker (pytestmark)")  # type: ignore[attr-defined]
        for mark in item.iter_markers("reliability"):  # type: ignore[attr-defined]
            unknown = [i for i in mark.args if i not in ROWS]
            if unknown or not mark.args:
                raise pytest.UsageError(f"{item.nodeid}: reliability marker names no matrix row: {mark.args!r}")  # type: ignore[attr-defined]
