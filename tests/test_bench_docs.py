"""docs/benchmarks.md is what `netsim.bench.runner.render_docs` makes of docs/benchmarks.json (issue 17): every table
and every measured figure of the page comes from the committed JSON, so page and data cannot drift apart.

No root, no measuring. After a new run: ``netsim bench --from-json docs/benchmarks.json --write-docs``.
"""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from netsim.bench import runner

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
DATA = ROOT / "docs" / "benchmarks.json"


def _data() -> dict[str, Any]:
    return dict(json.loads(DATA.read_text()))


def test_the_committed_page_is_what_the_renderer_makes_of_the_committed_json() -> None:
    page = PAGE.read_text()
    rendered = runner.render_docs(page, _data())
    assert rendered == page, (
        "docs/benchmarks.md differs from its rendering of docs/benchmarks.json; run "
        "`.venv/bin/netsim bench --from-json docs/benchmarks.json --write-docs`"
    )


def test_a_changed_figure_in_the_json_changes_the_page_and_rendering_is_idempotent() -> None:
    """The positive control of the test above: the page does depend on the data."""
    page, doc = PAGE.read_text(), _data()
    netsim = next(r for r in doc["results"] if r["name"] == "e2e/netsim/udp64")
    changed = copy.deepcopy(doc)
    rec = next(r for r in changed["results"] if r["name"] == "e2e/netsim/udp64")
    rec["cpu_s_per_packet"]["helper"] = netsim["cpu_s_per_packet"]["helper"] * 3 + 1e-6
    other = runner.render_docs(page, changed)
    assert other != page
    assert f"{rec['cpu_s_per_packet']['helper'] * 1e6:.1f}" in other
    assert runner.render_docs(other, changed) == other
    assert runner.render_docs(other, doc) == page


_CODE = re.compile(r"^```.*?^```|`[^`\n]+`", re.DOTALL | re.MULTILINE)  # code blocks and inline code
#: A measured figure: a decimal fraction, a percentage, or a number with a unit of speed, time or ratio.
_FIGURE = re.compile(
    r"(?<![\w.])\d[\d,]*\.\d+(?![\w.]*\.\d)"  # 0.76, 1,234.5 (not an address or version like 10.66.1.0)
    r"|(?<![\w.])\d[\d,.]*\s*(?:%|µs|ns|pkt/s|Gbit/s|x\b)"  # 31 %, 22 µs, 7,833 pkt/s, 2x (not "udp64 pkt/s")
)
#: Figures the prose may state: parameters of the method and names, not results.
_ALLOWED: set[str] = set()


def test_no_measured_figure_stands_outside_a_marker() -> None:
    """Prose figures come from the JSON too: outside markers and code blocks, no decimals, percentages or
    figures with units (the method's parameters are written without them: "300 ms", "64 datagrams")."""
    page = runner._MARKER.sub("", PAGE.read_text())
    prose = _CODE.sub("", page)
    found = [m.group(0) for m in _FIGURE.finditer(prose) if m.group(0) not in _ALLOWED]
    assert found == [], f"unsourced figures in docs/benchmarks.md: {found}"


def test_the_figure_check_catches_a_figure_written_by_hand() -> None:
    prose = "netsim reached 0.76 of wireguard-go, 31 % in epoll, helper 22 µs, 7,833 pkt/s, 2x faster"
    assert [m.group(0) for m in _FIGURE.finditer(prose)] == ["0.76", "31 %", "22 µs", "7,833 pkt/s", "2x"]
    assert not list(_FIGURE.finditer("inet 203.0.113.10, net 10.66.1.0/24, udp64 pkt/s, 64 datagrams, 300 ms"))


def test_a_figure_the_run_did_not_measure_says_so_and_an_unknown_key_is_an_error() -> None:
    doc = _data()
    page = "a <!-- bench:ratio:no such ratio -->old<!-- /bench --> "
    page += "b <!-- bench:case:e2e/none/udp64:pps --><!-- /bench -->"
    assert runner.render_docs(page, doc) == (
        f"a <!-- bench:ratio:no such ratio -->{runner.NOT_MEASURED}<!-- /bench --> "
        f"b <!-- bench:case:e2e/none/udp64:pps -->{runner.NOT_MEASURED}<!-- /bench -->"
    )
    for bad in ("nosuch:thing", "section:nosuch", "target:nosuch", "case:e2e/netsim/udp64:nosuch"):
        with pytest.raises(KeyError):
            runner.render_docs(f"<!-- bench:{bad} --><!-- /bench -->", doc)


def test_the_cpu_of_a_tcp_case_is_seconds_per_gbit() -> None:
    doc = _data()
    tcp = next(r for r in doc["results"] if r["name"] == "e2e/netsim/tcp")
    page = "<!-- bench:case:e2e/netsim/tcp:cpu.helper --><!-- /bench -->"
    expected = f"{tcp['cpu_s_per_gbit']['helper']:.2f}"
    assert runner.render_docs(page, doc) == f"<!-- bench:case:e2e/netsim/tcp:cpu.helper -->{expected}<!-- /bench -->"
    missing = page.replace("cpu.helper", "cpu.nosuch")
    assert runner.NOT_MEASURED in runner.render_docs(missing, doc)


def test_the_system_share_of_a_process_cpu_is_accumulated_and_rendered() -> None:
    from netsim.bench.bench_e2e import _add_cpu, split_sys

    cpu: dict[str, float] = {}
    _add_cpu(cpu, "helper", (1.0, 0.5), (1.3, 1.2))  # (utime, stime) before and after: 0.3 user + 0.7 system
    _add_cpu(cpu, "helper", (2.0, 2.0), (2.0, 2.0))  # an idle run adds nothing
    totals, shares = split_sys(cpu)
    assert totals == pytest.approx({"helper": 1.0}) and shares == pytest.approx({"helper": 0.7})
    doc = copy.deepcopy(_data())
    rec = next(r for r in doc["results"] if r["name"] == "e2e/netsim/udp64")
    rec["cpu_sys_share"] = shares
    page = "<!-- bench:case:e2e/netsim/udp64:sys.helper --><!-- /bench -->"
    assert runner.render_docs(page, doc) == "<!-- bench:case:e2e/netsim/udp64:sys.helper -->70 %<!-- /bench -->"
    del rec["cpu_sys_share"]  # a run from before the split says so
    assert runner.NOT_MEASURED in runner.render_docs(page, doc)


def test_write_docs_from_json_publishes_json_page_and_keeps_the_prose(tmp_path: Path) -> None:
    (tmp_path / "benchmarks.md").write_text(
        "Intro.\n\n<!-- bench:section:run --><!-- /bench -->\n\n"
        "Loop: <!-- bench:case:e2e/netsim/udp64:pps --><!-- /bench -->\n"
    )
    doc = runner.load_report(DATA)
    runner.publish_docs(doc, tmp_path, log=lambda line: None)
    page = (tmp_path / "benchmarks.md").read_text()
    assert page.startswith("Intro.\n\n<!-- bench:section:run -->\nMeasured ")
    pps = next(r for r in doc["results"] if r["name"] == "e2e/netsim/udp64")["pps"]["median"]
    assert f"Loop: <!-- bench:case:e2e/netsim/udp64:pps -->{pps:,.0f}<!-- /bench -->" in page
    assert json.loads((tmp_path / "benchmarks.json").read_text())["results"] == doc["results"]
    assert runner.render_docs(page, json.loads((tmp_path / "benchmarks.json").read_text())) == page


def test_profiles_of_the_run_render_as_tables_and_their_absence_is_said() -> None:
    doc = _data()
    page = "<!-- bench:section:profiles --><!-- /bench -->"
    assert "No profile was taken in this run" in runner.render_docs(page, {**doc, "profiles": []})
    profiles = [
        {"path": "netsim", "size": 64, "tool": "strace",
         "processes": {"helper": {"packets": 1000, "syscalls_per_packet": {"sendmsg": 0.02, "recvfrom": 1.07}}}},
        {"path": "netsim", "size": 64, "tool": "py-spy",
         "processes": {"provider": {"samples": 200, "self": [["write_packets (tun.py)", 0.31]], "inclusive": []}}},
    ]  # fmt: skip
    text = runner.render_docs(page, {**doc, "profiles": profiles})
    assert "**profile: netsim helper, UDP 64 B, strace (1,000 packets)**" in text
    assert "| `recvfrom` | 1.070 |\n| `sendmsg` | 0.020 |\n| total | 1.090 |" in text
    assert "| `write_packets (tun.py)` | 31.0 % |" in text


def test_profiles_need_root_and_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    profiles, skipped = runner.run_profiles(["netsim"], quick=True, log=lambda line: None)
    assert profiles == []
    assert {s["name"] for s in skipped} == {"profile/netsim/py-spy", "profile/netsim/strace"}
    assert all(s["reason"] == "needs root (a lab)" for s in skipped)
    shown: list[runner.Progress] = []

    def make(names: list[str]) -> runner.Progress:
        shown.append(runner.Progress(names, io.StringIO()))
        return shown[-1]

    doc = runner.run_bench(quick=True, only="micro/uds/64", log=lambda line: None, progress=make, profile=("netsim",))
    assert shown[0].names == ["micro/uds/64", "profile/netsim/py-spy", "profile/netsim/strace"]
    assert shown[0].finished == set(shown[0].names)  # the profiles count in the progress display
    assert [s["name"] for s in doc["skipped"]] == ["profile/netsim/py-spy", "profile/netsim/strace"]
    assert doc["profiles"] == [] and [r["case"] for r in doc["results"]] == ["micro/uds/64"]


def test_no_line_of_prose_starts_with_an_inline_marker() -> None:
    """Markdown takes a line that starts with an HTML comment for an HTML block and breaks the paragraph there."""
    prose = re.sub(r"^```.*?^```", "", PAGE.read_text(), flags=re.DOTALL | re.MULTILINE)
    starts = [ln for ln in prose.splitlines() if ln.startswith("<!-- bench:") and "bench:section:" not in ln]
    assert starts == []
