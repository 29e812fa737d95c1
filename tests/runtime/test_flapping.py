"""Tunnel flapping under traffic in the memory backend (row F12, wg-go TestUpDown): 50 connect/disconnect cycles in
10 s of (virtual) time while a sender keeps injecting packets, then the tunnel still works, nothing is left running
and every packet is accounted for.

No deadlock: the whole run is bounded (``fail_after``). No leaked tasks: every task of the run is counted before the
first cycle and after the last, on the whole task tree; each cycle's host must have been reaped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from netsim.apple.enums import VPNStatus
from netsim.errors import LabError
from netsim.testing.memory_tunnel import MemoryTunnel, icmp_echo, memory_tunnel

CYCLES = 50
PERIOD = 10.0 / CYCLES  # 50 up/down cycles in 10 s


def _tasks(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
    yield task
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from _tasks(child)


def _task_names() -> list[str]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    return sorted(t.name for t in _tasks(root))


async def _sender(t: MemoryTunnel, sent: list[int], stop: trio.Event) -> None:
    """Inject one echo request every 10 ms into whatever utun the current host has (none while it is down)."""
    seq = 0
    while not stop.is_set():
        seq += 1
        try:
            t.tun.inject([icmp_echo(t.client_v4, "203.0.113.10", seq & 0xFFFF)])
            sent[0] += 1
        except LabError:  # between a stop and the next start there is no utun: the app's packet has nowhere to go
            sent[1] += 1
        await trio.sleep(0.01)


async def _flap(t: MemoryTunnel, cycles: int) -> list[tuple[VPNStatus, VPNStatus]]:
    session = t.session
    seen = []
    for _ in range(cycles):
        await session.stop_vpn_tunnel()
        await session.wait_status(VPNStatus.DISCONNECTED)
        down = session.status
        await trio.sleep(PERIOD / 2)
        await session.start_vpn_tunnel()
        await session.wait_status(VPNStatus.CONNECTED)
        seen.append((down, session.status))
        await trio.sleep(PERIOD / 2)
    return seen


@pytest.mark.reliability("F12")
def test_fifty_up_down_cycles_under_traffic_leave_no_task_and_the_tunnel_works() -> None:
    async def main() -> dict[str, Any]:
        async with memory_tunnel() as t:
            await trio.testing.wait_all_tasks_blocked()
            before = _task_names()
            hosts_before = len(t.launcher.hosts)
            sent = [0, 0]
            stop = trio.Event()
            with trio.fail_after(120):  # a deadlock fails here instead of hanging
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_sender, t, sent, stop)
                    seen = await _flap(t, CYCLES)
                    stop.set()
                # the hosts of the stopped tunnels exit by themselves; wait for the reaping, then count
                with trio.move_on_after(t.session.manager.exit_grace + 1):
                    while len(t.session._live) > 1:
                        await trio.sleep(0.1)
                await trio.testing.wait_all_tasks_blocked()
            after = _task_names()
            replied = len(t.tun.take_written())  # the sender's answers that came back meanwhile
            echo = await t.exchange([icmp_echo(t.client_v4, "203.0.113.10", 1)], timeout=5)
            return {
                "seen": seen,
                "replied": replied,
                "before": before,
                "after": after,
                "hosts": len(t.launcher.hosts) - hosts_before,
                "live": len(t.session._live),
                "sent": sent,
                "echo": len(echo),
                "helper_ledger": t.helper.ledger.check(),
                "provider_ledger": (await t.provider_stats()).get("ledger"),
                "helper_sessions": t.helper.sessions,
            }

    rec = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert rec["seen"] == [(VPNStatus.DISCONNECTED, VPNStatus.CONNECTED)] * CYCLES
    assert rec["hosts"] == CYCLES and rec["live"] == 1  # a fresh host per start; every old one reaped
    assert rec["helper_sessions"] == CYCLES + 1
    assert rec["before"] == rec["after"], "tasks differ after the flapping"
    assert rec["sent"][0] > CYCLES  # traffic really ran during the cycles (and some found no utun)
    assert rec["echo"] == 1 and rec["replied"] >= 1
    assert rec["helper_ledger"] == []


@pytest.mark.reliability("F12")
def test_the_task_census_sees_a_leaked_task() -> None:
    """The positive control of the census above: one task left behind by a cycle shows up in the difference."""

    async def main() -> tuple[list[str], list[str]]:
        async with trio.open_nursery() as nursery:
            before = _task_names()
            nursery.start_soon(trio.sleep_forever, name="leaked-by-a-cycle")
            await trio.testing.wait_all_tasks_blocked()
            after = _task_names()
            nursery.cancel_scope.cancel()
        return before, after

    before, after = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sorted(set(after) - set(before)) == ["leaked-by-a-cycle"]
