"""``netsim bench --faults`` end to end, in its quickest form, for one scenario (en0 down 1 s).

The whole path a user runs: `netsim.bench.runner.run_bench` starts ``python -m netsim.bench.bench_faults`` in a
child process, which brings up a lab and the built-in tunnel, measures the scenario and writes the JSON this test
reads. Checked: the record's shape and that its numbers agree with each other (answered + lost == sent, the
outage's ends and its length, the named drops and their total, the leak verdict and its evidence) -- never how
fast anything was. The positive controls: the flap must cost probes (the measurement sees a fault) and the en0
capture must hold the tunnel's WireGuard frames (the leak check looked at real traffic). And a scenario of the
test's own (one `FaultScenario`, as a new fault is added) whose "fault" sends datagrams to www with the helper's
bypass mark, so they leave en0 outside the tunnel: the measurement must call them a leak.
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from netsim.bench import bench_faults, runner
from netsim.lab.lab import Lab
from netsim.lab.tunnel import LabTunnel, netsim_tunnel
from netsim.runtime.netconfig import BYPASS_FWMARK
from netsim.testing.fixtures import run_lab_scenario
from netsim.testing.require import require_binary, require_root

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
CASE = "faults/en0-flap-1s"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_root()
    require_binary("wireguard-go", "wg", "nft", "conntrack", "tcpdump", "dig", "ping")
    path = tmp_path_factory.mktemp("bench-faults") / "faults.json"
    doc = runner.run_bench(quick=True, only=CASE, json_path=path, faults=True, log=lambda line: None)
    on_disk = json.loads(Path(path).read_text())
    assert on_disk["results"] == doc["results"]
    return doc


def test_the_scenario_ran_and_its_record_has_every_part(report: dict[str, Any]) -> None:
    assert report["faults"] is True and report["skipped"] == [], report["skipped"]
    assert [r["name"] for r in report["results"]] == [CASE]
    rec = report["results"][0]
    assert rec["group"] == "faults" and rec["scenario"] == "en0-flap-1s"
    assert {"probes", "fault", "recovery", "ledger", "leak", "download", "goals"} <= rec.keys()
    assert set(rec["goals"]) == {"recovery_within_1s", "no_unaccounted_loss", "no_leak", "sha256_intact"}
    assert all(isinstance(v, bool) for v in rec["goals"].values())


def test_probe_counts_and_the_outage_are_consistent(report: dict[str, Any]) -> None:
    rec = report["results"][0]
    p, rc = rec["probes"], rec["recovery"]
    assert p["answered"] + p["lost"] == p["sent"] and p["answered"] > 0
    assert p["lost"] > 0, "en0 was down: some probes must be lost (the measurement sees the fault)"
    assert rc["recovered"] and rc["outage"]
    # the outage may start a moment after the fault was started (replies already on their way still arrive)
    assert rc["last_reply_before_s"] < rc["first_reply_after_s"] and rc["first_reply_after_s"] > 0
    assert rc["recovery_s"] == pytest.approx(rc["first_reply_after_s"] - rc["last_reply_before_s"])
    assert rc["after_fault_end_s"] == pytest.approx(max(0.0, rc["first_reply_after_s"] - rc["fault_seconds"]))
    assert rec["goals"]["recovery_within_1s"] == (rc["after_fault_end_s"] <= 1.0)


def test_the_ledger_account_adds_up(report: dict[str, Any]) -> None:
    rec = report["results"][0]
    led, lost = rec["ledger"], rec["probes"]["lost"]
    assert led["missing"] == []  # both sides answered with their ledgers
    assert led["named_total"] == sum(led["named_drops"].values())
    assert all(k.split("/")[0] in ("provider", "helper") and v > 0 for k, v in led["named_drops"].items())
    assert led["unaccounted"] == max(0, lost - led["named_total"])
    assert led["accounted"] == (led["unaccounted"] == 0)


def test_the_leak_check_saw_the_tunnel_and_the_download_is_judged(report: dict[str, Any]) -> None:
    rec = report["results"][0]
    leak, dl = rec["leak"], rec["download"]
    assert leak["capture_complete"], leak["capture_status"]
    assert leak["wireguard_frames"] > 0 and leak["frames"] >= leak["wireguard_frames"] + leak["leaked_frames"]
    assert rec["goals"]["no_leak"] == (leak["leaked_frames"] == 0)
    assert isinstance(dl["error"], str) and isinstance(dl["sha256_ok"], bool)
    if dl["sha256_ok"]:
        assert not dl["error"] and dl["bytes"] == dl["expected_bytes"]
    assert dl["start"] < 0 and isinstance(dl["across_fault"], bool)


def test_the_tables_render_and_the_lab_is_gone(report: dict[str, Any]) -> None:
    assert "faults (recovery under steady traffic)" in runner.render_text(report)
    assert "| en0-flap-1s |" in runner.render_markdown(report)
    run_id = report["results"][0]["run_id"]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert run_id and f"netsim-{run_id}-" not in names


async def _leak_on_purpose(lab: Lab, tunnel: LabTunnel) -> None:
    sock = lab.socket("mac", socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, BYPASS_FWMARK)  # skips the tunnel table: out of en0
        for _ in range(3):
            sock.sendto(b"netsim-leak-control", (str(lab.addr.www_v4), 7))


async def _control(lab: Lab, rec: dict[str, Any]) -> None:
    scenario = bench_faults.FaultScenario("leak-control", _leak_on_purpose, 0.0, "3 datagrams past the tunnel")
    async with netsim_tunnel(lab) as tunnel:
        with tempfile.TemporaryDirectory() as tmp:
            rec["record"] = await bench_faults.measure_scenario(lab, tunnel, scenario, Path(tmp), quick=True)


def test_a_datagram_that_leaves_en0_outside_the_tunnel_is_called_a_leak() -> None:
    rec = run_lab_scenario(_control, "wireguard-go", "nft", "tcpdump")
    assert "error" not in rec, rec["error"]
    leak = rec["record"]["leak"]
    assert leak["leaked_frames"] >= 3 and any("203.0.113.10" in line for line in leak["leaked"]), leak
    assert leak["wireguard_frames"] > 0 and rec["record"]["goals"]["no_leak"] is False
    assert rec["leaks"] == [] and rec["root_changed"] is None
