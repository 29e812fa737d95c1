"""``netsim bench`` options for the user's own code: ``--list``, ``--only`` that matches nothing, ``--provider``,
``--policy`` (docs/benchmarks.md, "Your own provider, policy and helper").

The provider cases run with the real harness and tiny counts; nothing here asserts on speed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from click.testing import CliRunner

from netsim.bench import runner
from netsim.benchcli import bench_command
from netsim.testing.require import require_binary, require_root, require_tun

SPEC = "bench_provider:TaggingProvider"
RAW = "bench_provider:SocketProvider"  # written from scratch on the IPC pieces, not on HelperForwardingProvider


def _lab_gate() -> Any:
    """Skip (or fail under CI) without what the lab tunnel paths need; the e2e module when it is all there."""
    require_root()
    require_tun()
    require_binary("cc", "ip", "nft", "wireguard-go", "wg", "ping")
    from netsim.bench import bench_e2e

    return bench_e2e


def _invoke(*argv: str) -> Any:
    return CliRunner().invoke(bench_command, list(argv))


def test_list_prints_every_case_name_one_per_line_and_respects_quick() -> None:
    quick = _invoke("--list", "--quick")
    assert quick.exit_code == 0, quick.output
    names = quick.output.splitlines()
    assert names == runner.case_names(quick=True)
    assert {"micro/ipc-encode/64", "loop/uds/b64", "loop/helper/b64", "e2e/netsim/udp64", "e2e/netsim/tcp"} <= set(
        names
    )
    assert "e2e/netsim/udp1400" not in names and "e2e/c-floor/tcp" not in names
    full = _invoke("--list")
    assert full.exit_code == 0
    assert {"e2e/netsim/udp1400", "loop/uds/b128", "micro/parse/1400"} <= set(full.output.splitlines())


def test_only_that_matches_nothing_fails_and_lists_the_case_names() -> None:
    result = _invoke("--quick", "--only", "no-such-case")
    assert result.exit_code == 2
    assert "--only 'no-such-case' matches no benchmark case" in result.output
    for name in ("micro/ipc-encode/64", "loop/uds/b64", "e2e/netsim/udp64"):
        assert f"  {name}\n" in result.output


def test_list_with_a_provider_names_its_cases_beside_the_built_in_ones() -> None:
    result = _invoke("--list", "--quick", "--provider", SPEC)
    assert result.exit_code == 0, result.output
    names = result.output.splitlines()
    assert names.index("loop/builtin-provider/b64") < names.index("loop/provider:TaggingProvider/b64")
    assert {"e2e/provider:TaggingProvider/udp64", "e2e/provider:TaggingProvider/tcp", "e2e/netsim/udp64"} <= set(names)
    assert "loop/builtin-provider/b64" not in _invoke("--list", "--quick").output  # only beside a user's


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nomodule_for_netsim_bench:X", "does not import: ModuleNotFoundError"),
        ("bench_provider:Missing", "is not a PacketTunnelProvider subclass"),
        ("bench_provider:NotAProvider", "is not a PacketTunnelProvider subclass"),
        ("bench_provider", "must look like 'package.module:Class'"),
        ("bench_provider:NeedsArguments", "must be constructible with no arguments"),
    ],
)
def test_a_bad_provider_spec_is_a_usage_error_before_anything_runs(
    spec: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(**_: Any) -> None:
        raise AssertionError("run_bench must not start with a bad --provider")

    monkeypatch.setattr(runner, "run_bench", forbidden)
    result = _invoke("--quick", "--provider", spec)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert _invoke("--list", "--provider", spec).exit_code == 2


def test_two_providers_with_one_class_name_are_refused() -> None:
    same_class = f"{Path(__file__).parent / 'bench_provider.py'}:TaggingProvider"  # the file form of SPEC
    result = _invoke("--list", "--provider", SPEC, "--provider", same_class)
    assert result.exit_code == 2
    assert "same class name 'TaggingProvider'" in result.output


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        (None, ".toml", "no such policy file"),
        ('default = "tunnel"\n[[rule]]\naction = "bypass"\ncolour = "red"\n', ".toml", "colour"),
        ('default = "tunnel"\n', ".txt", "unknown policy file extension"),
        ('default = "sideways"\n', ".toml", "default"),
    ],
)
def test_a_bad_policy_file_is_a_usage_error_before_anything_runs(
    text: str | None, suffix: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(**_: Any) -> None:
        raise AssertionError("run_bench must not start with a bad --policy")

    monkeypatch.setattr(runner, "run_bench", forbidden)
    path = tmp_path / f"policy{suffix}"
    if text is not None:
        path.write_text(text)
    result = _invoke("--quick", "--policy", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_the_user_provider_runs_beside_the_built_in_one_with_ratios(tmp_path: Path) -> None:
    """The loop provider cases over the in-memory tunnel, both providers, one report, ratio user/built-in."""
    policy = tmp_path / "policy.toml"
    policy.write_text('default = "tunnel"\nmechanism = "nat"\n\n[[rule]]\nname = "lan"\naction = "bypass"\n'
                      'dst = ["192.168.0.0/16"]\n')  # fmt: skip
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    argv = ["--quick", "--only", "loop/*provider*", "--provider", SPEC, "--provider", RAW, "--policy", str(policy)]
    result = _invoke(*argv, "--json", str(out), "--plot", str(png))
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["skipped"] == []
    assert doc["providers"] == [SPEC, RAW] and doc["policy"] == str(policy.resolve())
    by_case = {r["case"]: r for r in doc["results"]}
    assert sorted(by_case) == [
        "loop/builtin-provider/b64",
        "loop/provider:SocketProvider/b64",
        "loop/provider:TaggingProvider/b64",
    ]
    raw = by_case["loop/provider:SocketProvider/b64"]  # not a HelperForwardingProvider: its own counters
    assert raw["params"]["lost"] == 0 and raw["params"]["provider_stats"]["forwarded"] >= raw["items"]
    assert "provider:SocketProvider / built-in (loop b64 pkt/s)" in doc["ratios"]
    mine, builtin = by_case["loop/provider:TaggingProvider/b64"], by_case["loop/builtin-provider/b64"]
    assert mine["params"]["provider"] == SPEC
    assert builtin["params"]["provider"] == "netsim.runtime.forwarding:HelperForwardingProvider"
    for rec in (mine, builtin):
        assert rec["reps"] >= 5 and rec["params"]["lost"] == 0
        assert rec["params"]["policy"] == str(policy.resolve())
        ledger = rec["params"]["provider_stats"]["ledger"]["stages"]["tun_read"]
        assert ledger["forwarded"] >= rec["items"]  # the packets really went through that provider
    ratio = doc["ratios"]["provider:TaggingProvider / built-in (loop b64 pkt/s)"]
    assert ratio["value"] == pytest.approx(mine["items_per_s"] / builtin["items_per_s"])
    assert "provider:TaggingProvider / built-in (loop b64 pkt/s)" in result.output
    assert "loop/provider:TaggingProvider b64 64B" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_counting_provider_example_benchmarks_beside_the_built_in_one(tmp_path: Path) -> None:
    """Issue 13's "done when": examples/counting_provider.py (not a HelperForwardingProvider) through --provider."""
    spec = "netsim.examples.counting_provider:CountingProvider"
    out = tmp_path / "report.json"
    result = _invoke("--quick", "--only", "loop/*provider*", "--provider", spec, "--json", str(out))
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["skipped"] == [] and doc["providers"] == [spec]
    by_case = {r["case"]: r for r in doc["results"]}
    mine = by_case["loop/provider:CountingProvider/b64"]
    assert mine["params"]["provider"] == spec and mine["params"]["lost"] == 0 and mine["items"] > 0
    assert "loop/builtin-provider/b64" in by_case
    assert "provider:CountingProvider / built-in (loop b64 pkt/s)" in doc["ratios"]


def test_a_provider_that_carries_nothing_is_reported_as_failed_not_hung() -> None:
    doc = runner.run_bench(
        quick=True,
        only="loop/provider:*",
        inputs=runner.check_inputs(("bench_provider:BlackHoleProvider",)),
        log=lambda line: None,
    )
    assert doc["results"] == []
    [skip] = doc["skipped"]
    assert skip["name"] == "loop/provider:BlackHoleProvider/b64"
    assert "no UDP echo came back" in skip["reason"]


def _e2e(path: str, kind: str, value: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": f"e2e/{path}/{kind}", "group": "e2e", "path": path}
    if kind == "tcp":
        return {**rec, "proto": "tcp", "gbps": {"median": value, "min": value, "max": value}}
    return {**rec, "proto": "udp", "pps": {"median": value}, "cpu_s_per_packet": {}}


def test_provider_ratios_are_user_over_built_in_for_every_measured_case() -> None:
    results = [
        _e2e("netsim", "udp64", 20000.0),
        _e2e("provider:Mine", "udp64", 10000.0),
        _e2e("netsim", "tcp", 1.0),
        _e2e("provider:Mine", "tcp", 0.5),
        _e2e("provider:Other", "udp512", 1.0),  # no built-in at 512 in this run: no ratio invented
    ]
    ratios = runner.compute_ratios(results)
    assert ratios["provider:Mine / built-in (e2e udp64 pkt/s)"]["value"] == pytest.approx(0.5)
    assert ratios["provider:Mine / built-in (e2e tcp Gbit/s)"]["value"] == pytest.approx(0.5)
    assert not any("Other" in k for k in ratios)


@pytest.mark.lab
@pytest.mark.tun
@pytest.mark.slow
def test_e2e_runs_the_user_provider_beside_the_built_in_one_in_the_lab() -> None:
    bench_e2e = _lab_gate()

    # TCP too: the provider's phase comes after netsim's, and once reused its tunnel net, port and NAT table
    cases = [
        "e2e/netsim/udp64",
        "e2e/provider:TaggingProvider/udp64",
        "e2e/netsim/tcp",
        "e2e/provider:TaggingProvider/tcp",
    ]
    out = bench_e2e.run_e2e(quick=True, only=",".join(cases), providers=(SPEC,))
    assert out["skipped"] == []
    by_name = {r["name"]: r for r in out["results"]}
    assert sorted(by_name) == sorted(cases)
    for name in cases[:2]:
        assert all(run["received"] > 0 for run in by_name[name]["runs"]), by_name[name]["runs"]
        assert by_name[name]["cpu_s_per_packet"]["provider"] > 0
    for name in cases[2:]:
        assert by_name[name]["gbps"]["min"] > 0
    ratios = runner.compute_ratios(out["results"])
    assert {
        "provider:TaggingProvider / built-in (e2e udp64 pkt/s)",
        "provider:TaggingProvider / built-in (e2e tcp Gbit/s)",
    } <= set(ratios)


# ------------------------------------------------------------------------------------------------ --helper
NETSIM_HELPER_CMD = (
    f"{sys.executable} -m netsim.helpercli --config {{config}} --socket {{socket}} --token-file {{token_file}}"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--helper", "/bin/true --socket /tmp/x"], "must contain {socket}"),
        (["--helper", "/bin/true {socket} {colour}"], "placeholder {colour} is unknown"),
        (["--helper", "/bin/true {socket} --policy {policy}"], "placeholder {policy} has no value here"),
        (["--helper", "/no/such/helper-binary {socket}"], "'/no/such/helper-binary' is not an executable"),
        (["--helper", "/bin/true '{socket}"], "cannot split the command"),
        (["--conformance"], "give it with --helper CMD"),
    ],
)
def test_a_bad_helper_command_is_a_usage_error_before_anything_runs(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(**_: Any) -> None:
        raise AssertionError("run_bench must not start with a bad --helper")

    monkeypatch.setattr(runner, "run_bench", forbidden)
    result = _invoke("--quick", *argv)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_list_with_a_helper_names_the_user_helper_cases() -> None:
    result = _invoke("--list", "--quick", "--helper", NETSIM_HELPER_CMD)
    assert result.exit_code == 0, result.output
    names = result.output.splitlines()
    assert names[-2:] == ["e2e/user-helper/udp64", "e2e/user-helper/tcp"]


def test_helper_argv_fills_the_placeholders_word_by_word() -> None:
    from netsim.bench.bench_netsim import helper_argv

    argv = helper_argv("my-helper --listen={socket} -c '{config}' --token {token_file}", socket="/s p", config="/c",
                       token_file="/t")  # fmt: skip
    assert argv == ["my-helper", "--listen=/s p", "-c", "/c", "--token", "/t"]


def test_conformance_results_are_rendered_in_the_report() -> None:
    doc = {
        "machine": {"timestamp": "t", "cpu_model": "cpu", "cpu_count": 2, "kernel": "k", "python": "3.11",
                    "load_average": [1.0, 1.0, 1.0], "git_commit": None},
        "quick": True, "wall_seconds": 1.0, "results": [], "ratios": {}, "skipped": [],
        "conformance": [{"path": "user-helper", "name": "ping_pong", "status": "fail", "detail": "no PONG"}],
    }  # fmt: skip
    assert "FAIL ping_pong" in runner.render_text(doc) and "no PONG" in runner.render_text(doc)
    assert "| ping_pong | fail | no PONG |" in runner.render_markdown(doc)


@pytest.mark.lab
@pytest.mark.tun
@pytest.mark.slow
def test_e2e_runs_a_user_helper_command_after_checking_its_conformance() -> None:
    """netsim's own helper CLI given as a user's ``--helper`` command: it is checked, then measured."""
    bench_e2e = _lab_gate()

    out = bench_e2e.run_e2e(quick=True, only="e2e/user-helper/udp64", helper_cmd=NETSIM_HELPER_CMD, conformance=True)
    assert out["skipped"] == []
    [rec] = out["results"]
    assert rec["name"] == "e2e/user-helper/udp64"
    assert all(run["received"] > 0 for run in rec["runs"]), rec["runs"]
    statuses = {c["name"]: c["status"] for c in out["conformance"]}
    assert set(statuses) == set(conformance_checks())
    assert {n for n, s in statuses.items() if s != "pass"} == {"packets_echo"}, out["conformance"]


def conformance_checks() -> list[str]:
    from netsim.testing.conformance import CHECKS

    return list(CHECKS)


class _IperfFailsLab:
    """Just enough of a `Lab` for `E2E.measure_tcp`: every iperf3 run answers with iperf3's JSON error."""

    processes: ClassVar[list[Any]] = []

    async def run(self, ns: str, argv: list[str], timeout: float = 0, check: bool = True) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(
            stdout=b'{"start": {}, "intervals": [], "end": {}, "error": "server busy"}', returncode=1
        )


def test_an_iperf3_error_fails_that_tcp_case_with_iperfs_reason_instead_of_the_run(tmp_path: Path) -> None:
    from netsim.bench.bench_e2e import E2E, PathSetup

    run = E2E(_IperfFailsLab(), {}, True, tmp_path)
    trio.run(run.measure_tcp, {"netsim": PathSetup(("192.0.2.1", 9), {}, tcp_dst="192.0.2.1")})
    assert run.results == []
    [skip] = run.skipped
    assert skip["name"] == "e2e/netsim/tcp"
    assert "iperf3 gave no result" in skip["reason"] and "server busy" in skip["reason"]


def test_the_documented_provider_example_runs_from_its_directory(tmp_path: Path) -> None:
    """docs/benchmarks.md's example, as a user runs it: the file from the doc, the `netsim` command (a console
    script, whose sys.path does not hold the current directory) in that directory, in a fresh process."""
    import re
    import subprocess

    doc = (Path(__file__).parents[1] / "docs" / "benchmarks.md").read_text()
    match = re.search(r"cat > my_provider.py <<'PY'\n(.*?)\nPY\n", doc, re.S)
    assert match, "docs/benchmarks.md lost its provider example"
    (tmp_path / "my_provider.py").write_text(match.group(1) + "\n")
    netsim = Path(sys.executable).parent / "netsim"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listed = subprocess.run(
        [str(netsim), "bench", "--list", "--quick", "--provider", "my_provider:MyProvider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "loop/provider:MyProvider/b64" in listed.stdout.splitlines()
    ran = subprocess.run(
        [str(netsim), "bench", "--quick", "--only", "loop/provider:*", "--provider", "my_provider:MyProvider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "loop/provider:MyProvider b64 64B" in ran.stdout


def test_the_tunnel_paths_destinations_stay_in_the_tunnel_under_the_example_policy() -> None:
    """A provider path once went to 203.0.113.20, which examples/policy.toml bypasses: with that --policy its
    traffic skipped WireGuard (wireguard-go CPU 0) and it looked 1.7x faster than the built-in provider."""
    from netsim.bench.bench_e2e import ECHO_PORT, LEVER_PATHS, tunnel_destination
    from netsim.core.policy import FlowFields, PolicyEngine
    from netsim.runtime.policy_file import load_policy_file

    engine = PolicyEngine(load_policy_file(Path(__file__).parents[1] / "examples" / "policy.toml"))
    exclusive = ["provider:A", "provider:B", "user-helper"]
    dsts = [tunnel_destination(p, exclusive) for p in ["netsim", *LEVER_PATHS, *exclusive]]
    assert len(set(dsts)) == len(dsts)
    for dst in dsts:
        for proto, port in (("udp", ECHO_PORT), ("tcp", 5201)):
            verdict = engine.explain(FlowFields.parse(dst, proto, port), now=0.0).verdict
            assert verdict.action.name == "TUNNEL", (dst, proto, str(verdict))


# ---------------------------------------------------------------------------------------------- --faults
def test_list_faults_prints_the_faults_groups_cases() -> None:
    from netsim.bench import bench_faults

    result = _invoke("--list", "--faults", "--quick")
    assert result.exit_code == 0, result.output
    names = result.output.splitlines()
    assert names == [f"faults/{s.name}" for s in bench_faults.SCENARIOS] + ["faults/soak"]
    assert {"faults/en0-flap-1s", "faults/helper-sigstop-3s", "faults/wireguard-go-restart"} <= set(names)
    assert not any(n.startswith("faults/") for n in _invoke("--list", "--quick").output.splitlines())
    bad = _invoke("--faults", "--only", "e2e/*")
    assert bad.exit_code == 2 and "  faults/nat-flush\n" in bad.output


def test_faults_refuses_the_options_it_does_not_use() -> None:
    result = _invoke("--faults", "--provider", SPEC)
    assert result.exit_code == 2
    assert "--faults measures the built-in tunnel" in result.output


def test_recovery_is_the_longest_reply_gap_around_the_fault() -> None:
    from netsim.bench.bench_faults import recovery

    steady = [i * 0.05 for i in range(40)]  # replies every 50 ms, 0 .. 1.95 s
    # the link is down from 1.0 to 2.0; replies stop at 1.0 and come back at 2.3
    replies = [t for t in steady if t <= 1.0] + [2.3 + i * 0.05 for i in range(10)]
    r = recovery(replies, 1.0, 2.0)
    assert r["recovered"] and r["outage"]
    assert r["last_reply_before_s"] == pytest.approx(0.0)
    assert r["first_reply_after_s"] == pytest.approx(1.3)
    assert r["recovery_s"] == pytest.approx(1.3) and r["after_fault_end_s"] == pytest.approx(0.3)
    # an instant fault whose outage comes after it (a server restart): the gap after the fault counts
    later = [t for t in steady if t <= 1.21] + [5.0, 5.05]
    r = recovery(later, 1.0, 1.01)
    assert r["recovery_s"] == pytest.approx(3.8) and r["after_fault_end_s"] == pytest.approx(3.99)
    # the control: no outage at all
    r = recovery(steady, 1.0, 1.01)
    assert r["recovered"] and not r["outage"] and r["after_fault_end_s"] == 0.0
    # nothing after the fault: not recovered
    r = recovery([t for t in steady if t <= 1.0], 1.0, 2.0)
    assert not r["recovered"] and r["recovery_s"] is None


def _side(drops: dict[str, dict[str, int]], queued: int = 0) -> dict[str, Any]:
    stages = {}
    for stage, dropped in drops.items():
        n = sum(dropped.values())
        stages[stage] = {"name": stage, "read": n + 5, "forwarded": 5 - queued, "queued": queued, "dropped": dropped}
    return {"ledger": {"name": "side", "stages": stages}}


def test_ledger_account_names_the_drops_and_says_what_is_unaccounted() -> None:
    from netsim.bench.bench_faults import ledger_account

    before = {"provider": _side({"tun_read": {}}), "helper": _side({"udp_out": {}, "wg_decrypt": {"keepalive": 1}})}
    after = {
        "provider": _side({"tun_read": {}}),
        "helper": _side({"udp_out": {"udp_no_route": 7}, "wg_decrypt": {"keepalive": 9, "control": 2}}),
    }
    acc = ledger_account(7, before, after)
    assert acc["named_drops"] == {"helper/udp_out/udp_no_route": 7}  # keepalives and control are not loss
    assert acc["accounted"] and acc["unaccounted"] == 0 and acc["imbalances"] == []
    acc = ledger_account(10, before, after)
    assert not acc["accounted"] and acc["unaccounted"] == 3
    assert ledger_account(0, before, {"provider": {}, "helper": after["helper"]})["missing"] == ["provider"]
    # a loss on the network is accounted by the fault that counted it (a blackhole's counter), not by a ledger
    acc = ledger_account(10, before, after, {"blackhole": 3, "impairer": 0})
    assert acc["named_drops"] == {"fault/blackhole": 3, "helper/udp_out/udp_no_route": 7} and acc["accounted"]


def test_leak_account_flags_inner_destinations_on_en0_and_counts_wireguard() -> None:
    from netsim.bench.bench_faults import leak_account
    from netsim.testing.leaks import Frame

    wg = Frame(0, 0.0, b"", 1, proto=17, src="192.168.1.100", dst="192.0.2.2", sport=40000, dport=51820)
    wg_back = Frame(1, 0.0, b"", 1, proto=17, src="192.0.2.2", dst="192.168.1.100", sport=51820, dport=40000)
    leak = Frame(2, 0.0, b"", 1, proto=17, src="192.168.1.100", dst="203.0.113.10", sport=5, dport=7)
    spoof = Frame(3, 0.0, b"", 1, proto=1, src="10.66.0.2", dst="198.51.100.9")
    args = {"inner": ["203.0.113.10"], "tunnel_sources": ["10.66.0.2"], "server": "192.0.2.2", "port": 51820}
    clean = leak_account([wg, wg_back], **args)  # type: ignore[arg-type]
    assert clean["leaked_frames"] == 0 and clean["wireguard_frames"] == 2
    dirty = leak_account([wg, leak, spoof], **args)  # type: ignore[arg-type]
    assert dirty["leaked_frames"] == 2 and dirty["wireguard_frames"] == 1
    assert "203.0.113.10" in dirty["leaked"][0]


def test_the_faults_tables_render_in_text_and_markdown() -> None:
    rec = {
        "name": "faults/x",
        "group": "faults",
        "scenario": "x",
        "probes": {"sent": 10, "answered": 8, "lost": 2},
        "ledger": {"accounted": False, "unaccounted": 2, "imbalances": []},
        "recovery": {"recovered": True, "recovery_s": 1.25, "after_fault_end_s": 0.25},
        "leak": {"leaked_frames": 0, "wireguard_frames": 40, "capture_complete": True},
        "download": {"sha256_ok": True, "across_fault": True},
    }
    doc = {
        "machine": {
            "timestamp": "t",
            "cpu_model": "c",
            "cpu_count": 2,
            "kernel": "k",
            "python": "3",
            "load_average": [0.0],
        },
        "quick": True,
        "wall_seconds": 1.0,
        "results": [rec],
        "skipped": [],
        "ratios": {},
    }
    text = runner.render_text(doc)
    assert "faults (recovery under steady traffic)" in text and "unaccounted 2" in text and "1.25" in text
    assert "| x | 1.25 | 0.25 | 10/8/2 | unaccounted 2 | 0 (40 wg) | ok |" in runner.render_markdown(doc)
