"""The provider's utun deleted under it (``ip link del`` in mac while the tunnel runs; issue 16, row F7).

The TUN fd's reader wakes with EPOLLERR and the read fails with EBADFD (`TunDevice` turns that into
`TunnelDown`); the built-in provider must surface it: the session goes DISCONNECTED with a reason and an error,
nothing crashes, nothing spins, and the tunnel's kernel state (its routing table, its policy rules) is gone.

No busy loop: the provider host's CPU time (``/proc/<pid>/stat`` utime + stime) over one second after the
deletion, against a deliberate busy loop measured the same way in the same namespace (the positive control).

Row F3's remaining checks ride along (tests/lab/test_kill_switch_lab.py covers the fail-closed block): the
provider host SIGKILLed (through `netsim lab fault signal provider KILL`), the helper sees the EOF, and the
system removes the rules and routes the dead host left (before the fix they stayed: the server exclusion via en0
and both policy rules).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from netsim.apple import VPNStatus
from netsim.cli import main
from netsim.lab.lab import Lab
from netsim.lab.tunnel import netsim_tunnel
from netsim.runtime.netconfig import TUNNEL_TABLE
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (proc(5) fields 14, 15)


async def _cpu_over(pid: int, seconds: float = 1.0) -> float | None:
    before = _cpu_seconds(pid)
    await trio.sleep(seconds)
    after = _cpu_seconds(pid)
    return None if before is None or after is None else after - before


async def _tunnel_state(lab: Lab) -> dict[str, Any]:
    routes = []
    for fam in ("-4", "-6"):
        r = await lab.run("mac", ["ip", "-j", fam, "route", "show", "table", str(TUNNEL_TABLE)], check=False)
        routes += json.loads(r.stdout or b"[]")
    rules = (await lab.run("mac", ["ip", "rule", "show"])).stdout.decode()
    rules += (await lab.run("mac", ["ip", "-6", "rule", "show"])).stdout.decode()
    links = await trio.to_thread.run_sync(lab.links, "mac", "tun")
    return {"routes": routes, "rules_to_table": str(TUNNEL_TABLE) in rules, "utuns": links}


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    async with netsim_tunnel(lab) as t:
        try:
            s = t.session
            ping = ["ping", "-c", "1", "-W", "3", str(lab.addr.www_v4)]
            rec["ping_before"] = (await lab.run("mac", ping, check=False, timeout=30)).returncode
            rec["before"] = await _tunnel_state(lab)
            pid = t.provider_pid
            assert pid is not None
            utun = rec["before"]["utuns"][0]
            await lab.run("mac", ["ip", "link", "del", utun])
            rec["cpu_after_delete"] = await _cpu_over(pid)
            with trio.move_on_after(20):
                await s.wait_status(VPNStatus.DISCONNECTED)
            rec["status"] = s.status.name
            rec["reason"] = s.stop_reason.name if s.stop_reason else None
            rec["disconnect_error"] = s.last_disconnect_error
            rec["provider_exit"] = t.launcher.processes[-1].returncode if t.launcher else None
            rec["after"] = await _tunnel_state(lab)
            rec["helper_alive"] = t.helper.returncode is None
            log = t.helper.stderr_path.parent / "provider.log"
            rec["provider_log"] = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        except BaseException:
            rec["logs"] = t.logs()
            raise
    # F3's remaining checks (tests/lab/test_kill_switch_lab.py covers the block): the provider host SIGKILLed
    async with netsim_tunnel(lab) as t:
        try:
            rec["crash_before"] = await _tunnel_state(lab)
            # crashed from another process, as a user would: the run file lists the provider host
            argv = ["lab", "fault", "signal", "--run", lab.run_id, "provider", "KILL"]
            cli = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, argv))
            rec["crash_cli"] = (cli.exit_code, cli.output)
            with trio.move_on_after(20):
                await t.session.wait_status(VPNStatus.DISCONNECTED)
            rec["crash_status"] = t.session.status.name
            rec["crash_pid_after"] = t.provider_pid
            rec["crash_reason"] = t.session.stop_reason.name if t.session.stop_reason else None
            helper: dict[str, Any] = {}
            with trio.move_on_after(10):
                while True:
                    helper = await t.helper_stats()
                    if not helper.get("connected"):
                        break
                    await trio.sleep(0.1)
            rec["crash_helper"] = {k: helper.get(k) for k in ("connected", "sessions")}
            rec["crash_after"] = await _tunnel_state(lab)
        except BaseException:
            rec["logs"] = t.logs()
            raise
    # the positive control: a busy loop measured the same way, in the same namespace, bounded by its own timeout
    spin = "import time\nend = time.monotonic() + 5\nwhile time.monotonic() < end: pass"
    busy = lab.spawn("mac", [sys.executable, "-c", spin], name="busy")
    try:
        await trio.sleep(0.3)
        rec["cpu_busy_loop"] = await _cpu_over(busy.pid)
    finally:
        await busy.stop(grace=1.0)


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "wireguard-go", "ping")
    print("[utun removed]", {k: v for k, v in rec.items() if k not in ("logs", "provider_log")})
    assert "error" not in rec, rec["error"]
    return rec


@pytest.mark.reliability("F7")
def test_the_provider_surfaces_the_deleted_utun(scenario: dict[str, Any]) -> None:
    assert scenario["ping_before"] == 0
    assert scenario["status"] == "DISCONNECTED", scenario
    assert scenario["reason"] == "PROVIDER_FAILED", scenario
    assert "TunnelDown" in scenario["disconnect_error"] and "utun0" in scenario["disconnect_error"], scenario
    # no crash: the one traceback the provider host logs is the TunnelDown it stopped with (printed by
    # provider.py's task guard), no other exception
    log = scenario["provider_log"]
    raised = re.findall(r"^(\w[\w.]*(?:Error|Exception|TunnelDown|Exit)\b)", log, re.MULTILINE)
    assert set(raised) <= {"OSError", "netsim.errors.TunnelDown"}, log


@pytest.mark.reliability("F7")
def test_no_busy_loop_after_the_utun_went(scenario: dict[str, Any]) -> None:
    busy, provider = scenario["cpu_busy_loop"], scenario["cpu_after_delete"]
    assert busy is not None and busy > 0.05, busy  # the control spins measurably
    # None: the provider host had already exited within the second (the tunnel stopped); else it must idle
    assert provider is None or provider < busy / 4, (provider, busy)
    assert provider is not None or scenario["provider_exit"] is not None


@pytest.mark.reliability("F7")
def test_the_tunnels_kernel_state_is_gone(scenario: dict[str, Any]) -> None:
    before, after = scenario["before"], scenario["after"]
    assert before["routes"] and before["rules_to_table"], before  # the control: there was state to remove
    assert after["routes"] == [] and not after["rules_to_table"] and after["utuns"] == [], after
    assert scenario["helper_alive"]


@pytest.mark.reliability("F3")
def test_a_killed_provider_is_seen_by_the_helper(scenario: dict[str, Any]) -> None:
    assert scenario["crash_status"] == "DISCONNECTED" and scenario["crash_reason"] == "PROVIDER_FAILED", scenario
    assert scenario["crash_helper"]["connected"] is False and scenario["crash_helper"]["sessions"] >= 1, scenario
    assert scenario["crash_after"]["utuns"] == [], scenario["crash_after"]


def test_the_cli_crashes_the_provider_by_its_recorded_pid(scenario: dict[str, Any]) -> None:
    code, output = scenario["crash_cli"]
    assert code == 0 and "SIGKILL sent" in output, output
    assert scenario["crash_pid_after"] is None  # the provider host is gone
    assert scenario["crash_status"] == "DISCONNECTED" and scenario["crash_reason"] == "PROVIDER_FAILED"


@pytest.mark.reliability("F3")
def test_a_killed_provider_leaves_no_routes(scenario: dict[str, Any]) -> None:
    assert scenario["crash_before"]["routes"] and scenario["crash_before"]["rules_to_table"]  # the control
    after = scenario["crash_after"]
    assert after["routes"] == [] and not after["rules_to_table"] and after["utuns"] == [], after


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
