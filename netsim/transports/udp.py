"""`UdpTransport`: the helper's UDP socket on the physical interface, as a datagram transport.

Thin I/O adapter (docs/design.md, Layers): open/bind with SO_BINDTODEVICE and SO_MARK, a batch receive into the
caller's buffers (``recvfrom_into`` until EAGAIN: Python has no ``recvmmsg``), and sends that report a named
drop reason instead of raising. It satisfies `netsim.runtime.driver.DatagramTransport`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence

import trio

from netsim.core import ipc
from netsim.core.wireguard.peer import Endpoint
from netsim.errors import ConfigError

__all__ = ["UdpTransport"]

_TRANSIENT_RECV = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN)
# sendto errors that mean "the egress has no route" (en0 down or its route gone), counted as udp_no_route
_NO_GSO = frozenset((errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.EIO))
_NO_ROUTE_SEND = frozenset((errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN))
# ip(7): IP_MTU_DISCOVER and its IP_PMTUDISC_DONT value (Python's socket module has the first only on some builds)
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
# udp(7): UDP_SEGMENT (generic segmentation offload on send, Linux 4.18), at level SOL_UDP
_SOL_UDP = 17
_UDP_SEGMENT = 103
_GSO_SIZE = struct.Struct("=H")
#: Segments one UDP_SEGMENT send may carry (the kernel's UDP_MAX_SEGMENTS) and the payload bytes it may hold.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
#: Set to 0 to turn UDP GSO off for every `UdpTransport` (the bench's control; docs/benchmarks.md).
GSO_ENV = "NETSIM_UDP_GSO"


class UdpTransport:
    """`DatagramTransport` over a non-blocking UDP socket (the helper owns it and closes it).

    Use `UdpTransport.open` to get one bound to the physical interface.
    """

    def __init__(self, sock: socket.socket, *, gso: bool | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.recv_errors = 0
        #: Whether `send_segments` may use UDP_SEGMENT (off: it sends one datagram per syscall). Turned off for
        #: good when the kernel refuses it (EINVAL/EOPNOTSUPP/ENOPROTOOPT: no GSO on this socket or kernel).
        self.gso = os.environ.get(GSO_ENV, "1") != "0" if gso is None else gso
        self.gso_sends = 0  # sendmsg calls that carried more than one datagram
        self.gso_datagrams = 0  # datagrams they carried

    @classmethod
    def open(
        cls,
        family: int = socket.AF_INET,
        *,
        interface: str | None = "en0",
        fwmark: int | None = None,
        port: int = 0,
        rcvbuf: int = 4 << 20,
        fragment_outer: bool = True,
    ) -> UdpTransport:
        """A UDP socket bound to ``interface`` (SO_BINDTODEVICE) and marked ``fwmark`` (SO_MARK), on ``port``.

        Binding to the device keeps the helper's datagrams off every route but the physical one (socket(7)); the
        mark makes the tunnel's policy-routing rule skip them. Both need CAP_NET_RAW / CAP_NET_ADMIN.

        ``fragment_outer`` (IPv4 only): send with DF clear (``IP_PMTUDISC_DONT``, ip(7)), so a router in front
        of a smaller link fragments a full-size WireGuard datagram instead of dropping it, and an ICMP black hole
        on the path cannot eat it silently; kernel WireGuard clears DF the same way. Linux's default
        (``IP_PMTUDISC_WANT``) sets DF and relies on ICMP fragmentation-needed reaching this socket. IPv6 has no
        router fragmentation (RFC 8200 §5): there the tunnel MTU must fit the path (docs/faults.md).

        Raises:
            ConfigError: the interface does not exist or the options need privileges we lack.
        """
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if interface:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            if fwmark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
            if fragment_outer and family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DONT)
            for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                    break
                except OSError:
                    continue
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot open the helper's UDP socket on interface {interface!r} port {port}: {exc} "
                "(the interface must exist in this namespace; binding to it needs root)"
            ) from None
        return cls(sock)

    def bind_to_device(self, interface: str) -> None:
        """Re-bind the open socket to ``interface`` (SO_BINDTODEVICE again: the port and mark stay), after the
        default route moved to another interface (socket(7): a bound device may be changed; needs CAP_NET_RAW).

        Raises:
            ConfigError: the interface does not exist or we lack the privilege (the old binding stays).
        """
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        except OSError as exc:
            raise ConfigError(f"cannot re-bind the helper's UDP socket to interface {interface!r}: {exc}") from None

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def recv_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Endpoint | None]) -> int:
        recv = self.sock.recvfrom_into
        n = 0
        limit = len(bufs)
        while n < limit:
            try:
                size, addr = recv(bufs[n])
            except BlockingIOError:
                break
            except OSError as exc:
                # Linux reports ICMP errors for earlier sends (server down: port unreachable) on the next receive.
                if exc.errno in _TRANSIENT_RECV:
                    self.recv_errors += 1
                    continue
                raise
            sizes[n] = size
            addrs[n] = addr[:2]
            n += 1
        return n

    def send_segments(self, segments: Sequence[ipc.Buffer], addr: Endpoint) -> str | None:
        """Send ``segments`` to ``addr``: with `gso`, as one ``sendmsg`` the kernel splits into one datagram per
        segment (UDP_SEGMENT, udp(7)); every segment but the last must have the first's size, at most
        `GSO_MAX_SEGMENTS` of them, at most `GSO_MAX_BYTES` in all (the caller groups them so). The scatter list
        goes to the kernel as it is: nothing is copied. All of them are sent, or none (the reason, as `send`).
        Without GSO each segment is sent on its own and the first failure's reason is returned."""
        if len(segments) == 1 or not self.gso:
            reason = None
            for data in segments:
                reason = self.send(data, addr) or reason
            return reason
        try:
            self.sock.sendmsg(segments, [(_SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(len(segments[0])))], 0, addr)
        except BlockingIOError:
            return "udp_eagain"
        except OSError as exc:
            if exc.errno in _NO_GSO:
                self.gso = False  # this kernel or socket cannot: one datagram per send from now on
                return self.send_segments(segments, addr)
            return "udp_no_route" if exc.errno in _NO_ROUTE_SEND else "udp_error"
        self.gso_sends += 1
        self.gso_datagrams += len(segments)
        return None

    def send(self, data: ipc.Buffer, addr: Endpoint) -> str | None:
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            return "udp_eagain"
        except OSError as exc:
            return "udp_no_route" if exc.errno in _NO_ROUTE_SEND else "udp_error"
        return None

    def send_batch(self, datagrams: Sequence[tuple[ipc.Buffer, Endpoint]], reasons: list[str | None]) -> None:
        """Send each datagram (``sendto`` per datagram: no ``sendmmsg`` in Python); ``reasons[i]`` as `send`."""
        send = self.send
        reasons[:] = [send(data, addr) for data, addr in datagrams]

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        self.sock.close()
