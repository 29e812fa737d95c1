"""The provider host's path monitor: when the physical path changes, the tunnel's kernel state is re-applied.

A Mac's network changes under a running tunnel (Wi-Fi drops and returns, the default route moves). Linux drops
every route through a link that goes down, including the tunnel's own routes through it: the server exclusion,
excluded routes and the local networks of ``exclude_local_networks`` in the tunnel's table. Nothing put them back
(issue 16: after a 5 s flap of en0 the tunnel stayed broken). `watch_path` wakes on every link, address and route
change (`netsim.transports.rtevents.RouteEvents`), lets a burst settle, reads a snapshot of the physical path
(the main table's default routes: their gateways and interfaces), and calls ``on_change`` when the snapshot
differs from the last one. The provider host then re-applies the last settings (`KernelNetworkConfigurator.
reapply`), which replaces routes in place and puts back what the kernel removed, and updates the provider's
``default_path`` (`netsim.apple.path.NWPath`).

The helper runs the same loop on its own route events (it is the process with the UDP socket): its snapshot is
`default_route_interface`, the interface of the main table's default route for its socket's family, and on a
change it re-binds the socket there and forces a WireGuard handshake (`netsim.runtime.helper.Helper.path_changed`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

__all__ = ["EventSource", "default_route_interface", "watch_path"]

log = logging.getLogger(__name__)


class EventSource(Protocol):
    """What `watch_path` waits on: `netsim.transports.rtevents.RouteEvents`, or a stand-in in tests."""

    def fileno(self) -> int: ...

    def drain(self) -> int: ...

    def close(self) -> None: ...


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


_RTF_UP = 0x1  # <linux/route.h>
_RTF_REJECT = 0x200
_MAX_ROUTE_LINES = 4096  # bounded read of the kernel's route listing
PROC_NET = Path("/proc/net")


def default_route_interface(family: int = socket.AF_INET, *, proc_net: Path = PROC_NET) -> str | None:
    """The interface of the default route in this process's namespace for ``family``, or None without one.

    Read from procfs, not netlink, so the helper needs no pyroute2: ``/proc/net/route`` lists the main table
    only (IPv4; the lowest metric wins); ``/proc/net/ipv6_route`` lists every table, so a tunnel's own default
    route (``utun*``), ``lo`` and reject routes are skipped there. A missing or unreadable file is None (no path).
    """
    v6 = family == socket.AF_INET6
    try:
        with open(proc_net / ("ipv6_route" if v6 else "route"), encoding="ascii", errors="replace") as f:
            lines = [line.split() for _, line in zip(range(_MAX_ROUTE_LINES), f, strict=False)]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for fields in lines:
        try:
            if v6:
                if len(fields) < 10 or fields[0] != "0" * 32 or fields[1] != "00":
                    continue
                dev, flags, metric = fields[9], int(fields[8], 16), int(fields[5], 16)
                if dev == "lo" or dev.startswith("utun"):
                    continue
            else:
                if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
                    continue
                dev, flags, metric = fields[0], int(fields[3], 16), int(fields[6])
        except ValueError:
            continue
        if flags & _RTF_UP and not flags & _RTF_REJECT and (best is None or metric < best[0]):
            best = (metric, dev)
    return None if best is None else best[1]
