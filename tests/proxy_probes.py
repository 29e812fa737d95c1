"""Probes the transparent-proxy lab tests run in ``mac`` (IPv4 and IPv6 files share them)."""

from __future__ import annotations

NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]

# One UDP datagram from a fixed source port (argv: host, port, source port, payload), the echo printed: bounded
# (one send, 3 s timeout). The family follows the host's address.
UDP_SENDER = """
import socket, sys
v6 = ":" in sys.argv[1]
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.bind(("::" if v6 else "0.0.0.0", int(sys.argv[3])))
s.sendto(sys.argv[4].encode(), (sys.argv[1], int(sys.argv[2])))
try:
    print("reply", s.recvfrom(2048)[0].decode())
except OSError as exc:
    print("noreply", exc)
"""
