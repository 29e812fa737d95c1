"""What the provider <-> helper IPC carries: the enums of the wire format and the event dataclasses.

Every frame type has one event class here (`PacketBatch` for PACKETS); `netsim.core.ipc._codec` maps each class to
its frame type and back through tables, and `netsim.core.ipc._connection.Connection` hands these objects in and
out. `ConnectionClosed` and `NEED_DATA` are local: they never travel on the wire.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

Buffer = bytes | bytearray | memoryview


class Role(enum.IntEnum):
    """Which end of the IPC a `Connection` is. The provider connects; the helper accepts."""

    PROVIDER = 1
    HELPER = 2


class MessageType(enum.IntEnum):
    """Frame ``type`` byte."""

    HELLO = 1
    HELLO_ACK = 2
    PACKETS = 3
    SETTINGS = 4
    STATS_REQUEST = 5
    STATS_RESPONSE = 6
    POLICY_UPDATE = 7
    ERROR = 8
    GOODBYE = 9
    PING = 10
    PONG = 11
    POLICY_RESULT = 12


class Capability(enum.IntFlag):
    """Optional features a side offers in HELLO; HELLO_ACK carries the intersection.

    STATS, POLICY and PING are advisory. POLICY_RESULT gates a frame type: the helper answers a POLICY_UPDATE
    with a POLICY_RESULT only when both sides offered it, so a provider that predates it never receives one.
    """

    NONE = 0
    STATS = 1
    POLICY = 2
    PING = 4
    POLICY_RESULT = 8


ALL_CAPABILITIES: Final = Capability.STATS | Capability.POLICY | Capability.PING | Capability.POLICY_RESULT
"""Every capability this version of netsim implements: what its provider and helper offer in HELLO."""


class ErrorCode(enum.IntEnum):
    """Codes carried by an ERROR frame (the sender closes after it)."""

    PROTOCOL = 1
    VERSION = 2
    AUTH = 3
    TOO_BIG = 4
    BUSY = 5
    INTERNAL = 6
    POLICY = 7  # a POLICY_UPDATE did not parse: the old policy stays, the session closes
    TIMEOUT = 8  # the peer did not answer a liveness PING within the deadline


class GoodbyeReason(enum.IntEnum):
    """Why a side said GOODBYE."""

    NORMAL = 0
    SHUTDOWN = 1
    RESTART = 2


class NeedData:
    """Sentinel type: `Connection.next_event` needs more bytes. Compare with ``is NEED_DATA``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame, provider -> helper: what the provider speaks and can receive.

    ``token`` is an optional shared secret checked by the helper in constant time, on top of the SO_PEERCRED uid
    check the transport does before reading any frame.
    """

    role: Role
    versions: tuple[int, ...]
    capabilities: int
    max_frame: int
    token: bytes = b""


@dataclass(frozen=True, slots=True)
class HelloAck:
    """Helper -> provider: the chosen version, the common capabilities and the helper's receive cap."""

    version: int
    role: Role
    capabilities: int
    max_frame: int


@dataclass(frozen=True, slots=True)
class Settings:
    """Opaque tunnel settings (UTF-8 JSON by convention); either direction."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """Ask the peer for its counters; answered by a `StatsResponse` with the same ``request_id``."""

    request_id: int


@dataclass(frozen=True, slots=True)
class StatsResponse:
    """Counters as a JSON object (e.g. a `netsim.core.ledger.LedgerSnapshot.to_json`)."""

    request_id: int
    stats: dict[str, Any] = field(hash=False)


@dataclass(frozen=True, slots=True)
class PolicyUpdate:
    """Provider -> helper: a complete new policy, applied atomically by the receiver (it arrives whole)."""

    generation: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """Helper -> provider: the answer to the POLICY_UPDATE of ``generation`` (needs `Capability.POLICY_RESULT`).

    ``code`` 0 means applied; otherwise it is an `ErrorCode` (``POLICY``: the payload did not parse, the old
    policy stays in force) and ``message`` says why. Unlike ERROR it does not end the session.
    """

    generation: int
    code: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass(frozen=True, slots=True)
class Error:
    """A fatal error report; the sender sends nothing after it."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Orderly close; the sender sends nothing after it."""

    reason: int = GoodbyeReason.NORMAL
    message: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe; the peer answers `Pong` with the same nonce."""

    nonce: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to `Ping`."""

    nonce: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Local event: the peer closed its end. ``clean`` is true when it said GOODBYE or ERROR first."""

    clean: bool


class PacketBatch:
    """A decoded PACKETS frame: one buffer plus per-packet family and length, no per-packet objects until used.

    Iterating yields ``(family, memoryview)`` pairs sliced out of the receive buffer (zero copy). The views stay
    valid while referenced; call `copy_packets` to own the bytes instead.
    """

    __slots__ = ("_data", "families", "lengths")

    def __init__(self, data: memoryview, families: tuple[int, ...], lengths: tuple[int, ...]) -> None:
        self._data = data
        self.families = families
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[tuple[int, memoryview]]:
        data = self._data
        pos = 0
        for fam, n in zip(self.families, self.lengths, strict=True):
            yield fam, data[pos : pos + n]
            pos += n

    @property
    def nbytes(self) -> int:
        """Total payload bytes of all packets."""
        return self._data.nbytes

    def packets(self) -> list[memoryview]:
        """The packets as memoryview slices (zero copy)."""
        return [view for _, view in self]

    def copy_packets(self) -> list[bytes]:
        """The packets as owned ``bytes`` (copies; releases nothing by itself)."""
        return [bytes(view) for _, view in self]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PacketBatch):
            return NotImplemented
        return self.families == other.families and self.lengths == other.lengths and self._data == other._data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PacketBatch(count={len(self)}, nbytes={self.nbytes})"


Event = (
    Hello
    | HelloAck
    | PacketBatch
    | Settings
    | StatsRequest
    | StatsResponse
    | PolicyUpdate
    | PolicyResult
    | Error
    | Goodbye
    | Ping
    | Pong
    | ConnectionClosed
)
