"""A thin trio driver around the sans-IO `WireGuardDevice`: one UDP socket, one loop, timers pulled.

Theory of operation: the loop is `netsim.runtime.driver.DatagramDriver` over a
`netsim.transports.udp.UdpTransport` on the socket: it waits until the socket is readable or the device's next
timer is due, drains the socket in a batch (at most ``batch`` datagrams per wakeup), feeds the batch, fires due
timers, and sends whatever the device queued.
Decrypted inner packets go to a bounded trio memory channel (`received`); a full channel drops and counts,
it never blocks the network loop. Outbound packets go through `send_packets`, which encrypts a batch into
reused buffers and sends each datagram.

The device's clock is ``trio.current_time()``; TAI64N wall time is derived once from ``time.time()``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import trio

from netsim.core.wireguard.device import WireGuardDevice
from netsim.core.wireguard.peer import Endpoint, Peer
from netsim.runtime.driver import Buffer, DatagramDriver
from netsim.transports.udp import UdpTransport

__all__ = ["WireGuardSocket"]


class WireGuardSocket:
    """Run a `WireGuardDevice` over a trio UDP socket.

    Args:
        device: the sans-IO device (its ``wall_offset`` is set from the trio clock at construction).
        sock: a bound (or unbound, for a client) stdlib UDP socket, set non-blocking here; it may come from a
            lab namespace (``lab.socket("mac")``). The driver does not close it.
        batch: at most this many datagrams are read per wakeup and encrypted per `send_packets` call.
        queue: capacity of the `received` channel (inner packets waiting for the consumer).
        mtu: the largest inner packet `send_packets` accepts.

    Attributes:
        received: receive channel of ``(peer, inner_packet)``.
        rx_channel_full: inner packets dropped because the consumer was too slow.
        send_errors: datagrams the kernel refused (e.g. unreachable); counted, not raised.
    """

    def __init__(
        self,
        device: WireGuardDevice,
        sock: socket.socket,
        *,
        batch: int = 32,
        queue: int = 1024,
        mtu: int = 1420,
    ) -> None:
        self.device = device
        self.sock = sock
        self._transport = UdpTransport(sock)  # sets it non-blocking; not closed here (the caller owns sock)
        self.batch = batch
        device.wall_offset = time.time() - trio.current_time()
        self._send_ch, self.received = trio.open_memory_channel[tuple[Peer, bytes]](queue)
        self._bufs = [bytearray(mtu + 64) for _ in range(batch)]
        self._sizes = [0] * batch
        self._addrs: list[Endpoint | None] = [None] * batch
        # the loop (`netsim.runtime.driver`): one full-size reused receive buffer per datagram of a batch
        self._driver = DatagramDriver(self, self._transport, batch=batch, send=self._sendto, after=self._after)
        self.rx_channel_full = 0
        self.send_errors = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The network loop; run it in a nursery and cancel it to stop."""
        await self._driver.run(task_status=task_status)

    def receive_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any], n: int, now: float) -> None:
        """`netsim.runtime.driver.DatagramCore`: feed the batch to the device."""
        self.device.receive_datagrams_untrusted([bufs[i][: sizes[i]] for i in range(n)], addrs[:n], now)

    def datagrams_to_send(self, now: float) -> Iterable[tuple[Buffer, Any]]:
        return self.device.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        return self.device.get_timer()

    def handle_timer(self, now: float) -> None:
        self.device.handle_timer(now)

    async def _after(self, now: float) -> None:
        self._deliver()
        await trio.lowlevel.checkpoint()

    def _deliver(self) -> None:
        for item in self.device.take_received():
            try:
                self._send_ch.send_nowait(item)
            except trio.WouldBlock:
                self.rx_channel_full += 1

    def _flush(self, now: float) -> None:
        # a call from outside the loop may have armed an earlier timer (e.g. a handshake retransmission)
        self._driver.flush(now)

    def _sendto(self, data: Buffer, addr: Endpoint) -> None:
        if self._transport.send(data, addr) is not None:
            self.send_errors += 1

    async def send_packets(self, packets: Sequence[bytes | bytearray | memoryview]) -> int:
        """Encrypt and send inner IP packets (in chunks of ``batch``); returns datagrams sent now.

        Packets without a session are staged inside the device and go out after the handshake.
        """
        dev = self.device
        sent = 0
        for start in range(0, len(packets), self.batch):
            chunk = packets[start : start + self.batch]
            now = trio.current_time()
            dev.encapsulate(chunk, now, self._bufs, self._sizes, self._addrs)
            for i in range(len(chunk)):
                size = self._sizes[i]
                addr = self._addrs[i]
                if size and addr is not None:
                    self._sendto(memoryview(self._bufs[i])[:size], addr)
                    sent += 1
            self._flush(now)
        await trio.lowlevel.checkpoint()
        return sent

    async def handshake(self, peer: Peer) -> None:
        """Start a handshake with ``peer`` now (completion shows as a `HandshakeCompleted` device event)."""
        now = trio.current_time()
        self.device.initiate(peer, now)
        self._flush(now)
        await trio.lowlevel.checkpoint()
