"""en0 down for 5 s under steady probes: the built-in tunnel recovers without user code (issue 16; row F8).

One lab, two tunnels in turn. In the first the helper follows the path (`netsim.runtime.helper.Helper.path_changed`):
when en0's default route is back it re-binds and forces a WireGuard handshake at once. The second is the positive
control: the same outage with the forced handshake off (``NETSIM_HELPER_PATH_HANDSHAKE=0``), so any handshake is the
device's own (timers or data), never one for the path change. In both the provider's ``default_path`` goes
unsatisfied -> satisfied and the session reasserts; during the outage the excluded-routes bypass (a route-mechanism
policy excluding the ISP's upstream address) fails rather than reroutes into the tunnel (the helper would count
such packets as ``bypass_tunnelled``).

Recovery times (link up -> first tunnelled reply) are recorded for the report and printed with ``-s``; they are
not asserted (speed is the bench's).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import trio

from netsim.apple.enums import VPNStatus
from netsim.lab import faults
from netsim.lab.lab import Lab
from netsim.lab.tunnel import LabTunnel, netsim_tunnel
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

BYPASS = "198.51.100.1"  # the ISP's upstream (inet): excluded from the tunnel by the policy
POLICY = f"""default = "tunnel"
mechanism = "route"

[[rule]]
name = "direct"
action = "bypass"
dst = ["{BYPASS}/32"]
"""
OUTAGE = 5.0
# UDP to the bypassed address every 2 ms for 1.5 s (bounded: 750 datagrams), send errors ignored (en0 goes)
_SENDER = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(750):
    try:
        s.sendto(b"x" * 32, ("{BYPASS}", 9999))
    except OSError:
        pass
    time.sleep(0.002)
"""
PHASES = {"forced": "1", "control": "0"}


async def _ping(lab: Lab, dst: object) -> bool:
    r = await lab.run("mac", ["ping", "-n", "-q", "-c", "1", "-W", "1", str(dst)], check=False, timeout=10)
    return r.returncode == 0


async def _outage(lab: Lab, t: LabTunnel) -> dict[str, Any]:
    out: dict[str, Any] = {"before": (await _ping(lab, lab.addr.www_v4), await _ping(lab, BYPASS))}
    out["helper_before"] = await t.helper_stats()
    mac = lab.netns("mac")
    async with trio.open_nursery() as nursery:
        # a steady bypass flow across the moment the link goes: every datagram sent while the kernel has dropped
        # the excluded route and before the settings are re-applied would fall to the tunnel's default route
        nursery.start_soon(lambda: lab.run("mac", [sys.executable, "-c", _SENDER], check=False))
        await trio.sleep(0.3)
        await trio.to_thread.run_sync(faults.link_down, mac, "en0")
    out["sender_done"] = True
    start = trio.current_time()
    probes = tunnel_ok = bypass_ok = 0
    statuses = set()
    while trio.current_time() - start < OUTAGE:  # steady probes, both kinds, through the whole outage
        probes += 1
        tunnel_ok += await _ping(lab, lab.addr.www_v4)
        bypass_ok += await _ping(lab, BYPASS)
        statuses.add(t.session.status.name)
    out["during"] = {"probes": probes, "tunnel_ok": tunnel_ok, "bypass_ok": bypass_ok, "statuses": sorted(statuses)}
    out["helper_down"] = await t.helper_stats()
    await trio.to_thread.run_sync(faults.link_up, mac, "en0", faults.link_plan("mac", "en0"))
    up = trio.current_time()
    with trio.move_on_after(40):
        while not await _ping(lab, lab.addr.www_v4):
            pass
    out["recovery_s"] = trio.current_time() - up
    with trio.move_on_after(40):
        await t.session.wait_status(VPNStatus.CONNECTED)
    out["reasserting_cleared_s"] = trio.current_time() - up
    out["after"] = (await _ping(lab, lab.addr.www_v4), await _ping(lab, BYPASS))
    out["helper_after"] = await t.helper_stats()
    out["provider_after"] = await t.provider_stats()
    out["history"] = [c.status.name for c in t.session.history]
    return out


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    for phase, value in PHASES.items():
        previous = os.environ.get("NETSIM_HELPER_PATH_HANDSHAKE")
        os.environ["NETSIM_HELPER_PATH_HANDSHAKE"] = value  # the helper process inherits it (its click envvar)
        try:
            async with netsim_tunnel(lab, policy=POLICY) as t:
                rec[phase] = await _outage(lab, t)
        finally:
            if previous is None:
                os.environ.pop("NETSIM_HELPER_PATH_HANDSHAKE", None)
            else:
                os.environ["NETSIM_HELPER_PATH_HANDSHAKE"] = previous


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "wireguard-go", "nft", "ping")
    for phase in PHASES:
        if phase in rec:
            r = rec[phase]
            print(
                f"[path {phase}] recovery={r['recovery_s']:.2f}s reasserting_cleared={r['reasserting_cleared_s']:.2f}s "
                f"during={r['during']} path={r['helper_after']['path']}"
            )
    return rec


def _get(scenario: dict[str, Any], phase: str) -> dict[str, Any]:
    if phase not in scenario:
        pytest.fail(f"the {phase} phase did not complete: {scenario.get('error', 'no error recorded')}")
    return scenario[phase]  # type: ignore[no-any-return]


def _delta(r: dict[str, Any], key: str, a: str = "helper_before", b: str = "helper_after") -> int:
    return int(r[b][key] - r[a][key])


@pytest.mark.reliability("F8")
def test_after_the_link_is_back_a_forced_handshake_carries_the_tunnel_again(scenario: dict[str, Any]) -> None:
    r = _get(scenario, "forced")
    assert r["before"] == (True, True)
    path = r["helper_after"]["path"]
    assert path["handshakes_by_reason"]["path_change"] >= 1  # initiated for the path change, not by a timer
    assert path["recoveries"] >= 1 and path["ready"] is True and path["interface"] == "en0"
    assert r["helper_down"]["path"]["satisfied"] is False  # the helper saw the default route go
    assert r["after"] == (True, True)  # the tunnel and the bypass both work again


@pytest.mark.reliability("F8")
def test_the_control_without_the_forced_handshake_initiates_nothing_for_the_path(scenario: dict[str, Any]) -> None:
    r = _get(scenario, "control")
    path = r["helper_after"]["path"]
    assert path["path_handshake"] is False
    assert path["handshakes_by_reason"]["path_change"] == 0  # differs from the forced phase: no path handshake
    assert r["helper_down"]["path"]["satisfied"] is False
    assert r["after"][1] is True  # the bypass is back either way (the kernel's part)


@pytest.mark.reliability("F8")
@pytest.mark.parametrize("phase", PHASES)
def test_default_path_went_unsatisfied_then_satisfied_and_the_session_reasserted(
    scenario: dict[str, Any], phase: str
) -> None:
    r = _get(scenario, phase)
    statuses = [p["status"] for p in r["provider_after"]["path_history"]]
    assert 2 in statuses and statuses[-1] == 1 and statuses.index(2) < len(statuses) - 1
    assert r["provider_after"]["path_history"][-1]["interface_name"] == "en0"
    history = r["history"]
    assert "REASSERTING" in history and history[-1] == "CONNECTED"
    assert "REASSERTING" in r["during"]["statuses"]


@pytest.mark.reliability("F8")
@pytest.mark.parametrize("phase", PHASES)
def test_bypass_flows_fail_during_the_outage_instead_of_entering_the_tunnel(
    scenario: dict[str, Any], phase: str
) -> None:
    r = _get(scenario, phase)
    during = r["during"]
    assert during["probes"] >= 2
    assert during["bypass_ok"] == 0 and during["tunnel_ok"] == 0  # nothing reaches anything with en0 down
    # a bypass packet routed into the utun would reach the helper, which counts it as bypass_tunnelled
    assert _delta(r, "bypass_tunnelled", b="helper_down") == 0
    assert _delta(r, "bypass_tunnelled") == 0


def test_no_leaks(scenario: dict[str, Any]) -> None:
    assert "error" not in scenario, scenario.get("error")
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
