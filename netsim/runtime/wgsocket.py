"""A thin trio driver around the sans-IO `WireGuardDevice`: one UDP socket, one loop, timers pulled.

Theory of operation (aioquic's ``asyncio/protocol.py`` shape): the loop waits until the socket is readable or
the device's next timer is due, then drains the socket in a batch (``recvfrom`` until EAGAIN, at most
``batch`` datagrams per wakeup), feeds each datagram, fires due timers, and sends whatever the device queued.
Decrypted inner packets go to a bounded trio memory channel (`received`); a full channel drops and counts,
it never blocks the network loop. Outbound packets go through `send_packets`, which encrypts a batch into
reused buffers and sends each datagram.

The device's clock is ``trio.current_time()``; TAI64N wall time is derived once from ``time.time()``.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Sequence

import trio

from netsim.core.wireguard.device import WireGuardDevice
from netsim.core.wireguard.peer import Endpoint, Peer

__all__ = ["WireGuardSocket"]

_MAX_DATAGRAM = 65535


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
        sock.setblocking(False)
        self._scope: trio.CancelScope | None = None
        self.batch = batch
        device.wall_offset = time.time() - trio.current_time()
        self._send_ch, self.received = trio.open_memory_channel[tuple[Peer, bytes]](queue)
        self._bufs = [bytearray(mtu + 64) for _ in range(batch)]
        self._sizes = [0] * batch
        self._addrs: list[Endpoint | None] = [None] * batch
        # one full-size buffer per datagram of a receive batch (no truncation whatever the peer's MTU)
        self._recv_bufs = [memoryview(bytearray(_MAX_DATAGRAM)) for _ in range(batch)]
        self.rx_channel_full = 0
        self.send_errors = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The network loop; run it in a nursery and cancel it to stop."""
        dev = self.device
        sock = self.sock
        bufs = self._recv_bufs
        task_status.started()
        while True:
            deadline = dev.get_timer()
            with trio.CancelScope(deadline=deadline if deadline is not None else float("inf")) as scope:
                self._scope = scope
                await trio.lowlevel.wait_readable(sock)
            self._scope = None
            now = trio.current_time()
            datagrams: list[memoryview] = []
            addrs: list[Endpoint] = []
            for buf in bufs:
                try:
                    n, addr = sock.recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        continue  # ICMP errors for earlier sends surface here on Linux; not our input
                    raise
                datagrams.append(buf[:n])
                addrs.append(addr)
            if datagrams:
                dev.receive_datagrams_untrusted(datagrams, addrs, now)
            timer = dev.get_timer()
            if timer is not None and timer <= now:
                dev.handle_timer(now)
            self._flush(now)
            self._deliver()
            await trio.lowlevel.checkpoint()

    def _deliver(self) -> None:
        for item in self.device.take_received():
            try:
                self._send_ch.send_nowait(item)
            except trio.WouldBlock:
                self.rx_channel_full += 1

    def _flush(self, now: float) -> None:
        for data, addr in self.device.datagrams_to_send(now):
            self._sendto(data, addr)
        # a call from outside the loop may have armed an earlier timer (e.g. a handshake retransmission)
        scope = self._scope
        timer = self.device.get_timer()
        if scope is not None and timer is not None and timer < scope.deadline:
            scope.deadline = timer

    def _sendto(self, data: bytes | memoryview, addr: Endpoint) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, OSError):
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
