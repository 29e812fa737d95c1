"""Which local socket (and so which uid) sent a packet: the owner lookup behind per-app `FlowMetaData`.

Apple's per-app VPN knows each flow's app because the system opened the socket for it (R3, R10). On Linux the
namespace's socket tables say the same thing: ``/proc/net/{tcp,tcp6,udp,udp6}`` list every socket with its
local address and port and the uid that created it (``proc(5)``, ``net/ipv4/tcp_ipv4.c`` ``get_tcp4_sock``,
``net/ipv4/udp.c`` ``udp4_format_sock``). A packet read from the utun carries its socket's local address and
port as source, so ``(version, protocol, source address, source port)`` finds the socket, and its uid names the
app (`netsim.apple.AppRule`). ``/proc/self/net`` shows the network namespace of the reading process, which is
why the provider host (running inside ``mac``) sees the apps' sockets.

The tables are text the kernel formats, but netsim treats them as untrusted input anyway: a truncated or
garbled line is skipped and counted, never an exception. Addresses are printed as 32-bit words in host byte
order (``%08X`` of a ``__be32``), ports as ``%04X`` of the host-order port.

This module does I/O (file reads) and is not on the hot path: the flow caches answers per flow tuple and calls
this only on a cache miss, and only when the routing method is ``SOURCE_APPLICATION``; the lookup itself keeps
short-lived table snapshots (see `ProcNetOwnerLookup`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from netsim.apple.protocol import AppRule
from netsim.errors import ConfigError

__all__ = [
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "OwnerLookup",
    "OwnerLookupStatistics",
    "ProcNetOwnerLookup",
    "SocketEntry",
    "app_rules_by_uid",
    "parse_proc_net",
    "parse_proc_net_line",
]

IPPROTO_TCP = 6
IPPROTO_UDP = 17
_TCP_TIME_WAIT = 0x06  # include/net/tcp_states.h; timewait sockets are listed with uid 0, not their owner's
_LITTLE = sys.byteorder == "little"
_ANY4 = bytes(4)
_ANY6 = bytes(16)
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # RFC 4291 §2.5.5.2 IPv4-mapped IPv6 address

OwnerLookup = Callable[[int, int, bytes, int], "int | None"]
"""``(ip_version, ip_protocol, source_address_bytes, source_port) -> uid or None``."""

_FILES: dict[tuple[int, int], tuple[str, ...]] = {
    # An IPv4 packet may come from an IPv4 socket or a dual-stack IPv6 socket (listed with a mapped address).
    (4, IPPROTO_TCP): ("tcp", "tcp6"),
    (4, IPPROTO_UDP): ("udp", "udp6"),
    (6, IPPROTO_TCP): ("tcp6",),
    (6, IPPROTO_UDP): ("udp6",),
}


@dataclass(frozen=True, slots=True)
class SocketEntry:
    """One parsed line of a ``/proc/net`` socket table (addresses as network-order bytes)."""

    local_address: bytes
    local_port: int
    remote_address: bytes
    remote_port: int
    state: int
    uid: int
    inode: int


def _address(hexword: str) -> bytes:
    raw = bytes.fromhex(hexword)
    if len(raw) not in (4, 16):
        raise ValueError(hexword)
    if _LITTLE:
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return raw


def _endpoint(field: str) -> tuple[bytes, int]:
    addr, sep, port = field.partition(":")
    if not sep or len(port) != 4:
        raise ValueError(field)
    return _address(addr), int(port, 16)


def app_rules_by_uid(rules: Sequence[AppRule] | None) -> dict[int, AppRule]:
    """Validate per-app rules for ``SOURCE_APPLICATION`` routing and index them by uid.

    Raises:
        ConfigError: no rules, a rule without a uid (netsim selects apps by uid), or two rules for one uid.
    """
    if not rules:
        raise ConfigError(
            "routing_method SOURCE_APPLICATION needs app_rules: add AppRule(signing_identifier, uid=...) entries",
            source="TunnelProviderProtocol.app_rules",
        )
    by_uid: dict[int, AppRule] = {}
    for rule in rules:
        if rule.uid is None:
            raise ConfigError(
                f"AppRule({rule.signing_identifier!r}) has no uid; on Linux netsim selects an app's traffic by the "
                "uid it runs as, so give the app its own uid and set AppRule.uid",
                source="TunnelProviderProtocol.app_rules",
            )
        if rule.uid in by_uid:
            raise ConfigError(
                f"AppRule({rule.signing_identifier!r}) and AppRule({by_uid[rule.uid].signing_identifier!r}) both "
                f"claim uid {rule.uid}; one uid can name only one app",
                source="TunnelProviderProtocol.app_rules",
            )
        by_uid[rule.uid] = rule
    return by_uid


def parse_proc_net_line(line: str) -> SocketEntry | None:
    """Parse one socket line of ``/proc/net/{tcp,tcp6,udp,udp6}``; None for the header or anything malformed."""
    fields = line.split()
    # 10 columns up to the inode, and at least one after it: a line cut inside the inode is not trusted.
    if len(fields) < 11 or not fields[0].endswith(":"):
        return None
    try:
        local, lport = _endpoint(fields[1])
        remote, rport = _endpoint(fields[2])
        if len(local) != len(remote) or len(fields[3]) != 2:
            return None
        state = int(fields[3], 16)
        uid = int(fields[7])
        inode = int(fields[9])
    except ValueError:
        return None
    if uid < 0 or inode < 0:
        return None
    return SocketEntry(local, lport, remote, rport, state, uid, inode)


def parse_proc_net(text: str) -> tuple[list[SocketEntry], int]:
    """Parse a whole table: ``(entries, malformed_line_count)``; the header line is not counted as malformed."""
    entries: list[SocketEntry] = []
    bad = 0
    for i, line in enumerate(text.splitlines()):
        if not line.strip() or (i == 0 and "local_address" in line):
            continue
        entry = parse_proc_net_line(line)
        if entry is None:
            bad += 1
        else:
            entries.append(entry)
    return entries, bad


@dataclass(frozen=True, slots=True)
class OwnerLookupStatistics:
    """Counters of a `ProcNetOwnerLookup`.

    Attributes:
        lookups: calls.
        found: calls that returned a uid.
        table_reads: ``/proc/net`` files read (a lookup reads one or two).
        unreadable: files that could not be read (e.g. no IPv6 in the kernel).
        malformed_lines: candidate lines that did not parse.
    """

    lookups: int
    found: int
    table_reads: int
    unreadable: int
    malformed_lines: int


class ProcNetOwnerLookup:
    """An `OwnerLookup` over ``/proc/net`` socket tables: the uid of the socket a packet left from.

    Matching: a socket bound to the packet's exact source address and port wins; else one bound to the wildcard
    address (``0.0.0.0``, ``::``) on that port. IPv4 packets also match dual-stack IPv6 sockets (``::ffff:a.b.c.d``
    or ``::``). TCP TIME_WAIT entries are ignored (the kernel lists them with uid 0). With ``SO_REUSEPORT`` several
    sockets may share a port; the first listed wins.

    Cost. Reading a table makes the kernel walk its whole socket hash (about 0.4-0.5 ms for ``udp`` on the test
    machine, whatever the socket count), while searching the text is microseconds. So each table's text is kept
    as a snapshot: a lookup first searches a snapshot up to ``max_age`` old, and re-reads only when the socket is
    not in it and the snapshot is at least ``min_refresh`` old. A burst of new flows then costs one read, and a
    flood of packets from unknown sockets at most one read per table per ``min_refresh``.

    Args:
        proc_net: the directory holding the tables; ``/proc/self/net`` is the caller's namespace, and
            ``/proc/<pid>/net`` that of any process (e.g. one running in a lab namespace).
        max_age: seconds a snapshot answers without being re-read (a port closed and reused by another uid within
            this time can be misattributed).
        min_refresh: seconds between re-reads triggered by sockets missing from the snapshot.
        clock: monotonic seconds (injected for tests).
    """

    def __init__(
        self,
        proc_net: str | Path = "/proc/self/net",
        *,
        max_age: float = 0.5,
        min_refresh: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.proc_net = Path(proc_net)
        self.max_age = max_age
        self.min_refresh = min_refresh
        self._clock = clock
        self._snapshots: dict[str, tuple[float, str | None]] = {}  # table name -> (read at, text or unreadable)
        self._lookups = 0
        self._found = 0
        self._reads = 0
        self._unreadable = 0
        self._malformed = 0

    def _table(self, name: str, now: float, max_age: float) -> tuple[str | None, bool]:
        """(text of table ``name`` at most ``max_age`` old, whether it was read just now)."""
        snapshot = self._snapshots.get(name)
        if snapshot is not None and now - snapshot[0] < max_age:
            return snapshot[1], False
        text: str | None
        try:
            text = (self.proc_net / name).read_text()
        except OSError:
            self._unreadable += 1
            text = None
        else:
            self._reads += 1
        self._snapshots[name] = (now, text)
        return text, True

    def _search(
        self, text: str, protocol: int, port: int, exact: bytes, wildcard: bytes
    ) -> tuple[int | None, int | None]:
        """(uid of the exact-address socket, uid of a wildcard-address socket) on ``port`` in one table's text."""
        needle = f":{port:04X} "  # ends a local_address (or rem_address) field; parse only lines containing it
        found_wildcard: int | None = None
        pos = text.find(needle)
        while pos >= 0:
            start = text.rfind("\n", 0, pos) + 1
            end = text.find("\n", pos)
            if end < 0:
                end = len(text)
            entry = parse_proc_net_line(text[start:end])
            pos = text.find(needle, end)
            if entry is None:
                self._malformed += 1
                continue
            if entry.local_port != port or (protocol == IPPROTO_TCP and entry.state == _TCP_TIME_WAIT):
                continue  # the needle matched the remote endpoint, or a timewait entry (uid 0)
            if entry.local_address == exact:
                return entry.uid, found_wildcard
            if found_wildcard is None and entry.local_address == wildcard:
                found_wildcard = entry.uid
        return None, found_wildcard

    def _find(
        self, version: int, protocol: int, source: bytes, port: int, *, now: float, max_age: float
    ) -> tuple[int | None, bool]:
        """(uid or None, whether any table searched was older than ``min_refresh``)."""
        stale = False
        wildcard_uid: int | None = None
        for name in _FILES[(version, protocol)]:
            exact, wildcard = source, (_ANY4 if version == 4 else _ANY6)
            if version == 4 and name.endswith("6"):
                exact, wildcard = _MAPPED_PREFIX + source, _ANY6
            text, fresh = self._table(name, now, max_age)
            if not fresh and now - self._snapshots[name][0] >= self.min_refresh:
                stale = True
            if text is None:
                continue
            uid, any_uid = self._search(text, protocol, port, exact, wildcard)
            if uid is not None:
                return uid, stale
            if wildcard_uid is None:
                wildcard_uid = any_uid
        return wildcard_uid, stale

    def __call__(self, version: int, protocol: int, source: bytes, source_port: int) -> int | None:
        """The uid owning the socket ``(source, source_port)`` of ``protocol``, or None if there is none."""
        self._lookups += 1
        if (version, protocol) not in _FILES:
            return None
        now = self._clock()
        uid, stale = self._find(version, protocol, source, source_port, now=now, max_age=self.max_age)
        if uid is None and stale:  # the socket may be newer than the snapshot
            uid, _ = self._find(version, protocol, source, source_port, now=now, max_age=self.min_refresh)
        if uid is not None:
            self._found += 1
        return uid

    def statistics(self) -> OwnerLookupStatistics:
        """A snapshot of the counters."""
        return OwnerLookupStatistics(self._lookups, self._found, self._reads, self._unreadable, self._malformed)
