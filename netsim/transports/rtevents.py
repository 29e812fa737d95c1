"""Route events: a NETLINK_ROUTE socket that wakes the caller when links, addresses or routes change.

It subscribes to rtnetlink(7)'s multicast groups for the calling thread's network namespace.

The messages are not parsed: any datagram (or an overrun, ENOBUFS) means "look again", and the caller reads the
state it cares about through its own netlink calls. So nothing from the socket is trusted, and a burst of events
costs one look. Used by the provider host's path monitor (`netsim.runtime.pathmonitor`).
"""

from __future__ import annotations

import errno
import socket

__all__ = ["RouteEvents"]

_NETLINK_ROUTE = 0
# <linux/rtnetlink.h> RTMGRP_*: link, IPv4/IPv6 address and route changes
_GROUPS = 0x1 | 0x10 | 0x40 | 0x100 | 0x400
_RCVBUF = 1 << 20
_MAX_DRAIN = 4096  # datagrams per drain: bounded even under a storm (the caller looks again anyway)


class RouteEvents:
    """Subscribe to link/address/route changes of the calling thread's network namespace."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, _NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, _GROUPS))
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> int:
        """Read what is queued without blocking; returns how many datagrams (an overrun counts as one)."""
        n = 0
        while n < _MAX_DRAIN:
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped events: state changed, look again
                    n += 1
                    continue
                raise
            n += 1
        return n

    def close(self) -> None:
        self._sock.close()
