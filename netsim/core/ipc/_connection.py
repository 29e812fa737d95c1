"""The sans-IO `Connection`: one end of a provider <-> helper IPC conversation.

Like h11, a `Connection` does no I/O. Bytes from the peer go in through `Connection.receive_data` (or, to avoid a
copy, `Connection.receive_buffer` + `Connection.receive_commit` around a ``recv_into``), and parsed events come out
of `Connection.next_event`, which returns `NEED_DATA` when the buffer holds no complete frame. Events to send go in
through `Connection.send` / `Connection.send_packets`, which return a *list of buffers* for one scatter-gather
``sendmsg``: packet payloads are never copied into a frame, the list is ``[header_and_descriptors, pkt0, pkt1, ...]``.

The header is validated as soon as its 12 bytes arrive, so a peer announcing an oversized frame is rejected before
a single payload byte is buffered; payloads are then parsed by the codec's per-type tables (`_codec`), and the
sender's state moves through the transition tables (`_state`). The handshake order (`handshake_opening`,
`handshake_event`, `handshake_reply`) and the ERROR code that tells the peer why we close (`error_for`) are
protocol, so they live here and every runtime drives them the same way.

Liveness (optional, ``ping_interval``): once the handshake is done the runtime calls `Connection.start_liveness`
with ``now``, then sleeps until `Connection.get_timer` and calls `Connection.handle_timer`, which returns a `Ping`
to send every ``ping_interval`` seconds. The peer counts as alive while every such PING is answered by its PONG
within ``ping_timeout`` seconds; otherwise ``peer_timed_out`` becomes true and `Connection.next_event` raises
`RemoteProtocolError` ``peer_timeout`` (the runtime closes the stream to wake its reader). One liveness PING is in
flight at a time, so a stall is noticed at most ``ping_interval + ping_timeout`` seconds after the last answer.
The clock is only ever passed in.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from typing import Any, Final

from netsim.core.ipc._buffer import ReceiveBuffer
from netsim.core.ipc._codec import (
    BATCH_HEAD,
    DECODERS,
    DEFAULT_MAX_FRAME_SIZE,
    FAMILIES,
    HANDSHAKE_VERSION,
    HEADER,
    MAGIC,
    MAX_BATCH,
    MAX_MAX_FRAME_SIZE,
    MAX_PACKET_SIZE,
    MAX_TOKEN,
    MIN_MAX_FRAME_SIZE,
    SUPPORTED_VERSIONS,
    EncodeError,
    FrameError,
    batch_size,
    batch_struct,
    encode_header,
    encode_payload,
)
from netsim.core.ipc._events import (
    NEED_DATA,
    Buffer,
    Capability,
    ConnectionClosed,
    Error,
    ErrorCode,
    Event,
    Hello,
    HelloAck,
    MessageType,
    NeedData,
    PacketBatch,
    Ping,
    PolicyResult,
    Pong,
    Role,
    StatsRequest,
    StatsResponse,
)
from netsim.core.ipc._state import (
    ANSWER,
    CLOSERS,
    CROSS,
    ERROR_CODES,
    OPENER,
    PEER_ERROR_REASONS,
    TRANSITIONS,
    SideState,
)
from netsim.errors import ConfigError, LocalProtocolError, RemoteProtocolError

_BATCH_HEAD_SIZE: Final = BATCH_HEAD.size
_PACKETS: Final = MessageType.PACKETS

__all__ = ["DEFAULT_PING_INTERVAL", "DEFAULT_PING_TIMEOUT", "Connection"]

_M = MessageType
_MAX_OUTSTANDING: Final = 64
#: Liveness defaults (seconds). A PONG is a control frame that overtakes queued packets, so only a peer whose
#: event loop is stuck misses a 10 s deadline; a loaded 2-core machine answers in milliseconds.
DEFAULT_PING_INTERVAL: Final = 5.0
DEFAULT_PING_TIMEOUT: Final = 10.0
_LIVENESS_NONCE_BIT: Final = 1 << 63  # liveness nonces never collide with an application's PING nonces
_ERROR_TEXT: Final = 512  # how much of a RemoteProtocolError's text goes into the ERROR frame


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
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= MAX_MAX_FRAME_SIZE:
            raise ConfigError(
                f"max_frame_size={max_frame_size} is out of range; use {MIN_MAX_FRAME_SIZE}..{MAX_MAX_FRAME_SIZE}"
            )
        vs = tuple(sorted(set(versions), reverse=True))
        if not vs or not set(vs) <= set(SUPPORTED_VERSIONS):
            raise ConfigError(f"versions={tuple(versions)!r}: this build speaks only {SUPPORTED_VERSIONS}")
        if token is not None and (role is not Role.PROVIDER or len(token) > MAX_TOKEN):
            raise ConfigError(f"token is sent by the provider only and is at most {MAX_TOKEN} bytes")
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
        self._rx = ReceiveBuffer()
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

    @property
    def bytes_received(self) -> int:
        return self._rx.total

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

    # --- handshake (the order is protocol: see _state.OPENER / ANSWER) ---------------------------------------------
    def handshake_opening(self) -> Hello | None:
        """What this side sends before waiting for the peer: the provider's HELLO; None for the helper."""
        return self.hello() if self.role is OPENER else None

    def handshake_event(self, event: Event) -> Hello | HelloAck:
        """Judge the first event received: the one this role waits for is returned, anything else raises.

        An ERROR from the peer raises `RemoteProtocolError` ``peer_busy`` (a helper still serving another
        session: the provider may retry) or ``peer_error``; any other event raises ``handshake_failed``.
        """
        if isinstance(event, Error):
            reason = PEER_ERROR_REASONS.get(event.code, "peer_error")
            raise RemoteProtocolError(reason, f"code {event.code}: {event.message}")
        want = ANSWER[self.role]
        if want is _M.HELLO and isinstance(event, Hello):
            return event
        if want is _M.HELLO_ACK and isinstance(event, HelloAck):
            return event
        raise RemoteProtocolError("handshake_failed", f"expected a handshake message, got {event!r}")

    def handshake_reply(self) -> HelloAck | None:
        """What this side answers once `handshake_event` accepted the peer's: the helper's HELLO_ACK, else None."""
        return self.hello_ack() if self.role is not OPENER else None

    @staticmethod
    def error_for(exc: RemoteProtocolError) -> Error:
        """The ERROR frame telling the peer why we close after ``exc`` (its reason decides the `ErrorCode`)."""
        return Error(ERROR_CODES.get(exc.reason, ErrorCode.PROTOCOL), str(exc)[:_ERROR_TEXT])

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
            if mtype in CLOSERS and self.our_state is not SideState.DONE:
                self.states[self.role] = SideState.DONE
                return
            raise LocalProtocolError(f"connection is dead ({self._dead}); cannot send {mtype.name}")
        nxt = TRANSITIONS.get((self.role, self.our_state, mtype))
        cross = CROSS.get((self.role, mtype))
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
        check = _SEND_CHECKS.get(type(event))
        if check is not None:
            check(self, event)
        try:
            mtype, payload = encode_payload(event)
        except EncodeError as exc:
            raise self._local_fail(str(exc)) from exc
        frame_cap = self.peer_max_frame if self.our_state is SideState.OPEN else MIN_MAX_FRAME_SIZE
        if len(payload) > frame_cap:
            raise self._local_fail(f"{mtype.name} payload of {len(payload)} bytes exceeds the peer's {frame_cap}")
        self._local_transition(mtype)
        self._check_request(mtype, event, local=True)
        if isinstance(event, HelloAck):
            self.version = event.version
        version = HANDSHAKE_VERSION if mtype in (_M.HELLO, _M.HELLO_ACK) else self.version or HANDSHAKE_VERSION
        self.frames_sent += 1
        return [encode_header(version, mtype, len(payload)) + payload]

    def send_packets(self, packets: Sequence[Buffer], families: Sequence[int] | int) -> list[Buffer]:
        """Encode a PACKETS frame without copying payloads: ``[header+descriptors, pkt0, pkt1, ...]``.

        Args:
            packets: bare IP packets (bytes-like, 1..65535 bytes each, byte-format memoryviews).
            families: Darwin family per packet (2 or 30), or one value for all.
        """
        n = len(packets)
        if isinstance(families, int):
            families = (families,) * n
        if n == 0 or n > MAX_BATCH or len(families) != n:
            raise self._local_fail(f"a batch needs 1..{MAX_BATCH} packets and one family each (got {n})")
        self._local_transition(_M.PACKETS)
        lengths = [len(p) for p in packets]
        if min(lengths) == 0 or max(lengths) > MAX_PACKET_SIZE:
            raise self._local_fail(f"packet lengths must be 1..{MAX_PACKET_SIZE}")
        if not FAMILIES.issuperset(families):
            raise self._local_fail(f"families must be AF_INET (2) or AF_INET6 (30), got {set(families) - FAMILIES}")
        size = _BATCH_HEAD_SIZE + 4 * n + sum(lengths)  # batch_size(), inlined (per-batch hot path)
        if size > self.peer_max_frame:
            raise self._local_fail(f"batch of {size} bytes exceeds the peer's max frame {self.peer_max_frame}")
        self.frames_sent += 1
        # the header and descriptors in one precompiled struct; the payloads follow as their own buffers
        out: list[Buffer] = [batch_struct(n).pack(MAGIC, self.version, _PACKETS, 0, 0, size, n, 0, *families, *lengths)]
        out.extend(packets)
        return out

    def batch_fits(self, count: int, nbytes: int) -> bool:
        """Whether ``count`` packets totalling ``nbytes`` fit in one frame the peer accepts."""
        return batch_size(count, nbytes) <= self.peer_max_frame

    def _check_hello_ack(self, ev: HelloAck) -> None:
        if self._peer_hello is None or ev.version not in set(self.versions) & set(self._peer_hello.versions):
            raise self._local_fail(f"HELLO_ACK version {ev.version} was not offered by both sides")

    def _check_policy_result(self, ev: PolicyResult) -> None:
        if not self.capabilities & self.peer_capabilities & Capability.POLICY_RESULT:
            raise self._local_fail("POLICY_RESULT needs Capability.POLICY_RESULT on both sides")

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
        self._rx.feed(data)

    def receive_buffer(self, size_hint: int = 65536) -> memoryview:
        """Writable space for ``recv_into`` (zero-copy receive). Follow with `receive_commit`; drop the view."""
        return self._rx.writable(size_hint)

    def receive_commit(self, nbytes: int) -> None:
        """Account for ``nbytes`` written into the last `receive_buffer` view; 0 means EOF."""
        self._rx.commit(nbytes)

    @property
    def receive_capacity(self) -> int:
        """Size of the receive buffer: it grows only to hold unparsed bytes (at most one frame if drained)."""
        return len(self._rx.data)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed into events."""
        return len(self._rx)

    def next_event(self) -> Event | NeedData:
        """Parse the next event, or return `NEED_DATA`. Raises `RemoteProtocolError` on a protocol violation."""
        if self.peer_timed_out and self._dead is None:
            raise self._remote_fail("peer_timeout", f"no PONG within {self.ping_timeout:g} s")
        if self._dead is not None:
            raise RemoteProtocolError("connection_dead", f"the connection already failed ({self._dead})")
        rx = self._rx
        avail = rx.end - rx.start
        if avail < HEADER.size:
            return self._at_boundary(avail)
        magic, version, mtype, flags, reserved, length = HEADER.unpack_from(rx.data, rx.start)
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
        expected_version = HANDSHAKE_VERSION if (mt in (_M.HELLO, _M.HELLO_ACK) or not self.version) else self.version
        if version != expected_version:
            raise self._remote_fail("bad_version", f"frame version {version}, expected {expected_version}")
        if avail < HEADER.size + length:
            return self._at_boundary(avail)
        rx.skip(HEADER.size)
        payload = rx.consume(length)
        self.frames_received += 1
        if mt is _M.POLICY_RESULT and not self.capabilities & Capability.POLICY_RESULT:
            raise self._remote_fail("not_negotiated", "POLICY_RESULT without Capability.POLICY_RESULT")
        try:
            event = DECODERS[mt](payload)
        except FrameError as exc:
            raise self._remote_fail(exc.reason, exc.detail) from None
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
        if not self._rx.eof:
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
        nxt = TRANSITIONS.get((peer, self.their_state, mtype))
        cross = CROSS.get((peer, mtype))
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


_SEND_CHECKS: Final[dict[type, Callable[[Connection, Any], None]]] = {
    HelloAck: Connection._check_hello_ack,
    PolicyResult: Connection._check_policy_result,
}
"""Event class -> the checks on sending it that depend on the conversation (the codec checks the fields)."""
