"""`watch_path` without root: a burst of events is one look, and only a changed snapshot is reported.

The events source is a socketpair standing in for `RouteEvents` (any readable datagram means "look again").
The lab test is tests/lab/test_path_recovery_lab.py.
"""

from __future__ import annotations

import socket
from typing import Any

import trio
import trio.testing

from netsim.runtime.pathmonitor import watch_path


class FakeEvents:
    def __init__(self) -> None:
        self.kernel, self.ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)
        self.drained = 0

    def fileno(self) -> int:
        return self.ours.fileno()

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.ours.recv(64)
            except BlockingIOError:
                break
            n += 1
        self.drained += n
        return n

    def close(self) -> None:
        self.kernel.close()
        self.ours.close()

    def event(self, count: int = 1) -> None:
        for _ in range(count):
            self.kernel.send(b"x")


def test_a_burst_is_one_look_and_only_changes_are_reported() -> None:
    state: dict[str, tuple[str, ...]] = {"path": ("en0", "192.168.1.1")}
    changes: list[tuple[Any, Any]] = []
    looks = 0

    def snapshot() -> Any:
        nonlocal looks
        looks += 1
        return state["path"]

    async def on_change(old: Any, new: Any) -> None:
        changes.append((old, new))

    async def main() -> None:
        events = FakeEvents()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: watch_path(events, snapshot, on_change, settle=0.05))
            await trio.sleep(0.01)
            events.event(30)  # a route flush: many messages, the path unchanged
            await trio.sleep(0.2)
            assert changes == [] and looks == 2  # the first snapshot, then one look for the burst
            state["path"] = ()  # en0 down: no default route
            events.event(5)
            await trio.sleep(0.2)
            state["path"] = ("en0", "192.168.1.1")
            events.event(3)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        events.close()
        assert events.drained == 38

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert changes == [(("en0", "192.168.1.1"), ()), ((), ("en0", "192.168.1.1"))]
