"""Facts the docs state about the code, checked against the code (each was wrong once; issue 14).

* docs/helper.md's per-step cost table uses the unit `netsim.bench.bench_helper_steps` prints;
* the `LabTunnel.run_probe` paths it lists are every path `run_probe` can report;
* the `LabTunnel.pcaps` names it lists are those of the property's docstring and of the doc's own lab example,
  which asserts them against a real tunnel in the root tier (tests/test_doc_blocks.py).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import netsim.bench.bench_helper_steps as steps
from netsim.lab.tunnel import LabTunnel

HELPER_DOC = (Path(__file__).resolve().parents[1] / "docs" / "helper.md").read_text()


def _section(title: str) -> str:
    start = HELPER_DOC.index(f"## {title}")
    end = HELPER_DOC.find("\n## ", start + 1)
    return HELPER_DOC[start : end if end >= 0 else None]


def test_step_table_unit_is_the_tools() -> None:
    (unit,) = set(re.findall(r"med/best (\w+)", inspect.getsource(steps)))
    rows = _section("Cost per packet of each step").splitlines()
    table = [line for line in rows if re.match(r"\| (\d+\.|\*\*)", line)]
    assert len(table) == 12, table
    for row in table:
        cells = [c.strip(" *") for c in row.strip("|").split("|")[1:]]
        assert all(re.fullmatch(rf"[\d.]+ {unit}", c) for c in cells), f"not in {unit}, as the tool prints: {row}"


def test_run_probe_paths_are_all_listed() -> None:
    tree = ast.parse(inspect.getsource(LabTunnel.run_probe).strip().replace("\n    ", "\n"))
    paths: set[str] = {
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "path" for t in node.targets)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    assert paths >= {"tunnel", "direct"}, paths
    paragraph = next(p for p in _section("For tools built on top (`netsim demo`)").split("\n\n") if "run_probe" in p)
    listed = set(re.findall(r'`"(\w+)"`', paragraph))
    assert listed == paths, f"docs/helper.md lists {sorted(listed)}, run_probe reports {sorted(paths)}"


def test_pcaps_names_agree() -> None:
    def names(text: str) -> set[str]:
        return set(re.findall(r"`{1,2}((?:mac|isp|vpn)-\w+)`{1,2}", text))

    sentence = next(p for p in HELPER_DOC.split("\n\n") if "`LabTunnel.pcaps`" in p)
    documented = names(sentence[sentence.index("`LabTunnel.pcaps`") :])
    docstring = names(LabTunnel.pcaps.__doc__ or "")
    (asserted,) = re.findall(r"assert sorted\(t\.pcaps\) == \[(.*?)\]", HELPER_DOC)
    example = set(re.findall(r'"([\w-]+)"', asserted))
    assert documented == docstring == example, (documented, docstring, example)


def test_api_reference_lists_every_public_name() -> None:
    """docs/api.md has a ``::: module.attr`` entry for each name of ``netsim.__all__``, and each entry resolves
    to the object ``from netsim import name`` gives (mkdocstrings reads the sources, not the lazy exports)."""
    import importlib

    import netsim

    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    entries = re.findall(r"^::: ([\w.]+)", api, re.M)

    def resolve(dotted: str) -> object:
        """The object an entry names: the longest importable module prefix, then attributes (a method of a
        class, ``module.Class.method``, is an entry too)."""
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return obj
        raise ModuleNotFoundError(dotted)

    documented = {id(resolve(e)) for e in entries}
    missing = [n for n in netsim.__all__ if n != "__version__" and id(getattr(netsim, n)) not in documented]
    assert not missing, f"docs/api.md has no entry for: {missing}"
    assert any(e.startswith("netsim.testing.") for e in entries), "docs/api.md lost the test kit"
