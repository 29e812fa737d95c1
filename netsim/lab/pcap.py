"""Per-link packet capture with tcpdump inside a namespace, its drop accounting, and a reader for tests.

tcpdump runs with ``--immediate-mode -U`` (flush per packet, so a capture is readable while running) and
``-w``; it is ready when it prints "listening on" (pcap activated), which the lab waits for before any traffic.
It runs at `CAPTURE_NICE`, above the traffic it records, and is stopped only once its ring is drained.
``-Z root`` keeps it from dropping to a user that cannot write the pcap directory.

Completeness. A capture is only as complete as the kernel ring tcpdump reads from: when tcpdump falls behind, the
kernel drops what does not fit and counts it. libpcap's ring (``TPACKET_V2`` in immediate mode) is made of
fixed-size frames, one per packet, each as large as the snap length allows (on a TUN device, raw IP, the frame is
the snap length itself; on Ethernet links libpcap caps it at MTU, or 65535 with offloads). tcpdump's defaults, a
2 MiB buffer and a 262144-byte snap length, leave a TUN capture 8 frames: a 1 s iperf3 then lost 12,824 of 16,616
packets on ``mac-utun0``. So every capture gets an explicit buffer (``-B``, KiB) and snap length (``-s``), and at
stop tcpdump is sent SIGTERM and waited for: it leaves its loop, closes the file and prints its statistics on
stderr ("N packets captured / N packets received by filter / N packets dropped by kernel", plus "N packets
dropped by interface" when that is non-zero). `parse_tcpdump_stats` reads them; `CaptureStats` says per file
whether it is complete, partial (with the number dropped) or unknown (tcpdump died before printing).
"""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from netsim.errors import LabError
from netsim.lab.process import LabProcess

__all__ = [
    "CAPTURE_NICE",
    "CAPTURE_SUMMARY",
    "DEFAULT_BUFFER_KIB",
    "DEFAULT_SNAPLEN",
    "Capture",
    "CaptureStats",
    "TcpdumpStats",
    "capture_report_lines",
    "check_capture_options",
    "parse_tcpdump_stats",
    "read_capture_summary",
    "read_pcap",
    "write_capture_summary",
]

#: Kernel ring per capture, in KiB (``tcpdump -B``): 64 MiB. With `DEFAULT_SNAPLEN` that is ~1,000 frames on a
#: TUN or offloading veth link (measured: a stopped tcpdump kept 1,027 datagrams; 32 MiB kept 517, and a CI run
#: under load lost 29 packets of a burst sent in rounds of 400 frames), and ~40,000 on a link without offloads.
DEFAULT_BUFFER_KIB = 64 * 1024
#: Scheduling priority (nice) of every lab tcpdump: above the lab's own traffic (nice 0), so that on a loaded
#: machine the instrument is not starved by what it measures and its ring drains while a burst is in flight.
CAPTURE_NICE = -10
#: Bytes kept per packet (``tcpdump -s``): a whole IPv4/IPv6 packet of the largest size (65535), so nothing the
#: lab carries is truncated, in frames a quarter of tcpdump's default 262144.
DEFAULT_SNAPLEN = 65535
#: File in the pcap directory where the lab writes every capture's `CaptureStats` at teardown.
CAPTURE_SUMMARY = "captures.json"

_DRAIN_TIMEOUT = 2.0  # at most this long waiting for tcpdump to empty its ring before SIGTERM
_DRAIN_STEP = 0.02
_MAX_STDERR = 64 * 1024  # the statistics are the last lines; never read an unbounded log
_STAT_LINE = re.compile(
    r"^(?P<n>\d{1,20}) packets? (?P<what>captured|received by filter|dropped by kernel|dropped by interface)$",
    re.MULTILINE,
)
_FIELDS = {
    "captured": "captured",
    "received by filter": "received",
    "dropped by kernel": "dropped_kernel",
    "dropped by interface": "dropped_interface",
}


@dataclass(frozen=True)
class TcpdumpStats:
    """tcpdump's end-of-capture statistics (tcpdump(8): "packets ``captured``", "``received by filter``",
    "``dropped by kernel``"; "dropped by interface" only appears when non-zero, so it defaults to 0)."""

    captured: int
    received: int
    dropped_kernel: int
    dropped_interface: int = 0

    @property
    def dropped(self) -> int:
        """Packets lost before tcpdump saw them (kernel ring full, or the interface's own drops)."""
        return self.dropped_kernel + self.dropped_interface

    @property
    def unread(self) -> int:
        """Packets the kernel queued in the ring that tcpdump never wrote: still there when it stopped.

        "received by filter" counts every packet the socket was offered, the ring's drops included (the kernel
        adds them in ``PACKET_STATISTICS``), so a drained capture has ``captured + dropped_kernel == received``.
        """
        return max(0, self.received - self.dropped_kernel - self.captured)


def parse_tcpdump_stats(stderr: str) -> TcpdumpStats | None:
    """The statistics tcpdump printed last in ``stderr``, or None if it never printed the three required lines.

    Only the last ``_MAX_STDERR`` characters are read (tcpdump prints its summary last). When the text holds
    several summaries (a reused log), the last value of each line wins.
    """
    found: dict[str, int] = {}
    for match in _STAT_LINE.finditer(stderr[-_MAX_STDERR:]):
        found[_FIELDS[match["what"]]] = int(match["n"])
    if not {"captured", "received", "dropped_kernel"} <= found.keys():
        return None
    return TcpdumpStats(**found)


@dataclass(frozen=True)
class CaptureStats:
    """What one capture file holds, as tcpdump counted it at stop.

    Attributes:
        name: the capture's name (``mac-utun0`` ...).
        path: the pcap file.
        stats: tcpdump's statistics, or None if it died before printing them (then completeness is unknown).
        returncode: tcpdump's exit status (negative: killed by that signal).
        buffer_kib: the kernel buffer it ran with (``-B``).
        snaplen: the snap length it ran with (``-s``).
        loopback: captured on ``lo`` or ``any`` (which includes ``lo``), where libpcap discards the outgoing copy of
            every loopback packet in user space (the kernel shows each twice): "received" counts both, so
            `TcpdumpStats.unread` says nothing there.
    """

    name: str
    path: Path
    stats: TcpdumpStats | None
    returncode: int | None
    buffer_kib: int
    snaplen: int
    loopback: bool = False

    def _unread(self) -> int:
        return 0 if self.stats is None or self.loopback else self.stats.unread

    @property
    def complete(self) -> bool:
        """True only when tcpdump reported its statistics, dropped nothing and left nothing unread."""
        return self.stats is not None and self.stats.dropped == 0 and self._unread() == 0

    @property
    def dropped(self) -> int | None:
        """Packets missing from the file: dropped, or left unread in the ring at stop (None: unknown)."""
        return None if self.stats is None else self.stats.dropped + self._unread()

    @property
    def status(self) -> str:
        """``complete``, ``PARTIAL: N dropped`` or ``UNKNOWN: ...`` (one word for tables and logs)."""
        if self.stats is None:
            return f"UNKNOWN: tcpdump exited with {self.returncode} before printing its statistics"
        if unread := self._unread():
            return f"PARTIAL: {self.stats.dropped + unread} dropped ({unread} unread at stop)"
        if self.stats.dropped:
            return f"PARTIAL: {self.stats.dropped} dropped"
        return "complete"

    def describe(self) -> str:
        """One line: name, path, packet count and status."""
        count = "?" if self.stats is None else str(self.stats.captured)
        return f"{self.name}: {self.path} ({count} packets, {self.status})"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (`from_json` reads it back)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaptureStats:
        """Inverse of `to_json`."""
        stats = data.get("stats")
        return cls(
            name=str(data["name"]),
            path=Path(data["path"]),
            stats=TcpdumpStats(**{k: int(v) for k, v in stats.items()}) if stats else None,
            returncode=None if data.get("returncode") is None else int(data["returncode"]),
            buffer_kib=int(data["buffer_kib"]),
            snaplen=int(data["snaplen"]),
            loopback=bool(data.get("loopback", False)),
        )


def capture_report_lines(history: list[CaptureStats]) -> list[str]:
    """The lines ``netsim lab up``/``down`` and the demo print: one per capture file, partial ones marked."""
    return [f"  {'' if s.complete else '!! '}{s.describe()}" for s in history]


def write_capture_summary(directory: Path, run_id: str, history: list[CaptureStats]) -> Path:
    """Write ``<directory>/captures.json`` (the run id and every capture's stats); returns its path."""
    path = directory / CAPTURE_SUMMARY
    body = {"run_id": run_id, "captures": [s.to_json() for s in history]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_capture_summary(directory: str | Path, run_id: str | None = None) -> list[CaptureStats]:
    """The captures recorded in ``<directory>/captures.json`` ([] if absent, or written by another run)."""
    try:
        body = json.loads((Path(directory) / CAPTURE_SUMMARY).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(body, dict) or (run_id is not None and body.get("run_id") != run_id):
        return []
    try:
        return [CaptureStats.from_json(item) for item in body.get("captures", [])]
    except (KeyError, TypeError, ValueError, AttributeError):
        return []  # not a summary this version wrote


def check_capture_options(buffer_kib: int, snaplen: int) -> None:
    """Raise `LabError` unless ``buffer_kib`` (1 KiB..4 GiB) and ``snaplen`` (1..262144, tcpdump's maximum) are
    usable."""
    if not (isinstance(buffer_kib, int) and 0 < buffer_kib <= 4 * 1024 * 1024):
        raise LabError(f"capture buffer_kib={buffer_kib!r}: choose 1..4194304 KiB")
    if not (isinstance(snaplen, int) and 0 < snaplen <= 262144):
        raise LabError(f"capture snaplen={snaplen!r}: choose 1..262144 bytes")


class Capture:
    """A running tcpdump on ``role``/``ifname`` writing ``path``. Create with `netsim.lab.Lab.capture`."""

    def __init__(
        self,
        name: str,
        role: str,
        ifname: str,
        path: Path,
        process: LabProcess,
        *,
        buffer_kib: int = DEFAULT_BUFFER_KIB,
        snaplen: int = DEFAULT_SNAPLEN,
    ) -> None:
        self.name = name
        self.role = role
        self.ifname = ifname
        self.path = path
        self.process = process
        self.buffer_kib = buffer_kib
        self.snaplen = snaplen
        self.stats: CaptureStats | None = None  # set by stop_sync

    def __repr__(self) -> str:
        return f"<Capture {self.name} {self.path}>"

    @staticmethod
    def argv(
        ifname: str, path: Path, *, buffer_kib: int = DEFAULT_BUFFER_KIB, snaplen: int = DEFAULT_SNAPLEN
    ) -> list[str]:
        """tcpdump command line: no promiscuous mode needed on veth, explicit buffer and snap length, no name
        lookups."""
        check_capture_options(buffer_kib, snaplen)
        # --immediate-mode: hand each packet to tcpdump at once. Without it packets wait in the kernel's ring
        # buffer for a block timeout and those still there when SIGTERM arrives never reach the file.
        return [
            "tcpdump", "-i", ifname, "--immediate-mode", "-U", "-n",
            "-B", str(buffer_kib), "-s", str(snaplen), "-Z", "root", "-w", str(path),
        ]  # fmt: skip

    def wait_ready_sync(self, timeout: float = 10.0) -> None:
        """Block until tcpdump has activated the capture."""
        self.process.wait_output_sync(r"listening on", timeout, stream="stderr")

    def stop_sync(self, grace: float = 5.0) -> CaptureStats:
        """Stop tcpdump and return what the file holds (idempotent: a second call returns the same stats).

        SIGTERM (SIGINT would do the same): tcpdump breaks out of its loop, flushes and closes the file, then
        prints its statistics and exits 0. Only if it does not exit within ``grace`` is it killed, and then
        the statistics are unknown.
        """
        if self.stats is None:
            self._wait_drained(min(grace, _DRAIN_TIMEOUT))
            self.process.send_signal(signal.SIGTERM)
            try:
                rc = self.process.wait_sync(grace)
            except LabError:
                self.process.send_signal(signal.SIGKILL)
                rc = self.process.wait_sync()
            try:
                stderr = self.process.stderr()
            except OSError:
                stderr = ""
            self.stats = CaptureStats(
                self.name,
                self.path,
                parse_tcpdump_stats(stderr),
                rc,
                self.buffer_kib,
                self.snaplen,
                loopback=self.ifname in ("lo", "any"),
            )
        return self.stats

    def _wait_drained(self, timeout: float) -> None:
        """Wait (bounded) until tcpdump has emptied its ring: asleep in poll with the file no longer growing.

        SIGTERM ends tcpdump's loop at once, and what is still in the ring never reaches the file (it is then
        counted as `TcpdumpStats.unread`). tcpdump only sleeps when the ring holds nothing for it, so two looks
        ``_DRAIN_STEP`` apart that find it sleeping with the same file size mean it has caught up. A stopped
        (SIGSTOP) or exited tcpdump is not waited for.
        """
        deadline = time.monotonic() + timeout
        last: tuple[str, int] | None = None
        while time.monotonic() < deadline:
            try:
                stat = Path(f"/proc/{self.process.pid}/stat").read_text()
                state = stat.rsplit(")", 1)[1].split()[0]
                size = self.path.stat().st_size if self.path.exists() else 0
            except (OSError, IndexError):
                return
            if state not in ("R", "S", "D"):  # stopped, traced, zombie: nothing will drain
                return
            look = (state, size)
            if state == "S" and look == last:
                return
            last = look
            time.sleep(_DRAIN_STEP)

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
