"""NFQUEUE: packets a netfilter rule queued to userspace, and the verdicts that let them go (nfnetlink_queue).

A thin client over a raw ``NETLINK_NETFILTER`` socket, written from ``<linux/netfilter/nfnetlink_queue.h>``
(no library: none is packaged here). An xtables ``NFQUEUE --queue-num N`` rule (through iptables-nft: this
kernel has no nft ``queue``) hands each matching packet to the socket bound to queue ``N``; the kernel holds the
packet until a verdict names its id. Verdicts may be given in any order and at any time, which is what delay
and reorder are made of; a drop verdict is loss.

* `NfQueue`: bind (``NFQNL_CFG_CMD_BIND``), copy-packet mode, queue length and flags (``NFQNL_MSG_CONFIG``, each
  acknowledged); `NfQueue.receive_batch` reads every queued ``NFQNL_MSG_PACKET`` without blocking, bounded;
  `NfQueue.verdict` buffers ``NFQNL_MSG_VERDICT`` messages and `NfQueue.flush` sends them in one ``send``.
* `parse_messages_untrusted`: what the kernel sends, parsed with bounds (netlink header, ``nfgenmsg``,
  attributes); a malformed message raises `BadPacket`, which `NfQueue` counts by reason and skips.
* `RawInjector`: sends a copy of a packet (its IP header included) through a raw socket with a mark, so a rule
  that skips that mark does not queue the copy again (duplication).
* `queue_statistics`: the kernel's own counters for a queue (``/proc/thread-self/net/netfilter/nfnetlink_queue``).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from netsim.errors import BadPacket, LocalProtocolError

__all__ = [
    "NF_ACCEPT",
    "NF_DROP",
    "NfQueue",
    "QueueStatistics",
    "QueuedPacket",
    "RawInjector",
    "parse_messages_untrusted",
    "queue_statistics",
]

_NETLINK_NETFILTER = 12
# <linux/netlink.h>
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NLA = struct.Struct("=HH")  # nlattr: len, type
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLA_TYPE_MASK = 0x3FFF  # less NLA_F_NESTED / NLA_F_NET_BYTEORDER
_SOL_NETLINK = 270
_NETLINK_NO_ENOBUFS = 5
# <linux/netfilter/nfnetlink.h>: nfgenmsg is family, version, res_id (big-endian: the queue number)
_NFGEN = struct.Struct("!BBH")
_NFNL_SUBSYS_QUEUE = 3
# <linux/netfilter/nfnetlink_queue.h>
_NFQNL_MSG_PACKET = 0
_NFQNL_MSG_VERDICT = 1
_NFQNL_MSG_CONFIG = 2
_NFQA_PACKET_HDR = 1
_NFQA_VERDICT_HDR = 2
_NFQA_MARK = 3
_NFQA_IFINDEX_INDEV = 5
_NFQA_IFINDEX_OUTDEV = 6
_NFQA_PAYLOAD = 10
_NFQA_UID = 16
_NFQA_GID = 17
_NFQA_CFG_CMD = 1
_NFQA_CFG_PARAMS = 2
_NFQA_CFG_QUEUE_MAXLEN = 3
_NFQA_CFG_MASK = 4
_NFQA_CFG_FLAGS = 5
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_CFG_CMD_UNBIND = 2
_NFQNL_COPY_PACKET = 2
_NFQA_CFG_F_FAIL_OPEN = 1
_NFQA_CFG_F_UID_GID = 1 << 3
_PACKET_HDR = struct.Struct("!IHB")  # nfqnl_msg_packet_hdr: packet_id, hw_protocol, hook
_VERDICT_HDR = struct.Struct("!II")  # nfqnl_msg_verdict_hdr: verdict, id
_CFG_CMD = struct.Struct("!BxH")  # nfqnl_msg_config_cmd: command, pad, pf
_CFG_PARAMS = struct.Struct("!IB")  # nfqnl_msg_config_params: copy_range, copy_mode (packed)
_U32 = struct.Struct("!I")
# <linux/netfilter.h>
NF_DROP = 0
NF_ACCEPT = 1

_MAX_PAYLOAD = 0xFFFF
_RECV_SIZE = _MAX_PAYLOAD + 512  # one packet message: headers, a few attributes, a copied packet
_MAX_ATTRS = 64  # attributes read per message: the kernel sends about a dozen


@dataclass(frozen=True)
class QueuedPacket:
    """One packet the kernel holds for a verdict (``NFQNL_MSG_PACKET``).

    Attributes:
        packet_id: the id a verdict names.
        hw_protocol: the link-layer protocol (``ETH_P_IP`` 0x0800, ``ETH_P_IPV6`` 0x86DD).
        hook: the netfilter hook it was queued at (``NF_INET_PRE_ROUTING`` 0 ... ``POST_ROUTING`` 4).
        payload: the packet from its IP header on (copy-packet mode).
        mark: its ``skb->mark`` (0 when the kernel sent none).
        indev, outdev: interface indexes (0 when none).
        uid, gid: the owner of the packet's socket (``NFQA_UID`` / ``NFQA_GID``), sent by the kernel only to a
            queue configured with ``uid_gid`` and only for a packet of a local socket; else None.
    """

    packet_id: int
    hw_protocol: int
    hook: int
    payload: bytes
    mark: int = 0
    indev: int = 0
    outdev: int = 0
    uid: int | None = None
    gid: int | None = None


def _attributes_untrusted(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    off = 0
    for _ in range(_MAX_ATTRS):
        if off >= len(data):
            return
        if len(data) - off < _NLA.size:
            raise BadPacket("truncated_attribute")
        length, kind = _NLA.unpack_from(data, off)
        if length < _NLA.size or off + length > len(data):
            raise BadPacket("bad_attribute_length", f"{length} at {off} of {len(data)}")
        yield kind & _NLA_TYPE_MASK, data[off + _NLA.size : off + length]
        off += (length + 3) & ~3
    raise BadPacket("too_many_attributes")


def _packet_untrusted(body: memoryview) -> QueuedPacket:
    if len(body) < _NFGEN.size:
        raise BadPacket("truncated_nfgenmsg")
    header: tuple[int, int, int] | None = None
    payload = b""
    mark = indev = outdev = 0
    uid: int | None = None
    gid: int | None = None
    for kind, value in _attributes_untrusted(body[_NFGEN.size :]):
        if kind == _NFQA_PACKET_HDR:
            if len(value) < _PACKET_HDR.size:
                raise BadPacket("truncated_packet_hdr")
            header = _PACKET_HDR.unpack_from(value)
        elif kind == _NFQA_PAYLOAD:
            payload = bytes(value)
        elif kind in (_NFQA_MARK, _NFQA_IFINDEX_INDEV, _NFQA_IFINDEX_OUTDEV, _NFQA_UID, _NFQA_GID):
            if len(value) < _U32.size:
                raise BadPacket("truncated_u32_attribute", str(kind))
            (number,) = _U32.unpack_from(value)
            if kind == _NFQA_MARK:
                mark = number
            elif kind == _NFQA_UID:
                uid = number
            elif kind == _NFQA_GID:
                gid = number
            elif kind == _NFQA_IFINDEX_INDEV:
                indev = number
            else:
                outdev = number
    if header is None:
        raise BadPacket("no_packet_hdr")
    return QueuedPacket(header[0], header[1], header[2], payload, mark, indev, outdev, uid, gid)


def parse_messages_untrusted(data: bytes | bytearray | memoryview) -> Iterator[QueuedPacket | int]:
    """The messages in one netlink datagram from the kernel: a `QueuedPacket` per ``NFQNL_MSG_PACKET``, the
    (negative errno or 0) of an ``NLMSG_ERROR``; other types are skipped. Bounded by the datagram; a message that
    does not parse raises `BadPacket` (messages before it have been yielded)."""
    view = memoryview(data)
    off = 0
    while off < len(view):
        if len(view) - off < _NLMSG.size:
            raise BadPacket("truncated_nlmsghdr")
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(view, off)
        if length < _NLMSG.size or off + length > len(view):
            raise BadPacket("bad_nlmsg_length", f"{length} at {off} of {len(view)}")
        body = view[off + _NLMSG.size : off + length]
        if kind == _NLMSG_ERROR:
            if len(body) < 4:
                raise BadPacket("truncated_nlmsgerr")
            yield struct.unpack_from("=i", body)[0]
        elif kind == (_NFNL_SUBSYS_QUEUE << 8) | _NFQNL_MSG_PACKET:
            yield _packet_untrusted(body)
        elif kind == _NLMSG_DONE:
            return
        off += (length + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    raw = _NLA.pack(_NLA.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int, seq: int = 0) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return _NLMSG.pack(_NLMSG.size + len(body), (_NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body


@dataclass
class NfQueue:
    """A socket bound to one NFQUEUE queue of the calling thread's network namespace, in copy-packet mode.

    Args:
        queue_num: the ``--queue-num`` of the rules that feed it (0-65535). Binding a queue another socket holds
            fails with ``EPERM`` (an `OSError`).
        maxlen: packets the kernel holds for this queue (``NFQA_CFG_QUEUE_MAXLEN``); more are dropped by the
            kernel (`QueueStatistics.queue_dropped`), or accepted with ``fail_open``.
        fail_open: accept, rather than drop, what does not fit (``NFQA_CFG_F_FAIL_OPEN``).
        uid_gid: ask the kernel for the owner of each packet's socket (``NFQA_CFG_F_UID_GID``:
            `QueuedPacket.uid` / ``gid``), which saves a caller the ``/proc/net`` walk that would find it.
        rcvbuf: the socket's receive buffer (``SO_RCVBUFFORCE``, root): a packet the kernel cannot deliver is
            dropped (`QueueStatistics.user_dropped`).

    Malformed messages are counted in ``bad`` by reason and skipped; nothing from the socket raises.
    """

    queue_num: int
    maxlen: int = 4096
    fail_open: bool = False
    rcvbuf: int = 8 << 20
    uid_gid: bool = False
    bad: dict[str, int] = field(default_factory=dict, init=False)
    errors: int = field(default=0, init=False)  # NLMSG_ERROR answers to verdicts (an id the kernel no longer holds)
    overruns: int = field(default=0, init=False)  # ENOBUFS on receive: the kernel could not deliver some packets
    _sock: socket.socket | None = field(default=None, init=False, repr=False)
    _out: list[bytes] = field(default_factory=list, init=False, repr=False)
    _buf: bytearray = field(default_factory=lambda: bytearray(_RECV_SIZE), init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.queue_num <= 0xFFFF or not 1 <= self.maxlen <= 1 << 20:
            raise LocalProtocolError("NfQueue: queue_num 0-65535, maxlen 1-1048576")
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, self.rcvbuf)  # SO_RCVBUFFORCE
            sock.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
            sock.bind((0, 0))
            sock.settimeout(5.0)
            self._sock = sock
            self._config(_attr(_NFQA_CFG_CMD, _CFG_CMD.pack(_NFQNL_CFG_CMD_BIND, socket.AF_UNSPEC)))
            self._config(
                _attr(_NFQA_CFG_PARAMS, _CFG_PARAMS.pack(_MAX_PAYLOAD, _NFQNL_COPY_PACKET))
                + _attr(_NFQA_CFG_QUEUE_MAXLEN, _U32.pack(self.maxlen))
            )
            flags = (_NFQA_CFG_F_FAIL_OPEN if self.fail_open else 0) | (_NFQA_CFG_F_UID_GID if self.uid_gid else 0)
            if flags:
                flag = _U32.pack(flags)
                self._config(_attr(_NFQA_CFG_FLAGS, flag) + _attr(_NFQA_CFG_MASK, flag))
            sock.setblocking(False)
        except BaseException:
            self._sock = None
            sock.close()
            raise

    def _config(self, attrs: bytes) -> None:
        """Send one ``NFQNL_MSG_CONFIG`` and wait for its acknowledgement (errors raise `OSError`)."""
        assert self._sock is not None
        self._sock.send(_message(_NFQNL_MSG_CONFIG, self.queue_num, attrs, _NLM_F_REQUEST | _NLM_F_ACK, seq=1))
        for _ in range(64):  # packets may already be queued ahead of the ack
            n = self._sock.recv_into(self._buf)
            for item in parse_messages_untrusted(memoryview(self._buf)[:n]):
                if isinstance(item, int):
                    if item:
                        raise OSError(-item, f"nfqueue config of queue {self.queue_num}: {errno.errorcode.get(-item)}")
                    return
        raise OSError(errno.EPROTO, "nfqueue config: no acknowledgement")

    def fileno(self) -> int:
        if self._sock is None:
            raise LocalProtocolError("NfQueue is closed")
        return self._sock.fileno()

    def receive_batch(self, limit: int = 256) -> list[QueuedPacket]:
        """Every queued packet ready now, up to ``limit`` datagrams; never blocks."""
        if self._sock is None:
            raise LocalProtocolError("NfQueue is closed")
        out: list[QueuedPacket] = []
        view = memoryview(self._buf)
        for _ in range(limit):
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            try:
                for item in parse_messages_untrusted(view[:n]):
                    if isinstance(item, QueuedPacket):
                        out.append(item)
                    elif item:
                        self.errors += 1
            except BadPacket as exc:
                self.bad[exc.reason] = self.bad.get(exc.reason, 0) + 1
        return out

    def verdict(self, packet_id: int, verdict: int, mark: int | None = None) -> None:
        """Buffer a verdict (`NF_ACCEPT` / `NF_DROP`) for ``packet_id``, optionally setting its mark; `flush`
        sends the buffer."""
        attrs = _attr(_NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id & 0xFFFFFFFF))
        if mark is not None:
            attrs += _attr(_NFQA_MARK, _U32.pack(mark & 0xFFFFFFFF))
        self._out.append(_message(_NFQNL_MSG_VERDICT, self.queue_num, attrs, _NLM_F_REQUEST))

    def flush(self) -> int:
        """Send the buffered verdicts (in one ``send`` of up to 64 KiB each); returns how many were sent."""
        if self._sock is None or not self._out:
            return 0
        count = len(self._out)
        chunk: list[bytes] = []
        size = 0
        for msg in self._out:
            if size + len(msg) > 65536:
                self._send(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(msg)
            size += len(msg)
        self._send(b"".join(chunk))
        self._out.clear()
        return count

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.setblocking(True)  # a verdict batch is never half sent
        try:
            self._sock.send(data)
        finally:
            self._sock.setblocking(False)

    def close(self) -> None:
        """Unbind (the kernel then drops, or with ``--queue-bypass`` accepts, what the rules queue) and close.
        Packets still held get no verdict here: the kernel drops them when the socket closes. Idempotent."""
        if self._sock is None:
            return
        try:
            self._sock.setblocking(True)
            self._sock.send(
                _message(
                    _NFQNL_MSG_CONFIG,
                    self.queue_num,
                    _attr(_NFQA_CFG_CMD, _CFG_CMD.pack(_NFQNL_CFG_CMD_UNBIND, socket.AF_UNSPEC)),
                    _NLM_F_REQUEST,
                )
            )
        except OSError:
            pass
        self._sock.close()
        self._sock = None


@dataclass(frozen=True)
class QueueStatistics:
    """The kernel's line for one queue in ``/proc/thread-self/net/netfilter/nfnetlink_queue`` (per namespace).

    Attributes:
        held: packets waiting for a verdict (``queue_total``).
        queue_dropped: dropped because the queue was full (``maxlen``).
        user_dropped: dropped because the socket's buffer was full.
        id_sequence: the last packet id handed out.
    """

    queue_num: int
    portid: int
    held: int
    queue_dropped: int
    user_dropped: int
    id_sequence: int


def queue_statistics(queue_num: int, text: str | None = None) -> QueueStatistics | None:
    """The kernel's counters for ``queue_num`` in the calling thread's namespace, or None if not bound.
    ``text`` replaces reading the proc file (tests)."""
    if text is None:
        try:
            with open("/proc/thread-self/net/netfilter/nfnetlink_queue") as f:  # this thread's namespace
                text = f.read(1 << 16)
        except OSError:
            return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and all(x.lstrip("-").isdigit() for x in fields[:8]) and int(fields[0]) == queue_num:
            q, portid, held, _mode, _range, qdrop, udrop, seq = (int(x) for x in fields[:8])
            return QueueStatistics(q, portid, held, qdrop, udrop, seq)
    return None


class RawInjector:
    """Send IP packets as they are (header included) out of this namespace's stack, marked.

    ``AF_INET``/``AF_INET6`` with ``IPPROTO_RAW`` imply ``IP_HDRINCL``/``IPV6_HDRINCL`` (raw(7)); the packet is
    routed as a locally sent one (``OUTPUT``, then ``POSTROUTING``), so conntrack and NAT treat it as a packet of
    the flow it belongs to. ``SO_MARK`` lets the queueing rule skip it.
    """

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.errors = 0
        self._socks: dict[int, socket.socket] = {}
        for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
            sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setblocking(False)
            self._socks[version] = sock

    def send(self, packet: bytes) -> bool:
        """Send one packet; False (counted in ``errors``) if it is not IP or the kernel refused it."""
        version = packet[0] >> 4 if packet else 0
        sock = self._socks.get(version)
        if sock is None or len(packet) < (20 if version == 4 else 40):
            self.errors += 1
            return False
        dst = socket.inet_ntop(
            socket.AF_INET if version == 4 else socket.AF_INET6, packet[16:20] if version == 4 else packet[24:40]
        )
        try:
            sock.sendto(packet, (dst, 0))
        except OSError:
            self.errors += 1
            return False
        return True

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
