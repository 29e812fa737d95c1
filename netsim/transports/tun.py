"""Linux TUN device as a utun stand-in: a `netsim.transports.base.PacketDevice` over a non-blocking fd.

Created with ``IFF_TUN | IFF_NO_PI`` so the fd carries bare IP packets (no ``struct tun_pi``), and never made
persistent (no ``TUNSETPERSIST``), so the interface disappears when the last fd closes -- a SIGKILLed owner leaves
nothing behind (reliability.md B10). The device is opened in a thread that has ``setns``'d into the target
namespace; the fd keeps that namespace for life.

Optional *utun framing* reproduces what a macOS utun control socket does: every packet carries a 4-byte,
big-endian address-family word in front (``AF_INET`` = 2, Darwin ``AF_INET6`` = 30; apple-reference §2, as
wireguard-go's ``tun_darwin.go`` writes it). In that mode `read_into` puts the header at ``offset`` and the
packet after it; `write_packets` expects it there and strips it.

Errors: when the interface is deleted under an open fd (``ip link del utun0``) Linux answers reads and writes
with ``EBADFD``; that, like using a closed device, surfaces as `netsim.errors.TunnelDown`.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from netsim.errors import LocalProtocolError, PrivilegeError, TunnelDown

__all__ = ["AF_INET6_DARWIN", "UTUN_HEADER", "TunDevice", "TunStatistics"]

Buffer = bytes | bytearray | memoryview

AF_INET_DARWIN = 2
AF_INET6_DARWIN = 30  # Darwin's AF_INET6 (Linux uses 10)
UTUN_HEADER = struct.Struct("!I")
_HDR_V4 = UTUN_HEADER.pack(AF_INET_DARWIN)
_HDR_V6 = UTUN_HEADER.pack(AF_INET6_DARWIN)
_IFREQ_INT = struct.Struct("16si12x")  # struct ifreq with an int member (ifr_mtu / ifr_flags)
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _SIOCGIFMTU, _SIOCSIFMTU = 0x8913, 0x8914, 0x8921, 0x8922
_IFF_UP = 0x1
_GONE_ERRNOS = frozenset({errno.EBADFD, errno.ENODEV, errno.ENXIO, errno.EBADF})


@dataclass(frozen=True)
class TunStatistics:
    """Counters of a packet device (`TunDevice` or `netsim.testing.MemoryTun`).

    ``dropped`` maps a reason (``too_big``, ``truncated``, ``rejected``, ``queue_full``, ``bad_family``,
    ``empty``) to a count. ``kernel_tx_dropped`` is the interface's tx_dropped counter from /proc/net/dev (packets
    the kernel could not queue to the reader), when read; None otherwise.
    """

    packets_read: int = 0
    bytes_read: int = 0
    packets_written: int = 0
    bytes_written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kernel_tx_dropped: int | None = None


class TunDevice:
    """A TUN interface (``utunN`` by default) in a network namespace, with batch non-blocking I/O."""

    def __init__(
        self, fd_owner: object, fd: int, name: str, netns: str | None, ctl: socket.socket, *, utun_framing: bool
    ) -> None:
        self._owner = fd_owner  # the pytun object that owns the fd
        self._fd: int | None = fd
        self._fio: io.FileIO | None = None  # a no-allocation reader over the fd (not owning it)
        self._name = name
        self._netns = netns
        self._ctl = ctl  # AF_INET socket in the same namespace, for interface ioctls
        self.utun_framing = utun_framing
        self._hdr = 4 if utun_framing else 0
        self._mtu = self._ioctl_int(_SIOCGIFMTU)
        self.packets_read = 0
        self.bytes_read = 0
        self.packets_written = 0
        self.bytes_written = 0
        self._dropped: dict[str, int] = {}

    @classmethod
    def create(
        cls,
        netns: str | None = None,
        name: str = "utun%d",
        *,
        mtu: int | None = None,
        up: bool = True,
        utun_framing: bool = False,
    ) -> TunDevice:
        """Create the device in ``netns`` (None: the caller's namespace). ``%d`` in ``name`` picks the lowest free
        number, like utun. ``up`` brings the link up (it then has carrier, since this fd is attached)."""
        import pytun

        if len(name.replace("%d", "0")) > 15:
            raise LocalProtocolError(f"interface name {name!r} is longer than 15 characters")

        def open_dev() -> tuple[object, socket.socket]:
            try:
                dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
            except pytun.Error as exc:
                raise PrivilegeError(f"cannot create TUN {name!r}: {exc}; needs root and /dev/net/tun") from exc
            return dev, socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        if netns is None:
            owner, ctl = open_dev()
        else:
            from netsim.lab.netns import run_in_netns

            owner, ctl = run_in_netns(netns, open_dev)
        fd = owner.fileno()  # type: ignore[attr-defined]
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)  # a child holding the fd would keep the interface alive after we close it
        dev = cls(owner, fd, owner.name, netns, ctl, utun_framing=utun_framing)  # type: ignore[attr-defined]
        if mtu is not None:
            dev.set_mtu(mtu)
        if up:
            dev.set_up()
        return dev

    def __repr__(self) -> str:
        return f"<TunDevice {self._name} netns={self._netns} fd={self._fd}>"

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """Interface name, e.g. ``utun0``."""
        return self._name

    @property
    def netns(self) -> str | None:
        """Namespace the device lives in (None: the creator's)."""
        return self._netns

    @property
    def mtu(self) -> int:
        """MTU in bytes (cached; `set_mtu` updates it)."""
        return self._mtu

    def fileno(self) -> int:
        """The TUN fd; raises `TunnelDown` if closed."""
        return self._live_fd()

    def set_mtu(self, mtu: int) -> None:
        """Set the interface MTU (SIOCSIFMTU)."""
        self._ioctl_int(_SIOCSIFMTU, mtu)
        self._mtu = self._ioctl_int(_SIOCGIFMTU)

    def set_up(self) -> None:
        """Set IFF_UP (SIOCSIFFLAGS)."""
        flags = self._ioctl_int(_SIOCGIFFLAGS)
        self._ioctl_int(_SIOCSIFFLAGS, flags | _IFF_UP)

    def _ioctl_int(self, request: int, value: int = 0) -> int:
        req = _IFREQ_INT.pack(self._name.encode(), value)
        try:
            res = fcntl.ioctl(self._ctl.fileno(), request, req)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise TunnelDown(f"{self._name} no longer exists") from exc
            raise
        return int(_IFREQ_INT.unpack(res)[1])

    def _live_fd(self) -> int:
        if self._fd is None:
            raise TunnelDown(f"{self._name} is closed")
        return self._fd

    def _gone(self, exc: OSError) -> TunnelDown:
        return TunnelDown(f"{self._name}: {os.strerror(exc.errno or 0)} (device deleted?)")

    def _drop(self, reason: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + 1

    # ------------------------------------------------------------------ I/O
    def read_into(self, bufs: Sequence[bytearray], sizes: list[int], offset: int = 0) -> int:
        """Read ready packets into ``bufs[i][offset:]`` until EAGAIN or ``len(bufs)``; see `PacketDevice`.

        Each buffer needs ``offset + mtu`` bytes (+4 with utun framing), else `LocalProtocolError`; a packet
        longer than the MTU (possible only if the MTU shrank meanwhile) is counted as ``truncated`` and dropped.
        """
        reader = self._reader()
        if len(sizes) < len(bufs):
            raise LocalProtocolError("sizes must have at least len(bufs) entries")
        hdr = self._hdr
        need = offset + hdr + self._mtu
        for buf in bufs:
            if len(buf) < need:
                raise LocalProtocolError(f"read buffers need offset + mtu{' + 4' if hdr else ''} = {need} bytes")
        count = 0
        # At most len(bufs) reads (a device that keeps returning empty reads cannot spin us); packet i always
        # lands in bufs[i], also after a dropped read.
        for _ in range(len(bufs)):
            buf = bufs[count]
            view = memoryview(buf)[offset + hdr :]
            try:
                # FileIO.readinto: no allocation, and ~300 ns cheaper per call than os.readv (netsim/bench/).
                n = reader.readinto(view)
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    raise self._gone(exc) from exc
                raise
            if n is None:  # EAGAIN on the non-blocking fd
                break
            if n == 0:
                self._drop("empty")
                continue
            # A packet longer than the buffer is cut short by the kernel: catch it by its own IP length field.
            version = view[0] >> 4
            if version == 4:
                declared = (view[2] << 8) | view[3]
            elif version == 6:
                declared = 40 + ((view[4] << 8) | view[5])
            else:
                declared = n
            if n > self._mtu or (n >= 6 and declared > n):
                self._drop("truncated")
                continue
            if hdr:
                buf[offset : offset + 4] = _HDR_V6 if version == 6 else _HDR_V4
            sizes[count] = n + hdr
            count += 1
            self.packets_read += 1
            self.bytes_read += n
            if count == len(bufs):
                break
        return count

    def _reader(self) -> io.FileIO:
        fd = self._live_fd()
        if self._fio is None or self._fio.fileno() != fd:
            self._fio = io.FileIO(fd, "rb", closefd=False)
        return self._fio

    def read_packets(self, limit: int) -> list[bytes]:
        """Read up to ``limit`` ready packets as owned bytes (with the utun header in framing mode)."""
        fd = self._live_fd()
        out: list[bytes] = []
        size = self._mtu + 1
        while len(out) < limit:
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    raise self._gone(exc) from exc
                raise
            if not data:
                self._drop("empty")
                continue
            if len(data) > self._mtu:
                self._drop("truncated")
                continue
            self.packets_read += 1
            self.bytes_read += len(data)
            if self._hdr:
                data = (_HDR_V6 if data[0] >> 4 == 6 else _HDR_V4) + data
            out.append(data)
        return out

    def write_packets(self, packets: Sequence[Buffer], offset: int = 0) -> int:
        """Write a batch; refused packets are dropped and counted (see `TunStatistics`); never blocks."""
        fd = self._live_fd()
        hdr = self._hdr
        accepted = 0
        for pkt in packets:
            view = memoryview(pkt)[offset:]
            if hdr:
                if len(view) < 4 or bytes(view[:4]) not in (_HDR_V4, _HDR_V6):
                    self._drop("bad_family")
                    continue
                view = view[4:]
            n = len(view)
            if n == 0:
                self._drop("empty")
                continue
            if n > self._mtu:
                self._drop("too_big")
                continue
            try:
                os.write(fd, view)
            except BlockingIOError:
                self._drop("queue_full")
                continue
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    raise self._gone(exc) from exc
                if exc.errno == errno.ENOBUFS:
                    self._drop("queue_full")
                else:
                    self._drop("rejected")  # EINVAL etc.: the kernel refused this packet
                continue
            accepted += 1
            self.packets_written += 1
            self.bytes_written += n
        return accepted

    async def wait_readable(self) -> None:
        """Wait until a packet is ready or the device is gone/closed (then `TunnelDown` on the next call)."""
        fd = self._live_fd()
        try:
            await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:
            raise TunnelDown(f"{self._name} was closed") from None
        if self._fd is None:
            raise TunnelDown(f"{self._name} was closed")

    def close(self) -> None:
        """Close the fd (the interface vanishes: it is not persistent); wakes waiters with `TunnelDown`."""
        fd, self._fd = self._fd, None
        self._fio = None
        if fd is None:
            return
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:
            pass  # not inside trio.run: nobody can be waiting
        self._owner.close()  # type: ignore[attr-defined]
        self._ctl.close()

    # ------------------------------------------------------------------ stats
    def statistics(self) -> TunStatistics:
        """Counters kept by this object (cheap; no syscalls)."""
        return TunStatistics(
            self.packets_read, self.bytes_read, self.packets_written, self.bytes_written, dict(self._dropped)
        )

    def kernel_statistics(self) -> TunStatistics:
        """`statistics` plus the kernel's tx_dropped for this interface (reads /proc net/dev in the namespace)."""

        def read() -> str:
            return Path("/proc/thread-self/net/dev").read_text()

        if self._netns is None:
            text = read()
        else:
            from netsim.lab.netns import run_in_netns

            text = run_in_netns(self._netns, read)
        tx_dropped: int | None = None
        for line in text.splitlines()[2:]:
            ifname, _, rest = line.partition(":")
            if ifname.strip() == self._name:
                tx_dropped = int(rest.split()[11])
        base = self.statistics()
        return TunStatistics(
            base.packets_read, base.bytes_read, base.packets_written, base.bytes_written, base.dropped, tx_dropped
        )
