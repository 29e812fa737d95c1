"""Steady UDP probes from the lab's Mac to www's echo service, and the plaintext check of a physical capture.

Shared by the path-change and NAT-rebinding lab tests (tests/lab/test_uplink_lab.py, test_nat_rebinding_lab.py).
`SteadyProbes` sends one numbered datagram per family every ``interval`` from sockets in ``mac`` (through the
tunnel when one is up) and records when each was sent and when its echo came back, so a test can wait for the
first echo of a probe sent *after* a fault (recovery) without asserting any time. Bounded: it runs only while
its nursery task does, one datagram per family per interval.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import trio

from netsim.lab.addressing import ADDR
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap

PROBE = b"netsim-steady-probe "  # the probes' payload prefix: never on a physical link in the clear
CONTROL = b"netsim-steady-control "  # a deliberate cleartext datagram (the leak check's positive control)
TARGETS = {socket.AF_INET: str(ADDR.www_v4), socket.AF_INET6: str(ADDR.www_v6)}


@dataclass
class SteadyProbes:
    """UDP echo probes to www (v4 and v6) from ``mac``; `run` until cancelled."""

    lab: Lab
    interval: float = 0.05
    sent: dict[tuple[int, int], float] = field(default_factory=dict)  # (family, seq) -> trio time sent
    echoed: dict[tuple[int, int], float] = field(default_factory=dict)  # (family, seq) -> trio time echoed

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        socks = {fam: trio.socket.from_stdlib_socket(self.lab.socket("mac", fam, socket.SOCK_DGRAM)) for fam in TARGETS}
        try:
            async with trio.open_nursery() as nursery:
                for fam, sock in socks.items():
                    nursery.start_soon(self._receive, fam, sock)
                task_status.started()
                seq = 0
                while True:
                    for fam, sock in socks.items():
                        self.sent[(fam, seq)] = trio.current_time()
                        try:
                            await sock.sendto(PROBE + str(seq).encode(), (TARGETS[fam], 7))
                        except OSError:  # no route for a moment (a link down): the probe is lost, as an app's
                            pass
                    seq += 1
                    await trio.sleep(self.interval)
        finally:
            for sock in socks.values():
                sock.close()

    async def _receive(self, fam: int, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data = await sock.recv(256)
            except OSError:  # an ICMP error queued on the socket
                continue
            if data.startswith(PROBE):
                self.echoed.setdefault((fam, int(data[len(PROBE) :])), trio.current_time())

    def recovered_since(self, since: float) -> bool:
        """True when, for both families, a probe sent after ``since`` was echoed."""
        return all(any(fam == f and sent > since for (f, _), sent in self._echoed_sent()) for fam in TARGETS)

    def _echoed_sent(self) -> list[tuple[tuple[int, int], float]]:
        return [(key, self.sent[key]) for key in self.echoed if key in self.sent]

    async def wait_recovered(self, since: float, timeout: float) -> float | None:
        """Wait (at most ``timeout`` s) until `recovered_since` ``since``; the seconds it took, None if never."""
        with trio.move_on_after(timeout):
            while not self.recovered_since(since):
                await trio.sleep(0.02)
            return trio.current_time() - since
        return None

    def lost_between(self, start: float, end: float) -> int:
        """Probes sent in [start, end) that were never echoed."""
        return sum(1 for key, t in self.sent.items() if start <= t < end and key not in self.echoed)


def send_control(lab: Lab, ifname: str) -> None:
    """One cleartext datagram to www out of ``mac``'s ``ifname`` (``SO_BINDTODEVICE``: it skips the tunnel), so a
    capture of that link shows what a leak looks like to `plaintext_packets`."""
    sock = lab.socket("mac", socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.sendto(CONTROL + ifname.encode(), (TARGETS[socket.AF_INET], 7))
    finally:
        sock.close()


def _inner_host(addr: str) -> bool:
    ip = ip_address(addr)
    return any(ip.version == n.version and ip in n for n in (ADDR.inet_hosts_net_v4, ADDR.inet_hosts_net_v6))


def plaintext_packets(pcap: Path) -> dict[str, list[str]]:
    """Packets of a physical link's capture that carry an inner destination in the clear: to or from an internet
    host (www, dns), or with a probe's payload. ``{"control": [...], "leak": [...], "to_server": [...]}``
    (summaries): the control is `send_control`'s datagrams, ``to_server`` the datagrams to the VPN server."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6

    out: dict[str, list[str]] = {"control": [], "leak": [], "to_server": []}
    for pkt in read_pcap(pcap):
        raw = bytes(pkt)
        layer = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        hosts = layer is not None and (_inner_host(layer.src) or _inner_host(layer.dst))
        if CONTROL in raw:
            out["control"].append(pkt.summary())
        elif hosts or PROBE in raw:
            out["leak"].append(pkt.summary())
        elif layer is not None and layer.dst == str(ADDR.vpn_wan_v4) and pkt.haslayer(UDP):
            out["to_server"].append(pkt.summary())
    return out
