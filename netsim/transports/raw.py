"""The NAT bypass's network side: raw IP egress and packet-socket capture on the physical interface.

* **Egress**: ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`` implies ``IP_HDRINCL`` (raw(7)): the kernel sends our
  header as is, filling in only the IPv4 header checksum and total length. ``AF_INET6``/``IPPROTO_RAW`` implies
  ``IPV6_HDRINCL`` likewise (Linux >= 4.5). Both are bound to ``en0`` (``SO_BINDTODEVICE``) and carry the bypass
  fwmark (``SO_MARK``), so the tunnel's policy-routing rule skips them and they never loop into the utun.
* **Capture**: an ``AF_PACKET``/``SOCK_DGRAM`` socket on ``en0`` (packet(7)) with the classic BPF filter of
  `netsim.core.bpf.capture_filter`. The socket is created with protocol 0 (it receives nothing), the filter
  attached, and only then bound, so no unfiltered frame is ever queued. A packet socket sees frames before the IP
  stack, so the capture wins the race with the host's own stack by construction.
* **Offload**: the ``PACKET_AUXDATA`` control message says when a frame's transport checksum is partial
  (``TP_STATUS_CSUMNOTREADY``) or it is a TCP GSO super-packet (``TP_STATUS_GSO_TCP``): reported as ``FLAG_*``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import trio

from netsim.core.bpf import SOCK_FILTER, capture_filter
from netsim.core.nat import NatConfig
from netsim.core.packet import Buffer
from netsim.errors import ConfigError, PrivilegeError

__all__ = [
    "FLAG_CSUM_NOT_READY",
    "FLAG_GSO_TCP",
    "BypassTransport",
    "RawBypassTransport",
    "interface_addresses",
]

#: Per-frame flags from `BypassTransport.recv_batch`: the transport checksum is partial (offload).
FLAG_CSUM_NOT_READY = 1
#: The frame is a TCP GSO super-packet (may exceed the utun MTU).
FLAG_GSO_TCP = 2

# <linux/if_packet.h>, <linux/filter.h>, <linux/if_ether.h>
_SOL_PACKET = 263
_PACKET_AUXDATA = 8
_TP_STATUS_CSUMNOTREADY = 1 << 3
_TP_STATUS_GSO_TCP = 1 << 8
_AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata
_AUX_SPACE = socket.CMSG_SPACE(_AUXDATA.size)
_SO_ATTACH_FILTER = 26
_ETH_P_ALL = 0x0003


class BypassTransport(Protocol):
    """The NAT bypass's network side: send rewritten packets out of the physical interface, capture replies."""

    def send(self, packet: Buffer, version: int, dst: bytes) -> str | None:
        """Send one IP packet (header included) to ``dst``; None, or the drop reason."""
        ...

    def recv_batch(self, bufs: Sequence[memoryview], sizes: list[int], flags: list[int]) -> int:
        """Receive every ready captured packet, up to ``len(bufs)``; ``flags`` gets ``FLAG_*`` bits per packet."""
        ...

    async def wait_readable(self) -> None:
        """Block until a captured packet may be ready."""
        ...

    def close(self) -> None:
        """Release the sockets; idempotent."""
        ...


class RawBypassTransport:
    """`BypassTransport` over raw IP sockets (egress) and an ``AF_PACKET`` socket with a BPF filter (capture).

    Use `RawBypassTransport.open` inside the namespace of the simulated Mac.
    """

    def __init__(self, raw4: socket.socket | None, raw6: socket.socket | None, capture: socket.socket) -> None:
        self.raw4 = raw4
        self.raw6 = raw6
        self.capture = capture
        self.recv_errors = 0
        self._closed = False

    @classmethod
    def open(
        cls,
        interface: str,
        config: NatConfig,
        *,
        fwmark: int | None = None,
        rcvbuf: int = 4 << 20,
    ) -> RawBypassTransport:
        """Open the egress sockets bound to ``interface`` and the capture socket filtered for ``config``.

        Raises:
            PrivilegeError: raw and packet sockets need CAP_NET_RAW (root).
            ConfigError: the interface does not exist here, or the NAT has no external address.
        """
        if config.external_v4 is None and config.external_v6 is None:
            raise ConfigError("the NAT bypass needs en0's address: NatConfig(external_v4=... and/or external_v6=...)")
        opened: list[socket.socket] = []
        try:
            raws: list[socket.socket | None] = []
            for family, ext in ((socket.AF_INET, config.external_v4), (socket.AF_INET6, config.external_v6)):
                if ext is None:
                    raws.append(None)
                    continue
                s = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
                opened.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
                if fwmark:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
                s.setblocking(False)
                raws.append(s)
            cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # protocol 0: receives nothing yet
            opened.append(cap)
            program = capture_filter(config.external_v4, config.external_v6, config.port_range)  # type: ignore[arg-type]
            _attach_filter(cap, program)
            cap.setsockopt(_SOL_PACKET, _PACKET_AUXDATA, 1)
            for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
                try:
                    cap.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                    break
                except OSError:
                    continue
            cap.bind((interface, _ETH_P_ALL))
            cap.setblocking(False)
        except PermissionError as exc:
            for s in opened:
                s.close()
            raise PrivilegeError(f"the NAT bypass needs CAP_NET_RAW for raw and packet sockets: {exc}") from None
        except OSError as exc:
            for s in opened:
                s.close()
            raise ConfigError(f"cannot open the NAT bypass sockets on {interface!r}: {exc}") from None
        return cls(raws[0], raws[1], cap)

    def send(self, packet: Buffer, version: int, dst: bytes) -> str | None:
        if version == 4:
            sock, addr = self.raw4, (socket.inet_ntop(socket.AF_INET, dst), 0)
        else:
            sock, addr = self.raw6, (socket.inet_ntop(socket.AF_INET6, dst), 0)
        if sock is None:
            return "raw_no_socket"
        try:
            sock.sendto(packet, addr)
        except BlockingIOError:
            return "raw_eagain"
        except OSError:
            return "raw_error"
        return None

    def recv_batch(self, bufs: Sequence[memoryview], sizes: list[int], flags: list[int]) -> int:
        recv = self.capture.recvmsg_into
        n = 0
        limit = len(bufs)
        while n < limit:
            try:
                size, anc, _, _ = recv([bufs[n]], _AUX_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.ENETDOWN, errno.ENOBUFS):
                    self.recv_errors += 1
                    continue
                raise
            f = 0
            for level, kind, data in anc:
                if level == _SOL_PACKET and kind == _PACKET_AUXDATA and len(data) >= 4:
                    (status,) = struct.unpack_from("=I", data)
                    if status & _TP_STATUS_CSUMNOTREADY:
                        f |= FLAG_CSUM_NOT_READY
                    if status & _TP_STATUS_GSO_TCP:
                        f |= FLAG_GSO_TCP
            sizes[n] = size
            flags[n] = f
            n += 1
        return n

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.capture)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in (self.raw4, self.raw6, self.capture):
            if s is not None:
                s.close()


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (<linux/filter.h>)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // SOCK_FILTER.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)  # the kernel copies the program


_SIOCGIFADDR = 0x8915  # <linux/sockios.h>


def interface_addresses(interface: str) -> tuple[str | None, str | None]:
    """The first IPv4 address and the first non-link-local IPv6 address of ``interface`` (this namespace).

    Reads them the way ``ifconfig`` does (``SIOCGIFADDR``) and from ``/proc/net/if_inet6``, so the helper needs
    no netlink library for it.
    """
    v4: str | None = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            req = struct.pack("256s", interface.encode()[:15])
            v4 = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
        except OSError:
            v4 = None
    v6: str | None = None
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5] == interface:
            addr = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            if not addr.is_link_local:
                v6 = str(addr)
                break
    return v4, v6
