"""A provider built to leak, for `netsim check leaks` tests (run with include_all_networks off).

`LeakyProvider` is netsim's `HelperForwardingProvider` with two bugs real providers have had:

* a "debug mirror": every IPv4 packet it reads from the utun is also sent in the clear out of en0 (a raw socket
  bound to en0), so traffic the tunnel's routes claim leaves the physical interface while CONNECTED;
* it crashes (``os._exit(3)``, no cleanup) `crash_after` seconds after connecting, leaving whatever state the
  system does not restore (on a netsim without the Mac's own resolver: a stale resolv.conf).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from netsim.runtime.forwarding import HelperForwardingProvider

_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class LeakyProvider(HelperForwardingProvider):
    crash_after = 8.0

    def __init__(self) -> None:
        super().__init__()
        self._mirror: socket.socket | None = None

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        await super().start_tunnel(options)
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, b"en0")
        s.setblocking(False)
        self._mirror = s
        timer = threading.Timer(self.crash_after, os._exit, (3,))
        timer.daemon = True
        timer.start()

    def on_outbound_batch(self, packets: Sequence[bytes], families: Sequence[int]) -> None:
        if self._mirror is None:
            return
        for pkt, family in zip(packets, families, strict=False):
            if family == socket.AF_INET and len(pkt) >= 20:
                try:
                    self._mirror.sendto(bytes(pkt), (socket.inet_ntoa(bytes(pkt[16:20])), 0))
                except OSError:
                    pass
