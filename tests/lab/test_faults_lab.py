"""`netsim.lab.faults` and `netsim lab fault` on a real lab (root tier): links down/up/flapping, a blackhole, NAT
flush. Only the faults themselves; how a tunnel recovers from them is issue 16's.

One lab for the module. The positive control for `link_up`'s restore: bringing en0 up *without* the plan leaves
the Mac without IPv6 and without default routes (Linux drops them with the link), so the restore is what makes
the network come back, as DHCP and router advertisements do on a real one.
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from netsim.cli import main
from netsim.errors import LabError
from netsim.lab import faults
from netsim.lab.addressing import ADDR
from netsim.lab.cleanup import RunRecord
from netsim.lab.lab import Lab
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]
LINKS = [("mac", "en0"), ("lan", "eth0"), ("isp", "wan"), ("vpn", "wan")]


async def _ping(lab: Lab, dst: object) -> bool:
    # up to 3 echoes 0.2 s apart (any reply is success): the first right after a link comes up can go to
    # neighbour discovery, which flaked under load with a single echo
    argv = ["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-w", "2", "-W", "1", str(dst)]
    r = await lab.run("mac", argv, check=False, timeout=10)
    return r.returncode == 0


async def _reach(lab: Lab) -> tuple[bool, bool]:
    return await _ping(lab, ADDR.www_v4), await _ping(lab, ADDR.www_v6)


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["lab", "fault", *args])
    return r.exit_code, r.output + ("" if r.exception is None else str(r.exception))


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    plans = {}
    for role, ifname in LINKS:
        addrs = json.loads((await lab.run(role, ["ip", "-j", "addr", "show", "dev", ifname])).stdout)
        routes = json.loads((await lab.run(role, ["ip", "-j", "route", "show", "default"])).stdout)
        routes += json.loads((await lab.run(role, ["ip", "-j", "-6", "route", "show", "default"])).stdout)
        live = {f"{a['local']}/{a['prefixlen']}" for i in addrs for a in i["addr_info"] if a["scope"] == "global"}
        plan = faults.link_plan(role, ifname)
        gws = {r["gateway"] for r in routes if r.get("dev") == ifname}
        plans[(role, ifname)] = (set(plan.addresses) <= live, {gw for _, gw in plan.routes} == gws, live, gws)
    rec["plans"] = plans
    ns = lab.netns("mac")
    rec["before"] = await _reach(lab)
    await trio.to_thread.run_sync(faults.link_down, ns, "en0")
    rec["down"] = await _reach(lab)
    await trio.to_thread.run_sync(faults.link_up, ns, "en0")  # no plan: the control
    rec["up_without_plan"] = await _reach(lab)
    await trio.to_thread.run_sync(faults.link_up, ns, "en0", faults.link_plan("mac", "en0"))
    rec["up_with_plan"] = await _reach(lab)
    rec["flaps"] = await faults.flap(ns, "en0", down_for=0.3, times=2, up_for=0.2, plan=faults.link_plan("mac", "en0"))
    rec["after_flap"] = await _reach(lab)
    with faults.Blackhole(lab.netns("inet"), str(ADDR.www_v4)) as hole:
        rec["blackholed"] = await _reach(lab)
        rec["blackhole_dropped"] = hole.dropped()
    rec["after_blackhole"] = await _reach(lab)
    rec["tables_after"] = (await lab.run("inet", ["nft", "list", "tables"])).stdout.decode()
    rec["nat_flushed"] = await trio.to_thread.run_sync(faults.nat_flush, lab.netns("isp"))
    # the CLI, as a second process would use it (`--run` picks this lab)
    run = lab.run_id
    rec["cli_down"] = await trio.to_thread.run_sync(_cli, "link-down", "--run", run, "mac", "en0")
    rec["cli_down_reach"] = await _reach(lab)
    rec["cli_up"] = await trio.to_thread.run_sync(_cli, "link-up", "--run", run, "mac", "en0")
    rec["cli_up_reach"] = await _reach(lab)
    args = ("flap", "--run", run, "mac", "en0", "--down-for", "0.2", "--times", "1")
    rec["cli_flap"] = await trio.to_thread.run_sync(lambda: _cli(*args))
    rec["cli_flap_reach"] = await _reach(lab)
    rec["cli_nat"] = await trio.to_thread.run_sync(_cli, "nat-flush", "--run", run)
    cli_hole: list[tuple[int, str]] = []

    async def blackhole_cli() -> None:
        hole_args = ("blackhole", "--run", run, str(ADDR.www_v4), "--for", "4")
        cli_hole.append(await trio.to_thread.run_sync(lambda: _cli(*hole_args)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blackhole_cli)
        await trio.sleep(0.4)
        rec["cli_blackholed_reach"] = await _reach(lab)
    rec["cli_blackhole"] = cli_hole[0]
    rec["cli_after_blackhole_reach"] = await _reach(lab)
    await _processes(lab, rec)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def _echo(lab: Lab) -> bool:
    """One UDP echo to www (served by the svc-inet process)."""
    sock = trio.socket.from_stdlib_socket(lab.socket("mac"))
    with sock:
        await sock.sendto(b"netsim-freeze", (str(ADDR.www_v4), 7))
        with trio.move_on_after(0.5):
            return await sock.recv(100) == b"netsim-freeze"
    return False


async def _processes(lab: Lab, rec: dict[str, Any]) -> None:
    run = RunRecord.load(RunRecord(lab.run_id, 0, None, 0.0, []).path)
    info = faults.lab_process(run, "svc-inet")
    rec["echo_before"] = await _echo(lab)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(faults.freeze, info, 1.5)
        await trio.sleep(0.2)
        rec["frozen_state"] = _state(info.pid)
        rec["echo_frozen"] = await _echo(lab)
    rec["thawed_state"] = _state(info.pid)
    rec["echo_after"] = await _echo(lab)
    rec["cli_stop"] = await trio.to_thread.run_sync(_cli, "signal", "--run", lab.run_id, "svc-inet", "stop")
    rec["cli_stopped_state"] = _state(info.pid)
    rec["cli_cont"] = await trio.to_thread.run_sync(_cli, "signal", "--run", lab.run_id, "svc-inet", "CONT")
    rec["cli_cont_state"] = _state(info.pid)
    rec["cli_freeze"] = await trio.to_thread.run_sync(_cli, "freeze", "--run", lab.run_id, "svc-inet", "--for", "0.3")
    rec["cli_unknown"] = await trio.to_thread.run_sync(_cli, "signal", "--run", lab.run_id, "no-such", "KILL")
    # a run file whose start time does not match (a reused pid) is refused before any signal
    stale = dataclasses.replace(info, start_time=(info.start_time or 0) + 1)
    try:
        faults.signal_process(stale, signal.SIGSTOP)
        rec["stale"] = "signalled"
    except LabError as exc:
        rec["stale"] = str(exc)
    rec["stale_state"] = _state(info.pid)


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "ping", "nft", "conntrack")
    assert "error" not in rec, rec["error"]
    return rec


def test_link_plan_is_what_the_lab_configures(scenario: dict[str, Any]) -> None:
    for link, (addrs_ok, routes_ok, live, gws) in scenario["plans"].items():
        assert addrs_ok and routes_ok, (link, live, gws, faults.link_plan(*link))


def test_link_down_cuts_the_mac_off_and_link_up_restores_what_the_network_gives(scenario: dict[str, Any]) -> None:
    assert scenario["before"] == (True, True)
    assert scenario["down"] == (False, False)
    assert scenario["up_without_plan"] == (False, False)  # the kernel dropped the routes (and the v6 address)
    assert scenario["up_with_plan"] == (True, True)


def test_flap_is_bounded_and_the_network_comes_back(scenario: dict[str, Any]) -> None:
    spans = scenario["flaps"]
    assert len(spans) == 2 and all(up - down >= 0.3 for down, up in spans)
    assert scenario["after_flap"] == (True, True)
    with pytest.raises(Exception, match="1-100 times"):
        trio.run(lambda: faults.flap("netsim-x-mac", "en0", down_for=1, times=0))


def test_blackhole_drops_counts_and_goes(scenario: dict[str, Any]) -> None:
    assert scenario["blackholed"] == (False, True)  # v4 www blackholed, v6 untouched
    assert scenario["blackhole_dropped"] >= 1
    assert scenario["after_blackhole"] == (True, True)
    assert "netsim_fault_" not in scenario["tables_after"]


def test_nat_flush_forgets_the_mappings(scenario: dict[str, Any]) -> None:
    assert scenario["nat_flushed"] >= 1  # the pings' mappings at least


def test_the_cli_injects_the_same_faults(scenario: dict[str, Any]) -> None:
    assert scenario["cli_down"][0] == 0 and scenario["cli_down_reach"] == (False, False), scenario["cli_down"]
    assert scenario["cli_up"][0] == 0 and scenario["cli_up_reach"] == (True, True), scenario["cli_up"]
    assert scenario["cli_flap"][0] == 0 and scenario["cli_flap_reach"] == (True, True), scenario["cli_flap"]
    assert scenario["cli_nat"][0] == 0 and "conntrack entries flushed" in scenario["cli_nat"][1]


def test_faults_refuse_what_is_not_a_lab_namespace() -> None:
    for call in (
        lambda: faults.link_down("root", "en0"),
        lambda: faults.nat_flush("default"),
        lambda: faults.Blackhole("init", "192.0.2.1"),
        lambda: faults.lab_netns("../x", "mac"),
        lambda: faults.link_down("netsim-ab-mac", "en0; reboot"),
    ):
        with pytest.raises(Exception, match=r"refusing|no lab namespace|bad interface"):
            call()


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == [] and scenario["root_changed"] is None


def test_a_frozen_process_serves_nothing_and_resumes_after(scenario: dict[str, Any]) -> None:
    assert scenario["echo_before"] is True  # the positive control: the echo works when not frozen
    assert scenario["frozen_state"] == "T" and scenario["echo_frozen"] is False
    assert scenario["thawed_state"] in ("S", "R") and scenario["echo_after"] is True


def test_the_cli_blackholes_a_host_for_a_while_and_restores_it(scenario: dict[str, Any]) -> None:
    code, output = scenario["cli_blackhole"]
    assert code == 0 and "blackholed for 4 s" in output, output
    assert int(output.rsplit(", ", 1)[1].split()[0]) >= 1  # it counted what it dropped
    assert scenario["cli_blackholed_reach"] == (False, True)  # www v4 unreachable, v6 untouched
    assert scenario["cli_after_blackhole_reach"] == (True, True)


def test_the_cli_signals_lab_processes_by_name_and_checks_the_pid(scenario: dict[str, Any]) -> None:
    assert scenario["cli_stop"][0] == 0 and scenario["cli_stopped_state"] == "T", scenario["cli_stop"]
    assert scenario["cli_cont"][0] == 0 and scenario["cli_cont_state"] in ("S", "R"), scenario["cli_cont"]
    assert scenario["cli_freeze"][0] == 0 and "frozen for 0.3 s" in scenario["cli_freeze"][1]
    assert scenario["cli_unknown"][0] != 0 and "svc-inet" in scenario["cli_unknown"][1]  # lists the names
    assert "no longer names" in scenario["stale"] and scenario["stale_state"] in ("S", "R")
