"""The naive provider <-> helper loops users write first: the baselines netsim is measured against.

Two of them, both correct, one packet at a time. ``naive`` is a first version as it often looks:

* provider: python-pytun blocking ``read`` of one packet, scapy ``IP(raw)`` to look at it, one ``sendall`` of a
  2-byte length plus the packet per packet on the Unix socket; a second thread reads replies one at a time and
  does one ``tun.write`` per reply;
* helper: reads one packet at a time, dissects it with scapy, "forwards" it by swapping source and destination
  (addresses and ports) and rebuilds it with scapy (checksums recomputed), one ``sendall`` per packet.

``naive-careful`` (`careful_provider` / `careful_helper`) is the per-packet loop a careful user writes first,
with no scapy: a blocking ``os.read`` of one packet from the TUN fd (opened with ``TUNSETIFF`` by hand), the IP
version and length checked with `struct`, one ``sendall`` of a 2-byte length plus the packet per packet; the
helper swaps addresses and ports in place in a reused ``bytearray`` (`struct` fields, checksum-neutral) and
sends each reply on its own; the provider's reply thread does one ``os.write`` per reply. It is the fair
"what does netsim's batching buy over a plain loop" baseline: ``naive`` mostly measures scapy.

The reflection is the same job the C floor (``netsim/bench/c/floor.c``) and netsim's loop
(`netsim.bench.bench_loop.provider_main` / `helper_main`) do, so the three are comparable packet for packet.

    python -m netsim.bench.naive_loop helper <uds_path>
    python -m netsim.bench.naive_loop provider <tun_name> <uds_path>
    python -m netsim.bench.naive_loop careful-helper <uds_path>
    python -m netsim.bench.naive_loop careful-provider <tun_name> <uds_path>
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["careful_helper", "careful_provider", "careful_swap", "helper", "provider"]

_LEN = struct.Struct("!H")


def _recv_exact(f: Any, n: int) -> bytes | None:
    data = f.read(n)
    return data if data and len(data) == n else None


def _swap(raw: bytes) -> bytes:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    pkt: Any = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
    pkt.src, pkt.dst = pkt.dst, pkt.src
    for layer in (UDP, TCP):
        if pkt.haslayer(layer):
            l4 = pkt[layer]
            l4.sport, l4.dport = l4.dport, l4.sport
            del l4.chksum
    if pkt.version == 4:
        del pkt.chksum
    return bytes(pkt)


def _accept_one(path: str, who: str) -> socket.socket:
    """Listen on the Unix socket ``path``, say READY, and accept the one provider."""
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print(f"READY {who} {path}", flush=True)
    conn, _ = server.accept()
    server.close()
    return conn


def helper(path: str) -> None:
    """Accept one provider and reflect every packet it sends, one at a time."""
    conn = _accept_one(path, "helper")
    f = conn.makefile("rb")
    while True:
        head = _recv_exact(f, 2)
        if head is None:
            break
        raw = _recv_exact(f, _LEN.unpack(head)[0])
        if raw is None:
            break
        out = _swap(raw)
        conn.sendall(_LEN.pack(len(out)) + out)


def provider(tun_name: str, path: str) -> None:
    """Bridge a TUN and the helper, one packet per read, send and write."""
    import pytun
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    tun = pytun.TunTapDevice(name=tun_name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
    tun.up()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    print(f"READY provider {tun.name}", flush=True)

    def uplink() -> None:
        while True:
            raw = tun.read(tun.mtu + 64)
            pkt: Any = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
            if pkt.version not in (4, 6):
                continue
            sock.sendall(_LEN.pack(len(raw)) + raw)

    threading.Thread(target=uplink, daemon=True).start()
    f = sock.makefile("rb")
    while True:
        head = _recv_exact(f, 2)
        if head is None:
            break
        raw = _recv_exact(f, _LEN.unpack(head)[0])
        if raw is None:
            break
        tun.write(raw)


# ---------------------------------------------------------------------------------------- the careful loop
_TUNSETIFF = 0x400454CA  # linux/if_tun.h: _IOW('T', 202, int)
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ_FLAGS = struct.Struct("16sH")
_V4_HEAD = struct.Struct("!BBH")  # version/IHL, TOS, total length
_V6_PAYLOAD_LEN = struct.Struct("!H")  # at offset 4
_PORTS = struct.Struct("!HH")


def careful_swap(buf: bytearray, start: int, n: int) -> None:
    """Swap source/destination address (and TCP/UDP ports) of the packet in ``buf[start:start + n]`` in place.

    Checksum-neutral (RFC 1071: the one's-complement sum does not depend on word order). A packet too short for
    its header is left as it is.
    """
    o = start
    version = buf[o] >> 4
    if version == 4 and n >= 20:
        buf[o + 12 : o + 16], buf[o + 16 : o + 20] = buf[o + 16 : o + 20], buf[o + 12 : o + 16]
        l4, proto = o + (buf[o] & 15) * 4, buf[o + 9]
    elif version == 6 and n >= 40:
        buf[o + 8 : o + 24], buf[o + 24 : o + 40] = buf[o + 24 : o + 40], buf[o + 8 : o + 24]
        l4, proto = o + 40, buf[o + 6]
    else:
        return
    if proto in (6, 17) and o + n >= l4 + 4:
        sport, dport = _PORTS.unpack_from(buf, l4)
        _PORTS.pack_into(buf, l4, dport, sport)


def _valid_length(pkt: bytes) -> bool:
    """The checks a careful user makes before forwarding: a known IP version and a length that matches."""
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        return bool(_V4_HEAD.unpack_from(pkt)[2] == len(pkt))
    if len(pkt) >= 40 and pkt[0] >> 4 == 6:
        return bool(_V6_PAYLOAD_LEN.unpack_from(pkt, 4)[0] + 40 == len(pkt))
    return False


def _open_tun(name: str) -> int:
    """Open ``/dev/net/tun`` as ``name`` (IFF_TUN | IFF_NO_PI, blocking) and bring the link up."""
    import fcntl

    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, _IFREQ_FLAGS.pack(name.encode(), _IFF_TUN | _IFF_NO_PI))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(s, _SIOCGIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), 0))[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), flags | _IFF_UP))
    return fd


def _recv_into_exact(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _frames(conn: socket.socket, buf: bytearray) -> Iterator[int]:
    """Read length-prefixed packets into ``buf`` (length at 0, packet from 2), one at a time; yield each length."""
    view = memoryview(buf)
    while _recv_into_exact(conn, view[:2]):
        n = _LEN.unpack_from(buf)[0]
        if not _recv_into_exact(conn, view[2 : 2 + n]):
            return
        yield n


def careful_helper(path: str) -> None:
    """Accept one provider; per packet: read its length and bytes, swap in place, one ``sendall`` back."""
    conn = _accept_one(path, "careful-helper")
    buf = bytearray(2 + 65535)  # reused for every packet
    view = memoryview(buf)
    for n in _frames(conn, buf):
        careful_swap(buf, 2, n)
        conn.sendall(view[: 2 + n])


def careful_provider(tun_name: str, path: str) -> None:
    """Bridge a TUN and the helper: one blocking ``os.read``, one ``sendall``, one ``os.write`` per packet."""
    fd = _open_tun(tun_name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    print(f"READY careful-provider {tun_name}", flush=True)

    def uplink() -> None:
        while True:
            pkt = os.read(fd, 65535)
            if _valid_length(pkt):
                sock.sendall(_LEN.pack(len(pkt)) + pkt)

    threading.Thread(target=uplink, daemon=True).start()
    buf = bytearray(2 + 65535)
    view = memoryview(buf)
    for n in _frames(sock, buf):
        os.write(fd, view[2 : 2 + n])


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["helper"]:
            helper(sys.argv[2])
        elif sys.argv[1:2] == ["provider"]:
            provider(sys.argv[2], sys.argv[3])
        elif sys.argv[1:2] == ["careful-helper"]:
            careful_helper(sys.argv[2])
        elif sys.argv[1:2] == ["careful-provider"]:
            careful_provider(sys.argv[2], sys.argv[3])
        else:
            raise SystemExit(__doc__)
    except KeyboardInterrupt:
        pass
