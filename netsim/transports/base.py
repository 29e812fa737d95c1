"""The packet-device interface shared by the Linux TUN adapter and `netsim.testing.MemoryTun`.

Shape follows wireguard-go's ``tun.Device``: non-blocking batch I/O, one call per batch. Reads return owned
``bytes`` (measured faster from Python than reading into reused buffers, see `netsim.transports.tun`); writes take
any buffers, with optional headroom. Both implementations pass the conformance suite in ``tests/transports``.
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

    def read_packets(self, limit: int) -> list[bytes]:
        """Read every packet that is ready, up to ``limit``, as owned ``bytes`` (empty list when none).

        Never blocks. A packet longer than `mtu` (queued before the MTU shrank) is dropped and counted as
        ``truncated``, never handed out cut short. Raises `netsim.errors.TunnelDown` when the device is gone or
        closed.
        """
        ...

    def write_packets(self, packets: Sequence[Buffer], offset: int = 0, *, validated: bool = False) -> int:
        """Write a batch (each packet starts at ``offset`` in its buffer); never blocks.

        Returns how many were accepted. Packets the device refuses (queue full, too big, bad) are dropped and
        counted in `statistics`; raises `netsim.errors.TunnelDown` only when the device itself is gone.
        ``validated=True`` promises every packet is non-empty and at most `mtu` bytes (the caller checked and
        counted them, as `netsim.runtime.flow.PacketTunnelFlow` does), so the device skips those checks.
        """
        ...

    async def wait_readable(self) -> None:
        """Block (trio) until at least one packet can be read, or the device is gone."""
        ...

    def close(self) -> None:
        """Close the device; idempotent. Readers blocked in `wait_readable` wake with `TunnelDown`."""
        ...
