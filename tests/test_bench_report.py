"""The report of ``netsim bench`` (issue 17): levers on/off for every `LEVER_PATHS` entry, the targets with met or
missed and by how much, and the progress display. No root, no timing: records are made up, clocks are fake.
"""

from __future__ import annotations

import io
import json
from typing import Any, cast

import pytest
from click.testing import CliRunner

from netsim.bench import bench_e2e, runner
from netsim.benchcli import bench_command


def _udp(path: str, size: int, pps: float, provider: float, helper: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": f"e2e/{path}/udp{size}",
        "group": "e2e",
        "path": path,
        "proto": "udp",
        "size": size,
        "pps": {"median": pps, "min": pps, "max": pps},
        "gbps": pps * size * 8 / 1e9,
        "loss": {"median": 0.0, "min": 0.0, "max": 0.0},
        "cpu_s_per_packet": {"blaster": 1e-6, "provider": provider, "helper": helper},
        **extra,
    }


def _tcp(path: str, gbps: float, provider: float, helper: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": f"e2e/{path}/tcp",
        "group": "e2e",
        "path": path,
        "proto": "tcp",
        "gbps": {"median": gbps, "min": gbps, "max": gbps},
        "cpu_s_per_gbit": {"provider": provider, "helper": helper},
        **extra,
    }


def _doc(results: list[dict[str, Any]]) -> dict[str, Any]:
    machine = {"timestamp": "t", "cpu_model": "cpu", "cpu_count": 2, "kernel": "k", "python": "3.11",
               "load_average": [1.0, 1.0, 1.0], "git_commit": None}  # fmt: skip
    doc = {"machine": machine, "quick": True, "wall_seconds": 1.0, "results": results, "skipped": []}
    return {**doc, "ratios": runner.compute_ratios(results)}


def test_ratios_are_computed_from_the_same_run_against_the_targets() -> None:
    results = [_udp("netsim-loop", 64, 30000, 4e-6, 4e-6), _udp("c-floor", 64, 100000, 1e-6, 1e-6)]
    results += [_udp("naive", 64, 1000, 5e-4, 5e-4), _udp("naive-careful", 64, 10000, 2e-5, 2e-5)]
    ratios = runner.compute_ratios(results)
    floor = ratios["netsim-loop / c-floor (udp64 pkt/s)"]
    assert floor["value"] == pytest.approx(0.3) and floor["met"] is False and floor["target"] == 0.5
    naive = ratios["netsim-loop / naive (udp64 pkt/s)"]
    assert naive["value"] == pytest.approx(30.0) and "met" not in naive  # scapy's cost: no target (issue 17)
    careful = ratios["netsim-loop / naive-careful (udp64 pkt/s)"]
    assert careful["value"] == pytest.approx(3.0) and careful["denominator"] == "e2e/naive-careful/udp64"
    assert ratios["naive-careful CPU / netsim-loop CPU per packet (udp64)"]["value"] == pytest.approx(5.0)
    cpu = ratios["c-floor CPU / netsim-loop CPU per packet (udp64)"]
    assert cpu["value"] == pytest.approx(0.25) and cpu["met"] is False
    assert "netsim / wireguard-go (udp64 pkt/s)" not in ratios  # never invented when a path did not run
    doc = {**_doc(results), "skipped": [{"name": "e2e/netsim/*", "reason": "needs root"}]}
    md = runner.render_markdown(doc)
    assert "| netsim-loop / c-floor (udp64 pkt/s) | 0.300 | >= 0.5 | **no** |" in md
    assert "`e2e/netsim/*`: needs root" in md
    assert "MISSED" in runner.render_text(doc)


def test_a_lever_added_to_lever_paths_gets_cases_ratios_and_a_report_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """What another engineer's one-line `LEVER_PATHS` entry must produce, with no edit elsewhere."""
    monkeypatch.setitem(bench_e2e.LEVER_PATHS, "netsim-nofoo", (10, {"NETSIM_FOO": "0"}))
    names = bench_e2e.case_names(quick=True)
    assert {"e2e/netsim-nofoo/udp64", "e2e/netsim-nofoo/tcp"} <= set(names)
    assert bench_e2e.lever_destination("netsim-nofoo") not in {
        bench_e2e.tunnel_destination(p, []) for p in ("direct", "wireguard-go", "netsim", "netsim-nogso")
    }
    results = [
        _udp("netsim", 64, 20000, 10e-6, 20e-6),
        _udp("netsim-nofoo", 64, 10000, 12e-6, 48e-6),  # lever off: half the rate, twice the CPU
        _tcp("netsim", 0.5, 1.0, 2.0),
        _tcp("netsim-nofoo", 0.4, 1.5, 3.0),
        _udp("netsim-nogso", 64, 16000, 10e-6, 30e-6),
    ]
    ratios = runner.compute_ratios(results)
    assert ratios["lever netsim-nofoo: netsim / netsim-nofoo (udp64 pkt/s)"]["value"] == pytest.approx(2.0)
    assert ratios["lever netsim-nofoo: netsim-nofoo CPU / netsim CPU per packet (udp64)"]["value"] == pytest.approx(2.0)
    assert ratios["lever netsim-nofoo: netsim / netsim-nofoo (tcp Gbit/s)"]["value"] == pytest.approx(1.25)
    assert ratios["lever netsim-nofoo: netsim-nofoo CPU / netsim CPU per Gbit (tcp)"]["value"] == pytest.approx(1.5)
    assert ratios["lever netsim-nogso: netsim / netsim-nogso (udp64 pkt/s)"]["value"] == pytest.approx(1.25)
    assert "lever netsim-nogso: netsim / netsim-nogso (tcp Gbit/s)" not in ratios  # not measured: not invented
    doc = _doc(results)
    md = runner.render_markdown(doc)
    assert "| netsim-nofoo | `NETSIM_FOO=0` | udp64 | 20,000 | 10,000 | 2.00 | 30.0 | 60.0 | 2.00 |" in md
    assert "| netsim-nofoo | `NETSIM_FOO=0` | tcp | 0.500 | 0.400 | 1.25 | 3.00 | 4.50 | 1.50 |" in md
    assert "| netsim-nogso | `NETSIM_UDP_GSO=0` | udp64 |" in md
    assert "netsim-nofoo" in runner.render_text(doc)


def test_a_lever_record_is_recognised_by_its_lever_env_after_the_entry_is_gone() -> None:
    """An earlier run's JSON re-rendered after a lever left `LEVER_PATHS` still shows that lever."""
    results = [_udp("netsim", 64, 20000, 10e-6, 20e-6), _udp("netsim-old", 64, 5000, 10e-6, 30e-6)]
    results[1]["lever_env"] = {"NETSIM_OLD": "0"}
    assert runner.lever_paths(results) == ["netsim-old"]
    assert runner.compute_ratios(results)["lever netsim-old: netsim / netsim-old (udp64 pkt/s)"]["value"] == 4.0
    assert "| netsim-old | `NETSIM_OLD=0` | udp64 |" in runner.render_markdown(_doc(results))
    assert runner.lever_paths([_udp("netsim-other", 64, 1, 1e-6, 1e-6)]) == []  # not a lever: no env, no entry


def test_an_opt_in_lever_path_is_the_on_side_of_its_ratios_and_rows() -> None:
    """`OPT_IN_LEVERS` (TUN offloads, off by default) turn a lever on: the lever path is "on", netsim "off"."""
    assert "netsim-tungro" in bench_e2e.OPT_IN_LEVERS
    assert bench_e2e.LEVER_PATHS["netsim-tungro"][1] == {"NETSIM_TUN_OFFLOAD": "gro"}
    results = [
        _udp("netsim", 64, 20000, 10e-6, 20e-6),
        _udp("netsim-tungro", 64, 25000, 8e-6, 16e-6),  # lever on: faster, cheaper
        _tcp("netsim", 0.5, 1.0, 2.0),
        _tcp("netsim-tungro", 0.4, 1.5, 3.0),  # on, in TCP: slower, dearer
    ]
    ratios = runner.compute_ratios(results)
    assert ratios["lever netsim-tungro: netsim-tungro / netsim (udp64 pkt/s)"]["value"] == pytest.approx(1.25)
    assert ratios["lever netsim-tungro: netsim CPU / netsim-tungro CPU per packet (udp64)"]["value"] == (
        pytest.approx(1.25)
    )
    assert ratios["lever netsim-tungro: netsim-tungro / netsim (tcp Gbit/s)"]["value"] == pytest.approx(0.8)
    assert "lever netsim-tungro: netsim / netsim-tungro (udp64 pkt/s)" not in ratios
    md = runner.render_markdown(_doc(results))
    assert "| netsim-tungro | `NETSIM_TUN_OFFLOAD=gro` | udp64 | 25,000 | 20,000 | 1.25 | 24.0 | 30.0 | 1.25 |" in md
    assert "| netsim-tungro | `NETSIM_TUN_OFFLOAD=gro` | tcp | 0.400 | 0.500 | 0.80 | 4.50 | 3.00 | 0.67 |" in md
    # an earlier run's record keeps its direction after the entry is gone
    old = [_udp("netsim", 64, 20000, 10e-6, 20e-6), _udp("netsim-withx", 64, 40000, 5e-6, 10e-6)]
    old[1].update(lever_env={"NETSIM_X": "1"}, lever_on=True)
    assert runner.compute_ratios(old)["lever netsim-withx: netsim-withx / netsim (udp64 pkt/s)"]["value"] == 2.0


def _loop_pair(size: int, netsim_pps: float, floor_pps: float, netsim_cpu: float, floor_cpu: float) -> list[Any]:
    return [
        _udp("netsim-loop", size, netsim_pps, netsim_cpu / 2, netsim_cpu / 2),
        _udp("c-floor", size, floor_pps, floor_cpu / 2, floor_cpu / 2),
    ]


def test_targets_say_met_or_missed_and_by_how_much_from_the_runs_figures() -> None:
    results = [
        _udp("netsim", 64, 30000, 5e-6, 12e-6),  # provider 5 µs (<= 6: met), helper 12 µs (<= 10: missed)
        _udp("wireguard-go", 64, 20000, 0.0, 0.0),
        _tcp("netsim", 0.8, 1.0, 1.0),
        _tcp("wireguard-go", 1.0, 0.0, 0.0),
        *_loop_pair(64, 40000, 100000, 8e-6, 4e-6),
    ]
    verdicts = {t["name"]: t for t in runner.evaluate_targets(_doc(results))}
    udp = verdicts["netsim end to end / wireguard-go, UDP 64 B pkt/s"]
    assert udp["value"] == pytest.approx(1.5) and udp["met"] is True and udp["margin"] == pytest.approx(0.5)
    tcp = verdicts["netsim end to end / wireguard-go, TCP Gbit/s"]
    assert tcp["met"] is False and tcp["margin"] == pytest.approx(-0.2)
    assert verdicts["netsim end to end, TCP"]["value"] == pytest.approx(0.8)
    assert verdicts["netsim loop / C floor, UDP 64 B pkt/s"]["met"] is False
    cpu = verdicts["netsim loop / C floor, UDP 64 B CPU per packet (C floor CPU / netsim CPU)"]
    assert cpu["value"] == pytest.approx(0.5) and cpu["met"] is True and cpu["margin"] == pytest.approx(0.0)
    helper = verdicts["helper CPU per packet end to end, UDP 64 B"]
    assert helper["value"] == pytest.approx(12.0) and helper["met"] is False and helper["margin"] == pytest.approx(-0.2)
    provider = verdicts["provider CPU per packet end to end, UDP 64 B"]
    assert provider["met"] is True and provider["margin"] == pytest.approx(1 / 6)
    unmeasured = verdicts["netsim loop / C floor, UDP 512 B pkt/s"]
    assert unmeasured["value"] is None and unmeasured["met"] is None  # never a verdict without a figure
    md = runner.render_markdown(_doc(results))
    assert "| netsim end to end / wireguard-go, TCP Gbit/s | 0.80x | >= 1x | **missed** | 20 % short |" in md
    assert "| helper CPU per packet end to end, UDP 64 B | 12.00 µs | <= 10 µs | **missed** | 20 % over |" in md
    assert "| provider CPU per packet end to end, UDP 64 B | 5.00 µs | <= 6 µs | met | 17 % to spare |" in md
    assert "| netsim loop / C floor, UDP 512 B pkt/s | - | >= 0.5x | not measured |  |" in md
    text = runner.render_text(_doc(results))
    assert "MISSED" in text and "20 % over" in text and "UDP 512 B" not in text


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_status_line_with_count_case_elapsed_and_eta() -> None:
    clock, term = _Clock(), _Terminal()
    progress = runner.Progress(["micro/a", "micro/b", "e2e/x/udp64", "e2e/x/tcp"], term, clock=clock, tick=None)
    assert progress.tty and progress.eta() is None
    progress.start("micro/a")
    assert term.getvalue().endswith("\r\x1b[K[0/4] 0:00 elapsed, ETA ?  micro/a")
    clock.now += 10
    progress.done("micro/a")
    progress.done("micro/a")  # twice counts once
    progress.done("not/a/case")  # unknown names do not count
    # weights: micro 1, e2e 6 -> 10 s for weight 1 done, weight 13 left
    assert progress.eta() == pytest.approx(130.0)
    progress.start("micro/b")
    assert term.getvalue().endswith("[1/4] 0:10 elapsed, ETA 2:10  micro/b")
    progress.log("a result line")
    assert term.getvalue().endswith("\r\x1b[Ka result line\n\r\x1b[K[1/4] 0:10 elapsed, ETA 2:10  micro/b")
    for name in ("micro/b", "e2e/x/udp64", "e2e/x/tcp"):
        progress.done(name)
    progress.close()
    assert term.getvalue().endswith("[4/4] 0:10 elapsed, ETA 0:00  micro/b\n")
    progress.log("after the end")
    assert term.getvalue().endswith("micro/b\nafter the end\n")  # no status line once closed


def test_progress_on_a_terminal_redraws_while_a_long_case_runs() -> None:
    """The ticker: the elapsed time moves with no event (no timing asserted: it waits for the redraw)."""
    import threading

    drawn = threading.Event()

    class Watched(_Terminal):
        def write(self, text: str) -> int:
            if "0:05 elapsed" in text:
                drawn.set()
            return super().write(text)

    clock = _Clock()
    progress = runner.Progress(["e2e/x/udp64"], Watched(), clock=clock, tick=0.01)
    progress.start("e2e/x/udp64")
    clock.now += 5
    assert drawn.wait(60)
    progress.close()


def test_progress_off_a_terminal_prints_plain_lines_and_no_control_characters() -> None:
    out = io.StringIO()
    progress = runner.Progress(["micro/a", "micro/b"], out, clock=_Clock())
    assert not progress.tty
    progress.start("micro/a")
    progress.done("micro/a")
    progress.log("measured")
    progress.start("micro/b")
    progress.close()
    assert out.getvalue() == "[0/2] micro/a ...\nmeasured\n[1/2] micro/b ...\n"


def test_run_bench_reports_every_selected_case_to_the_progress_display() -> None:
    seen: list[tuple[str, str]] = []

    class Recorder(runner.Progress):
        def start(self, name: str) -> None:
            seen.append(("start", name))

        def done(self, name: str) -> None:
            seen.append(("done", name))
            super().done(name)

    made: list[Recorder] = []

    def make(names: list[str]) -> Recorder:
        made.append(Recorder(names, io.StringIO()))
        return made[-1]

    runner.run_bench(quick=True, only="micro/ipc-encode/64,micro/uds/64", log=lambda line: None, progress=make)
    assert made[0].names == ["micro/ipc-encode/64", "micro/uds/64"]
    assert seen == [
        ("start", "micro/ipc-encode/64"),
        ("done", "micro/ipc-encode/64"),
        ("start", "micro/uds/64"),
        ("done", "micro/uds/64"),
    ]
    assert made[0].finished == {"micro/ipc-encode/64", "micro/uds/64"}


def test_the_e2e_childs_progress_lines_drive_the_display_and_are_not_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [
        "lab 1 up",
        bench_e2e.progress_line("start", "e2e/direct,netsim/udp64"),
        "  direct        udp    64B       100 pkt/s  loss 0.0000",
        bench_e2e.progress_line("done", "e2e/direct/udp64"),
        "skipped e2e/netsim/udp64: whatever",
    ]

    def fake_child(argv: list[str], on_line: Any, timeout: float) -> tuple[int, str]:
        for line in lines:
            on_line(line)
        return 1, "boom"

    monkeypatch.setattr(runner, "_stream_child", fake_child)
    logged: list[str] = []
    progress = runner.Progress(["e2e/direct/udp64", "e2e/netsim/udp64"], io.StringIO())
    out = runner._run_e2e(True, None, logged.append, runner.BenchInputs(), progress)
    assert logged == ["lab 1 up", "  direct        udp    64B       100 pkt/s  loss 0.0000"]
    assert progress.finished == {"e2e/direct/udp64"} and progress.current == "e2e/direct,netsim/udp64"
    assert out["skipped"][0]["name"] == "e2e/*" and "boom" in out["skipped"][0]["reason"]


def _separate_streams() -> CliRunner:
    """A runner that keeps stderr out of stdout: click < 8.2 (the lowest tier) mixes them unless told not to."""
    try:
        runner_: CliRunner = cast(Any, CliRunner)(mix_stderr=False)
        return runner_
    except TypeError:  # click >= 8.2: always separate, and the argument is gone
        return CliRunner()


def test_bench_json_to_stdout_is_pure_json_and_stderr_off_a_terminal_has_no_status_line() -> None:
    result = _separate_streams().invoke(bench_command, ["--quick", "--only", "micro/uds/64", "--json", "-"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [r["case"] for r in doc["results"]] == ["micro/uds/64"]
    assert "\r" not in result.stderr and "ETA" not in result.stderr
    assert "micro/uds/64 ..." in result.stderr
    forced = _separate_streams().invoke(bench_command, ["--quick", "--only", "micro/uds/64", "--progress"])
    assert forced.exit_code == 0, forced.stderr
    assert "\r\x1b[K[1/1]" in forced.stderr and "ETA" in forced.stderr


def test_the_before_after_table_puts_each_target_of_two_runs_side_by_side() -> None:
    before = _doc([_udp("netsim", 64, 10000, 10e-6, 20e-6), _udp("wireguard-go", 64, 20000, 0.0, 0.0)])
    after = _doc([_udp("netsim", 64, 30000, 5e-6, 8e-6), _udp("wireguard-go", 64, 20000, 0.0, 0.0)])
    after["results"].append(_udp("naive-careful", 64, 1000, 1e-6, 1e-6))
    table = runner.render_comparison(before, after)
    row = "| netsim end to end / wireguard-go, UDP 64 B pkt/s | >= 1x | 0.50x | 1.50x | 3.00 | met, 50 % to spare |"
    assert row in table
    helper = "| helper CPU per packet end to end, UDP 64 B | <= 10 µs | 20.00 µs | 8.00 µs | 0.40 | met, 20 % to spare"
    assert helper in table
    assert "| netsim end to end, TCP | >= 1 Gbit/s | - | - | - | not measured |" in table
    assert "| netsim / wireguard-go (udp64 pkt/s) | 0.500 | 1.500 |" in table
