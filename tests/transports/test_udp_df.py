"""The helper's UDP socket clears DF on IPv4 (issue 16, row LD4; the lab test is tests/lab/test_mtu_lab.py).

Linux's default for UDP (``IP_PMTUDISC_WANT``) sets DF, so a full-size WireGuard datagram crossing a smaller
link behind an ICMP black hole vanished silently. Before the fix this read ``IP_PMTUDISC_WANT`` (1).
"""

from __future__ import annotations

import socket

from netsim.transports.udp import UdpTransport

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT, IP_PMTUDISC_WANT = 0, 1


def _pmtudisc(transport: UdpTransport) -> int:
    return transport.sock.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER)


def test_ipv4_outer_datagrams_leave_with_df_clear() -> None:
    t = UdpTransport.open(socket.AF_INET, interface=None)
    try:
        assert _pmtudisc(t) == IP_PMTUDISC_DONT
    finally:
        t.close()


def test_fragment_outer_false_keeps_linux_default() -> None:
    t = UdpTransport.open(socket.AF_INET, interface=None, fragment_outer=False)
    try:
        assert _pmtudisc(t) == IP_PMTUDISC_WANT
    finally:
        t.close()


def test_ipv6_socket_is_left_alone() -> None:
    t = UdpTransport.open(socket.AF_INET6, interface=None)
    try:
        assert t.sock.getsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_MTU_DISCOVER", 23)) == IP_PMTUDISC_WANT
    finally:
        t.close()
