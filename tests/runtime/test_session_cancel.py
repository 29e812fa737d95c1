"""A session closed by its caller's cancellation still stops its tunnel in order (found with issue 11's SIGTERM).

A stop signal to an ``async with Lab()`` owner cancels the owner's body, and with it `open_session`'s block.
The session's event readers used to be cancelled too: nobody read the host's DISCONNECTED, so closing waited
out ``stop_timeout + 5`` and ``exit_grace`` (25 s with the lab tunnel) and then killed the host, and the
session never saw its own stop. In-memory backend, autojump clock: the times below are virtual.
"""

from __future__ import annotations

from typing import Any, ClassVar

import trio
import trio.testing

from netsim.apple import ProviderStopReason, TunnelProviderProtocol, VPNStatus
from netsim.runtime.controller import TunnelProviderManager, memory_launcher
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.memory_tun import MemoryTun


class Stopper(PacketTunnelProvider):
    """Records its stop (the in-process host runs in the session's tasks, so it is cancelled with them)."""

    stops: ClassVar[list[ProviderStopReason]] = []

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        return None

    async def stop_tunnel(self, reason: ProviderStopReason) -> None:
        Stopper.stops.append(reason)


def test_cancelled_caller_gets_an_orderly_prompt_stop() -> None:
    Stopper.stops = []
    launcher = memory_launcher(MemoryTun, physical_mtu=1500)
    manager = TunnelProviderManager(Stopper, launcher, TunnelProviderProtocol(server_address="203.0.113.5"))
    rec: dict[str, Any] = {}

    async def main() -> None:
        with trio.CancelScope() as outer:
            async with manager.open_session() as session:
                rec["session"] = session
                await session.start_vpn_tunnel()
                await session.wait_status(VPNStatus.CONNECTED)
                rec["cancelled_at"] = trio.current_time()
                outer.cancel()  # what a SIGTERM does to the lab owner's body
                await trio.sleep_forever()
        rec["closed_after"] = trio.current_time() - rec["cancelled_at"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    session = rec["session"]
    assert Stopper.stops == [ProviderStopReason.USER_INITIATED]
    assert [c.status for c in session.history][-2:] == [VPNStatus.DISCONNECTING, VPNStatus.DISCONNECTED]
    assert session.stop_reason is ProviderStopReason.USER_INITIATED
    assert rec["closed_after"] < manager.stop_timeout  # virtual seconds: it did not wait out a timeout
