"""The provider host's path monitor: when the physical path changes, the tunnel's kernel state is re-applied.

A Mac's network changes under a running tunnel (Wi-Fi drops and returns, the default route moves). Linux drops
every route through a link that goes down, including the tunnel's own routes through it: the server exclusion,
excluded routes and the local networks of ``exclude_local_networks`` in the tunnel's table. Nothing put them back
(issue 16: after a 5 s flap of en0 the tunnel stayed broken). `watch_path` wakes on every link, address and route
change (`netsim.transports.rtevents.RouteEvents`), lets a burst settle, reads a snapshot of the physical path
(the main table's default routes: their gateways and interfaces), and calls ``on_change`` when the snapshot
differs from the last one. The provider host then re-applies the last settings (`KernelNetworkConfigurator.
reapply`), which replaces routes in place and puts back what the kernel removed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

__all__ = ["EventSource", "watch_path"]

log = logging.getLogger(__name__)


class EventSource(Protocol):
    """What `watch_path` waits on: `netsim.transports.rtevents.RouteEvents`, or a stand-in in tests."""

    def fileno(self) -> int: ...

    def drain(self) -> int: ...


async def watch_path(
    events: EventSource,
    snapshot: Callable[[], Any],
    on_change: Callable[[Any, Any], Awaitable[None]],
    *,
    settle: float = 0.05,
) -> None:
    """Call ``await on_change(old, new)`` whenever ``snapshot()`` differs after route events; runs until cancelled.

    ``settle``: seconds to wait after the first event of a burst before looking (a link going down removes
    routes one message at a time).
    """
    last = snapshot()
    while True:
        await trio.lowlevel.wait_readable(events.fileno())
        events.drain()
        await trio.sleep(settle)
        events.drain()
        now = snapshot()
        if now != last:
            log.info("physical path changed: %s -> %s", last, now, extra={"event": "path_change"})
            old, last = last, now
            await on_change(old, now)
