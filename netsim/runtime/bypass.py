"""The bypass mechanisms' I/O: helper packet NAT out of the physical interface, and the route compile step.

Theory of operation
-------------------
Two mechanisms carry out a policy's BYPASS verdicts (docs/bypass.md compares them):

* **route** (Apple-supported): prefix-only BYPASS rules become ``excludedRoutes`` (`excluded_routes_for`), so the
  kernel sends that traffic out of ``en0`` before it ever reaches the utun; domain rules become host routes as
  their DNS answers arrive (`PolicyEngine.route_exclusion`, pushed by the helper before the answer).
  `route_exclusions_payload` is what the helper adds to its SETTINGS frame; the provider turns it into excluded
  routes. Ports and protocols cannot be expressed as routes: packets they would bypass reach the helper and are
  tunnelled.
* **nat** (what teams try; not a supported use on Apple, TN3120): `NatBypass` takes BYPASS packets the helper
  read from the provider, rewrites them with the sans-IO `NatTable` (source -> ``en0``'s address and a port from
  a reserved range) and sends them out of ``en0`` with a raw socket; a packet socket on ``en0`` captures the
  replies to the NAT's mappings, which are rewritten back and returned to the provider for
  ``write_packet_objects``.

The NAT's I/O (`RawBypassTransport`), with the Linux facts it relies on:

* **Egress**: ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`` implies ``IP_HDRINCL`` (raw(7)): the kernel sends our
  header as is, filling in only the IPv4 header checksum and total length. ``AF_INET6``/``IPPROTO_RAW`` implies
  ``IPV6_HDRINCL`` likewise (Linux >= 4.5). Both are bound to ``en0`` (``SO_BINDTODEVICE``) and carry the bypass
  fwmark (``SO_MARK``), so the tunnel's policy-routing rule skips them and they never loop into the utun.
* **Capture**: an ``AF_PACKET``/``SOCK_DGRAM`` socket on ``en0`` (packet(7)) with a classic BPF filter
  (`capture_filter`) that passes only frames for the host (``PACKET_HOST``) addressed to ``en0``'s address and
  either TCP/UDP to the reserved port range, an ICMP echo reply whose identifier is in it, or an ICMP error
  (which the NAT matches against its mappings). The socket is created with protocol 0 (it receives nothing),
  the filter attached, and only then bound, so no unfiltered frame is ever queued. A packet socket sees frames
  before the IP stack, so the capture wins the race with the host's own stack by construction.
* **Host stack**: the kernel would answer those replies itself (a TCP RST, an ICMP port unreachable), killing
  the bypassed flows. `HostSetup` drops inbound TCP/UDP to the reserved range on ``en0`` at the nftables input
  hook (after the packet socket saw them) and reserves the range from the kernel's own ephemeral ports with
  ``net.ipv4.ip_local_reserved_ports`` (per namespace; covers IPv6 too), so no local socket ever owns one.
  ICMP echo replies are not dropped: the kernel ignores replies no socket asked for, and a local ``ping`` whose
  identifier happens to fall in the range keeps working (the NAT filters such a reply as ``nat_filtered``).
* **Checksum offload and GSO**: frames crossing veth pairs may arrive with ``CHECKSUM_PARTIAL`` (the transport
  checksum holds only the pseudo-header sum) or as TCP super-packets (GSO) longer than the utun's MTU. The
  ``PACKET_AUXDATA`` control message says so (``TP_STATUS_CSUMNOTREADY``, ``TP_STATUS_GSO_TCP``). Such packets
  get a full transport checksum after the NAT rewrite, and super-packets are cut into MTU-sized TCP segments
  (`segment_tcp`) -- the utun, like Apple's ``writePacketObjects``, takes one IP packet per write.

Batching: the provider's batch arrives as one call (`NatBypass.send_batch`; one ``sendto`` per packet, Python has
no ``sendmmsg``); the capture loop wakes once per readiness, drains up to ``batch`` frames, translates them all
and hands them to the provider as one IPC frame. The NAT's expiry timer is the same loop's deadline.

Ledger stages (added to the helper's ledger): ``nat_out`` (BYPASS packets -> sent on en0; dropped: the NAT's
``nat_*`` reasons, ``malformed``, ``raw_eagain``, ``raw_error``) and ``nat_in`` (captured frames -> handed to the
provider; dropped: ``nat_*`` reasons, ``malformed``, ``no_provider``, ``ipc_queue_full``...). Segments made from
a super-packet are counted in ``segments_out``, not as extra packets.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import math
import socket
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from netsim.core.checksum import checksum_offset, compute_ipv4_header_checksum, compute_l4_checksum
from netsim.core.ledger import Ledger
from netsim.core.nat import NatConfig, NatStatistics, NatTable
from netsim.core.packet import PROTO_TCP, Buffer, PacketView
from netsim.core.policy import Mechanism, Policy, RouteExclusion, excluded_routes_for
from netsim.errors import BadPacket, ConfigError, PrivilegeError

__all__ = [
    "FLAG_CSUM_NOT_READY",
    "FLAG_GSO_TCP",
    "BypassStatistics",
    "BypassTransport",
    "HostSetup",
    "MemoryBypassTransport",
    "NatBypass",
    "NatBypassHost",
    "RawBypassTransport",
    "capture_filter",
    "host_ruleset",
    "interface_addresses",
    "route_exclusions_payload",
    "segment_tcp",
]

log = logging.getLogger("netsim.bypass")

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
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_SKF_AD_OFF = -0x1000
_SKF_AD_PROTOCOL = 0
_SKF_AD_PKTTYPE = 4
_PACKET_HOST = 0
_SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter {code, jt, jf, k}
_MAX_FRAME = 65535
_SNAP = 0x40000  # BPF "accept": keep the whole frame

# classic BPF opcodes (<linux/bpf_common.h>)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_H_IND, _LD_B_IND = 0x48, 0x50
_LDX_B_MSH = 0xB1
_JEQ, _JGT, _JGE, _JSET = 0x15, 0x25, 0x35, 0x45
_RET = 0x06

_SEQ = struct.Struct("!I")
_U16 = struct.Struct("!H")


# ------------------------------------------------------------------------------------------------ BPF
class _Asm:
    """A tiny classic-BPF assembler with forward labels (jumps are forward-only, offsets < 256)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int = 0, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.code):
            offs = []
            for target in (jt, jf):
                off = self.labels[target] - i - 1 if isinstance(target, str) else int(target)  # type: ignore[call-overload]
                if not 0 <= off <= 255:
                    raise ConfigError(f"BPF jump offset {off} out of range (program too long)")
                offs.append(off)
            out += _SOCK_FILTER.pack(code, offs[0], offs[1], k)
        return bytes(out)


def _range(asm: _Asm, lo: int, hi: int, *, accept: str = "accept") -> None:
    asm.op(_JGE, lo, 0, "reject")
    asm.op(_JGT, hi, "reject", accept)


def capture_filter(ext_v4: bytes | None, ext_v6: bytes | None, port_range: tuple[int, int]) -> bytes:
    """The capture socket's classic BPF program (``struct sock_filter[]`` bytes) for a ``SOCK_DGRAM`` packet socket.

    Offsets are from the network header (packet(7): ``SOCK_DGRAM`` removes the link-layer header before the
    filter runs). Passes frames for this host (``PACKET_HOST``) to ``ext_v4``/``ext_v6`` that are TCP/UDP to
    ``port_range`` (IPv4 non-first fragments excluded: they carry no port), ICMP/ICMPv6 echo replies with an
    identifier in ``port_range``, or ICMP errors (RFC 792 types 3, 11, 12; RFC 4443 types 1-4). IPv6 packets with
    extension headers are not passed (the NAT would drop them as fragments or unsupported anyway).
    """
    lo, hi = port_range
    asm = _Asm()
    asm.op(_LD_W_ABS, _SKF_AD_OFF + _SKF_AD_PKTTYPE)
    asm.op(_JEQ, _PACKET_HOST, 0, "reject")
    asm.op(_LD_W_ABS, _SKF_AD_OFF + _SKF_AD_PROTOCOL)
    asm.op(_JEQ, _ETH_P_IP, "v4", 0)
    asm.op(_JEQ, _ETH_P_IPV6, "v6", "reject")
    asm.label("v4")
    if ext_v4 is None:
        asm.op(_RET, 0)
    else:
        asm.op(_LD_W_ABS, 16)  # RFC 791: destination address
        asm.op(_JEQ, int.from_bytes(ext_v4, "big"), 0, "reject")
        asm.op(_LD_H_ABS, 6)
        asm.op(_JSET, 0x1FFF, "reject", 0)  # non-first fragment
        asm.op(_LDX_B_MSH, 0)  # X = 4 * IHL
        asm.op(_LD_B_ABS, 9)
        asm.op(_JEQ, 6, "ports4", 0)
        asm.op(_JEQ, 17, "ports4", 0)
        asm.op(_JEQ, 1, "icmp4", "reject")
        asm.label("ports4")
        asm.op(_LD_H_IND, 2)  # destination port
        _range(asm, lo, hi)
        asm.label("icmp4")
        asm.op(_LD_B_IND, 0)
        asm.op(_JEQ, 0, "echo4", 0)
        asm.op(_JEQ, 3, "accept", 0)
        asm.op(_JEQ, 11, "accept", 0)
        asm.op(_JEQ, 12, "accept", "reject")
        asm.label("echo4")
        asm.op(_LD_H_IND, 4)  # echo identifier
        _range(asm, lo, hi)
    asm.label("v6")
    if ext_v6 is None:
        asm.op(_RET, 0)
    else:
        for i in range(4):
            asm.op(_LD_W_ABS, 24 + 4 * i)  # RFC 8200: destination address
            asm.op(_JEQ, int.from_bytes(ext_v6[4 * i : 4 * i + 4], "big"), 0, "reject")
        asm.op(_LD_B_ABS, 6)  # next header
        asm.op(_JEQ, 6, "ports6", 0)
        asm.op(_JEQ, 17, "ports6", 0)
        asm.op(_JEQ, 58, "icmp6", "reject")
        asm.label("ports6")
        asm.op(_LD_H_ABS, 42)
        _range(asm, lo, hi)
        asm.label("icmp6")
        asm.op(_LD_B_ABS, 40)
        asm.op(_JEQ, 129, "echo6", 0)
        asm.op(_JGE, 1, 0, "reject")
        asm.op(_JGT, 4, "reject", "accept")
        asm.label("echo6")
        asm.op(_LD_H_ABS, 44)
        _range(asm, lo, hi)
    asm.label("accept")
    asm.op(_RET, _SNAP)
    asm.label("reject")
    asm.op(_RET, 0)
    return asm.assemble()


# ------------------------------------------------------------------------------------------------ segmentation
def segment_tcp(view: PacketView, max_size: int) -> list[bytearray]:
    """Cut a TCP packet longer than ``max_size`` into segments of at most ``max_size`` bytes, checksums filled.

    What a NIC does for TSO (and the kernel for GSO): every segment repeats the IP and TCP headers (options
    included), the sequence number advances by the payload already sent, FIN and PSH stay on the last segment
    and CWR on the first (RFC 3168 §6.1.2 sets CWR once); IPv4 identifications count up. A receiver accepts any
    segmentation (RFC 9293 §3.7), so this is transparent to the endpoints.

    Raises:
        ConfigError: ``max_size`` leaves no room for payload after the headers.
    """
    buf = view.buffer
    l4 = view.l4_offset
    hdr = l4 + ((buf[l4 + 12] >> 4) << 2)
    mss = max_size - hdr
    if mss < 8:
        raise ConfigError(f"max_size {max_size} leaves no room for TCP payload after {hdr} header bytes")
    total = view.total_length
    (seq,) = _SEQ.unpack_from(buf, l4 + 4)
    flags = buf[l4 + 13]
    ident = view.identification
    head = bytes(buf[:hdr])
    out: list[bytearray] = []
    start = hdr
    i = 0
    while start < total:
        end = min(start + mss, total)
        seg = bytearray(head)
        seg += buf[start:end]
        n = len(seg)
        _SEQ.pack_into(seg, l4 + 4, (seq + start - hdr) & 0xFFFFFFFF)
        f = flags
        if end < total:
            f &= ~0x09  # FIN, PSH only on the last segment
        if i:
            f &= ~0x80  # CWR only on the first
        seg[l4 + 13] = f
        if view.version == 4:
            _U16.pack_into(seg, 2, n)
            _U16.pack_into(seg, 4, (ident + i) & 0xFFFF)
            _U16.pack_into(seg, 10, 0)
            _U16.pack_into(seg, 10, compute_ipv4_header_checksum(seg, l4))
        else:
            _U16.pack_into(seg, 4, n - 40)
        seg_view = PacketView.parse_untrusted(seg)
        _U16.pack_into(seg, l4 + 16, compute_l4_checksum(seg_view))
        out.append(seg)
        start = end
        i += 1
    return out


# ------------------------------------------------------------------------------------------------ host setup
def host_ruleset(
    interface: str, port_range: tuple[int, int], ext_v4: str | None, ext_v6: str | None, *, table: str = "netsim_bypass"
) -> str:
    """nftables: drop inbound TCP/UDP to the NAT's reserved ports on ``interface`` before the host stack sees them.

    The packet socket has its copy already (it taps frames before IP input), so this only stops the kernel from
    answering them with a RST or an ICMP port unreachable.
    """
    lo, hi = port_range
    rules = []
    if ext_v4:
        rules.append(f'iifname "{interface}" ip daddr {ext_v4} meta l4proto {{ tcp, udp }} th dport {lo}-{hi} drop')
    if ext_v6:
        rules.append(f'iifname "{interface}" ip6 daddr {ext_v6} meta l4proto {{ tcp, udp }} th dport {lo}-{hi} drop')
    body = "\n".join(f"    {r}" for r in rules)
    return (
        f"table inet {table} {{\n"
        "  chain input {\n"
        "    type filter hook input priority filter - 10; policy accept;\n"
        f"{body}\n"
        "  }\n"
        "}\n"
    )


class HostSetup:
    """Keep the host's own stack away from the NAT's ports, in the current network namespace; undo on `remove`.

    Applies `host_ruleset` with ``nft`` and adds ``port_range`` to ``net.ipv4.ip_local_reserved_ports``
    (ip-sysctl.rst: reserved ports are skipped by automatic port assignment; the setting is per namespace and
    also governs IPv6). Needs CAP_NET_ADMIN (root).
    """

    def __init__(
        self,
        interface: str,
        port_range: tuple[int, int],
        ext_v4: str | None,
        ext_v6: str | None,
        *,
        table: str = "netsim_bypass",
        sysctl_path: Path = Path("/proc/sys/net/ipv4/ip_local_reserved_ports"),
    ) -> None:
        self.interface = interface
        self.port_range = port_range
        self.ext_v4 = ext_v4
        self.ext_v6 = ext_v6
        self.table = table
        self.sysctl_path = sysctl_path
        self._saved: str | None = None
        self._nft = False

    def apply(self) -> None:
        """Install the rule and the port reservation (idempotent: an old table of the same name is replaced).

        Raises:
            PrivilegeError: not allowed to change nftables or the sysctl.
            ConfigError: ``nft`` rejected the ruleset.
        """
        ruleset = host_ruleset(self.interface, self.port_range, self.ext_v4, self.ext_v6, table=self.table)
        self._run_nft(f"table inet {self.table}\ndelete table inet {self.table}\n{ruleset}")
        self._nft = True
        lo, hi = self.port_range
        try:
            old = self.sysctl_path.read_text().strip()
            self._saved = old
            new = f"{old},{lo}-{hi}" if old else f"{lo}-{hi}"
            self.sysctl_path.write_text(new + "\n")
        except PermissionError as exc:
            raise PrivilegeError(f"cannot reserve ports {lo}-{hi} ({self.sysctl_path}): {exc}; run as root") from None

    def remove(self) -> None:
        """Undo `apply` (best effort, idempotent)."""
        if self._nft:
            self._nft = False
            with contextlib.suppress(ConfigError, PrivilegeError, OSError):
                self._run_nft(f"delete table inet {self.table}\n")
        if self._saved is not None:
            saved, self._saved = self._saved, None
            with contextlib.suppress(OSError):
                self.sysctl_path.write_text(saved + "\n")

    @staticmethod
    def _run_nft(script: str) -> None:
        try:
            result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise ConfigError("nft is not installed (apt-get install nftables)") from None
        if result.returncode != 0:
            err = result.stderr.strip()
            if "Operation not permitted" in err:
                raise PrivilegeError(f"nft needs CAP_NET_ADMIN: {err}")
            raise ConfigError(f"nft rejected the bypass ruleset: {err}")


# ------------------------------------------------------------------------------------------------ transports
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
    fprog = struct.pack("HL", len(program) // _SOCK_FILTER.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)  # the kernel copies the program


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


# ------------------------------------------------------------------------------------------------ the NAT bypass
@dataclass(frozen=True, slots=True)
class BypassStatistics:
    """Counters of a `NatBypass`.

    Attributes:
        nat: the NAT table's counters (mappings, translations, drops by reason).
        sent / send_drops: packets sent on the physical interface / dropped before or at the send, by reason.
        captured / delivered / receive_drops: frames captured, packets handed to the provider, drops by reason.
        checksums_completed: captured packets whose partial (offloaded) transport checksum was completed.
        superpackets / segments_out: GSO super-packets captured and the segments they were cut into.
        wakeups / batches_delivered: capture-loop wakeups and IPC batches handed to the provider.
    """

    nat: NatStatistics
    sent: int
    send_drops: tuple[tuple[str, int], ...]
    captured: int
    delivered: int
    receive_drops: tuple[tuple[str, int], ...]
    checksums_completed: int
    superpackets: int
    segments_out: int
    wakeups: int
    batches_delivered: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the helper's STATS_RESPONSE carries it under ``"bypass"``)."""
        n = self.nat
        return {
            "nat": {
                "mappings": n.mappings,
                "created": n.created,
                "expired": n.expired,
                "translated_out": n.translated_out,
                "translated_in": n.translated_in,
                "icmp_errors_translated": n.icmp_errors_translated,
                "drops": {k: v for k, v in n.drops if v},
            },
            "sent": self.sent,
            "send_drops": dict(self.send_drops),
            "captured": self.captured,
            "delivered": self.delivered,
            "receive_drops": dict(self.receive_drops),
            "checksums_completed": self.checksums_completed,
            "superpackets": self.superpackets,
            "segments_out": self.segments_out,
            "wakeups": self.wakeups,
            "batches_delivered": self.batches_delivered,
        }


Deliver = Callable[[list[bytes]], str | None]


class NatBypass:
    """The helper-side NAT bypass: BYPASS packets out of the physical interface, their replies back.

    Args:
        nat: the NAT state (its `NatConfig` names en0's addresses and the reserved port range).
        transport: `RawBypassTransport.open(...)` in a helper; `MemoryBypassTransport` in tests.
        deliver: hands de-NATed packets to the provider (one call per batch); returns None, or a drop reason
            (``no_provider``). Settable later (`Helper` wires it).
        ledger: the stages ``nat_out`` and ``nat_in`` are created in it (the helper's ledger).
        clock: the time source the NAT's timeouts use.
        max_packet: the largest packet the provider's utun takes (its MTU); longer TCP replies are segmented.
        batch: frames drained per wakeup.
    """

    def __init__(
        self,
        nat: NatTable,
        transport: BypassTransport,
        *,
        deliver: Deliver | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = trio.current_time,
        max_packet: int = 1420,
        batch: int = 32,
    ) -> None:
        if max_packet < 576:
            raise ConfigError(f"max_packet {max_packet} is below the IPv4 minimum of 576")
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        self.nat = nat
        self.transport = transport
        self.deliver = deliver
        self.clock = clock
        self.max_packet = max_packet
        self.batch = batch
        ledger = ledger if ledger is not None else Ledger("bypass")
        self.ledger = ledger
        self._out = ledger.stage("nat_out")
        self._in = ledger.stage("nat_in")
        self._tx = bytearray(_MAX_FRAME)
        self._tx_view = memoryview(self._tx)
        self._rx_slab = bytearray(batch * _MAX_FRAME)
        slab = memoryview(self._rx_slab)
        self._rx = [slab[i * _MAX_FRAME : (i + 1) * _MAX_FRAME] for i in range(batch)]
        self._rx_sizes = [0] * batch
        self._rx_flags = [0] * batch
        self._view = PacketView()
        self._scope: trio.CancelScope | None = None
        self.checksums_completed = 0
        self.superpackets = 0
        self.segments_out = 0
        self.wakeups = 0
        self.batches_delivered = 0

    # -- outbound (tunnel -> en0) --------------------------------------------------------------------------
    def send_batch(self, packets: Sequence[Buffer]) -> None:
        """The helper's bypass hook: NAT and send each packet (copied: the caller's buffers are not changed)."""
        st = self._out
        st.count_read(len(packets))
        now = self.clock()
        nat = self.nat
        view = self._view
        tx = self._tx
        txv = self._tx_view
        send = self.transport.send
        for pkt in packets:
            n = len(pkt)
            if n > _MAX_FRAME:
                st.count_dropped("malformed")
                continue
            tx[:n] = pkt
            frame = txv[:n]
            try:
                view.load_untrusted(frame)
            except BadPacket:
                st.count_dropped("malformed")
                continue
            reason = nat.translate_outbound(view, now)
            if reason is None:
                reason = send(txv[: view.total_length], view.version, view.dst)
            if reason is None:
                st.count_forwarded()
            else:
                st.count_dropped(reason)
        self._rearm()

    def _rearm(self) -> None:
        scope = self._scope
        deadline = self.nat.next_deadline()
        if scope is not None and deadline is not None and deadline < scope.deadline:
            scope.deadline = deadline

    # -- inbound (en0 -> tunnel) ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The capture loop: one wakeup drains a batch, translates it and delivers it in one call; expires NAT
        mappings at their deadlines. Run it in a nursery for the helper's lifetime."""
        task_status.started()
        transport = self.transport
        while True:
            deadline = self.nat.next_deadline()
            with trio.CancelScope(deadline=deadline if deadline is not None else math.inf) as scope:
                self._scope = scope
                await transport.wait_readable()
            self._scope = None
            self.wakeups += 1
            now = self.clock()
            if scope.cancelled_caught:
                self.nat.expire(now)
                continue
            n = transport.recv_batch(self._rx, self._rx_sizes, self._rx_flags)
            if n:
                self.receive(n, now)

    def receive(self, n: int, now: float) -> None:
        """Translate ``n`` captured frames from the receive buffers and deliver them (one `deliver` call)."""
        st = self._in
        st.count_read(n)
        nat = self.nat
        view = self._view
        out: list[bytes] = []
        frames = 0
        max_packet = self.max_packet
        for i in range(n):
            frame = self._rx[i][: self._rx_sizes[i]]
            flags = self._rx_flags[i]
            try:
                view.load_untrusted(frame)
            except BadPacket:
                st.count_dropped("malformed")
                continue
            reason = nat.translate_inbound(view, now)
            if reason is not None:
                st.count_dropped(reason)
                continue
            if flags & FLAG_CSUM_NOT_READY:
                # The transport checksum held only the pseudo-header sum (offload), so the NAT's incremental
                # update of it means nothing: compute it in full now that the addresses are final.
                off = checksum_offset(view)
                if off is not None and not view.is_fragment:
                    _U16.pack_into(frame, off, compute_l4_checksum(view))
                    self.checksums_completed += 1
            frames += 1
            if view.total_length > max_packet and view.protocol == PROTO_TCP and not view.is_fragment:
                segs = segment_tcp(view, max_packet)
                self.superpackets += 1
                self.segments_out += len(segs)
                out.extend(bytes(s) for s in segs)
            else:
                out.append(bytes(frame[: view.total_length]))  # the IPC owns it until written: copy
        if not out:
            return
        deliver = self.deliver
        reason = "no_provider" if deliver is None else deliver(out)
        # A super-packet counts as one frame forwarded, however many segments it became.
        if reason is None:
            st.count_forwarded(frames)
            self.batches_delivered += 1
        else:
            st.count_dropped(reason, frames)

    # -- statistics ----------------------------------------------------------------------------------------
    def statistics(self) -> BypassStatistics:
        """A frozen snapshot."""
        o, i = self._out, self._in
        return BypassStatistics(
            nat=self.nat.statistics(),
            sent=o.forwarded,
            send_drops=tuple(sorted(o.dropped.items())),
            captured=i.read,
            delivered=i.forwarded,
            receive_drops=tuple(sorted(i.dropped.items())),
            checksums_completed=self.checksums_completed,
            superpackets=self.superpackets,
            segments_out=self.segments_out,
            wakeups=self.wakeups,
            batches_delivered=self.batches_delivered,
        )

    def close(self) -> None:
        """Close the transport."""
        self.transport.close()


# ------------------------------------------------------------------------------------------------ route mechanism
def route_exclusions_payload(policy: Policy, exclusion: RouteExclusion | None = None) -> dict[str, Any]:
    """What the helper adds to its SETTINGS payload for ``policy``: excluded routes when the mechanism is route.

    ``{"excluded_routes": [prefix, ...], "bypass_unsupported": [[index, name, why], ...]}``; empty lists for the
    NAT mechanism (its BYPASS verdicts are carried out by the helper, not by routes). ``exclusion`` is a
    precomputed `RouteExclusion` (`PolicyEngine.route_exclusion`, which adds host routes for the addresses of
    bypassed domains); default: ``excluded_routes_for(policy)``.
    """
    if policy.mechanism is not Mechanism.ROUTE:
        return {"excluded_routes": [], "bypass_unsupported": []}
    ex = exclusion if exclusion is not None else excluded_routes_for(policy)
    return {
        "excluded_routes": [str(n) for n in ex.routes],
        "bypass_unsupported": [list(u) for u in ex.unsupported],
    }


# ------------------------------------------------------------------------------------------------ wiring
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


class NatBypassHost:
    """Everything the helper needs for the NAT mechanism on ``interface``, opened together, closed together.

    `open` reads the interface's addresses, installs `HostSetup`, opens `RawBypassTransport` and builds the
    `NatBypass`; `close` undoes it in reverse. Wire ``host.bypass`` into the helper (``Helper.attach_bypass``)
    and run ``host.bypass.run`` in the helper's nursery.
    """

    def __init__(self, setup: HostSetup, bypass: NatBypass) -> None:
        self.setup = setup
        self.bypass = bypass

    @classmethod
    def open(
        cls,
        interface: str,
        *,
        fwmark: int | None = None,
        port_range: tuple[int, int] = (61000, 61999),
        ledger: Ledger | None = None,
        clock: Callable[[], float] = trio.current_time,
        max_packet: int = 1420,
    ) -> NatBypassHost:
        """Open the NAT bypass on ``interface`` (root; run inside the simulated Mac's namespace).

        Raises:
            ConfigError: the interface has no address, or a socket/rule could not be set up.
            PrivilegeError: not root.
        """
        v4, v6 = interface_addresses(interface)
        if v4 is None and v6 is None:
            raise ConfigError(f"interface {interface!r} has no IPv4 or global IPv6 address for the NAT bypass")
        config = NatConfig(external_v4=v4, external_v6=v6, port_range=port_range)
        setup = HostSetup(interface, port_range, v4, v6)
        setup.apply()
        try:
            transport = RawBypassTransport.open(interface, config, fwmark=fwmark)
        except BaseException:
            setup.remove()
            raise
        bypass = NatBypass(NatTable(config), transport, ledger=ledger, clock=clock, max_packet=max_packet)
        log.info(
            "nat bypass ready",
            extra={"event": "bypass_ready", "interface": interface, "v4": v4, "v6": v6, "ports": list(port_range)},
        )
        return cls(setup, bypass)

    def close(self) -> None:
        """Close the sockets and remove the host rules (idempotent)."""
        self.bypass.close()
        self.setup.remove()
