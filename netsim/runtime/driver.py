"""THE sans-IO driver loop: one datagram transport, one core, timers pulled, the clock injected.

Theory of operation (aioquic's ``asyncio/protocol.py`` shape, docs/design.md): a sans-IO core never blocks
and never reads a clock. `DatagramDriver.run` waits until the transport is readable or the core's next timer
(`get_timer`) is due -- one wakeup per batch --, drains up to ``batch`` datagrams into reused buffers
(`DatagramTransport.recv_batch`), hands the whole batch to the core with ``now``, fires ``handle_timer(now)``
when due, sends what ``datagrams_to_send(now)`` yields, then runs the caller's ``after`` step (deliver the
decrypted packets, push settings, ...). Calls from outside the loop (an IPC send that queued a handshake) call
`DatagramDriver.flush`, which also moves the wakeup earlier when the core's timer did.

The helper (`netsim.runtime.helper.Helper`), `netsim.runtime.wgsocket.WireGuardSocket`, the NAT bypass's
capture loop (`netsim.runtime.bypass.NatBypass`, whose core sends nothing through it: ``datagrams_to_send`` is
empty and the third list carries offload flags) and the in-memory VPN server (`netsim.testing.memory_tunnel`)
run on it; the clock is ``trio.current_time`` in the runtime and
whatever the test injects (trio's ``MockClock`` under ``autojump``), or a `netsim.runtime.clock.SleepClock`, which
runs ahead of trio's after a simulated sleep: the core's timers are on that clock, so the loop converts them back to
trio deadlines (`SleepClock.to_trio`) before it waits, and `rearm` after a jump makes the due ones fire at once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, cast

import trio

from netsim.runtime.clock import SleepClock

__all__ = ["DEFAULT_MAX_DATAGRAM", "DatagramCore", "DatagramDriver", "DatagramSource", "DatagramTransport"]

DEFAULT_MAX_DATAGRAM = 65535
Buffer = bytes | bytearray | memoryview


class DatagramSource(Protocol):
    """What the loop itself needs of its transport: batch receive and readiness.

    The third list of `recv_batch` is per-datagram metadata the core interprets: source addresses for UDP,
    offload flags for the NAT bypass's capture socket.
    """

    def recv_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any]) -> int:
        """Receive every ready datagram, up to ``len(bufs)``, into the caller's buffers; 0 when none is ready."""
        ...

    async def wait_readable(self) -> None:
        """Block until a datagram may be ready."""
        ...


class DatagramTransport(DatagramSource, Protocol):
    """A non-blocking datagram socket (real UDP `netsim.transports.udp.UdpTransport`, or the fake network).

    Addresses are whatever the transport uses (``(host, port)`` for UDP). Implementations may also offer
    ``send_batch(datagrams, reasons)``; the driver needs only `send`.
    """

    def send(self, data: Buffer, addr: Any) -> str | None:
        """Send one datagram; None on success, else the drop reason (``udp_eagain``, ``udp_no_route``,
        ``udp_error``)."""
        ...

    def close(self) -> None:
        """Release the socket; idempotent."""
        ...


class DatagramCore(Protocol):
    """What the driver needs of a sans-IO core (a `WireGuardDevice`, the helper's bookkeeping around one, a
    NAT table's pump...)."""

    def receive_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any], n: int, now: float) -> None:
        """Take datagrams ``bufs[i][:sizes[i]]`` from ``addrs[i]`` for ``i < n`` (the buffers are reused after)."""
        ...

    def datagrams_to_send(self, now: float) -> Iterable[tuple[Buffer, Any]]:
        """The datagrams to send now, with their destinations."""
        ...

    def get_timer(self) -> float | None:
        """When `handle_timer` should next be called (None: no timer)."""
        ...

    def handle_timer(self, now: float) -> None:
        """Fire what is due at ``now``."""
        ...


class DatagramDriver:
    """Run a `DatagramCore` over a `DatagramTransport`.

    Args:
        core: the sans-IO object (an adapter may delegate to an object it replaces, e.g. a server reboot).
        transport: the network side: a `DatagramTransport`, or any `DatagramSource` when ``send`` is given.
        batch: datagrams read per wakeup; the receive buffers are allocated once.
        clock: the time source (``trio.current_time``; a test's clock).
        send: sends one datagram (default: ``transport.send``, result ignored); the helper books it in its
            ledger instead.
        after: awaited at the end of every wakeup with ``now`` (deliver received packets, push settings).
        max_datagram: size of each receive buffer (no truncation whatever the peer's MTU).

    Attributes:
        wakeups: loop wakeups so far (a readable socket or a due timer); ``batches``: those that received at
            least one datagram; ``datagrams``: datagrams received (datagrams per batch = datagrams / batches).
    """

    def __init__(
        self,
        core: DatagramCore,
        transport: DatagramSource,
        *,
        batch: int = 64,
        clock: Callable[[], float] = trio.current_time,
        send: Callable[[Buffer, Any], object] | None = None,
        after: Callable[[float], Awaitable[None] | None] | None = None,
        max_datagram: int = DEFAULT_MAX_DATAGRAM,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.core = core
        self.transport = transport
        self.batch = batch
        self.clock = clock
        self._sleep_clock = clock if isinstance(clock, SleepClock) else None
        self._send = send if send is not None else cast("DatagramTransport", transport).send
        self._after = after
        self._slab = bytearray(batch * max_datagram)
        slab = memoryview(self._slab)
        self.views = [slab[i * max_datagram : (i + 1) * max_datagram] for i in range(batch)]
        # A transport that reads several datagrams per call (UDP GRO: `UdpTransport.segments_per_read`) hands the
        # extra ones as slices of the buffer it read into, in the slots after it: room for one more full read.
        extra = max(int(getattr(transport, "segments_per_read", 1)) - 1, 0)
        self.views += [slab[:0]] * extra
        self.sizes = [0] * (batch + extra)
        self.addrs: list[Any] = [None] * (batch + extra)
        self._scope: trio.CancelScope | None = None
        self.wakeups = 0
        self.batches = 0
        self.datagrams = 0

    def flush(self, now: float) -> None:
        """Send what the core has queued and move the pending wakeup earlier if its timer moved earlier."""
        core = self.core
        send = self._send
        for data, addr in core.datagrams_to_send(now):
            send(data, addr)
        self.rearm()

    def rearm(self) -> None:
        """Move the pending wakeup earlier if the core's timer moved earlier (a call from outside the loop)."""
        scope = self._scope
        timer = self._deadline()
        if scope is not None and timer < scope.deadline:
            scope.deadline = timer

    def _deadline(self) -> float:
        """The core's next timer as a trio deadline (inf: none)."""
        timer = self.core.get_timer()
        if timer is None:
            return math.inf
        sleep_clock = self._sleep_clock
        return timer if sleep_clock is None else sleep_clock.to_trio(timer)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The loop; run it in a nursery and cancel it to stop."""
        transport = self.transport
        views, sizes, addrs = self.views, self.sizes, self.addrs
        after = self._after
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self._deadline()) as scope:
                self._scope = scope
                await transport.wait_readable()
            self._scope = None
            self.wakeups += 1
            core = self.core
            now = self.clock()
            n = transport.recv_batch(views, sizes, addrs)
            if n:
                self.batches += 1
                self.datagrams += n
                core.receive_batch(views, sizes, addrs, n, now)
            timer = core.get_timer()
            if timer is not None and timer <= now:
                core.handle_timer(now)
            self.flush(now)
            if after is not None:
                pending = after(now)
                if pending is not None:
                    await pending
