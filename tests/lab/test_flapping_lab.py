"""Tunnel flapping on a real lab (row F12, bounded): 10 connect/disconnect cycles through the app's session while a
probe loop sends UDP echoes, then the kernel, this process and the process table are as before.

The state compared while DISCONNECTED, after the first stop and after the last one: the ``mac`` namespace's policy
rules, every route of every table, nftables tables, tun links; this process's open fds; running provider hosts.
The positive control: the same snapshot taken while CONNECTED differs (the tunnel's routes, rules and utun are in
it), so the comparison can see what a cycle would leave behind.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import trio

from netsim.apple.enums import VPNStatus
from netsim.lab.lab import Lab
from netsim.lab.tunnel import LabTunnel, netsim_tunnel, udp_echo_argv
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]
CYCLES = 10


async def _kernel_state(lab: Lab) -> dict[str, Any]:
    async def j(*argv: str) -> Any:
        out = (await lab.run("mac", list(argv))).stdout
        return json.loads(out) if out.strip() else []

    routes = [*await j("ip", "-j", "-4", "route", "show", "table", "all")]
    routes += await j("ip", "-j", "-6", "route", "show", "table", "all")
    return {
        "rules": [*await j("ip", "-j", "-4", "rule", "show"), *await j("ip", "-j", "-6", "rule", "show")],
        "routes": sorted(json.dumps(r, sort_keys=True) for r in routes if r.get("protocol") != "kernel"),
        "nft": sorted(t["table"]["name"] for t in (await j("nft", "-j", "list", "tables"))["nftables"] if "table" in t),
        "tun": sorted(link["ifname"] for link in await j("ip", "-j", "link", "show", "type", "tun")),
    }


def _running_hosts(t: LabTunnel) -> int:
    assert t.launcher is not None
    return sum(1 for p in t.launcher.processes if p.returncode is None)


async def _reaped(t: LabTunnel) -> None:
    """Wait until every stopped host has exited and been reaped (bounded by the manager's exit grace)."""
    with trio.move_on_after(t.session.manager.exit_grace + 5):
        while t.session._live:
            await trio.sleep(0.05)


async def _probes(lab: Lab, counts: list[int], stop: trio.Event) -> None:
    while not stop.is_set():
        r = await lab.run("mac", list(udp_echo_argv(str(lab.addr.www_v4))), check=False, timeout=10)
        counts[0 if r.returncode == 0 else 1] += 1
        await trio.sleep(0.05)


async def _snapshot(lab: Lab, t: LabTunnel) -> dict[str, Any]:
    return {
        "kernel": await _kernel_state(lab),
        "fds": len(os.listdir("/proc/self/fd")),
        "hosts": _running_hosts(t),
    }


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    async with netsim_tunnel(lab) as t:
        session = t.session
        rec["connected"] = await _snapshot(lab, t)
        await session.stop_vpn_tunnel()
        await session.wait_status(VPNStatus.DISCONNECTED)
        await _reaped(t)
        rec["first_down"] = await _snapshot(lab, t)
        sessions = (await t.helper_stats())["sessions"]
        counts = [0, 0]
        stop = trio.Event()
        statuses = []
        with trio.fail_after(240):  # a deadlock fails here instead of hanging
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_probes, lab, counts, stop)
                for _ in range(CYCLES):
                    await session.start_vpn_tunnel()
                    await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
                    up = session.status
                    await trio.sleep(0.3)
                    await session.stop_vpn_tunnel()
                    await session.wait_status(VPNStatus.DISCONNECTED)
                    statuses.append((up, session.status))
                stop.set()
        await _reaped(t)
        rec["statuses"] = statuses
        rec["probes"] = counts
        rec["last_down"] = await _snapshot(lab, t)
        rec["new_sessions"] = (await t.helper_stats())["sessions"] - sessions
        await session.start_vpn_tunnel()  # up again: the tunnel still works after the flapping
        await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
        rec["final_status"] = session.status
        rec["final_probe"] = (await t.run_probe("udp", udp_echo_argv(str(lab.addr.www_v4)))).returncode


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "wireguard-go", "nft")
    assert "error" not in rec, rec["error"]
    return rec


@pytest.mark.reliability("F12")
def test_ten_cycles_under_traffic_connect_every_time_and_the_tunnel_still_works(scenario: dict[str, Any]) -> None:
    assert scenario["statuses"] == [(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)] * CYCLES
    assert scenario["new_sessions"] == CYCLES  # each start reached the helper
    assert sum(scenario["probes"]) >= 2  # the probe loop ran during the cycles
    assert scenario["final_status"] is VPNStatus.CONNECTED and scenario["final_probe"] == 0


@pytest.mark.reliability("F12")
def test_no_route_rule_table_utun_fd_or_process_is_left_by_the_cycles(scenario: dict[str, Any]) -> None:
    first, last = scenario["first_down"], scenario["last_down"]
    assert last["kernel"] == first["kernel"]
    assert last["fds"] == first["fds"]
    assert first["hosts"] == last["hosts"] == 0
    # the positive control: while connected the snapshot has the tunnel's state, so a leftover would show
    connected = scenario["connected"]["kernel"]
    assert connected["tun"] and not first["kernel"]["tun"]
    assert connected["rules"] != first["kernel"]["rules"] and connected["routes"] != first["kernel"]["routes"]
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
