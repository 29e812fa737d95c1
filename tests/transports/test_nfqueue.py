"""NFQUEUE (netsim.transports.nfqueue): the parser on crafted and hostile bytes, and the client on the real kernel.

The root test uses a fresh namespace with an iptables-nft ``NFQUEUE`` rule on ``lo``: packets queued, verdicts
given out of order (the later packet first), a drop, a marked copy that the rule lets pass (not queued again),
the kernel's own counters, and a second bind of the same queue refused.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import subprocess
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netsim.errors import BadPacket
from netsim.testing.require import require_binary, require_root
from netsim.transports.netns import run_in_netns
from netsim.transports.nfqueue import (
    NF_ACCEPT,
    NF_DROP,
    NfQueue,
    QueuedPacket,
    RawInjector,
    parse_messages_untrusted,
    queue_statistics,
)

IP_PACKET = bytes.fromhex("4500001c0001000040117cce7f0000017f000001d4310007000812ab")


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _packet_message(packet_id: int, payload: bytes, mark: int = 0) -> bytes:
    body = struct.pack("!BBH", 2, 0, 7)
    body += _attr(1, struct.pack("!IHB", packet_id, 0x0800, 3))
    body += _attr(3 | 0x4000, struct.pack("!I", mark))  # NLA_F_NET_BYTEORDER is masked off
    body += _attr(6, struct.pack("!I", 1))
    body += _attr(10, payload)
    return struct.pack("=IHHII", 16 + len(body), (3 << 8) | 0, 0, 0, 0) + body


def test_a_packet_message_parses() -> None:
    items = list(parse_messages_untrusted(_packet_message(42, IP_PACKET, mark=9)))
    assert items == [QueuedPacket(42, 0x0800, 3, IP_PACKET, mark=9, indev=0, outdev=1)]


def test_the_socket_owner_parses_when_sent() -> None:
    """NFQA_UID / NFQA_GID (16, 17): sent for a queue configured with ``uid_gid``; absent, they stay None."""
    message = bytearray(_packet_message(5, IP_PACKET))
    extra = _attr(16, struct.pack("!I", 65534)) + _attr(17, struct.pack("!I", 100))
    message += extra
    struct.pack_into("=I", message, 0, len(message))
    (item,) = parse_messages_untrusted(bytes(message))
    assert isinstance(item, QueuedPacket) and (item.uid, item.gid) == (65534, 100)
    (plain,) = parse_messages_untrusted(_packet_message(5, IP_PACKET))
    assert isinstance(plain, QueuedPacket) and (plain.uid, plain.gid) == (None, None)
    short = bytearray(_packet_message(5, IP_PACKET)) + _attr(16, b"\x00\x01")  # a truncated u32: refused
    struct.pack_into("=I", short, 0, len(short))
    with pytest.raises(BadPacket):
        list(parse_messages_untrusted(bytes(short)))


def test_several_messages_and_an_error_in_one_datagram() -> None:
    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -errno.EBUSY) + bytes(16)
    data = _packet_message(1, b"a") + err + _packet_message(2, b"bc")
    items = list(parse_messages_untrusted(data))
    assert [i if isinstance(i, int) else i.packet_id for i in items] == [1, -errno.EBUSY, 2]


def test_every_truncation_is_a_bad_packet_or_a_shorter_parse() -> None:
    data = _packet_message(5, IP_PACKET) + _packet_message(6, IP_PACKET)
    for cut in range(len(data)):
        try:
            list(parse_messages_untrusted(data[:cut]))
        except BadPacket:
            pass


def test_a_message_without_its_header_or_with_a_lying_length_is_refused() -> None:
    body = struct.pack("!BBH", 2, 0, 7) + _attr(10, b"x")
    no_hdr = struct.pack("=IHHII", 16 + len(body), 3 << 8, 0, 0, 0) + body
    with pytest.raises(BadPacket, match="no_packet_hdr"):
        list(parse_messages_untrusted(no_hdr))
    lying = bytearray(_packet_message(1, b"x"))
    lying[16 + 4 : 16 + 6] = struct.pack("=H", 200)  # the first attribute claims more than there is
    with pytest.raises(BadPacket, match="bad_attribute_length"):
        list(parse_messages_untrusted(bytes(lying)))
    many = struct.pack("!BBH", 2, 0, 7) + _attr(1, struct.pack("!IHB", 1, 0x800, 3)) + _attr(20, b"") * 100
    with pytest.raises(BadPacket, match="too_many_attributes"):
        list(parse_messages_untrusted(struct.pack("=IHHII", 16 + len(many), 3 << 8, 0, 0, 0) + many))


@given(st.binary(max_size=300))
def test_hostile_bytes_raise_only_bad_packet(data: bytes) -> None:
    try:
        list(parse_messages_untrusted(data))
    except BadPacket:
        pass


def test_the_kernels_queue_line() -> None:
    text = "    7  11202     3 2 65535     0     0        3  1\n 1001  99 0 2 65535 4 5 77 1\n"
    stats = queue_statistics(1001, text)
    assert stats is not None and (stats.held, stats.queue_dropped, stats.user_dropped, stats.id_sequence) == (
        0,
        4,
        5,
        77,
    )
    assert queue_statistics(8, text) is None and queue_statistics(8, "garbage\n") is None


@pytest.mark.reliability("F10")
@pytest.mark.lab
def test_queue_verdicts_out_of_order_drop_and_a_marked_copy(netns: str) -> None:
    require_root()
    require_binary("iptables")
    mark = 0x4E53ABCD
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    rule = f"-o lo -p udp --dport 9999 -m mark ! --mark {mark:#x} -j NFQUEUE --queue-num 7".split()
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "mangle", "-A", "OUTPUT", *rule], check=True)

    def body() -> dict[str, object]:
        out: dict[str, object] = {}
        queue = NfQueue(7)
        try:
            with pytest.raises(OSError) as busy:
                NfQueue(7)
            out["busy"] = busy.value.errno
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.bind(("127.0.0.1", 9999))
            rx.settimeout(2)
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range(3):
                tx.sendto(b"p%d" % i, ("127.0.0.1", 9999))
            got: list[QueuedPacket] = []
            deadline = time.monotonic() + 10
            while len(got) < 3 and time.monotonic() < deadline:
                select.select([queue], [], [], 0.5)
                got += queue.receive_batch()
            out["queued"] = [p.payload[28:] for p in got]
            out["held"] = getattr(queue_statistics(7), "held", None)
            queue.verdict(got[2].packet_id, NF_ACCEPT)
            queue.verdict(got[1].packet_id, NF_DROP)
            queue.verdict(got[0].packet_id, NF_ACCEPT)
            out["flushed"] = queue.flush()
            injector = RawInjector(mark)
            out["injected"] = injector.send(got[0].payload)
            injector.close()
            received = []
            rx.settimeout(1)
            try:
                while True:
                    received.append(rx.recv(100))
            except TimeoutError:
                pass
            out["received"] = received
            out["requeued"] = queue.receive_batch()
            out["held_after"] = getattr(queue_statistics(7), "held", None)
            out["bad"] = (queue.bad, queue.errors)
            rx.close()
            tx.close()
        finally:
            queue.close()
        out["unbound"] = queue_statistics(7)
        return out

    out = run_in_netns(netns, body)
    assert out["busy"] == errno.EPERM  # nfnetlink_queue: the queue belongs to another socket
    assert out["queued"] == [b"p0", b"p1", b"p2"] and out["held"] == 3
    assert out["flushed"] == 3 and out["injected"] is True
    assert out["received"] == [b"p2", b"p0", b"p0"]  # out of order, p1 dropped, p0's copy not queued again
    assert out["requeued"] == [] and out["held_after"] == 0 and out["bad"] == ({}, 0)
    assert out["unbound"] is None


@pytest.mark.lab
def test_uid_gid_names_the_sending_socket_owner(netns: str) -> None:
    """``uid_gid=True``: the kernel adds the owner of the packet's socket (here root's); without it: None."""
    require_root()
    require_binary("iptables")
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    rule = "-o lo -p udp --dport 9998 -j NFQUEUE --queue-num 8".split()
    subprocess.run(["ip", "netns", "exec", netns, "iptables", "-t", "mangle", "-A", "OUTPUT", *rule], check=True)

    def body() -> list[tuple[int | None, int | None]]:
        owners = []
        for uid_gid in (True, False):
            queue = NfQueue(8, uid_gid=uid_gid)
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                tx.sendto(b"who", ("127.0.0.1", 9998))
                got: list[QueuedPacket] = []
                deadline = time.monotonic() + 10
                while not got and time.monotonic() < deadline:
                    select.select([queue], [], [], 0.5)
                    got += queue.receive_batch()
                owners += [(p.uid, p.gid) for p in got]
                for p in got:
                    queue.verdict(p.packet_id, NF_DROP)
                queue.flush()
            finally:
                tx.close()
                queue.close()
        return owners

    assert run_in_netns(netns, body) == [(0, 0), (None, None)]
