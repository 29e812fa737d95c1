"""An in-memory `BypassTransport` (en0 for the NAT bypass without sockets or root) and a recording sink."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from netsim.core.packet import Buffer, PacketView

if TYPE_CHECKING:
    from netsim.runtime.bypass import BypassSink

__all__ = ["MemoryBypassTransport", "RecordingSink"]


class MemoryBypassTransport:
    """In-memory `BypassTransport` for tests: records what is sent, and plays captured frames you `inject`."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self._pending: list[tuple[bytes, int]] = []
        self._event = trio.Event()
        self.fail_with: str | None = None
        self.recv_calls = 0

    def inject(self, packet: bytes, flags: int = 0) -> None:
        """Queue a frame as if the capture socket had received it."""
        self._pending.append((bytes(packet), flags))
        self._event.set()

    def send(self, packet: Buffer, version: int, dst: bytes) -> str | None:
        if self.fail_with is not None:
            return self.fail_with
        self.sent.append(bytes(packet))
        return None

    def recv_batch(self, bufs: Sequence[memoryview], sizes: list[int], flags: list[int]) -> int:
        self.recv_calls += 1
        n = min(len(bufs), len(self._pending))
        for i in range(n):
            data, f = self._pending[i]
            bufs[i][: len(data)] = data
            sizes[i] = len(data)
            flags[i] = f
        del self._pending[:n]
        if not self._pending:
            self._event = trio.Event()
        return n

    async def wait_readable(self) -> None:
        if not self._pending:
            await self._event.wait()

    def close(self) -> None:
        self._pending.clear()


class RecordingSink:
    """A `netsim.runtime.bypass.BypassSink` for tests: records what the NAT bypass delivers.

    Args:
        forward: another sink (a `Helper`) to pass everything on to after recording; None answers ``reply``.
        reply: what `bypass_deliver` returns without ``forward`` (None: handed over; ``"no_provider"``...).
    """

    def __init__(self, forward: BypassSink | None = None, *, reply: str | None = None) -> None:
        self.forward = forward
        self.reply = reply
        self.delivered: list[bytes] = []
        self.batches: list[int] = []
        self.dns_replies = 0

    def bypass_deliver(self, packets: list[Buffer]) -> str | None:
        self.delivered.extend(bytes(p) for p in packets)  # views into the NAT's buffers: valid during the call
        self.batches.append(len(packets))
        return self.forward.bypass_deliver(packets) if self.forward is not None else self.reply

    def bypass_dns_reply(self, view: PacketView, now: float) -> None:
        self.dns_replies += 1
        if self.forward is not None:
            self.forward.bypass_dns_reply(view, now)
