"""Sleep and wake of the simulated Mac on a real lab (row F17): Apple's callbacks, a clock jump, disconnect_on_sleep.

`LabTunnel.sleep` runs the session's sleep (the provider's ``sleep``, or with ``disconnect_on_sleep`` a stop with
reason SLEEP), then SIGSTOPs the helper and the provider host; `LabTunnel.wake` writes the jump to the helper's
clock file, SIGCONTs both and runs ``wake()``. A jump past REJECT_AFTER_TIME (180 s) leaves the helper's keys
unusable: the tunnel recovers with a new handshake and no user code, and a helper restarted afterwards keeps the
slept time (its handshake timestamps must stay later than those the server saw). A counter in the ISP router
counts any probe datagram that leaves the Mac in the clear; it must stay 0 while the Mac sleeps, and the positive
control (the same probe with no tunnel at all) shows that it counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.apple.enums import ProviderStopReason, VPNStatus
from netsim.lab.lab import Lab
from netsim.lab.tunnel import LabTunnel, netsim_tunnel, udp_echo_argv
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

#: the memory tests' recorder, run in the lab's provider process (a file spec: importable there)
SPEC = f"{Path(__file__).resolve().parents[1] / 'runtime' / 'test_sleep_wake.py'}:SleepRecorder"
_PROBE_PORT = 7
_LEAK_TABLE = "netsim_sleep_leaks"


def _leak_counter(lab: Lab) -> None:
    """Count, in the ISP router, probe datagrams from the Mac to www in the clear (never tunnel traffic)."""
    lab.nft(
        "isp",
        f"table inet {_LEAK_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority -10; policy accept;\n"
        f"    ip daddr {lab.addr.www_v4} udp dport {_PROBE_PORT} counter\n"
        "  }\n"
        "}\n",
    )


async def _leaked(lab: Lab) -> int:
    out = json.loads((await lab.run("isp", ["nft", "-j", "list", "table", "inet", _LEAK_TABLE])).stdout)
    return sum(item["rule"]["expr"][-1]["counter"]["packets"] for item in out["nftables"] if "rule" in item)


async def _probe(lab: Lab) -> int:
    return (await lab.run("mac", list(udp_echo_argv(str(lab.addr.www_v4))), check=False, timeout=15)).returncode


async def _handshakes(t: LabTunnel) -> int:
    return int((await t.helper_stats())["device"]["handshakes_completed"])


async def _recovered_within(lab: Lab, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        while await _probe(lab) != 0:
            await trio.sleep(0.2)
        return True
    return False


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    _leak_counter(lab)
    async with netsim_tunnel(lab, provider=SPEC) as t:
        rec["probe_before"] = await _probe(lab)
        # the control: a short sleep without a jump keeps the keys (no new handshake)
        hs = await _handshakes(t)
        await t.sleep(1.0)
        rec["control_probe"] = await _probe(lab)
        rec["control_new_handshakes"] = await _handshakes(t) - hs
        # the sleep: frozen, then a jump past REJECT_AFTER_TIME on wake
        hs = await _handshakes(t)
        await t.sleep(clock_jump=200.0)
        rec["frozen"] = t.frozen
        rec["probe_asleep"] = await _probe(lab)  # into the utun, nobody reads it: no answer, and no leak
        rec["leaked_asleep"] = await _leaked(lab)
        await t.wake()
        rec["recovered"] = await _recovered_within(lab, 20.0)
        rec["new_handshakes"] = await _handshakes(t) - hs
        rec["calls"] = json.loads(await t.send_provider_message(b"calls") or b"[]")
        rec["status"] = t.session.status
        rec["helper_log_jump"] = "clock jump" in t.helper.stderr()
        # a helper restarted after the sleep starts from the clock file: its handshake timestamps stay later than
        # the ones wireguard-go saw (else it would refuse them as replays until real time caught up, 200 s)
        connects = (await t.provider_stats())["connects"]
        await t.restart_helper()
        await t.wait_connected(after_connects=connects)
        rec["recovered_after_restart"] = await _recovered_within(lab, 20.0)
    # disconnect_on_sleep with the kill switch: the system stops the tunnel (SLEEP) and nothing leaves in the clear
    protocol = {"disconnect_on_sleep": True, "include_all_networks": True}
    async with netsim_tunnel(lab, provider=SPEC, protocol=protocol) as t:
        await t.sleep()
        rec["dos_asleep"] = (t.session.status, t.session.stop_reason)
        rec["dos_probe_asleep"] = await _probe(lab)
        await t.wake()
        await trio.sleep(1.0)
        rec["dos_after_wake"] = t.session.status
        rec["dos_leaked"] = await _leaked(lab)
    # the positive control: no tunnel, the same probe leaves en0 in the clear and is counted
    rec["probe_no_tunnel"] = await _probe(lab)
    rec["leaked_no_tunnel"] = await _leaked(lab)


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "wireguard-go", "nft")
    assert "error" not in rec, rec["error"]
    return rec


@pytest.mark.reliability("F17")
def test_sleep_and_wake_callbacks_run_in_order_and_the_tunnel_stays_connected(scenario: dict[str, Any]) -> None:
    assert scenario["probe_before"] == 0
    assert scenario["calls"] == ["sleep", "wake", "sleep", "wake"]
    assert scenario["status"] is VPNStatus.CONNECTED


@pytest.mark.reliability("F17")
def test_a_clock_jump_past_180_s_forces_a_new_handshake_and_the_tunnel_recovers(scenario: dict[str, Any]) -> None:
    assert scenario["control_probe"] == 0 and scenario["control_new_handshakes"] == 0  # no jump: same keys
    assert scenario["frozen"] and scenario["probe_asleep"] != 0
    assert scenario["helper_log_jump"]
    assert scenario["recovered"]
    assert scenario["new_handshakes"] >= 1
    assert scenario["recovered_after_restart"]


@pytest.mark.reliability("F17")
def test_disconnect_on_sleep_stops_with_reason_sleep_and_wake_does_not_restart(scenario: dict[str, Any]) -> None:
    assert scenario["dos_asleep"] == (VPNStatus.DISCONNECTED, ProviderStopReason.SLEEP)
    assert scenario["dos_probe_asleep"] != 0  # the kill switch holds while the tunnel is down for sleep
    assert scenario["dos_after_wake"] is VPNStatus.DISCONNECTED


@pytest.mark.reliability("F17")
def test_nothing_leaks_while_asleep(scenario: dict[str, Any]) -> None:
    assert scenario["leaked_asleep"] == 0 and scenario["dos_leaked"] == 0
    assert scenario["probe_no_tunnel"] == 0 and scenario["leaked_no_tunnel"] >= 1  # the counter counts
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
