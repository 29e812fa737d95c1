"""The IPC conversation's state, as data: which frames each side may send when, and what a failure is called.

Theory of operation
-------------------
Both ends track *both* sides' `SideState` (like h11's ``ConnectionState``). A frame moves its sender's side through
`TRANSITIONS`, keyed by ``(sender role, sender state, message type)``; a missing key is a protocol violation. A few
frames also move the *other* side (`CROSS`: HELLO_ACK opens the provider, which waits in AWAIT_ACK). The same
table judges what we send (a violation is our bug: `LocalProtocolError`) and what we receive (the peer's:
`RemoteProtocolError`); after either the connection is dead and only one last ERROR or GOODBYE may still go out.

The handshake order is data too: `OPENER` says which role speaks first (the provider's HELLO) and `ANSWER` what
the other role answers with; `Connection` uses them so that every runtime (the Unix socket, the in-memory pair)
drives the same order. `ERROR_CODES` maps the reason of a `RemoteProtocolError` to the `ErrorCode` of the ERROR
frame that tells the peer why we close; `PEER_ERROR_REASONS` maps an ERROR received during the handshake to the
reason the caller sees (``peer_busy`` lets a provider retry while the helper finishes an old session).

Diagram (provider P, helper H; each side's state)::

    P: IDLE --HELLO--> AWAIT_ACK --(H sends HELLO_ACK)--> OPEN --GOODBYE/ERROR--> DONE
    H: IDLE --HELLO_ACK--> OPEN --GOODBYE/ERROR--> DONE
    any: IDLE/AWAIT_ACK/OPEN --ERROR/GOODBYE--> DONE;  protocol error --> ERROR (unless already DONE)
"""

from __future__ import annotations

import enum
from typing import Final

from netsim.core.ipc._events import ErrorCode, MessageType, Role

__all__ = ["ANSWER", "CLOSERS", "CROSS", "ERROR_CODES", "OPENER", "PEER_ERROR_REASONS", "TRANSITIONS", "SideState"]


class SideState(enum.Enum):
    """The state of one side of the conversation, as both ends track it."""

    IDLE = "idle"
    AWAIT_ACK = "await_ack"  # provider sent HELLO, nothing else until HELLO_ACK
    OPEN = "open"
    DONE = "done"  # sent GOODBYE or ERROR: sends nothing more
    ERROR = "error"  # a protocol error killed the connection


_P, _H = Role.PROVIDER, Role.HELPER
_S = SideState
_M = MessageType
_OPEN_BOTH = (_M.PACKETS, _M.SETTINGS, _M.STATS_REQUEST, _M.STATS_RESPONSE, _M.PING, _M.PONG)
CLOSERS: Final = frozenset((_M.ERROR, _M.GOODBYE))

TRANSITIONS: Final[dict[tuple[Role, SideState, MessageType], SideState]] = {
    (_P, _S.IDLE, _M.HELLO): _S.AWAIT_ACK,
    (_H, _S.IDLE, _M.HELLO_ACK): _S.OPEN,
    (_P, _S.OPEN, _M.POLICY_UPDATE): _S.OPEN,
    (_H, _S.OPEN, _M.POLICY_RESULT): _S.OPEN,
    **{(role, _S.OPEN, m): _S.OPEN for role in Role for m in _OPEN_BOTH},
    **{(role, st, m): _S.DONE for role in Role for st in (_S.IDLE, _S.AWAIT_ACK, _S.OPEN) for m in CLOSERS},
}
"""``(sender, sender's state, type) -> sender's next state``; absent: the sender may not send it now."""

CROSS: Final[dict[tuple[Role, MessageType], tuple[SideState, SideState]]] = {
    (_H, _M.HELLO_ACK): (_S.AWAIT_ACK, _S.OPEN),
}
"""``(sender, type) -> (the other side's required state, its next state)``."""

OPENER: Final = Role.PROVIDER
"""The role that speaks first (HELLO); the other waits for it."""

ANSWER: Final[dict[Role, MessageType]] = {Role.PROVIDER: _M.HELLO_ACK, Role.HELPER: _M.HELLO}
"""What each role waits for during the handshake."""

ERROR_CODES: Final[dict[str, ErrorCode]] = {
    "auth_failed": ErrorCode.AUTH,
    "peer_timeout": ErrorCode.TIMEOUT,
    "no_common_version": ErrorCode.VERSION,
    "frame_too_big": ErrorCode.TOO_BIG,
}
"""`RemoteProtocolError` reason -> the code of the ERROR frame we send before closing (otherwise PROTOCOL)."""

PEER_ERROR_REASONS: Final[dict[int, str]] = {ErrorCode.BUSY: "peer_busy"}
"""An ERROR code received during the handshake -> the reason raised (otherwise ``peer_error``)."""
