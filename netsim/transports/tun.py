"""Linux TUN device as a utun stand-in: a `netsim.transports.base.PacketDevice` over a non-blocking fd.

Created with ``IFF_TUN | IFF_NO_PI`` so the fd carries bare IP packets (no ``struct tun_pi``), and never made
persistent (no ``TUNSETPERSIST``), so the interface disappears when the last fd closes -- a SIGKILLed owner leaves
nothing behind (docs/reliability.md, lesson B10). The device is opened in a thread that has ``setns``'d into the target
namespace; the fd keeps that namespace for life.

Optional *utun framing* reproduces what a macOS utun control socket does: every packet carries a 4-byte, big-endian
address-family word in front (``AF_INET`` = 2, Darwin ``AF_INET6`` = 30; Apple R2, docs/apple-mapping.md; as
wireguard-go's ``tun_darwin.go`` writes it; the numbers and header bytes come from `netsim.core.family`). In that mode
`read_packets` prepends the header and `write_packets` expects it and strips it.

Reads return owned ``bytes`` (`read_packets`): measured faster than a wireguard-go style ``read_into`` over reused
buffers with headroom (``micro/tun-read``: about 1.0 us/packet against 1.3 us for ``readinto`` plus the bookkeeping
it needs), and the owned bytes can go straight into an IPC frame without a copy or a buffer lifetime rule.

Validation: `write_packets` checks every packet (framing, empty, longer than the MTU) and counts what it drops,
so the device is safe to use directly. `netsim.runtime.flow.PacketTunnelFlow` already checks the same things
(and counts them under Apple-facing names), so it passes ``validated=True`` and each packet is checked once.

Statistics: `statistics` never does I/O (safe on the event loop, under load). `kernel_statistics` reads the
interface's kernel counters (``/proc/net/dev`` inside the namespace, a thread hop): call it explicitly, off the
hot path; `statistics` then reports the ``kernel_tx_dropped`` it read, as of that call.

Errors: when the interface is deleted under an open fd (``ip link del utun0``) Linux answers reads and writes
with ``EBADFD``; that, like using a closed device, surfaces as `netsim.errors.TunnelDown`.

TUN offloads (opt-in, ``create(offload=True)``; docs/helper.md, "TUN offloads"): the fd carries a virtio_net_hdr,
the kernel may hand a read a TSO/USO super-packet and take a coalesced write; `TunDevice.read_offload_packets` and
`TunDevice.write_coalesced` speak it (their own block below), and every packet they return is still a wire packet.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from netsim import accel
from netsim.core.family import UTUN_HEADER_SIZE, UTUN_HEADER_V4, UTUN_HEADER_V6
from netsim.core.segment import (
    GRO_MIN,
    VNET_F_NEEDS_CSUM,
    VNET_GSO_NONE,
    VNET_HDR_SIZE,
    VNET_PLAIN,
    coalesce_tcp,
    parse_vnet_header_untrusted,
    split_gso_untrusted,
)
from netsim.errors import BadPacket, ConfigError, LocalProtocolError, PrivilegeError, TunnelDown

__all__ = [
    "TUN_F_ALL",
    "TUN_OFFLOAD_ENV",
    "TunDevice",
    "TunStatistics",
    "tun_offload_from_env",
]

Buffer = bytes | bytearray | memoryview

_UTUN_HEADERS = (UTUN_HEADER_V4, UTUN_HEADER_V6)
_IFREQ_INT = struct.Struct("16si12x")  # struct ifreq with an int member (ifr_mtu / ifr_flags)
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _SIOCGIFMTU, _SIOCSIFMTU = 0x8913, 0x8914, 0x8921, 0x8922
_IFF_UP = 0x1
_GONE_ERRNOS = frozenset({errno.EBADFD, errno.ENODEV, errno.ENXIO, errno.EBADF})
# the native accelerator's batched read(2)/write(2) (`netsim.accel`, docs/native.md); None: pure Python
_native: Any = accel.native
_NATIVE_MAX_READ = 65536  # tun_read's largest read size (mtu + 1)
_NATIVE_WRITE_DROPS = ("bad_family", "empty", "too_big", "queue_full", "rejected")  # tun_write's drop tuple order

# ---- TUN offloads (linux/if_tun.h): the vnet header and TUNSETOFFLOAD; methods in their block of TunDevice ----
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
TUN_F_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
TUN_F_ALL = TUN_F_OFFLOADS | TUN_F_USO4 | TUN_F_USO6  # USO: Linux 6.2+ (older kernels: TUN_F_OFFLOADS)
#: ``NETSIM_TUN_OFFLOAD``: the utun a provider process creates (`tun_offload_from_env`; docs/helper.md).
TUN_OFFLOAD_ENV = "NETSIM_TUN_OFFLOAD"
_OFFLOAD_MODES = {"": None, "0": None, "off": None, "gro": 0, "1": TUN_F_ALL, "tso": TUN_F_ALL}


def tun_offload_from_env(environ: Mapping[str, str] = os.environ) -> int | None:
    """The TUN offloads ``NETSIM_TUN_OFFLOAD`` asks for: None (unset, ``0``, ``off``: no vnet header, the
    default), ``0`` (``gro``: vnet header, coalesced writes, whole packets on reads) or `TUN_F_ALL` (``tso`` or
    ``1``: also TSO/USO super-packets on reads, cut in Python).

    Raises:
        ConfigError: any other value (says which are allowed).
    """
    value = environ.get(TUN_OFFLOAD_ENV, "").strip().lower()
    if value not in _OFFLOAD_MODES:
        raise ConfigError(f"{TUN_OFFLOAD_ENV}={value!r}: use 0/off, gro, or tso/1", source=TUN_OFFLOAD_ENV)
    return _OFFLOAD_MODES[value]


@dataclass(frozen=True)
class TunStatistics:
    """Counters of a packet device (`TunDevice` or `netsim.testing.MemoryTun`).

    ``dropped`` maps a reason (``too_big``, ``truncated``, ``rejected``, ``queue_full``, ``bad_family``,
    ``empty``) to a count. ``kernel_tx_dropped`` is the interface's tx_dropped counter from /proc/net/dev (packets
    the kernel could not queue to the reader) as of the last `TunDevice.kernel_statistics` call; None if it was
    never read (`MemoryTun` always reports its own queue drops here).

    With TUN offloads (``TunDevice.create(offload=True)``): ``super_packets_read`` reads that carried a GSO
    super-packet, ``segments_read`` the packets they were cut into; ``super_packets_written`` coalesced writes,
    ``segments_written`` the packets merged into them; ``dropped`` also holds the vnet header's reasons
    (``vnet_*``, `netsim.core.segment.VNET_REASONS`).
    """

    packets_read: int = 0
    bytes_read: int = 0
    packets_written: int = 0
    bytes_written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kernel_tx_dropped: int | None = None
    super_packets_read: int = 0
    segments_read: int = 0
    super_packets_written: int = 0
    segments_written: int = 0


class TunDevice:
    """A TUN interface (``utunN`` by default) in a network namespace, with batch non-blocking I/O."""

    def __init__(
        self, fd_owner: object, fd: int, name: str, netns: str | None, ctl: socket.socket, *, utun_framing: bool
    ) -> None:
        self._owner = fd_owner  # the pytun object that owns the fd
        self._fd: int | None = fd
        self._name = name
        self._netns = netns
        self._ctl = ctl  # AF_INET socket in the same namespace, for interface ioctls
        self.utun_framing = utun_framing
        self._hdr = UTUN_HEADER_SIZE if utun_framing else 0
        self._mtu = self._ioctl_int(_SIOCGIFMTU)
        self.packets_read = 0
        self.bytes_read = 0
        self.packets_written = 0
        self.bytes_written = 0
        self._dropped: dict[str, int] = {}
        self._kernel_tx_dropped: int | None = None  # as of the last kernel_statistics()
        self._vnet = False  # IFF_VNET_HDR: every read and write starts with a virtio_net_hdr ("TUN offloads")
        self.offload_flags = 0  # TUN_F_* in effect
        self.super_packets_read = 0
        self.segments_read = 0
        self.super_packets_written = 0
        self.segments_written = 0

    @classmethod
    def create(
        cls,
        netns: str | None = None,
        name: str = "utun%d",
        *,
        mtu: int | None = None,
        up: bool = True,
        utun_framing: bool = False,
        offload: bool = False,
        offload_flags: int = TUN_F_ALL,
    ) -> TunDevice:
        """Create the device in ``netns`` (None: the caller's namespace). ``%d`` in ``name`` picks the lowest free
        number, like utun. ``up`` brings the link up (it then has carrier, since this fd is attached).
        ``offload``: open it with ``IFF_VNET_HDR``, reads getting ``offload_flags`` (`set_offload`; see "TUN
        offloads" below; not with framing)."""
        import pytun

        if len(name.replace("%d", "0")) > 15:
            raise LocalProtocolError(f"interface name {name!r} is longer than 15 characters")

        if offload and utun_framing:
            raise LocalProtocolError("offload needs bare packets: utun_framing=True cannot carry a vnet header")
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (IFF_VNET_HDR if offload else 0)

        def open_dev() -> tuple[object, socket.socket]:
            try:
                dev = pytun.TunTapDevice(name=name, flags=flags)
            except pytun.Error as exc:
                raise PrivilegeError(f"cannot create TUN {name!r}: {exc}; needs root and /dev/net/tun") from exc
            return dev, socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

        if netns is None:
            owner, ctl = open_dev()
        else:
            from netsim.transports.netns import run_in_netns

            owner, ctl = run_in_netns(netns, open_dev)
        fd = owner.fileno()  # type: ignore[attr-defined]
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)  # a child holding the fd would keep the interface alive after we close it
        dev = cls(owner, fd, owner.name, netns, ctl, utun_framing=utun_framing)  # type: ignore[attr-defined]
        if offload:
            dev._vnet = True
            try:
                dev.set_offload(offload_flags)
            except BaseException:
                dev.close()
                raise
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
    def read_packets(self, limit: int) -> list[bytes]:
        """Read up to ``limit`` ready packets as owned bytes (with the utun header in framing mode)."""
        fd = self._live_fd()
        size = self._mtu + 1
        if _native is not None and size <= _NATIVE_MAX_READ:  # the same packets, counters and errors, one C call
            hdrs = (UTUN_HEADER_V4, UTUN_HEADER_V6) if self._hdr else (b"", b"")
            packets, empty, truncated, nbytes, err = _native.tun_read(fd, limit, size, *hdrs)
            for reason, count in (("empty", empty), ("truncated", truncated)):
                if count:
                    self._dropped[reason] = self._dropped.get(reason, 0) + count
            self.packets_read += len(packets)
            self.bytes_read += nbytes
            if err:
                exc = OSError(err, os.strerror(err))
                if err in _GONE_ERRNOS:
                    raise self._gone(exc) from exc
                raise exc
            return packets  # type: ignore[no-any-return]
        out: list[bytes] = []
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
                data = (UTUN_HEADER_V6 if data[0] >> 4 == 6 else UTUN_HEADER_V4) + data
            out.append(data)
        return out

    def write_packets(self, packets: Sequence[Buffer], offset: int = 0, *, validated: bool = False) -> int:
        """Write a batch; refused packets are dropped and counted (see `TunStatistics`); never blocks.

        Args:
            packets: bare IP packets (with the utun header in framing mode), each starting at ``offset``.
            offset: headroom to skip in every buffer.
            validated: the caller guarantees every packet is non-empty and at most `mtu` bytes (what
                `PacketTunnelFlow` checks and counts itself), so the device does not check again. Honoured only
                without framing and offset; otherwise every packet is checked as usual.
        """
        fd = self._live_fd()
        if _native is not None:  # the same writes, drops and errors as below, one C call
            check = not validated or bool(self._hdr) or bool(offset)
            hdrs = (UTUN_HEADER_V4, UTUN_HEADER_V6) if self._hdr else (b"", b"")
            accepted, nbytes, drops, err = _native.tun_write(fd, packets, offset, *hdrs, self._mtu, check)
            for reason, count in zip(_NATIVE_WRITE_DROPS, drops, strict=True):
                if count:
                    self._dropped[reason] = self._dropped.get(reason, 0) + count
            self.packets_written += accepted
            self.bytes_written += nbytes
            if err:
                exc = OSError(err, os.strerror(err))
                raise self._gone(exc) from exc
            return accepted  # type: ignore[no-any-return]
        if validated and not self._hdr and not offset:
            return self._write_validated(fd, packets)
        hdr = self._hdr
        accepted = 0
        for pkt in packets:
            view = memoryview(pkt)[offset:]
            if hdr:
                if len(view) < hdr or view[:hdr] not in _UTUN_HEADERS:
                    self._drop("bad_family")
                    continue
                view = view[hdr:]
            n = len(view)
            if n == 0:
                self._drop("empty")
                continue
            if n > self._mtu:
                self._drop("too_big")
                continue
            try:
                os.write(fd, view)
            except OSError as exc:
                self._refused(exc)
                continue
            accepted += 1
            self.packets_written += 1
            self.bytes_written += n
        return accepted

    def _write_validated(self, fd: int, packets: Sequence[Buffer]) -> int:
        """`write_packets` for packets the caller already checked: one ``os.write`` each, nothing else."""
        write = os.write
        accepted = nbytes = 0
        try:
            for pkt in packets:
                try:
                    nbytes += write(fd, pkt)
                except OSError as exc:
                    self._refused(exc)  # raises TunnelDown when the device is gone: the finally still counts
                    continue
                accepted += 1
        finally:
            self.packets_written += accepted
            self.bytes_written += nbytes
        return accepted

    def _refused(self, exc: OSError) -> None:
        """Count a refused write by its errno; a vanished device raises `TunnelDown` instead."""
        if isinstance(exc, BlockingIOError) or exc.errno == errno.ENOBUFS:
            self._drop("queue_full")
        elif exc.errno in _GONE_ERRNOS:
            raise self._gone(exc) from exc
        else:
            self._drop("rejected")  # EINVAL etc.: the kernel refused this packet

    # ------------------------------------------------------------------ TUN offloads (vnet header, TSO/USO, GRO)
    # A device created with ``offload=True`` has IFF_VNET_HDR: every read and write starts with a 10-byte
    # ``struct virtio_net_hdr`` (`netsim.core.segment.VnetHeader`), and TUNSETOFFLOAD lets the kernel hand a read
    # a whole TCP (TSO) or UDP (USO) super-packet of up to 64 KiB with a partial checksum, and take such a
    # super-packet in one write (GRO on writes). `read_packets` / `write_packets` do not know the header: use
    # `read_offload_packets` / `write_coalesced` on such a device (`netsim.runtime.flow.PacketTunnelFlow` does).
    # docs/helper.md, "TUN offloads", says what this buys and what it costs.
    @property
    def offload(self) -> bool:
        """True when the device carries a vnet header (created with ``offload=True``)."""
        return self._vnet

    def set_offload(self, flags: int = TUN_F_ALL) -> None:
        """TUNSETOFFLOAD: what the kernel may hand a read (``TUN_F_*``; writes may carry GSO whatever is set).

        `TUN_F_ALL`: checksum + TSO4/6, and USO4/6 where the kernel has them (Linux 6.2+; on EINVAL it retries
        without USO). ``0``: whole packets with full checksums on reads (the kernel segments in C), while writes
        can still be coalesced.

        Raises:
            LocalProtocolError: the device has no vnet header (created without ``offload=True``).
        """
        if not self._vnet:
            raise LocalProtocolError(f"{self._name} has no vnet header: create it with offload=True")
        fd = self._live_fd()
        choices = (flags, flags & ~(TUN_F_USO4 | TUN_F_USO6)) if flags & (TUN_F_USO4 | TUN_F_USO6) else (flags,)
        for choice in choices:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, choice)
            except OSError as exc:
                if exc.errno != errno.EINVAL or choice == choices[-1]:
                    raise
                continue
            self.offload_flags = choice
            return

    def read_offload_packets(self, limit: int, out: list[bytes]) -> int:
        """Read up to ``limit`` TUN reads of a vnet device and append the wire packets to ``out``.

        Super-packets are cut into MTU-sized packets with full checksums (`split_gso_untrusted`), and partial
        checksums of single packets are completed, so ``out`` holds exactly what `read_packets` would have
        returned without offloads. A read whose header or packet does not parse is dropped under its
        ``BadPacket`` reason (`netsim.core.segment.VNET_REASONS`). Returns the number of reads taken.
        """
        fd = self._live_fd()
        size = VNET_HDR_SIZE + 0x10000
        mtu = self._mtu
        reads = 0
        while reads < limit:
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    raise self._gone(exc) from exc
                raise
            reads += 1
            if data.startswith(VNET_PLAIN) and VNET_HDR_SIZE < len(data) <= mtu + VNET_HDR_SIZE:
                out.append(data[VNET_HDR_SIZE:])  # a whole packet with its checksums: the common case
                self.packets_read += 1
                self.bytes_read += len(data) - VNET_HDR_SIZE
                continue
            try:
                hdr = parse_vnet_header_untrusted(data, mtu)
                view = memoryview(data)[VNET_HDR_SIZE:]
                if not view:
                    self._drop("empty")
                    continue
                if hdr.gso_type == VNET_GSO_NONE and not hdr.flags & VNET_F_NEEDS_CSUM:
                    if len(view) > mtu:
                        self._drop("truncated")
                        continue
                    out.append(data[VNET_HDR_SIZE:])
                    n = 1
                else:
                    n = split_gso_untrusted(view, hdr, out)
            except BadPacket as exc:
                self._drop(exc.reason)
                continue
            if n > 1 or hdr.gso_type != VNET_GSO_NONE:
                self.super_packets_read += 1
                self.segments_read += n
            self.packets_read += n
            self.bytes_read += len(data) - VNET_HDR_SIZE
        return reads

    def write_coalesced(self, packets: Sequence[Buffer]) -> int:
        """Write validated packets to a vnet device, consecutive TCP segments of a flow merged (GRO on writes).

        The packets must be what `write_packets` accepts with ``validated=True`` (bare, non-empty, at most `mtu`).
        Runs of mergeable segments (`netsim.core.segment.coalesce_tcp`) go in one write each; the rest one write
        each after a plain header. Returns the number of packets accepted; refusals are counted as in
        `write_packets` (a refused super-packet loses all its segments).
        """
        if not packets or max(map(len, packets)) < GRO_MIN:
            return self.write_offload_packets(packets)  # nothing to merge (a batch of ACKs): no grouping work
        fd = self._live_fd()
        writev = os.writev
        accepted = nbytes = 0
        try:
            for parts in coalesce_tcp(packets):
                segs = len(parts) - 2 if len(parts) > 2 else 1
                try:
                    nbytes += writev(fd, parts) - VNET_HDR_SIZE + (segs - 1) * len(parts[1])
                except OSError as exc:
                    for _ in range(segs):
                        self._refused(exc)
                    continue
                accepted += segs
                if segs > 1:
                    self.super_packets_written += 1
                    self.segments_written += segs
        finally:
            self.packets_written += accepted
            self.bytes_written += nbytes
        return accepted

    def write_offload_packets(self, packets: Sequence[Buffer]) -> int:
        """Write validated packets to a vnet device one by one, each after a plain header (no coalescing)."""
        fd = self._live_fd()
        writev = os.writev
        hdr: list[Buffer] = [VNET_PLAIN, b""]
        accepted = nbytes = 0
        try:
            for pkt in packets:
                hdr[1] = pkt
                try:
                    nbytes += writev(fd, hdr) - VNET_HDR_SIZE
                except OSError as exc:
                    self._refused(exc)
                    continue
                accepted += 1
        finally:
            self.packets_written += accepted
            self.bytes_written += nbytes
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
        """Counters kept by this object: no syscall, safe on the event loop under load.

        ``kernel_tx_dropped`` is the value the last `kernel_statistics` call read (None before the first).
        """
        return TunStatistics(
            self.packets_read,
            self.bytes_read,
            self.packets_written,
            self.bytes_written,
            dict(self._dropped),
            self._kernel_tx_dropped,
            self.super_packets_read,
            self.segments_read,
            self.super_packets_written,
            self.segments_written,
        )

    def kernel_statistics(self) -> TunStatistics:
        """`statistics` with the kernel's tx_dropped for this interface read now (/proc net/dev in the namespace).

        Blocking I/O (a thread enters the namespace to read the file): call it explicitly, never per batch.
        """

        def read() -> str:
            return Path("/proc/thread-self/net/dev").read_text()

        if self._netns is None:
            text = read()
        else:
            from netsim.transports.netns import run_in_netns

            text = run_in_netns(self._netns, read)
        tx_dropped: int | None = None
        for line in text.splitlines()[2:]:
            ifname, _, rest = line.partition(":")
            if ifname.strip() == self._name:
                tx_dropped = int(rest.split()[11])
        self._kernel_tx_dropped = tx_dropped
        return self.statistics()
