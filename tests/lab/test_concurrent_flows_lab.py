"""4, 16 and 50 concurrent flows through the built-in tunnel: every flow is served, none starves, and the
control plane (the app's messages to the provider, the helper's statistics, the IPC liveness pings) keeps being
answered under the load (row LD2; issue 16).

Each round sends one datagram per flow (UDP echo on the lab's www, v4 and v6 flows alternating) every 20 ms, so
the offered load is bounded (at most 50 x 50 = 2500 datagrams/s, 50 rounds); the answers are counted per flow.
Fairness is Jain's index over the flows' answered counts (1.0 when every flow got the same share); starvation of
the control plane is a message that does not come back at all (a liveness bound of 10 s, not a speed figure: the
answer times are recorded for the report, never asserted).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from netsim.apple.enums import VPNStatus
from netsim.core.ledger import LedgerSnapshot
from netsim.lab.lab import Lab
from netsim.lab.tunnel import LabTunnel, netsim_tunnel
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]

FLOW_COUNTS = (4, 16, 50)
ROUNDS = 50
INTERVAL = 0.02
ECHO_PORT = 7


def jain(values: list[int]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2); 1.0 is perfectly fair, 1/n is one flow taking all."""
    total, squares = sum(values), sum(v * v for v in values)
    return 1.0 if squares == 0 else total * total / (len(values) * squares)


async def _flows(lab: Lab, n: int) -> list[int]:
    """Run ``n`` paced echo flows from the Mac; the number of answers each flow got back."""
    socks = []
    for i in range(n):
        family = socket.AF_INET6 if i % 2 else socket.AF_INET
        raw = lab.socket("mac", family, socket.SOCK_DGRAM)
        sock = trio.socket.from_stdlib_socket(raw)
        dst = str(lab.addr.www_v6 if i % 2 else lab.addr.www_v4)
        await sock.connect((dst, ECHO_PORT))
        socks.append(sock)
    answered = [0] * n

    async def receive(i: int) -> None:
        while True:
            data = await socks[i].recv(2048)
            if data.startswith(b"ld2 %d " % i):
                answered[i] += 1

    try:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(receive, i)
            for r in range(ROUNDS):
                for i, sock in enumerate(socks):
                    await sock.send(b"ld2 %d %d " % (i, r) + bytes(64))
                await trio.sleep(INTERVAL)
            with trio.move_on_after(3):  # the last answers
                while sum(answered) < n * ROUNDS:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        for sock in socks:
            sock.close()
    return answered


async def _control_plane(t: LabTunnel, rec: dict[str, Any], stop: trio.Event) -> None:
    """Ask the provider and the helper for their statistics all through the load; every answer must come."""
    waits: list[float] = []
    unanswered = 0
    while not stop.is_set():
        start = trio.current_time()
        with trio.move_on_after(10) as scope:
            await t.provider_stats()
            await t.helper_stats()
        if scope.cancelled_caught:
            unanswered += 1
        waits.append(trio.current_time() - start)
        await trio.sleep(0.1)
    rec.setdefault("control", []).append({"asked": len(waits), "unanswered": unanswered, "max_wait": max(waits)})


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    async with netsim_tunnel(lab) as t:
        statuses: list[VPNStatus] = []
        for n in FLOW_COUNTS:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_control_plane, t, rec, stop)
                answered = await _flows(lab, n)
                stop.set()
            statuses.append(t.session.status)
            rec.setdefault("rounds", []).append({"flows": n, "answered": answered})
        rec["statuses"] = [s.name for s in statuses]
        rec["provider"] = await t.provider_stats()
        rec["helper"] = await t.helper_stats()


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    rec = run_lab_scenario(_scenario, "wireguard-go", "nft")
    assert "error" not in rec, rec["error"]
    return rec


@pytest.mark.reliability("LD2")
@pytest.mark.parametrize("index", range(len(FLOW_COUNTS)), ids=[f"{n}-flows" for n in FLOW_COUNTS])
def test_every_flow_is_served_and_none_starves(scenario: dict[str, Any], index: int) -> None:
    result = scenario["rounds"][index]
    answered = result["answered"]
    assert len(answered) == result["flows"]
    assert min(answered) > 0, answered  # no flow starved
    assert jain(answered) >= 0.95, answered
    assert sum(answered) >= 0.9 * ROUNDS * len(answered), answered  # a bounded load is carried, not shed


@pytest.mark.reliability("LD2")
def test_the_control_plane_is_answered_under_load(scenario: dict[str, Any]) -> None:
    for control in scenario["control"]:
        assert control["asked"] >= 1 and control["unanswered"] == 0, scenario["control"]
    # the IPC liveness pings were answered too: the provider never lost its helper, and never reasserted
    assert scenario["statuses"] == ["CONNECTED"] * len(FLOW_COUNTS)
    assert scenario["provider"]["disconnects"] == 0, scenario["provider"]


def test_every_loss_under_load_is_accounted(scenario: dict[str, Any]) -> None:
    sent = sum(ROUNDS * r["flows"] for r in scenario["rounds"])
    assert scenario["helper"]["ledger"]["stages"]["udp_out"]["forwarded"] >= sent  # it went through the tunnel
    for side in ("provider", "helper"):
        assert LedgerSnapshot.from_json_untrusted(scenario[side]["ledger"]).check() == [], side
    assert scenario["leaks"] == [] and scenario["root_changed"] is None


def test_jain_index_tells_fair_from_starved() -> None:
    """Positive control for the fairness assertion."""
    assert jain([50, 50, 50, 50]) == 1.0
    assert jain([200, 0, 0, 0]) == pytest.approx(0.25)
    assert jain([50, 50, 50, 5]) < 0.95
