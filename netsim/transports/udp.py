"""`UdpTransport`: the helper's UDP socket on the physical interface, as a datagram transport.

Thin I/O adapter (docs/design.md, Layers): open/bind with SO_BINDTODEVICE and SO_MARK, a batch receive into the
caller's buffers (one ``recvmmsg`` per batch with the native accelerator, `netsim.accel`; without it
``recvfrom_into`` until EAGAIN, as Python has no ``recvmmsg``; with UDP GRO a read may hold several datagrams,
split by the segment size the kernel reports), UDP GSO on send, and sends that report a named drop reason instead
of raising. It satisfies `netsim.runtime.driver.DatagramTransport`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, TypeVar

import trio

from netsim import accel
from netsim.core import ipc
from netsim.core.wireguard.peer import Endpoint
from netsim.errors import ConfigError

__all__ = ["UdpTransport"]

_T = TypeVar("_T")

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
# udp(7): UDP_GRO (generic receive offload, Linux 5.0): the kernel may hand one recvmsg several datagrams of one
# flow, back to back, with a SOL_UDP/UDP_GRO cmsg carrying the segment size (an int); every segment but the last
# has that size. Only coalesced reads carry the cmsg.
_UDP_GRO = 104
_GRO_SIZE = struct.Struct("=i")
_GRO_CMSG_SPACE = socket.CMSG_SPACE(_GRO_SIZE.size)
#: Datagrams one GRO read may carry (the kernel's UDP_GRO_CNT_MAX); a read claiming more is a counted drop.
GRO_MAX_SEGMENTS = 64
#: Set to 0 to turn UDP GRO off for every `UdpTransport` (the bench's control; docs/benchmarks.md).
GRO_ENV = "NETSIM_UDP_GRO"
#: The transport's named receive drops (`UdpTransport.rx_drops`): a GRO read longer than the caller's buffer
#: (``gro_truncated``: the kernel cut it, its datagrams are lost) and a segment size that cannot describe the
#: read (``gro_bad_segment``: zero or negative, or more than `GRO_MAX_SEGMENTS` segments). Counted in datagrams
#: where the length tells how many (truncated: the full length is known), else one per read.
#: ``gro_no_room``: a GRO read with more datagrams than the caller's list had slots left (a list shorter than
#: `GRO_MAX_SEGMENTS`; the driver's never is).
#: ``truncated``: a datagram longer than the caller's buffer on the native receive without GRO (the driver's
#: buffers hold 65535 bytes, so only a caller with smaller ones sees it; ``recvfrom_into`` hands such a datagram
#: on cut, which the device then fails to decrypt).
RX_DROP_REASONS = ("gro_truncated", "gro_bad_segment", "gro_no_room", "truncated")
# the native accelerator's batched receive (one recvmmsg per call, docs/native.md); None: pure Python
_native_udp_recv: Any = getattr(accel.native, "udp_recv", None)
_NATIVE_RECV_MAX = 256  # udp_recv's most messages per call
#: The receive buffer `UdpTransport.open` asks for: 7 MiB, wireguard-go's ``socketBufferSize``
#: (conn/controlfns.go, set with SO_RCVBUFFORCE past ``net.core.rmem_max`` on Linux; the kernel doubles it for
#: its bookkeeping, socket(7)). About 17k handshake-sized datagrams (832 bytes of truesize each): what lets the
#: helper ride out a burst it reads more slowly than it arrives, such as a handshake flood from a sender that
#: shares its CPU (S10, docs/helper.md).
SOCKET_BUFFER = 7 << 20
# socket(7) SO_MEMINFO: the socket's sk_meminfo (linux/sock_diag.h), nine u32; index 8 is sk_drops, the datagrams
# the kernel dropped at this socket before anyone read them (receive buffer full, or a socket filter)
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("=9I")
_SK_MEMINFO_DROPS = 8


def _replace_front(lst: list[_T], items: list[_T]) -> None:
    """``lst[:len(items)] = items``, growing ``lst`` when it is shorter, never shrinking it."""
    have = len(lst)
    lst[: min(len(items), have)] = items[:have]
    lst.extend(items[have:])


class _SockFilter(ctypes.Structure):  # linux/filter.h struct sock_filter: one classic BPF instruction
    _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32))


class _SockFprog(ctypes.Structure):  # linux/filter.h struct sock_fprog: the program SO_ATTACH_FILTER takes
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


_SO_ATTACH_FILTER = 26
_SO_DETACH_FILTER = 27
# A UDP socket's filter runs on the datagram from its UDP header on (udp_queue_rcv_one_skb: skb->data is the
# header, skb->len is 8 + the payload), so the payload starts at offset 8. The program drops a datagram that is
# exactly a handshake initiation -- 148 bytes whose first u32 is type 1 with zero reserved bytes, the test
# `netsim.core.wireguard.device.classify_datagram` makes -- and keeps everything else whole (return 0 / ~0).
_INITIATION_FILTER = (_SockFilter * 6)(
    _SockFilter(0x80, 0, 0, 0),  # A = skb->len                     (BPF_LD | BPF_W | BPF_LEN)
    _SockFilter(0x15, 0, 2, 8 + 148),  # A == UDP header + initiation? else keep   (BPF_JMP | BPF_JEQ | BPF_K)
    _SockFilter(0x20, 0, 0, 8),  # A = the payload's first 4 bytes, big-endian  (BPF_LD | BPF_W | BPF_ABS)
    _SockFilter(0x15, 1, 0, 0x01000000),  # bytes 01 00 00 00 (type 1, reserved 0)? drop, else keep
    _SockFilter(0x06, 0, 0, 0xFFFFFFFF),  # keep the whole datagram   (BPF_RET | BPF_K)
    _SockFilter(0x06, 0, 0, 0),  # drop it
)
_INITIATION_FPROG = bytes(_SockFprog(len(_INITIATION_FILTER), _INITIATION_FILTER))  # the kernel copies the program


class UdpTransport:
    """`DatagramTransport` over a non-blocking UDP socket (the helper owns it and closes it).

    Use `UdpTransport.open` to get one bound to the physical interface.
    """

    def __init__(self, sock: socket.socket, *, gso: bool | None = None, gro: bool | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.recv_errors = 0
        #: Whether `send_segments` may use UDP_SEGMENT (off: it sends one datagram per syscall). Turned off for
        #: good when the kernel refuses it (EINVAL/EOPNOTSUPP/ENOPROTOOPT: no GSO on this socket or kernel).
        self.gso = os.environ.get(GSO_ENV, "1") != "0" if gso is None else gso
        self.gso_sends = 0  # sendmsg calls that carried more than one datagram
        self.gso_datagrams = 0  # datagrams they carried
        #: Whether the socket has UDP_GRO on (`recv_batch` then splits coalesced reads). Off when ``gro`` is
        #: False, ``NETSIM_UDP_GRO=0``, or the kernel refuses the option (before Linux 5.0: ENOPROTOOPT).
        self.gro = self._enable_gro(os.environ.get(GRO_ENV, "1") != "0" if gro is None else gro)
        #: Receive syscalls that returned a datagram or a GRO read (datagrams per read = ``rx_datagrams`` /
        #: ``rx_reads``), and reads that carried more than one datagram.
        self.rx_reads = 0
        self.rx_datagrams = 0
        self.gro_reads = 0
        #: Receive syscalls that returned something (one ``recvmmsg`` brings a batch on the native path; without
        #: it, one per read): reads per syscall is what the native receive saves.
        self.rx_syscalls = 0
        # the native receive needs a kernel UDP socket (a stand-in socket some tests pass is not one); its fd is
        # asked for on every call (-1 once closed: EBADF, never a later socket that reused the number)
        self._native_recv = isinstance(sock, socket.socket) and sock.type == socket.SOCK_DGRAM
        self.rx_drops = dict.fromkeys(RX_DROP_REASONS, 0)
        self.tx_sends = 0  # send syscalls that were accepted (datagrams sent = tx_datagrams)
        #: Initiations the kernel dropped while `filter_initiations` was on (``socket_drops`` over those spans),
        #: and how many times it was turned on.
        self.initiations_filtered = 0
        self.filter_spans = 0
        self._filter_drops_at: int | None = None  # `socket_drops` when the filter went on (None: it is off)
        self.tx_datagrams = 0
        # GRO splitting rebinds entries of the caller's list; the originals, restored on the next call
        self._base: list[memoryview] | None = None
        self._base_of: Any = None
        self._dirty = 0  # bufs[1:_dirty] may hold segment views; restored before the next read

    def _enable_gro(self, wanted: bool) -> bool:
        if not wanted:
            return False
        sock = self.sock
        # a UDP socket only (a stand-in object without the option, as some tests pass, reads one at a time)
        if getattr(sock, "type", None) != socket.SOCK_DGRAM or getattr(sock, "family", None) not in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            return False
        try:
            sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)
        except OSError:
            return False  # ENOPROTOOPT (no UDP GRO in this kernel) and the like: one datagram per read
        return True

    @property
    def segments_per_read(self) -> int:
        """Most datagrams one read may put into the caller's list (`recv_batch`): `GRO_MAX_SEGMENTS` with GRO,
        else 1. `netsim.runtime.driver.DatagramDriver` gives its list that many slots past the batch."""
        return GRO_MAX_SEGMENTS if self.gro else 1

    def statistics(self) -> dict[str, Any]:
        """The socket's counters as JSON-ready data (the helper's ``udp`` statistics; docs/helper.md)."""
        drops = self.socket_drops()
        return {
            "gso": self.gso,
            "gro": self.gro,
            "rx_reads": self.rx_reads,
            "rx_datagrams": self.rx_datagrams,
            "gro_reads": self.gro_reads,
            "rx_syscalls": self.rx_syscalls,
            "rx_drops": {k: v for k, v in self.rx_drops.items() if v},
            "recv_errors": self.recv_errors,
            "socket_drops": drops,
            "initiations_filtered": self.initiations_filtered + self._filtering_now(drops),
            "filter_spans": self.filter_spans,
            "tx_sends": self.tx_sends,
            "tx_datagrams": self.tx_datagrams,
            "gso_sends": self.gso_sends,
            "gso_datagrams": self.gso_datagrams,
        }

    def socket_drops(self) -> int | None:
        """Datagrams the kernel dropped at this socket before they were read (SO_MEMINFO ``sk_drops``: the
        receive buffer was full, the usual cause under a flood); None where the socket cannot tell (not a
        kernel socket, or a kernel without SO_MEMINFO). The helper never saw these, so they are outside its
        ledger: this is the only place they are counted."""
        try:
            raw = self.sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size)
        except (OSError, AttributeError, TypeError):
            return None
        if not isinstance(raw, bytes) or len(raw) < _MEMINFO.size:
            return None
        return int(_MEMINFO.unpack_from(raw)[_SK_MEMINFO_DROPS])

    def filter_initiations(self, on: bool) -> bool:
        """Have the kernel drop every handshake initiation that reaches this socket (on), or stop (off).

        The helper turns it on for the rest of a second in which its device, under load, has spent its
        handshake budget and would shed every further initiation unread
        (`netsim.core.wireguard.device.WireGuardDevice.initiations_shed_until`): the flood then costs the helper
        no read at all and cannot crowd transport data out of the receive buffer, whatever its rate. A classic
        BPF socket filter (SO_ATTACH_FILTER, socket(7)) owned by the socket: it goes with the socket, no other
        state of the machine changes. What it drops is counted by the kernel (SO_MEMINFO) and read into
        `initiations_filtered` when the filter goes off (drops for a full buffer in that span, rare once the
        flood is filtered, are counted with them). A GRO read coalescing several initiations is longer than one
        and passes (the device sheds those as before; the lab's veths do no GRO). Returns whether the filter is
        now as asked (False: this socket or kernel has no socket filters; the device still sheds them itself).
        """
        if on == (self._filter_drops_at is not None):
            return True
        # the drop count is read before the filter goes on and after it goes off, so a flood arriving meanwhile
        # has none of its filtered datagrams left out (the filter is the only cause of drops in those gaps)
        at = self.socket_drops() or 0
        try:
            if on:
                self.sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, _INITIATION_FPROG)
            else:
                self.sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        except (OSError, AttributeError, TypeError):
            return False
        if on:
            self._filter_drops_at = at
            self.filter_spans += 1
        else:
            self.initiations_filtered += self._filtering_now()
            self._filter_drops_at = None
        return True

    def _filtering_now(self, drops: int | None = None) -> int:
        """Drops counted since the filter went on (0 when it is off); ``drops``: `socket_drops` if already read."""
        at = self._filter_drops_at
        if at is None:
            return 0
        return max((drops if drops is not None else self.socket_drops() or 0) - at, 0)

    @classmethod
    def open(
        cls,
        family: int = socket.AF_INET,
        *,
        interface: str | None = "en0",
        fwmark: int | None = None,
        port: int = 0,
        rcvbuf: int = SOCKET_BUFFER,
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
        """Receive every ready datagram into the caller's buffers: datagram ``i`` is ``bufs[i][:sizes[i]]`` from
        ``addrs[i]``; returns how many (0 when none is ready).

        With `gro`, one ``recvmsg_into`` may bring up to `GRO_MAX_SEGMENTS` datagrams back to back in
        ``bufs[n]``: they are handed on as memoryview slices of that one read (no copy), by rebinding
        ``bufs[n + 1]``, ``bufs[n + 2]``, ... (so ``bufs`` must be a list; the originals are put back at the
        start of the next call). A read happens only while `segments_per_read` slots are left, so a batch never
        overflows the list: give it ``batch + segments_per_read - 1`` entries (the driver does) and at most
        ``batch`` reads' worth of buffers are read into. A read the buffer could not hold (``MSG_TRUNC``) or
        whose segment size cannot describe it is dropped and counted in `rx_drops`, never raised.

        With the native accelerator the reads of a call are one ``recvmmsg`` (`_recv_native`): the same
        datagrams, lists and counters, one syscall.
        """
        if _native_udp_recv is not None and self._native_recv and type(bufs) is list and type(sizes) is list:
            return self._recv_native(bufs, sizes, addrs)
        if not self.gro:
            return self._recv_plain(bufs, sizes, addrs)
        lst: list[memoryview] = bufs  # type: ignore[assignment]  # a list: GRO rebinds its entries
        self._restore(lst)
        recv = self.sock.recvmsg_into
        drops = self.rx_drops
        n = reads = gro_reads = 0
        limit = len(lst)
        last = max(limit - GRO_MAX_SEGMENTS, 0)  # read only while a full GRO read still fits the list
        while n <= last and n < limit:
            buf = lst[n]
            try:
                nbytes, ancdata, flags, addr = recv((buf,), _GRO_CMSG_SPACE, socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _TRANSIENT_RECV:  # an ICMP error for an earlier send, as in `_recv_plain`
                    self.recv_errors += 1
                    continue
                raise
            reads += 1
            seg = nbytes
            for level, kind, data in ancdata:
                if level == _SOL_UDP and kind == _UDP_GRO and len(data) >= _GRO_SIZE.size:
                    seg = _GRO_SIZE.unpack_from(data)[0]
            if seg <= 0:
                drops["gro_bad_segment"] += 1
                continue
            count = -(-nbytes // seg) if nbytes else 1  # ceil; an empty datagram is one datagram
            if flags & socket.MSG_TRUNC or nbytes > len(buf):
                drops["gro_truncated"] += count  # MSG_TRUNC: nbytes is the full length, not what was copied
                continue
            if count > GRO_MAX_SEGMENTS:
                drops["gro_bad_segment"] += 1
                continue
            if count > limit - n:
                drops["gro_no_room"] += count
                continue
            src = addr[:2]
            if count == 1:
                sizes[n] = nbytes
                addrs[n] = src
                n += 1
                continue
            gro_reads += 1
            off = 0
            for j in range(n, n + count):
                end = off + seg if off + seg < nbytes else nbytes
                if j != n:
                    lst[j] = buf[off:end]
                sizes[j] = end - off
                addrs[j] = src
                off = end
            n += count
            self._dirty = n
        self.rx_reads += reads
        self.rx_syscalls += reads
        self.rx_datagrams += n
        self.gro_reads += gro_reads
        return n

    def _restore(self, lst: list[memoryview]) -> list[memoryview]:
        """Put the caller's own buffers back where the last GRO split rebound entries of ``lst`` (the first call
        with a list records them); returns them. Entries a native split appended past them are left alone."""
        if self._base_of is not lst:
            self._base, self._base_of, self._dirty = list(lst), lst, 0
        assert self._base is not None
        if self._dirty:
            dirty = min(self._dirty, len(self._base))
            lst[:dirty] = self._base[:dirty]
            self._dirty = 0
        return self._base

    def _recv_native(self, lst: list[memoryview], sizes: list[int], addrs: list[Endpoint | None]) -> int:
        """`recv_batch` in one ``recvmmsg`` (the accelerator's ``udp_recv``).

        Without GRO it reads up to ``len(lst)`` datagrams. With GRO it reads as many reads as the batch has
        buffers (the list's length less the `segments_per_read` - 1 spare slots) and splits a coalesced read
        into memoryview slices, moving the later datagrams up; should the reads of one call hold more datagrams
        than the list has slots, the lists grow (once: they keep that length), so nothing read is dropped.
        """
        drops = self.rx_drops
        gro = self.gro
        limit = max(len(self._restore(lst)) - GRO_MAX_SEGMENTS + 1, 1) if gro else len(lst)
        limit = min(limit, _NATIVE_RECV_MAX, len(sizes), len(addrs))
        if limit < 1:
            return 0
        n, coalesced, truncated, transient, err = _native_udp_recv(self.sock.fileno(), lst, sizes, addrs, limit, gro)
        self.recv_errors += transient
        if truncated:
            drops["gro_truncated" if gro else "truncated"] += truncated
        if err:
            raise OSError(err, os.strerror(err))  # as recvfrom_into raises it; nothing was read in this call
        if n:
            self.rx_syscalls += 1
        self.rx_reads += n
        if coalesced is not None:
            n = self._split_coalesced(lst, sizes, addrs, n, coalesced)
        self.rx_datagrams += n
        return int(n)

    def _split_coalesced(
        self, lst: list[memoryview], sizes: list[int], addrs: list[Endpoint | None], n: int, coalesced: list[Any]
    ) -> int:
        """The native GRO receive's rare path: reads ``coalesced`` ((index, segment size), ascending) of the
        ``n`` in the lists each become their datagrams, as slices of their buffer, in order."""
        drops = self.rx_drops
        out_views: list[memoryview] = []
        out_sizes: list[int] = []
        out_addrs: list[Endpoint | None] = []
        segs = dict(coalesced)
        for j in range(n):
            view, size, addr = lst[j], sizes[j], addrs[j]
            seg = segs.get(j)
            if seg is None:
                out_views.append(view)
                out_sizes.append(size)
                out_addrs.append(addr)
                continue
            if seg <= 0 or -(-size // seg) > GRO_MAX_SEGMENTS:
                drops["gro_bad_segment"] += 1
                continue
            self.gro_reads += 1
            for off in range(0, size, seg):
                end = min(off + seg, size)
                out_views.append(view[off:end])
                out_sizes.append(end - off)
                out_addrs.append(addr)
        count = len(out_views)
        _replace_front(lst, out_views)
        _replace_front(sizes, out_sizes)
        _replace_front(addrs, out_addrs)
        self._dirty = count
        return count

    def _recv_plain(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Endpoint | None]) -> int:
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
        self.rx_reads += n
        self.rx_syscalls += n
        self.rx_datagrams += n
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
        self.tx_sends += 1
        self.tx_datagrams += len(segments)
        return None

    def send(self, data: ipc.Buffer, addr: Endpoint) -> str | None:
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            return "udp_eagain"
        except OSError as exc:
            return "udp_no_route" if exc.errno in _NO_ROUTE_SEND else "udp_error"
        self.tx_sends += 1
        self.tx_datagrams += 1
        return None

    def send_batch(self, datagrams: Sequence[tuple[ipc.Buffer, Endpoint]], reasons: list[str | None]) -> None:
        """Send each datagram (``sendto`` per datagram: no ``sendmmsg`` in Python); ``reasons[i]`` as `send`."""
        send = self.send
        reasons[:] = [send(data, addr) for data, addr in datagrams]

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def close(self) -> None:
        self.sock.close()
