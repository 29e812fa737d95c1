"""Per-link packet capture with tcpdump inside a namespace, and a reader for tests.

tcpdump runs with ``--immediate-mode -U`` (flush per packet, so a capture is readable while running) and
``-w``; it is ready when it prints "listening on" (pcap activated), which the lab waits for before any traffic.
SIGTERM makes it close the file cleanly. ``-Z root`` keeps it from dropping to a user that cannot write the
pcap directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netsim.lab.process import LabProcess

__all__ = ["Capture", "read_pcap"]


class Capture:
    """A running tcpdump on ``role``/``ifname`` writing ``path``. Create with `netsim.lab.Lab.capture`."""

    def __init__(self, name: str, role: str, ifname: str, path: Path, process: LabProcess) -> None:
        self.name = name
        self.role = role
        self.ifname = ifname
        self.path = path
        self.process = process

    def __repr__(self) -> str:
        return f"<Capture {self.name} {self.path}>"

    @staticmethod
    def argv(ifname: str, path: Path) -> list[str]:
        """tcpdump command line: no promiscuous mode needed on veth, full snaplen, no name lookups."""
        # --immediate-mode: hand each packet to tcpdump at once. Without it packets wait in the kernel's ring
        # buffer for a block timeout and those still there when SIGTERM arrives never reach the file.
        return ["tcpdump", "-i", ifname, "--immediate-mode", "-U", "-n", "-s", "0", "-Z", "root", "-w", str(path)]

    def wait_ready_sync(self, timeout: float = 10.0) -> None:
        """Block until tcpdump has activated the capture."""
        self.process.wait_output_sync(r"listening on", timeout, stream="stderr")

    def stop_sync(self) -> None:
        """Stop tcpdump (SIGTERM) and let it flush and close the file."""
        self.process.stop_sync(grace=5.0)

    def packets(self) -> list[Any]:
        """The packets captured so far, as scapy packets (see `read_pcap`)."""
        return read_pcap(self.path)


def read_pcap(path: str | Path) -> list[Any]:
    """Read a pcap with scapy (tests only; scapy is never used on the hot path).

    Tolerates a file still being written (a truncated last record is ignored).
    """
    import scapy.layers.inet
    import scapy.layers.inet6
    import scapy.layers.l2  # noqa: F401 -- registers Ethernet/IP/IPv6 so records dissect
    from scapy.utils import PcapReader

    packets: list[Any] = []
    try:
        with PcapReader(str(path)) as reader:
            for pkt in reader:
                packets.append(pkt)
    except EOFError:
        pass
    return packets
