"""The naive provider <-> helper loop users write first: the baseline netsim is measured against.

Deliberately naive but correct, as a first version usually looks:

* provider: python-pytun blocking ``read`` of one packet, scapy ``IP(raw)`` to look at it, one ``sendall`` of a
  2-byte length plus the packet per packet on the Unix socket; a second thread reads replies one at a time and
  does one ``tun.write`` per reply;
* helper: reads one packet at a time, dissects it with scapy, "forwards" it by swapping source and destination
  (addresses and ports) and rebuilds it with scapy (checksums recomputed), one ``sendall`` per packet.

The reflection is the same job the C floor (``netsim/bench/c/floor.c``) and netsim's loop
(`netsim.bench.bench_loop.provider_main` / `helper_main`) do, so the three are comparable packet for packet.

    python -m netsim.bench.naive_loop helper <uds_path>
    python -m netsim.bench.naive_loop provider <tun_name> <uds_path>
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from typing import Any

__all__ = ["helper", "provider"]

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


def helper(path: str) -> None:
    """Accept one provider and reflect every packet it sends, one at a time."""
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print(f"READY helper {path}", flush=True)
    conn, _ = server.accept()
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


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["helper"]:
            helper(sys.argv[2])
        elif sys.argv[1:2] == ["provider"]:
            provider(sys.argv[2], sys.argv[3])
        else:
            raise SystemExit(__doc__)
    except KeyboardInterrupt:
        pass
