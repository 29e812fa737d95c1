"""The provider <-> helper IPC protocol: a sans-IO frame codec and connection state machine (docs/ipc.md).

Split the way h11 splits itself, one job per module:

* `_events`: the enums of the wire format and the event dataclasses (`Hello`, `PacketBatch`, ...);
* `_state`: the conversation's state as data tables (`SideState`, transitions, handshake order, error codes),
  with the theory of operation on top;
* `_codec`: the frame header and per-type encoder / decoder tables (bounded, stateless);
* `_buffer`: the zero-copy receive buffer;
* `_connection`: the sans-IO `Connection` that ties them together (handshake, requests, liveness timers).

Import the public names from here (``from netsim.core import ipc; ipc.Connection``); the submodules are private.
"""

from __future__ import annotations

from netsim.core.ipc._codec import (
    AF_INET,
    AF_INET6,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    MAGIC,
    MAX_PACKET_SIZE,
    MIN_MAX_FRAME_SIZE,
    SUPPORTED_VERSIONS,
)
from netsim.core.ipc._connection import DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT, Connection
from netsim.core.ipc._events import (
    ALL_CAPABILITIES,
    NEED_DATA,
    Buffer,
    Capability,
    ConnectionClosed,
    Error,
    ErrorCode,
    Event,
    Goodbye,
    GoodbyeReason,
    Hello,
    HelloAck,
    MessageType,
    NeedData,
    PacketBatch,
    Ping,
    PolicyResult,
    PolicyUpdate,
    Pong,
    Role,
    Settings,
    StatsRequest,
    StatsResponse,
)
from netsim.core.ipc._state import SideState

__all__ = [
    "AF_INET",
    "AF_INET6",
    "ALL_CAPABILITIES",
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
