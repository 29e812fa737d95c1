"""Every fenced code block in README.md and docs/*.md runs as written, or says why it cannot.

The line right before a fence names what the block is (an HTML comment, invisible on the rendered page):

* ``<!-- doc-test: run -->``: Python, run as a script in a fresh interpreter, no root, in an empty directory but
  for ``examples/`` (a link to the repository's: the docs name ``examples/policy.toml`` as a checkout has it);
* ``<!-- doc-test: lab -->``: Python that needs root and the lab (run in the root tier: marked ``lab``, gated);
* ``<!-- doc-test: cli -->``: shell commands run with ``bash -euo pipefail`` from the repository root, the venv's
  ``netsim`` first on PATH; only safe, quick commands that need no root;
* ``<!-- doc-test: policy -->``: a policy file (the fence says toml or yaml) that `parse_policy` must accept;
* ``<!-- doc-test: excerpt -->``: not runnable on its own (a fragment, output, a diagram, a root-namespace command);
* ``<!-- file: NAME -->``: one file of the example project of docs/testing.md, which tests/test_plugin.py builds and
  runs with pytest.

A block without a marker fails `test_every_block_is_marked` with its file and line. Python blocks (run and lab)
are also checked for undefined names (ruff F821) before they run, so code in a function the block never calls
cannot hide a name that does not exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from netsim.core.policy import parse_policy
from netsim.testing.require import require_binary, require_root

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KINDS = ("run", "lab", "cli", "policy", "excerpt", "file")
FILE_BLOCK_RUNNERS = {"docs/testing.md": "tests/test_plugin.py"}  # doc -> the test that runs its file blocks
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?:doc-test:\s*(?P<kind>[\w-]+)|file:\s*(?P<file>\S+))\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    kind: str | None  # None: unmarked
    code: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(text: str, path: str) -> list[Block]:
    """The fenced blocks of one Markdown text, each with the marker on the line before its opening fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close is not None and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence):
                if not close["info"].strip():
                    break
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        else:
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        marker = _MARKER.match(lines[start - 1]) if start > 0 else None
        kind = (marker["kind"] or "file") if marker else None
        blocks.append(Block(path, start + 1, info.split()[0] if info else "", kind, textwrap.dedent("\n".join(body))))
        i += 1
    return blocks


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_blocks() -> list[Block]:
    return [b for p in doc_files() for b in parse_blocks(p.read_text(), p.relative_to(ROOT).as_posix())]


def _params(kind: str) -> list[object]:
    marks = [pytest.mark.lab] if kind == "lab" else []
    return [pytest.param(b, id=b.where, marks=marks) for b in all_blocks() if b.kind == kind]


# ---------------------------------------------------------------------------------------------------- the rule
def test_every_block_is_marked() -> None:
    blocks = all_blocks()
    assert len(blocks) > 20, "the collector found almost no code blocks: it is blind"
    unmarked = [b.where for b in blocks if b.kind is None]
    assert not unmarked, (
        "code blocks with no doc-test marker on the line before the fence (see tests/test_doc_blocks.py): "
        + ", ".join(unmarked)
    )
    unknown = [f"{b.where} ({b.kind})" for b in blocks if b.kind not in KINDS]
    assert not unknown, f"unknown doc-test markers: {unknown}"


def test_file_blocks_have_a_runner() -> None:
    for block in (b for b in all_blocks() if b.kind == "file"):
        runner = FILE_BLOCK_RUNNERS.get(block.path)
        assert runner, f"{block.where}: a <!-- file: --> block in a doc no test builds a project from"
        source = (ROOT / runner).read_text()
        assert block.path.split("/")[-1] in source and "<!-- file:" in source, f"{runner} does not read {block.path}"


# ------------------------------------------------------------------------------------- the collector's own tests
def test_parser_sees_markers_indents_and_unmarked_blocks() -> None:
    text = (
        "intro\n"
        "<!-- doc-test: run -->\n"
        "```python\n"
        "print(1)\n"
        "```\n"
        "\n"
        "* a list item:\n"
        "  <!-- doc-test: cli -->\n"
        "  ```sh\n"
        "  echo hi\n"
        "  ```\n"
        "<!-- file: x.py -->\n"
        "```python\n"
        "```\n"
        "\n"
        "````\n"
        "```\n"
        "nested fence text\n"
        "````\n"
    )
    blocks = parse_blocks(text, "t.md")
    assert [(b.line, b.lang, b.kind, b.code) for b in blocks] == [
        (3, "python", "run", "print(1)"),
        (9, "sh", "cli", "echo hi"),
        (13, "python", "file", ""),
        (16, "", None, "```\nnested fence text"),
    ]


def test_an_unclosed_fence_is_an_error() -> None:
    with pytest.raises(AssertionError, match=r"t\.md:1: unclosed"):
        parse_blocks("```python\nprint(1)\n", "t.md")


# ------------------------------------------------------------------------------------------------- the runners
def _check_names(block: Block, script: Path) -> None:
    """Undefined names fail here, with the doc's line numbers, before anything runs."""
    res = subprocess.run(
        [str(BIN / "ruff"), "check", "--isolated", "--select", "F821,F822,F823", "--output-format", "concise", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, f"{block.where}: undefined names (the line numbers are the doc's):\n{res.stdout}"


def _failure(block: Block, res: subprocess.CompletedProcess[str]) -> str:
    return f"{block.where} failed (exit {res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"


def _run_python(block: Block, tmp_path: Path, timeout: float) -> None:
    assert block.lang in ("python", "py"), f"{block.where}: a {block.kind} block must be python, not {block.lang!r}"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    script = tmp_path / "doc_block.py"
    # Line numbers in tracebacks match the doc: the code starts on the line after the fence.
    script.write_text("\n" * block.line + block.code + "\n")
    _check_names(block, script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    res = subprocess.run(
        [sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, _failure(block, res)


@pytest.mark.parametrize("block", _params("run"))
def test_run_block(block: Block, tmp_path: Path) -> None:
    _run_python(block, tmp_path, timeout=120)


@pytest.mark.parametrize("block", _params("lab"))
def test_lab_block(block: Block, tmp_path: Path) -> None:
    require_root()
    require_binary("ip", "nft", "tcpdump", "curl", "wireguard-go", "wg")
    _run_python(block, tmp_path, timeout=240)


@pytest.mark.parametrize("block", _params("cli"))
def test_cli_block(block: Block) -> None:
    assert block.lang in ("sh", "bash", "console", ""), f"{block.where}: a cli block must be shell, not {block.lang!r}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, _failure(block, res)


@pytest.mark.parametrize("block", _params("policy"))
def test_policy_block(block: Block) -> None:
    assert block.lang in ("toml", "yaml", "yml"), f"{block.where}: a policy block must be toml or yaml"
    policy = parse_policy(block.code, fmt="yaml" if block.lang == "yml" else block.lang, source=block.where)
    assert policy.rules, f"{block.where}: the policy has no rules"
