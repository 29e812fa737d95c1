"""`MemoryTun`: an in-memory `netsim.transports.base.PacketDevice` that behaves like `TunDevice`.

The "kernel side" is driven by the test: `MemoryTun.inject` queues packets for the device's reader (what the
kernel would route into utun0), `MemoryTun.take_written` returns what the device's user wrote (what the kernel
would receive). The inbound queue is bounded like a TUN's txqueue: when full, injected packets are dropped and
counted as ``queue_full`` (the kernel's tx_dropped). `MemoryTun.delete` simulates ``ip link del``.
The same conformance suite (tests/transports) runs against this and the real device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import trio

from netsim.core.family import UTUN_HEADER_SIZE, UTUN_HEADER_V4, UTUN_HEADER_V6
from netsim.errors import LocalProtocolError, TunnelDown
from netsim.transports.tun import TunStatistics

__all__ = ["MemoryTun"]

Buffer = bytes | bytearray | memoryview
_HDR_V4, _HDR_V6 = UTUN_HEADER_V4, UTUN_HEADER_V6


class MemoryTun:
    """In-memory packet device with a bounded inbound queue (default 500 packets, like a TUN's txqueuelen)."""

    def __init__(self, name: str = "utun0", mtu: int = 1500, *, capacity: int = 500, utun_framing: bool = False):
        if capacity < 1 or mtu < 68:
            raise LocalProtocolError("capacity must be >= 1 and mtu >= 68")
        self._name = name
        self._mtu = mtu
        self.capacity = capacity
        self.utun_framing = utun_framing
        self._hdr = UTUN_HEADER_SIZE if utun_framing else 0
        self._inbound: deque[bytes] = deque()
        self._written: list[bytes] = []
        self._closed = False
        self._deleted = False
        self._event = trio.Event()
        self.packets_read = 0
        self.bytes_read = 0
        self.packets_written = 0
        self.bytes_written = 0
        self._dropped: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<MemoryTun {self._name} queued={len(self._inbound)}>"

    @property
    def name(self) -> str:
        """Interface name."""
        return self._name

    @property
    def mtu(self) -> int:
        """MTU in bytes."""
        return self._mtu

    def set_mtu(self, mtu: int) -> None:
        """Change the MTU."""
        self._mtu = mtu

    # ------------------------------------------------------------------ kernel side (tests)
    def inject(self, packets: Iterable[Buffer]) -> int:
        """Queue packets for the reader, as the kernel would route them in. Returns how many were queued.

        Packets over the MTU are dropped (``too_big``; the kernel would not route them to the device) and a full
        queue drops (``queue_full``).
        """
        if self._deleted:
            raise TunnelDown(f"{self._name} was deleted")
        queued = 0
        for pkt in packets:
            data = bytes(pkt)
            if len(data) > self._mtu:
                self._drop("too_big")
            elif len(self._inbound) >= self.capacity:
                self._drop("queue_full")
            else:
                self._inbound.append(data)
                queued += 1
        if queued:
            self._wake()
        return queued

    def take_written(self) -> list[bytes]:
        """Return and forget every packet written by the device's user (bare IP, header stripped)."""
        out, self._written = self._written, []
        return out

    def delete(self) -> None:
        """Simulate ``ip link del``: queued packets vanish; reads and writes raise `TunnelDown`."""
        self._deleted = True
        self._inbound.clear()
        self._wake()

    # ------------------------------------------------------------------ device side
    def _check(self) -> None:
        if self._closed:
            raise TunnelDown(f"{self._name} is closed")
        if self._deleted:
            raise TunnelDown(f"{self._name}: device deleted")

    def _drop(self, reason: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def _wake(self) -> None:
        self._event.set()
        self._event = trio.Event()

    def read_packets(self, limit: int) -> list[bytes]:
        """See `PacketDevice.read_packets`."""
        self._check()
        out: list[bytes] = []
        while len(out) < limit and self._inbound:
            pkt = self._inbound.popleft()
            if len(pkt) > self._mtu:
                self._drop("truncated")  # the MTU shrank after it was queued (TunDevice: the read came up short)
                continue
            self.packets_read += 1
            self.bytes_read += len(pkt)
            out.append((_HDR_V6 if pkt[0] >> 4 == 6 else _HDR_V4) + pkt if self._hdr else pkt)
        return out

    def write_packets(self, packets: Sequence[Buffer], offset: int = 0, *, validated: bool = False) -> int:
        """See `PacketDevice.write_packets` (``validated`` skips the checks, as `TunDevice` does)."""
        self._check()
        if validated and not self._hdr and not offset:
            self._written.extend(map(bytes, packets))
            n = len(packets)
            self.packets_written += n
            self.bytes_written += sum(map(len, packets))
            return n
        accepted = 0
        for pkt in packets:
            view = memoryview(pkt)[offset:]
            if self._hdr:
                if len(view) < 4 or bytes(view[:4]) not in (_HDR_V4, _HDR_V6):
                    self._drop("bad_family")
                    continue
                view = view[4:]
            if len(view) == 0:
                self._drop("empty")
                continue
            if len(view) > self._mtu:
                self._drop("too_big")
                continue
            self._written.append(bytes(view))
            accepted += 1
            self.packets_written += 1
            self.bytes_written += len(view)
        return accepted

    async def wait_readable(self) -> None:
        """See `PacketDevice.wait_readable`."""
        while True:
            self._check()
            if self._inbound:
                await trio.lowlevel.checkpoint()
                return
            await self._event.wait()

    def close(self) -> None:
        """See `PacketDevice.close`."""
        if not self._closed:
            self._closed = True
            self._inbound.clear()
            self._wake()

    def statistics(self) -> TunStatistics:
        """Counters (``kernel_tx_dropped`` mirrors the queue_full drops, as the kernel counts them)."""
        return TunStatistics(
            self.packets_read,
            self.bytes_read,
            self.packets_written,
            self.bytes_written,
            dict(self._dropped),
            self._dropped.get("queue_full", 0),
        )
