"""The IPC wire format (docs/ipc.md): the frame header, and one encoder and one decoder per message type.

Like h11's ``_readers`` / ``_writers``, the codec is a pair of tables rather than ``isinstance`` chains:
`ENCODERS` maps an event class to a function building its payload, `DECODERS` maps a `MessageType` to a function
parsing one. Both are stateless and bounded; every check that needs the conversation (negotiated capabilities,
outstanding requests, state) stays in `netsim.core.ipc._connection.Connection`. A decoder rejects a payload by
raising `FrameError` with a named reason, which the connection turns into `RemoteProtocolError` (and a dead
connection); an encoder rejects an event by raising `EncodeError`, which becomes `LocalProtocolError`.

Frame: a fixed 12-byte header, then ``length`` payload bytes, big-endian::

    magic u16 = 0x4E53 ("NS") | version u8 | type u8 | flags u16 = 0 | reserved u16 = 0 | length u32

A PACKETS payload is ``count u16, reserved u16, families u16[count], lengths u16[count], payloads``: families and
lengths are two arrays (not interleaved pairs) so both directions handle them with one precompiled `struct.Struct`
call per batch instead of a Python loop per packet.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Final

from netsim.core.family import DARWIN_AF_INET, DARWIN_AF_INET6
from netsim.core.ipc._events import (
    Error,
    Event,
    Goodbye,
    Hello,
    HelloAck,
    MessageType,
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

# Darwin address families (Apple: NEPacket.protocolFamily is sa_family_t); their one home is netsim.core.family.
AF_INET: Final = DARWIN_AF_INET
AF_INET6: Final = DARWIN_AF_INET6
FAMILIES: Final = frozenset((AF_INET, AF_INET6))

MAGIC: Final = 0x4E53
SUPPORTED_VERSIONS: Final = (1,)
# HELLO and HELLO_ACK always travel with header version 1, so any future version can still read a peer's offer.
HANDSHAKE_VERSION: Final = 1
HEADER: Final = struct.Struct("!HBBHHI")
DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20
MIN_MAX_FRAME_SIZE: Final = 1 << 17  # must hold one maximum-size packet plus its batch header
MAX_MAX_FRAME_SIZE: Final = 1 << 26
MAX_PACKET_SIZE: Final = 0xFFFF
MAX_BATCH: Final = 0xFFFF
MAX_TOKEN: Final = 256
MAX_TEXT: Final = 4096
MAX_VERSIONS: Final = 16

_HELLO_FIXED = struct.Struct("!BBIIH")  # role, n_versions, capabilities, max_frame, token_len
_ACK = struct.Struct("!BBII")  # version, role, capabilities, max_frame
BATCH_HEAD: Final = struct.Struct("!HH")  # count, reserved
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_CODE_TEXT = struct.Struct("!H")


class FrameError(Exception):
    """A payload the peer sent does not parse; ``reason`` names it (it becomes `RemoteProtocolError.reason`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class EncodeError(Exception):
    """An event we were asked to send cannot be encoded (it becomes `LocalProtocolError`)."""


# --- encoders -----------------------------------------------------------------------------------------------------
def _frame_cap_ok(value: int) -> None:
    if not MIN_MAX_FRAME_SIZE <= value <= MAX_MAX_FRAME_SIZE:
        raise EncodeError(f"max_frame={value} out of range")


def _text_ok(message: str) -> bytes:
    if len(message.encode("utf-8", "replace")) > MAX_TEXT:
        raise EncodeError(f"message text is limited to {MAX_TEXT} bytes")
    return message.encode()


def _enc_hello(ev: Hello) -> bytes:
    if not (0 < len(ev.versions) <= MAX_VERSIONS and len(ev.token) <= MAX_TOKEN):
        raise EncodeError(f"HELLO needs 1..{MAX_VERSIONS} versions and a token of <= {MAX_TOKEN} bytes")
    _frame_cap_ok(ev.max_frame)
    fixed = _HELLO_FIXED.pack(ev.role, len(ev.versions), ev.capabilities, ev.max_frame, len(ev.token))
    return fixed + bytes(ev.versions) + ev.token


def _enc_hello_ack(ev: HelloAck) -> bytes:
    _frame_cap_ok(ev.max_frame)
    return _ACK.pack(ev.version, ev.role, ev.capabilities, ev.max_frame)


def _enc_stats_response(ev: StatsResponse) -> bytes:
    return _U32.pack(ev.request_id) + json.dumps(ev.stats, separators=(",", ":")).encode()


def _enc_policy_result(ev: PolicyResult) -> bytes:
    text = _text_ok(ev.message)
    return _U64.pack(ev.generation) + _CODE_TEXT.pack(ev.code) + text


def _enc_error(ev: Error) -> bytes:
    text = _text_ok(ev.message)
    return _CODE_TEXT.pack(ev.code) + text


def _enc_goodbye(ev: Goodbye) -> bytes:
    text = _text_ok(ev.message)
    return _CODE_TEXT.pack(ev.reason) + text


ENCODERS: Final[dict[type, tuple[MessageType, Callable[[Any], bytes]]]] = {
    Hello: (MessageType.HELLO, _enc_hello),
    HelloAck: (MessageType.HELLO_ACK, _enc_hello_ack),
    Settings: (MessageType.SETTINGS, lambda ev: bytes(ev.payload)),
    StatsRequest: (MessageType.STATS_REQUEST, lambda ev: _U32.pack(ev.request_id)),
    StatsResponse: (MessageType.STATS_RESPONSE, _enc_stats_response),
    PolicyUpdate: (MessageType.POLICY_UPDATE, lambda ev: _U64.pack(ev.generation) + bytes(ev.payload)),
    PolicyResult: (MessageType.POLICY_RESULT, _enc_policy_result),
    Error: (MessageType.ERROR, _enc_error),
    Goodbye: (MessageType.GOODBYE, _enc_goodbye),
    Ping: (MessageType.PING, lambda ev: _U64.pack(ev.nonce)),
    Pong: (MessageType.PONG, lambda ev: _U64.pack(ev.nonce)),
}
"""Event class -> (its frame type, payload encoder). PACKETS is encoded by `Connection.send_packets` (zero copy)."""


def encode_payload(ev: Event) -> tuple[MessageType, bytes]:
    """The frame type and payload of a control event. Raises `EncodeError` for one that cannot be sent."""
    entry = ENCODERS.get(type(ev))
    if entry is None:
        raise EncodeError(f"{type(ev).__name__} is not a sendable message")
    mtype, encoder = entry
    try:
        return mtype, encoder(ev)
    except (struct.error, OverflowError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode {type(ev).__name__}: {exc}") from exc


def encode_header(version: int, mtype: MessageType, length: int) -> bytes:
    return HEADER.pack(MAGIC, version, mtype, 0, 0, length)


@lru_cache(maxsize=512)
def batch_struct(count: int) -> struct.Struct:
    """Header + batch head + families + lengths for ``count`` packets, as one precompiled struct."""
    return struct.Struct(f"!HBBHHIHH{count}H{count}H")


@lru_cache(maxsize=512)
def _desc_struct(count: int) -> struct.Struct:
    return struct.Struct(f"!{count}H{count}H")


def batch_size(count: int, nbytes: int) -> int:
    """Payload size of a PACKETS frame of ``count`` packets totalling ``nbytes``."""
    return BATCH_HEAD.size + 4 * count + nbytes


# --- decoders -----------------------------------------------------------------------------------------------------
def _exact(mt: MessageType, n: int, want: int) -> None:
    if n != want:
        raise FrameError("bad_length", f"{mt.name} of {n} bytes, expected {want}")


def _text(payload: memoryview, what: str) -> str:
    try:
        return str(payload, "utf-8")
    except UnicodeDecodeError:
        raise FrameError("bad_utf8", f"{what} text is not UTF-8") from None


def _role(value: int) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise FrameError("bad_role", f"role {value}") from None


def _frame_cap(value: int) -> int:
    if not MIN_MAX_FRAME_SIZE <= value <= MAX_MAX_FRAME_SIZE:
        raise FrameError("bad_max_frame", f"peer max_frame {value}")
    return int(value)


def _dec_hello(p: memoryview) -> Hello:
    n = len(p)
    if n < _HELLO_FIXED.size:
        raise FrameError("bad_length", f"HELLO of {n} bytes")
    role, nv, caps, max_frame, tlen = _HELLO_FIXED.unpack_from(p)
    if n != _HELLO_FIXED.size + nv + tlen or not 0 < nv <= MAX_VERSIONS or tlen > MAX_TOKEN:
        raise FrameError("bad_length", f"HELLO with {nv} versions, {tlen}-byte token in {n} bytes")
    versions = tuple(p[_HELLO_FIXED.size : _HELLO_FIXED.size + nv])
    return Hello(_role(role), versions, caps, _frame_cap(max_frame), bytes(p[n - tlen :]))


def _dec_hello_ack(p: memoryview) -> HelloAck:
    _exact(MessageType.HELLO_ACK, len(p), _ACK.size)
    version, role, caps, max_frame = _ACK.unpack_from(p)
    return HelloAck(version, _role(role), caps, _frame_cap(max_frame))


def _dec_stats_request(p: memoryview) -> StatsRequest:
    _exact(MessageType.STATS_REQUEST, len(p), 4)
    return StatsRequest(_U32.unpack_from(p)[0])


def _dec_stats_response(p: memoryview) -> StatsResponse:
    if len(p) < 4:
        raise FrameError("bad_length", f"STATS_RESPONSE of {len(p)} bytes")
    try:
        stats = json.loads(_text(p[4:], "STATS_RESPONSE"))
    except ValueError as exc:  # JSONDecodeError
        raise FrameError("bad_json", str(exc)) from None
    except RecursionError:
        raise FrameError("bad_json", "nested too deeply") from None
    if not isinstance(stats, dict):
        raise FrameError("bad_json", "STATS_RESPONSE must be a JSON object")
    return StatsResponse(_U32.unpack_from(p)[0], stats)


def _dec_policy_update(p: memoryview) -> PolicyUpdate:
    if len(p) < 8:
        raise FrameError("bad_length", f"POLICY_UPDATE of {len(p)} bytes")
    return PolicyUpdate(_U64.unpack_from(p)[0], bytes(p[8:]))


def _dec_policy_result(p: memoryview) -> PolicyResult:
    n = len(p)
    if n < 10 or n - 10 > MAX_TEXT:
        raise FrameError("bad_length", f"POLICY_RESULT of {n} bytes")
    gen = _U64.unpack_from(p)[0]
    code = _CODE_TEXT.unpack_from(p, 8)[0]
    return PolicyResult(gen, code, _text(p[10:], "POLICY_RESULT"))


def _dec_nonce(mt: MessageType, p: memoryview) -> int:
    _exact(mt, len(p), 8)
    return int(_U64.unpack_from(p)[0])


def _code_and_text(mt: MessageType, p: memoryview) -> tuple[int, str]:
    n = len(p)
    if n < 2 or n - 2 > MAX_TEXT:
        raise FrameError("bad_length", f"{mt.name} of {n} bytes")
    return _CODE_TEXT.unpack_from(p)[0], _text(p[2:], mt.name)


def decode_batch(p: memoryview) -> PacketBatch:
    """A PACKETS payload as a `PacketBatch` of views into ``p`` (zero copy), every descriptor checked."""
    n = len(p)
    if n < BATCH_HEAD.size:
        raise FrameError("truncated_batch", f"PACKETS of {n} bytes")
    count, reserved = BATCH_HEAD.unpack_from(p)
    desc_end = BATCH_HEAD.size + 4 * count
    if count == 0 or reserved:
        raise FrameError("bad_batch", f"count={count} reserved={reserved}")
    if desc_end > n:
        raise FrameError("truncated_batch", f"{count} descriptors do not fit in {n} bytes")
    values = _desc_struct(count).unpack_from(p, BATCH_HEAD.size)
    families, lengths = values[:count], values[count:]
    total = sum(lengths)
    if total != n - desc_end:
        reason = "batch_overflow" if total > n - desc_end else "batch_trailing_bytes"
        raise FrameError(reason, f"descriptors sum to {total}, frame holds {n - desc_end}")
    if 0 in lengths:
        raise FrameError("bad_batch", "zero-length packet")
    if not FAMILIES.issuperset(families):
        raise FrameError("bad_family", f"families {set(families) - FAMILIES}")
    return PacketBatch(p[desc_end:], families, lengths)


_M = MessageType
DECODERS: Final[dict[MessageType, Callable[[memoryview], Event]]] = {
    _M.HELLO: _dec_hello,
    _M.HELLO_ACK: _dec_hello_ack,
    _M.PACKETS: decode_batch,
    _M.SETTINGS: lambda p: Settings(bytes(p)),
    _M.STATS_REQUEST: _dec_stats_request,
    _M.STATS_RESPONSE: _dec_stats_response,
    _M.POLICY_UPDATE: _dec_policy_update,
    _M.POLICY_RESULT: _dec_policy_result,
    _M.ERROR: lambda p: Error(*_code_and_text(_M.ERROR, p)),
    _M.GOODBYE: lambda p: Goodbye(*_code_and_text(_M.GOODBYE, p)),
    _M.PING: lambda p: Ping(_dec_nonce(_M.PING, p)),
    _M.PONG: lambda p: Pong(_dec_nonce(_M.PONG, p)),
}
"""Frame type -> payload decoder (stateless; raises `FrameError`)."""
