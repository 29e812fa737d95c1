"""The packet-device interface shared by the Linux TUN adapter and `netsim.testing.MemoryTun`.

Shape follows wireguard-go's ``tun.Device``: batch I/O with caller-owned buffers and headroom, so a caller can
prepend headers in place. Both implementations pass the conformance suite in ``tests/transports``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["PacketDevice"]

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class PacketDevice(Protocol):
    """A layer-3 packet device (bare IP packets, no link header) with non-blocking batch I/O."""

    @property
    def name(self) -> str:
        """Interface name, e.g. ``utun0``."""
        ...

    @property
    def mtu(self) -> int:
        """Current MTU in bytes."""
        ...

    def read_into(self, bufs: Sequence[bytearray], sizes: list[int], offset: int = 0) -> int:
        """Read every packet that is ready, up to ``len(bufs)``, without blocking.

        Packet ``i`` is stored at ``bufs[i][offset:offset + sizes[i]]``. Returns the count (0 when nothing is
        ready). Every buffer must hold ``offset + mtu`` bytes (plus 4 in utun framing mode), else
        `netsim.errors.LocalProtocolError` is raised: a packet is never silently cut short. Raises
        `netsim.errors.TunnelDown` when the device is gone or closed.
        """
        ...

    def read_packets(self, limit: int) -> list[bytes]:
        """Read every packet that is ready, up to ``limit``, as owned ``bytes`` (empty list when none)."""
        ...

    def write_packets(self, packets: Sequence[Buffer], offset: int = 0) -> int:
        """Write a batch (each packet starts at ``offset`` in its buffer); never blocks.

        Returns how many were accepted. Packets the device refuses (queue full, too big, bad) are dropped and
        counted in `statistics`; raises `netsim.errors.TunnelDown` only when the device itself is gone.
        """
        ...

    async def wait_readable(self) -> None:
        """Block (trio) until at least one packet can be read, or the device is gone."""
        ...

    def close(self) -> None:
        """Close the device; idempotent. Readers blocked in `wait_readable` wake with `TunnelDown`."""
        ...
