"""The provider <-> helper IPC protocol: a sans-IO frame codec and connection state machine.

Theory of operation
-------------------
Like h11, a `Connection` does no I/O. Bytes from the peer go in through `Connection.receive_data` (or, to avoid a
copy, `Connection.receive_buffer` + `Connection.receive_commit` around a ``recv_into``), and parsed events come out
of `Connection.next_event`, which returns `NEED_DATA` when the buffer holds no complete frame. Events to send go in
through `Connection.send` / `Connection.send_packets`, which return a *list of buffers* for one scatter-gather
``sendmsg``: packet payloads are never copied into a frame, the list is ``[header_and_descriptors, pkt0, pkt1, ...]``.

Every frame is a fixed 12-byte header followed by ``length`` payload bytes (all integers big-endian, see
``docs/ipc.md``)::

    magic u16 = 0x4E53 ("NS") | version u8 | type u8 | flags u16 = 0 | reserved u16 = 0 | length u32

The header is validated as soon as its 12 bytes arrive, so a peer announcing an oversized frame is rejected before
a single payload byte is buffered. A PACKETS payload is ``count u16, reserved u16, families u16[count],
lengths u16[count], payloads``; families and lengths are stored as two arrays (not interleaved pairs) so that both
the encoder and the decoder handle them with one precompiled `struct.Struct` call per batch rather than a Python
loop per packet. Decoded batches are `PacketBatch` objects holding memoryview slices of the receive buffer.

Each side's state (`SideState`) moves through a transition table, not ``if`` chains: ``_TRANSITIONS`` maps
``(sender role, sender state, message type)`` to the sender's next state, and ``_CROSS`` lists the transitions a
message causes on the *other* side (HELLO_ACK opens both sides). The same table judges what we send (a violation is
our bug: `LocalProtocolError`) and what we receive (a violation is the peer's: `RemoteProtocolError`). After either
error the connection is dead; the only thing still allowed is one last ERROR or GOODBYE to tell the peer why.

Liveness (optional, ``ping_interval``): once the handshake is done the runtime calls `Connection.start_liveness`
with ``now``, then sleeps until `Connection.get_timer` and calls `Connection.handle_timer`, which returns a `Ping`
to send every ``ping_interval`` seconds. The peer counts as alive while every such PING is answered by its PONG
within ``ping_timeout`` seconds; otherwise ``peer_timed_out`` becomes true and `Connection.next_event` raises
`RemoteProtocolError` ``peer_timeout`` (the runtime closes the stream to wake its reader). One liveness PING is in
flight at a time, so a stall is noticed at most ``ping_interval + ping_timeout`` seconds after the last answer.
The clock is only ever passed in.

Receive buffer: one ``bytearray`` with read/write offsets, compacted only when it runs out of room, so receiving is
O(n) overall. Delivered `PacketBatch` views point into that buffer; the buffer is never resized or overwritten
while such views are alive (CPython refuses to resize an exported ``bytearray``; we probe for that and switch to a
fresh buffer instead), so a batch stays valid for as long as the caller keeps it.
"""

from __future__ import annotations

import enum
import hmac
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from netsim.errors import ConfigError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "AF_INET",
    "AF_INET6",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_PING_TIMEOUT",
    "HEADER",
    "MAGIC",
    "MAX_PACKET_SIZE",
    "MIN_MAX_FRAME_SIZE",
    "NEED_DATA",
    "SUPPORTED_VERSIONS",
    "Buffer",
    "Capability",
    "Connection",
    "ConnectionClosed",
    "Error",
    "ErrorCode",
    "Event",
    "Goodbye",
    "GoodbyeReason",
    "Hello",
    "HelloAck",
    "MessageType",
    "NeedData",
    "PacketBatch",
    "Ping",
    "PolicyResult",
    "PolicyUpdate",
    "Pong",
    "Role",
    "Settings",
    "SideState",
    "StatsRequest",
    "StatsResponse",
]

Buffer = bytes | bytearray | memoryview

# Darwin address families (Apple: NEPacket.protocolFamily is sa_family_t; xnu bsd/sys/socket.h AF_INET6 = 30).
AF_INET: Final = 2
AF_INET6: Final = 30
_FAMILIES: Final = frozenset((AF_INET, AF_INET6))

MAGIC: Final = 0x4E53
SUPPORTED_VERSIONS: Final = (1,)
# HELLO and HELLO_ACK always travel with header version 1, so any future version can still read a peer's offer.
_HANDSHAKE_VERSION: Final = 1
HEADER: Final = struct.Struct("!HBBHHI")
DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20
MIN_MAX_FRAME_SIZE: Final = 1 << 17  # must hold one maximum-size packet plus its batch header
_MAX_MAX_FRAME_SIZE: Final = 1 << 26
MAX_PACKET_SIZE: Final = 0xFFFF
_MAX_BATCH: Final = 0xFFFF
_MAX_TOKEN: Final = 256
_MAX_TEXT: Final = 4096
_MAX_VERSIONS: Final = 16
_MAX_OUTSTANDING: Final = 64
#: Liveness defaults (seconds). A PONG is a control frame that overtakes queued packets, so only a peer whose
#: event loop is stuck misses a 10 s deadline; a loaded 2-core machine answers in milliseconds.
DEFAULT_PING_INTERVAL: Final = 5.0
DEFAULT_PING_TIMEOUT: Final = 10.0
_LIVENESS_NONCE_BIT: Final = 1 << 63  # liveness nonces never collide with an application's PING nonces

_HELLO_FIXED = struct.Struct("!BBIIH")  # role, n_versions, capabilities, max_frame, token_len
_ACK = struct.Struct("!BBII")  # version, role, capabilities, max_frame
_BATCH_HEAD = struct.Struct("!HH")  # count, reserved
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_CODE_TEXT = struct.Struct("!H")
_INITIAL_BUFFER = 1 << 18


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


class SideState(enum.Enum):
    """The state of one side of the conversation, as both ends track it."""

    IDLE = "idle"
    AWAIT_ACK = "await_ack"  # provider sent HELLO, nothing else until HELLO_ACK
    OPEN = "open"
    DONE = "done"  # sent GOODBYE or ERROR: sends nothing more
    ERROR = "error"  # a protocol error killed the connection


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

_TYPE_OF: Final[dict[type, MessageType]] = {
    Hello: MessageType.HELLO,
    HelloAck: MessageType.HELLO_ACK,
    PacketBatch: MessageType.PACKETS,
    Settings: MessageType.SETTINGS,
    StatsRequest: MessageType.STATS_REQUEST,
    StatsResponse: MessageType.STATS_RESPONSE,
    PolicyUpdate: MessageType.POLICY_UPDATE,
    PolicyResult: MessageType.POLICY_RESULT,
    Error: MessageType.ERROR,
    Goodbye: MessageType.GOODBYE,
    Ping: MessageType.PING,
    Pong: MessageType.PONG,
}

# --- state tables -------------------------------------------------------------------------------------------------
_P, _H = Role.PROVIDER, Role.HELPER
_S = SideState
_M = MessageType
_OPEN_BOTH = (_M.PACKETS, _M.SETTINGS, _M.STATS_REQUEST, _M.STATS_RESPONSE, _M.PING, _M.PONG)
_CLOSERS = (_M.ERROR, _M.GOODBYE)

_TRANSITIONS: Final[dict[tuple[Role, SideState, MessageType], SideState]] = {
    (_P, _S.IDLE, _M.HELLO): _S.AWAIT_ACK,
    (_H, _S.IDLE, _M.HELLO_ACK): _S.OPEN,
    (_P, _S.OPEN, _M.POLICY_UPDATE): _S.OPEN,
    (_H, _S.OPEN, _M.POLICY_RESULT): _S.OPEN,
    **{(role, _S.OPEN, m): _S.OPEN for role in Role for m in _OPEN_BOTH},
    **{(role, st, m): _S.DONE for role in Role for st in (_S.IDLE, _S.AWAIT_ACK, _S.OPEN) for m in _CLOSERS},
}
# Messages that also move the other side: (sender, type) -> (other side's required state, its next state).
_CROSS: Final[dict[tuple[Role, MessageType], tuple[SideState, SideState]]] = {
    (_H, _M.HELLO_ACK): (_S.AWAIT_ACK, _S.OPEN),
}


@lru_cache(maxsize=512)
def _batch_struct(count: int) -> struct.Struct:
    """Header + batch head + families + lengths for ``count`` packets, as one precompiled struct."""
    return struct.Struct(f"!HBBHHIHH{count}H{count}H")


@lru_cache(maxsize=512)
def _desc_struct(count: int) -> struct.Struct:
    return struct.Struct(f"!{count}H{count}H")


class Connection:
    """One end of a provider <-> helper IPC conversation (sans-IO).

    Args:
        role: which end this is.
        versions: protocol versions this end speaks (a provider offers them, a helper picks the highest common).
        capabilities: `Capability` bits offered.
        max_frame_size: the largest frame payload this end accepts; announced in the handshake so the peer never
            sends more. Frames announcing more are rejected from their header alone.
        token: provider only: a shared secret to send in HELLO.
        expected_token: helper only: if set, HELLO must carry exactly this token (compared in constant time).
        ping_interval: seconds between liveness PINGs once open (None: no liveness checking).
        ping_timeout: seconds the peer has to answer a liveness PING before it counts as dead.
    """

    def __init__(
        self,
        role: Role,
        *,
        versions: Sequence[int] = SUPPORTED_VERSIONS,
        capabilities: int = Capability.STATS | Capability.POLICY | Capability.PING,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        token: bytes | None = None,
        expected_token: bytes | None = None,
        ping_interval: float | None = None,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
    ) -> None:
        if ping_interval is not None and not (ping_interval > 0 and ping_timeout > 0):
            raise ConfigError(f"ping_interval={ping_interval} and ping_timeout={ping_timeout} must be > 0")
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= _MAX_MAX_FRAME_SIZE:
            raise ConfigError(
                f"max_frame_size={max_frame_size} is out of range; use {MIN_MAX_FRAME_SIZE}..{_MAX_MAX_FRAME_SIZE}"
            )
        vs = tuple(sorted(set(versions), reverse=True))
        if not vs or not set(vs) <= set(SUPPORTED_VERSIONS):
            raise ConfigError(f"versions={tuple(versions)!r}: this build speaks only {SUPPORTED_VERSIONS}")
        if token is not None and (role is not Role.PROVIDER or len(token) > _MAX_TOKEN):
            raise ConfigError(f"token is sent by the provider only and is at most {_MAX_TOKEN} bytes")
        if expected_token is not None and role is not Role.HELPER:
            raise ConfigError("expected_token is checked by the helper only")
        self.role = role
        self.versions = vs
        self.capabilities = int(capabilities)
        self.max_frame_size = max_frame_size
        self._token = token or b""
        self._expected_token = expected_token
        self.states: dict[Role, SideState] = {Role.PROVIDER: SideState.IDLE, Role.HELPER: SideState.IDLE}
        self.peer_role = Role.HELPER if role is Role.PROVIDER else Role.PROVIDER
        #: negotiated version (0 until HELLO_ACK is sent or received)
        self.version = 0
        self.peer_capabilities = 0
        self.peer_max_frame = MIN_MAX_FRAME_SIZE
        self._peer_hello: Hello | None = None
        # outstanding requests we sent / the peer sent, bounded so neither side can grow them without limit
        self._our_requests: set[tuple[MessageType, int]] = set()
        self._their_requests: set[tuple[MessageType, int]] = set()
        self._buf = bytearray(_INITIAL_BUFFER)
        self._start = 0
        self._end = 0
        self._eof = False
        self._dead: str | None = None
        # liveness (all times are the caller's ``now``)
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._next_ping: float | None = None
        self._ping_deadline: float | None = None
        self._ping_nonce: int | None = None
        self._ping_seq = 0
        #: True once a liveness PING went unanswered past its deadline (`next_event` then raises peer_timeout)
        self.peer_timed_out = False
        self.pings_sent = 0
        self.pongs_received = 0
        # plain-int counters
        self.frames_sent = 0
        self.frames_received = 0
        self.bytes_received = 0

    # --- introspection --------------------------------------------------------------------------------------------
    @property
    def our_state(self) -> SideState:
        return self.states[self.role]

    @property
    def their_state(self) -> SideState:
        return self.states[self.peer_role]

    @property
    def peer_hello(self) -> Hello | None:
        """The provider's HELLO, once received (helper side)."""
        return self._peer_hello

    def hello(self) -> Hello:
        """The HELLO this provider should send first."""
        return Hello(Role.PROVIDER, self.versions, self.capabilities, self.max_frame_size, self._token)

    def hello_ack(self) -> HelloAck:
        """The HELLO_ACK this helper should send after receiving HELLO (version already negotiated)."""
        if self._peer_hello is None:
            raise LocalProtocolError("hello_ack() before the provider's HELLO was received")
        return HelloAck(self.version, Role.HELPER, self.capabilities & self.peer_capabilities, self.max_frame_size)

    # --- liveness -------------------------------------------------------------------------------------------------
    def start_liveness(self, now: float) -> None:
        """Begin liveness checking (after the handshake); the first PING is due ``ping_interval`` from ``now``.

        Does nothing without ``ping_interval`` or when the peer did not offer `Capability.PING`.
        """
        if self.ping_interval is None or self.version == 0:
            return
        if not self.peer_capabilities & Capability.PING:
            return
        self._next_ping = now + self.ping_interval

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called (the outstanding PING's deadline, else the next PING), or None."""
        if self._next_ping is None or self.peer_timed_out or self._dead is not None:
            return None
        if self.our_state is not SideState.OPEN or self.their_state is not SideState.OPEN:
            return None
        return self._ping_deadline if self._ping_deadline is not None else self._next_ping

    def handle_timer(self, now: float) -> Ping | None:
        """Advance liveness to ``now``: returns a `Ping` to `send` when one is due; declares the peer dead (sets
        ``peer_timed_out``) when the outstanding one was not answered in time."""
        timer = self.get_timer()
        if timer is None or now < timer:
            return None
        if self._ping_deadline is not None:
            self.peer_timed_out = True
            return None
        assert self._next_ping is not None and self.ping_interval is not None
        self._ping_seq += 1
        nonce = _LIVENESS_NONCE_BIT | self._ping_seq
        self._ping_nonce = nonce
        self._ping_deadline = now + self.ping_timeout
        self._next_ping = now + self.ping_interval
        self.pings_sent += 1
        return Ping(nonce)

    def _note_pong(self, pong: Pong) -> None:
        if pong.nonce == self._ping_nonce:
            self._ping_nonce = None
            self._ping_deadline = None
            self.pongs_received += 1

    # --- sending --------------------------------------------------------------------------------------------------
    def _local_transition(self, mtype: MessageType) -> None:
        if self._dead is not None:
            # Last words after a failure: one ERROR or GOODBYE, so the peer learns why we close.
            if mtype in _CLOSERS and self.our_state is not SideState.DONE:
                self.states[self.role] = SideState.DONE
                return
            raise LocalProtocolError(f"connection is dead ({self._dead}); cannot send {mtype.name}")
        nxt = _TRANSITIONS.get((self.role, self.our_state, mtype))
        cross = _CROSS.get((self.role, mtype))
        if nxt is None or (cross is not None and self.their_state is not cross[0]):
            self._die(f"local:{mtype.name}")
            raise LocalProtocolError(
                f"cannot send {mtype.name} as {self.role.name} in state {self.our_state.value}/{self.their_state.value}"
            )
        self.states[self.role] = nxt
        if cross is not None:
            self.states[self.peer_role] = cross[1]

    def _local_fail(self, msg: str) -> LocalProtocolError:
        self._die("local:" + msg)
        return LocalProtocolError(msg)

    def send(self, event: Event) -> list[Buffer]:
        """Encode a control event (or a `PacketBatch` to forward as is). Returns buffers for one ``sendmsg``."""
        if isinstance(event, PacketBatch):
            return self.send_packets(event.packets(), event.families)
        mtype = _TYPE_OF.get(type(event))
        if mtype is None:
            raise self._local_fail(f"{type(event).__name__} is not a sendable message")
        payload = self._encode(event)
        frame_cap = self.peer_max_frame if self.our_state is SideState.OPEN else MIN_MAX_FRAME_SIZE
        if len(payload) > frame_cap:
            raise self._local_fail(f"{mtype.name} payload of {len(payload)} bytes exceeds the peer's {frame_cap}")
        self._local_transition(mtype)
        self._check_request(mtype, event, local=True)
        if isinstance(event, HelloAck):
            self.version = event.version
        version = _HANDSHAKE_VERSION if mtype in (_M.HELLO, _M.HELLO_ACK) else self.version or _HANDSHAKE_VERSION
        self.frames_sent += 1
        return [HEADER.pack(MAGIC, version, mtype, 0, 0, len(payload)) + payload]

    def send_packets(self, packets: Sequence[Buffer], families: Sequence[int] | int) -> list[Buffer]:
        """Encode a PACKETS frame without copying payloads: ``[header+descriptors, pkt0, pkt1, ...]``.

        Args:
            packets: bare IP packets (bytes-like, 1..65535 bytes each, byte-format memoryviews).
            families: Darwin family per packet (2 or 30), or one value for all.
        """
        n = len(packets)
        if isinstance(families, int):
            families = (families,) * n
        if n == 0 or n > _MAX_BATCH or len(families) != n:
            raise self._local_fail(f"a batch needs 1..{_MAX_BATCH} packets and one family each (got {n})")
        self._local_transition(_M.PACKETS)
        lengths = [len(p) for p in packets]
        if min(lengths) == 0 or max(lengths) > MAX_PACKET_SIZE:
            raise self._local_fail(f"packet lengths must be 1..{MAX_PACKET_SIZE}")
        if not _FAMILIES.issuperset(families):
            raise self._local_fail(f"families must be AF_INET (2) or AF_INET6 (30), got {set(families) - _FAMILIES}")
        size = _BATCH_HEAD.size + 4 * n + sum(lengths)
        if size > self.peer_max_frame:
            raise self._local_fail(f"batch of {size} bytes exceeds the peer's max frame {self.peer_max_frame}")
        self.frames_sent += 1
        head = _batch_struct(n).pack(MAGIC, self.version, _M.PACKETS, 0, 0, size, n, 0, *families, *lengths)
        out: list[Buffer] = [head]
        out.extend(packets)
        return out

    def batch_fits(self, count: int, nbytes: int) -> bool:
        """Whether ``count`` packets totalling ``nbytes`` fit in one frame the peer accepts."""
        return _BATCH_HEAD.size + 4 * count + nbytes <= self.peer_max_frame

    def _encode(self, ev: Event) -> bytes:
        self._validate(ev)
        try:
            if isinstance(ev, Hello):
                fixed = _HELLO_FIXED.pack(ev.role, len(ev.versions), ev.capabilities, ev.max_frame, len(ev.token))
                return fixed + bytes(ev.versions) + ev.token
            if isinstance(ev, HelloAck):
                return _ACK.pack(ev.version, ev.role, ev.capabilities, ev.max_frame)
            if isinstance(ev, Settings):
                return bytes(ev.payload)
            if isinstance(ev, StatsRequest):
                return _U32.pack(ev.request_id)
            if isinstance(ev, Ping | Pong):
                return _U64.pack(ev.nonce)
            if isinstance(ev, StatsResponse):
                return _U32.pack(ev.request_id) + json.dumps(ev.stats, separators=(",", ":")).encode()
            if isinstance(ev, PolicyUpdate):
                return _U64.pack(ev.generation) + bytes(ev.payload)
            if isinstance(ev, PolicyResult):
                return _U64.pack(ev.generation) + _CODE_TEXT.pack(ev.code) + ev.message.encode()
            if isinstance(ev, Error | Goodbye):
                return _CODE_TEXT.pack(ev.code if isinstance(ev, Error) else ev.reason) + ev.message.encode()
        except (struct.error, OverflowError, TypeError, ValueError) as exc:
            raise self._local_fail(f"cannot encode {type(ev).__name__}: {exc}") from exc
        raise self._local_fail(f"cannot encode {type(ev).__name__}")  # pragma: no cover - _TYPE_OF guards

    def _validate(self, ev: Event) -> None:
        """Field checks the struct formats cannot express."""
        if isinstance(ev, Hello) and not (0 < len(ev.versions) <= _MAX_VERSIONS and len(ev.token) <= _MAX_TOKEN):
            raise self._local_fail(f"HELLO needs 1..{_MAX_VERSIONS} versions and a token of <= {_MAX_TOKEN} bytes")
        if isinstance(ev, Hello | HelloAck) and not MIN_MAX_FRAME_SIZE <= ev.max_frame <= _MAX_MAX_FRAME_SIZE:
            raise self._local_fail(f"max_frame={ev.max_frame} out of range")
        if isinstance(ev, HelloAck) and (
            self._peer_hello is None or ev.version not in set(self.versions) & set(self._peer_hello.versions)
        ):
            raise self._local_fail(f"HELLO_ACK version {ev.version} was not offered by both sides")
        if isinstance(ev, PolicyResult) and not self.capabilities & self.peer_capabilities & Capability.POLICY_RESULT:
            raise self._local_fail("POLICY_RESULT needs Capability.POLICY_RESULT on both sides")
        if isinstance(ev, Error | Goodbye | PolicyResult) and len(ev.message.encode("utf-8", "replace")) > _MAX_TEXT:
            raise self._local_fail(f"message text is limited to {_MAX_TEXT} bytes")

    def _check_request(self, mtype: MessageType, ev: Event, *, local: bool) -> None:
        """Responses must answer an outstanding request; requests in flight are bounded (either direction)."""
        mine, theirs = (self._our_requests, self._their_requests)
        if not local:
            mine, theirs = theirs, mine
        if isinstance(ev, StatsRequest | Ping):
            key = (mtype, ev.request_id if isinstance(ev, StatsRequest) else ev.nonce)
            if len(mine) >= _MAX_OUTSTANDING or key in mine:
                self._fail(local, "too_many_outstanding", f"{mtype.name} {key[1]} duplicate or over the limit")
            mine.add(key)
        elif isinstance(ev, StatsResponse | Pong):
            req = _M.STATS_REQUEST if isinstance(ev, StatsResponse) else _M.PING
            key = (req, ev.request_id if isinstance(ev, StatsResponse) else ev.nonce)
            if key not in theirs:
                self._fail(local, "unsolicited_response", f"{mtype.name} {key[1]} answers no outstanding request")
            theirs.discard(key)

    def _fail(self, local: bool, reason: str, detail: str) -> None:
        if local:
            raise self._local_fail(f"{reason}: {detail}")
        raise self._remote_fail(reason, detail)

    # --- receiving ------------------------------------------------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        """Feed bytes read from the peer; ``b""`` means EOF."""
        n = len(data)
        if n == 0:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        self._reserve(n)
        self._buf[self._end : self._end + n] = data
        self._end += n
        self.bytes_received += n

    def receive_buffer(self, size_hint: int = 65536) -> memoryview:
        """Writable space for ``recv_into`` (zero-copy receive). Follow with `receive_commit`; drop the view."""
        if self._eof:
            raise LocalProtocolError("receive_buffer after EOF")
        self._reserve(size_hint)
        return memoryview(self._buf)[self._end :]

    def receive_commit(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last `receive_buffer` view; 0 means EOF."""
        if nbytes == 0:
            self._eof = True
            return
        if not 0 < nbytes <= len(self._buf) - self._end:
            raise LocalProtocolError(f"receive_commit({nbytes}) exceeds the buffer handed out")
        self._end += nbytes
        self.bytes_received += nbytes

    @property
    def receive_capacity(self) -> int:
        """Size of the receive buffer: it grows only to hold unparsed bytes (at most one frame if drained)."""
        return len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed into events."""
        return self._end - self._start

    def _reserve(self, n: int) -> None:
        """Make room for ``n`` more bytes after ``_end`` without disturbing views handed out earlier."""
        buf = self._buf
        if len(buf) - self._end >= n:
            return
        live = self._end - self._start
        need = live + n
        if need <= len(buf) and not self._exported():
            buf[0:live] = buf[self._start : self._end]  # in-place move: no exported view points here
        else:
            size = len(buf)
            while size < need:
                size *= 2
            new = bytearray(size)
            new[0:live] = buf[self._start : self._end]
            self._buf = new  # the old buffer now belongs to the views still exported from it
        self._start, self._end = 0, live

    def _exported(self) -> bool:
        try:
            self._buf.append(0)
        except BufferError:
            return True
        del self._buf[-1]
        return False

    def next_event(self) -> Event | NeedData:
        """Parse the next event, or return `NEED_DATA`. Raises `RemoteProtocolError` on a protocol violation."""
        if self.peer_timed_out and self._dead is None:
            raise self._remote_fail("peer_timeout", f"no PONG within {self.ping_timeout:g} s")
        if self._dead is not None:
            raise RemoteProtocolError("connection_dead", f"the connection already failed ({self._dead})")
        avail = self._end - self._start
        if avail < HEADER.size:
            return self._at_boundary(avail)
        magic, version, mtype, flags, reserved, length = HEADER.unpack_from(self._buf, self._start)
        if magic != MAGIC:
            raise self._remote_fail("bad_magic", f"0x{magic:04x}")
        if length > self.max_frame_size:
            raise self._remote_fail("frame_too_big", f"{length} > {self.max_frame_size}")
        if flags or reserved:
            raise self._remote_fail("bad_flags", f"flags=0x{flags:x} reserved=0x{reserved:x}")
        try:
            mt = MessageType(mtype)
        except ValueError:
            raise self._remote_fail("unknown_type", f"type {mtype}") from None
        expected_version = _HANDSHAKE_VERSION if (mt in (_M.HELLO, _M.HELLO_ACK) or not self.version) else self.version
        if version != expected_version:
            raise self._remote_fail("bad_version", f"frame version {version}, expected {expected_version}")
        if avail < HEADER.size + length:
            return self._at_boundary(avail)
        body_start = self._start + HEADER.size
        self._start = body_start + length
        self.frames_received += 1
        payload = memoryview(self._buf)[body_start : body_start + length]
        event = self._decode(mt, payload)
        self._remote_transition(mt)
        self._check_request(mt, event, local=False)
        if isinstance(event, Hello):
            self._accept_hello(event)
        elif isinstance(event, HelloAck):
            self._accept_ack(event)
        elif isinstance(event, Pong):
            self._note_pong(event)
        return event

    def _at_boundary(self, avail: int) -> Event | NeedData:
        if not self._eof:
            return NEED_DATA
        if avail:
            raise self._remote_fail("truncated_frame", f"EOF with {avail} bytes of an incomplete frame")
        return ConnectionClosed(clean=self.their_state is SideState.DONE)

    def _remote_fail(self, reason: str, detail: str) -> RemoteProtocolError:
        self._die(reason)
        return RemoteProtocolError(reason, detail)

    def _die(self, why: str) -> None:
        if self._dead is None:
            self._dead = why
        for role in Role:
            if self.states[role] is not SideState.DONE:
                self.states[role] = SideState.ERROR

    def _remote_transition(self, mtype: MessageType) -> None:
        peer = self.peer_role
        nxt = _TRANSITIONS.get((peer, self.their_state, mtype))
        cross = _CROSS.get((peer, mtype))
        if nxt is None or (cross is not None and self.our_state is not cross[0]):
            state = self.their_state
            reason = "frame_after_goodbye" if state is SideState.DONE else "out_of_order"
            raise self._remote_fail(reason, f"{mtype.name} from {peer.name} in state {state.value}")
        self.states[peer] = nxt
        if cross is not None:
            self.states[self.role] = cross[1]

    def _accept_hello(self, hello: Hello) -> None:
        if hello.role is not Role.PROVIDER:
            raise self._remote_fail("bad_role", f"HELLO claims role {hello.role.name}")
        if self._expected_token is not None and not hmac.compare_digest(hello.token, self._expected_token):
            raise self._remote_fail("auth_failed", "HELLO token does not match")
        common = set(self.versions) & set(hello.versions)
        if not common:
            raise self._remote_fail("no_common_version", f"peer offers {hello.versions}, we speak {self.versions}")
        self.version = max(common)
        self.peer_capabilities = hello.capabilities
        self.peer_max_frame = hello.max_frame
        self._peer_hello = hello

    def _accept_ack(self, ack: HelloAck) -> None:
        if ack.role is not Role.HELPER or ack.version not in self.versions:
            raise self._remote_fail("bad_hello_ack", f"version {ack.version} role {ack.role}")
        self.version = ack.version
        self.peer_capabilities = ack.capabilities
        self.peer_max_frame = ack.max_frame

    def _decode(self, mt: MessageType, p: memoryview) -> Event:
        n = len(p)
        if mt is _M.PACKETS:
            return self._decode_batch(p)
        if mt is _M.HELLO:
            if n < _HELLO_FIXED.size:
                raise self._remote_fail("bad_length", f"HELLO of {n} bytes")
            role, nv, caps, max_frame, tlen = _HELLO_FIXED.unpack_from(p)
            if n != _HELLO_FIXED.size + nv + tlen or not 0 < nv <= _MAX_VERSIONS or tlen > _MAX_TOKEN:
                raise self._remote_fail("bad_length", f"HELLO with {nv} versions, {tlen}-byte token in {n} bytes")
            versions = tuple(p[_HELLO_FIXED.size : _HELLO_FIXED.size + nv])
            return Hello(self._role(role), versions, caps, self._frame_cap(max_frame), bytes(p[n - tlen :]))
        if mt is _M.HELLO_ACK:
            self._exact(mt, n, _ACK.size)
            version, role, caps, max_frame = _ACK.unpack_from(p)
            return HelloAck(version, self._role(role), caps, self._frame_cap(max_frame))
        if mt is _M.SETTINGS:
            return Settings(bytes(p))
        if mt is _M.STATS_REQUEST:
            self._exact(mt, n, 4)
            return StatsRequest(_U32.unpack_from(p)[0])
        if mt is _M.STATS_RESPONSE:
            if n < 4:
                raise self._remote_fail("bad_length", f"STATS_RESPONSE of {n} bytes")
            try:
                stats = json.loads(self._text(p[4:], "STATS_RESPONSE"))
            except ValueError as exc:  # JSONDecodeError, RecursionError are ValueError/RuntimeError kin
                raise self._remote_fail("bad_json", str(exc)) from None
            except RecursionError:
                raise self._remote_fail("bad_json", "nested too deeply") from None
            if not isinstance(stats, dict):
                raise self._remote_fail("bad_json", "STATS_RESPONSE must be a JSON object")
            return StatsResponse(_U32.unpack_from(p)[0], stats)
        if mt is _M.POLICY_UPDATE:
            if n < 8:
                raise self._remote_fail("bad_length", f"POLICY_UPDATE of {n} bytes")
            return PolicyUpdate(_U64.unpack_from(p)[0], bytes(p[8:]))
        if mt is _M.POLICY_RESULT:
            if not self.capabilities & Capability.POLICY_RESULT:
                raise self._remote_fail("not_negotiated", "POLICY_RESULT without Capability.POLICY_RESULT")
            if n < 10 or n - 10 > _MAX_TEXT:
                raise self._remote_fail("bad_length", f"POLICY_RESULT of {n} bytes")
            gen = _U64.unpack_from(p)[0]
            code = _CODE_TEXT.unpack_from(p, 8)[0]
            return PolicyResult(gen, code, self._text(p[10:], mt.name))
        if mt is _M.PING or mt is _M.PONG:
            self._exact(mt, n, 8)
            nonce = _U64.unpack_from(p)[0]
            return Ping(nonce) if mt is _M.PING else Pong(nonce)
        # ERROR / GOODBYE
        if n < 2 or n - 2 > _MAX_TEXT:
            raise self._remote_fail("bad_length", f"{mt.name} of {n} bytes")
        code = _CODE_TEXT.unpack_from(p)[0]
        text = self._text(p[2:], mt.name)
        return Error(code, text) if mt is _M.ERROR else Goodbye(code, text)

    def _text(self, payload: memoryview, what: str) -> str:
        try:
            return str(payload, "utf-8")
        except UnicodeDecodeError:
            raise self._remote_fail("bad_utf8", f"{what} text is not UTF-8") from None

    def _exact(self, mt: MessageType, n: int, want: int) -> None:
        if n != want:
            raise self._remote_fail("bad_length", f"{mt.name} of {n} bytes, expected {want}")

    def _role(self, value: int) -> Role:
        try:
            return Role(value)
        except ValueError:
            raise self._remote_fail("bad_role", f"role {value}") from None

    def _frame_cap(self, value: int) -> int:
        if not MIN_MAX_FRAME_SIZE <= value <= _MAX_MAX_FRAME_SIZE:
            raise self._remote_fail("bad_max_frame", f"peer max_frame {value}")
        return int(value)

    def _decode_batch(self, p: memoryview) -> PacketBatch:
        n = len(p)
        if n < _BATCH_HEAD.size:
            raise self._remote_fail("truncated_batch", f"PACKETS of {n} bytes")
        count, reserved = _BATCH_HEAD.unpack_from(p)
        desc_end = _BATCH_HEAD.size + 4 * count
        if count == 0 or reserved:
            raise self._remote_fail("bad_batch", f"count={count} reserved={reserved}")
        if desc_end > n:
            raise self._remote_fail("truncated_batch", f"{count} descriptors do not fit in {n} bytes")
        values = _desc_struct(count).unpack_from(p, _BATCH_HEAD.size)
        families, lengths = values[:count], values[count:]
        total = sum(lengths)
        if total != n - desc_end:
            reason = "batch_overflow" if total > n - desc_end else "batch_trailing_bytes"
            raise self._remote_fail(reason, f"descriptors sum to {total}, frame holds {n - desc_end}")
        if 0 in lengths:
            raise self._remote_fail("bad_batch", "zero-length packet")
        if not _FAMILIES.issuperset(families):
            raise self._remote_fail("bad_family", f"families {set(families) - _FAMILIES}")
        return PacketBatch(p[desc_end:], families, lengths)
