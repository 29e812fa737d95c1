"""Conformance checks for a helper that speaks netsim's provider <-> helper IPC (docs/ipc.md).

A team writing its own helper (in any language) points this at the helper's Unix socket and learns, check by
check, where the helper breaks the protocol::

    python -m netsim.testing.conformance --socket /run/my-helper/helper.sock [--token-file F] [--echo 203.0.113.10]

or from Python (trio)::

    report = await check_helper("/run/my-helper/helper.sock", token=b"...")
    assert report.ok, report.render()

Theory of operation
-------------------
Every check opens its own connection (most of them end it on purpose), so checks run one after another and each
waits for the helper's single session slot (an ERROR BUSY answer is retried for ``busy_retry`` seconds). The
frames are built and read here with plain `struct` code written from docs/ipc.md -- deliberately *not* with
`netsim.core.ipc` -- so a bug shared by netsim's codec and the helper under test cannot hide itself. Whatever
the helper sends that a check is not about is handled as a provider would: a PING gets its PONG, SETTINGS and
PACKETS are set aside.

A check passes, fails with the reason (what was sent, what was expected, what came back), or is skipped when it
needs something not given (``auth`` without a token, ``packets_echo`` without an echo address). Where docs/ipc.md
allows a closing ERROR but does not demand it ("the only thing still allowed is one ERROR"), a check demands
that the helper closes, and that an ERROR it sends carries the right code.

The checks (`CHECKS`, in order): ``handshake``, ``settings``, ``ping_pong``, ``stats``, ``packets_accepted``,
``packets_echo``, ``version_negotiation``, ``no_common_version``, ``auth``, ``missing_token``, ``before_hello``,
``garbage``, ``oversize_frame``, ``bad_family``, ``batch_trailing_bytes``, ``second_hello``, ``unsolicited_pong``,
``goodbye``.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface
from pathlib import Path

import trio

__all__ = ["CHECKS", "CheckFailed", "CheckResult", "ConformanceReport", "check_helper", "main"]

# docs/ipc.md, "Frames": the wire format as documented, independent of netsim.core.ipc
_HEADER = struct.Struct("!HBBHHI")
_MAGIC = 0x4E53
HELLO, HELLO_ACK, PACKETS, SETTINGS, STATS_REQUEST, STATS_RESPONSE = 1, 2, 3, 4, 5, 6
POLICY_UPDATE, ERROR, GOODBYE, PING, PONG, POLICY_RESULT = 7, 8, 9, 10, 11, 12
_TYPE_NAMES = {
    1: "HELLO",
    2: "HELLO_ACK",
    3: "PACKETS",
    4: "SETTINGS",
    5: "STATS_REQUEST",
    6: "STATS_RESPONSE",
    7: "POLICY_UPDATE",
    8: "ERROR",
    9: "GOODBYE",
    10: "PING",
    11: "PONG",
    12: "POLICY_RESULT",
}
ERR_PROTOCOL, ERR_VERSION, ERR_AUTH, ERR_TOO_BIG, ERR_BUSY = 1, 2, 3, 4, 5
_ERROR_NAMES = {
    1: "PROTOCOL",
    2: "VERSION",
    3: "AUTH",
    4: "TOO_BIG",
    5: "BUSY",
    6: "INTERNAL",
    7: "POLICY",
    8: "TIMEOUT",
}
ROLE_PROVIDER, ROLE_HELPER = 1, 2
AF_INET, AF_INET6 = 2, 30  # Darwin values (docs/ipc.md, PACKETS)
_MIN_MAX_FRAME, _MAX_MAX_FRAME = 128 << 10, 64 << 20
_OUR_MAX_FRAME = 1 << 20
_CAPS = 1 | 2 | 4  # STATS | POLICY | PING
_MAX_PAYLOAD_READ = 64 << 20


class CheckFailed(Exception):
    """The helper broke the protocol; the message says what was sent, expected and received."""


@dataclass(frozen=True)
class Frame:
    version: int
    type: int
    flags: int
    payload: bytes

    def __str__(self) -> str:
        name = _TYPE_NAMES.get(self.type, f"type {self.type}")
        if self.type == ERROR and len(self.payload) >= 2:
            code = struct.unpack_from("!H", self.payload)[0]
            text = self.payload[2:].decode("utf-8", "replace")
            return f"ERROR {_ERROR_NAMES.get(code, code)} {text!r}"
        return f"{name} ({len(self.payload)} bytes)"


def frame(mtype: int, payload: bytes = b"", *, version: int = 1) -> bytes:
    """One frame as docs/ipc.md lays it out: 12-byte header, then the payload."""
    return _HEADER.pack(_MAGIC, version, mtype, 0, 0, len(payload)) + payload


def hello(versions: Sequence[int] = (1,), token: bytes = b"", *, caps: int = _CAPS) -> bytes:
    """A HELLO frame: ``role u8, n u8, capabilities u32, max_frame u32, token_len u16, versions u8[n], token``."""
    body = struct.pack("!BBIIH", ROLE_PROVIDER, len(versions), caps, _OUR_MAX_FRAME, len(token))
    return frame(HELLO, body + bytes(versions) + token)


def packets_frame(pkts: Sequence[bytes], families: Sequence[int]) -> bytes:
    """A PACKETS frame: ``count u16, 0 u16, families u16[count], lengths u16[count], payloads``."""
    n = len(pkts)
    body = struct.pack(f"!HH{n}H{n}H", n, 0, *families, *(len(p) for p in pkts))
    return frame(PACKETS, body + b"".join(pkts))


def parse_packets(payload: bytes) -> list[tuple[int, bytes]]:
    """``(family, packet)`` pairs of a PACKETS payload, checked as docs/ipc.md says; `CheckFailed` if not."""
    if len(payload) < 4:
        raise CheckFailed(f"PACKETS payload of {len(payload)} bytes has no count")
    count, reserved = struct.unpack_from("!HH", payload)
    if count == 0 or reserved != 0:
        raise CheckFailed(f"PACKETS count={count} reserved={reserved}: count must be >= 1 and reserved 0")
    if len(payload) < 4 + 4 * count:
        raise CheckFailed(f"PACKETS count={count} but the descriptors do not fit in {len(payload)} bytes")
    fams = struct.unpack_from(f"!{count}H", payload, 4)
    lens = struct.unpack_from(f"!{count}H", payload, 4 + 2 * count)
    if sum(lens) != len(payload) - 4 - 4 * count:
        raise CheckFailed(f"PACKETS lengths add up to {sum(lens)}, the frame carries {len(payload) - 4 - 4 * count}")
    out, off = [], 4 + 4 * count
    for fam, n in zip(fams, lens, strict=True):
        if fam not in (AF_INET, AF_INET6):
            raise CheckFailed(f"PACKETS family {fam}: only Darwin AF_INET=2 / AF_INET6=30 are allowed")
        if n == 0:
            raise CheckFailed("PACKETS carries an empty packet (lengths are 1..65535)")
        out.append((fam, payload[off : off + n]))
        off += n
    return out


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet with valid checksums (RFC 791, RFC 768)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = _checksum(s + d + struct.pack("!BBH", 0, 17, len(udp)) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, s, d)
    return ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:] + udp


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv6/UDP packet with a valid checksum (RFC 8200 §8.1)."""
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = _checksum(s + d + struct.pack("!I3xB", len(udp), 17) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, s, d) + udp


# ------------------------------------------------------------------------------------------------ the peer
class _Peer:
    """One raw connection to the helper under test, as a provider would hold it."""

    def __init__(self, sock: trio.socket.SocketType, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        self.seen: list[Frame] = []  # SETTINGS / PACKETS / ... set aside while waiting for something else
        self.settings: list[bytes] = []
        self.max_frame = _MIN_MAX_FRAME

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = await self.sock.send(view)
                view = view[n:]
        except (BrokenPipeError, ConnectionResetError):  # the helper closed first: the next read sees EOF
            self.eof = True

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            try:
                chunk = await self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.eof = True
                return False
            self.buf += chunk
        return True

    async def read_frame(self) -> Frame | None:
        """The next frame, or None at EOF; `CheckFailed` for a malformed one."""
        if not await self._fill(_HEADER.size):
            if self.buf:
                raise CheckFailed(f"the helper closed inside a frame header ({len(self.buf)} bytes)")
            return None
        magic, version, mtype, flags, reserved, length = _HEADER.unpack_from(self.buf)
        if magic != _MAGIC:
            raise CheckFailed(f"frame with magic {magic:#06x}, expected {_MAGIC:#06x}")
        if flags or reserved:
            raise CheckFailed(f"{_TYPE_NAMES.get(mtype, mtype)} frame with flags={flags} reserved={reserved} (both 0)")
        if length > max(_OUR_MAX_FRAME, 1) or length > _MAX_PAYLOAD_READ:
            raise CheckFailed(f"frame of {length} bytes is over the max_frame {_OUR_MAX_FRAME} we announced")
        if not await self._fill(_HEADER.size + length):
            raise CheckFailed(f"the helper closed inside a {_TYPE_NAMES.get(mtype, mtype)} frame")
        payload = bytes(self.buf[_HEADER.size : _HEADER.size + length])
        del self.buf[: _HEADER.size + length]
        return Frame(version, mtype, flags, payload)

    async def expect(self, *types: int, what: str) -> Frame:
        """Wait for a frame of one of ``types``; answer PINGs, set SETTINGS/PACKETS aside, fail on anything else."""
        with trio.move_on_after(self.timeout):
            while True:
                f = await self.read_frame()
                if f is None:
                    raise CheckFailed(f"{what}: the helper closed the connection instead")
                if f.type in types:
                    return f
                if f.type == PING and len(f.payload) == 8:
                    await self.send(frame(PONG, f.payload))
                elif f.type == SETTINGS:
                    self.settings.append(f.payload)
                elif f.type in (PACKETS, POLICY_RESULT, STATS_RESPONSE, PONG):
                    self.seen.append(f)
                else:
                    raise CheckFailed(f"{what}: got {f}")
        raise CheckFailed(f"{what}: nothing within {self.timeout:g} s")

    async def expect_closed(self, what: str, code: int | None) -> None:
        """The helper must close within the timeout; an ERROR it sends first must carry ``code``."""
        with trio.move_on_after(self.timeout):
            while True:
                try:
                    f = await self.read_frame()
                except CheckFailed:
                    return  # a broken tail on a connection being torn down: it did close
                if f is None:
                    return
                if f.type == ERROR and code is not None:
                    got = struct.unpack_from("!H", f.payload)[0] if len(f.payload) >= 2 else None
                    if got != code:
                        raise CheckFailed(f"{what}: expected ERROR {_ERROR_NAMES[code]}, got {f}")
                elif f.type == PING and len(f.payload) == 8:
                    continue
                elif f.type not in (SETTINGS, PACKETS, GOODBYE, ERROR, PONG, STATS_RESPONSE):
                    raise CheckFailed(f"{what}: expected the helper to close, got {f}")
        raise CheckFailed(f"{what}: the helper did not close the connection within {self.timeout:g} s")

    async def handshake(self, versions: Sequence[int] = (1,), token: bytes = b"") -> Frame:
        await self.send(hello(versions, token))
        ack = await self.expect(HELLO_ACK, ERROR, what="HELLO answered")
        if ack.type == ERROR:
            raise CheckFailed(f"HELLO(versions={list(versions)}) answered with {ack}")
        self.max_frame = _check_ack(ack, max(versions))
        return ack


def _check_ack(ack: Frame, want_version: int) -> int:
    if ack.version != 1:
        raise CheckFailed(f"HELLO_ACK header version {ack.version}: HELLO/HELLO_ACK always carry header version 1")
    if len(ack.payload) != 10:
        raise CheckFailed(f"HELLO_ACK payload is {len(ack.payload)} bytes, expected 10")
    version, role, _caps, max_frame = struct.unpack("!BBII", ack.payload)
    if version != want_version:
        raise CheckFailed(f"HELLO_ACK picked version {version}, expected {want_version} (the highest in common)")
    if role != ROLE_HELPER:
        raise CheckFailed(f"HELLO_ACK role {role}, expected {ROLE_HELPER} (helper)")
    if not _MIN_MAX_FRAME <= max_frame <= _MAX_MAX_FRAME:
        raise CheckFailed(f"HELLO_ACK max_frame {max_frame} is outside {_MIN_MAX_FRAME}..{_MAX_MAX_FRAME}")
    return int(max_frame)


# ------------------------------------------------------------------------------------------------ the checks
@dataclass
class Target:
    """What the checks connect to and know about it."""

    socket_path: str
    token: bytes | None = None
    echo: str | None = None
    timeout: float = 3.0
    busy_retry: float = 5.0
    opened: list[trio.socket.SocketType] = field(default_factory=list)

    def close_all(self) -> None:
        """Close every connection a check opened (also those it left open by failing)."""
        for sock in self.opened:
            sock.close()
        self.opened.clear()

    async def connect(self) -> _Peer:
        """A fresh connection (retried while the helper's slot is still busy with the previous check)."""
        deadline = trio.current_time() + self.busy_retry
        while True:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.opened.append(sock)
            try:
                await sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                if trio.current_time() > deadline:
                    raise CheckFailed(f"cannot connect to {self.socket_path}: {exc}") from None
                await trio.sleep(0.05)
                continue
            return _Peer(sock, self.timeout)

    async def open(self, versions: Sequence[int] = (1,)) -> _Peer:
        """Connect and complete the handshake (with the token, if any), retrying on ERROR BUSY."""
        deadline = trio.current_time() + self.busy_retry
        while True:
            peer = await self.connect()
            await peer.send(hello(versions, self.token or b""))
            ack = await peer.expect(HELLO_ACK, ERROR, what="HELLO answered")
            if ack.type == HELLO_ACK:
                peer.max_frame = _check_ack(ack, max(versions))
                return peer
            peer.sock.close()
            busy = len(ack.payload) >= 2 and struct.unpack_from("!H", ack.payload)[0] == ERR_BUSY
            if not busy or trio.current_time() > deadline:
                raise CheckFailed(f"HELLO(versions={list(versions)}) answered with {ack}")
            await trio.sleep(0.05)


Check = Callable[[Target], Awaitable[str | None]]


class Skip(Exception):
    """The check needs something not given (a token, an echo address)."""


async def check_handshake(t: Target) -> str | None:
    """HELLO(version 1) -> HELLO_ACK(version 1, role helper, max_frame 128 KiB..64 MiB), header version 1."""
    peer = await t.open()
    peer.sock.close()
    return f"max_frame {peer.max_frame}"


async def check_settings(t: Target) -> str | None:
    """After HELLO_ACK the helper sends SETTINGS: a JSON object the built-in provider can apply (docs/helper.md)."""
    from netsim.errors import ConfigError
    from netsim.runtime.forwarding import settings_from_payload

    peer = await t.open()
    try:
        payload = peer.settings[0] if peer.settings else (await peer.expect(SETTINGS, what="SETTINGS")).payload
    finally:
        peer.sock.close()
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise CheckFailed(f"SETTINGS payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CheckFailed(f"SETTINGS payload is a JSON {type(doc).__name__}, expected an object")
    try:
        settings_from_payload(doc)
    except ConfigError as exc:
        raise CheckFailed(f"SETTINGS {doc!r}: {exc}") from None
    for key in ("addresses", "routes"):
        if not isinstance(doc.get(key), list) or not doc[key]:
            raise CheckFailed(f"SETTINGS has no {key!r} list (the provider would configure no {key})")
    return f"addresses {doc['addresses']}, server {doc['server']}"


async def check_ping_pong(t: Target) -> str | None:
    """PING(nonce) -> PONG with the same nonce, without closing."""
    peer = await t.open()
    nonce = 0x0123456789ABCDEF
    await peer.send(frame(PING, struct.pack("!Q", nonce)))
    pong = await peer.expect(PONG, what="PONG for our PING")
    peer.sock.close()
    if len(pong.payload) != 8 or struct.unpack("!Q", pong.payload)[0] != nonce:
        raise CheckFailed(f"PONG payload {pong.payload.hex()} does not echo the nonce {nonce:016x}")
    return None


async def check_stats(t: Target) -> str | None:
    """STATS_REQUEST(id) -> STATS_RESPONSE(same id, a UTF-8 JSON object)."""
    peer = await t.open()
    await peer.send(frame(STATS_REQUEST, struct.pack("!I", 4242)))
    resp = await peer.expect(STATS_RESPONSE, what="STATS_RESPONSE for our STATS_REQUEST")
    peer.sock.close()
    if len(resp.payload) < 4 or struct.unpack_from("!I", resp.payload)[0] != 4242:
        raise CheckFailed(f"STATS_RESPONSE does not carry our request_id 4242 ({resp.payload[:4].hex()})")
    try:
        doc = json.loads(resp.payload[4:])
    except ValueError as exc:
        raise CheckFailed(f"STATS_RESPONSE body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CheckFailed(f"STATS_RESPONSE body is a JSON {type(doc).__name__}, expected an object")
    return f"keys {sorted(doc)[:6]}"


def _tunnel_addresses(peer: _Peer) -> tuple[str, str | None]:
    v4, v6 = "10.66.0.2", None
    for raw in peer.settings[:1]:
        try:
            addrs = [ip_interface(a).ip for a in json.loads(raw).get("addresses", [])]
        except (ValueError, TypeError, AttributeError):
            continue
        v4 = next((str(a) for a in addrs if a.version == 4), v4)
        v6 = next((str(a) for a in addrs if a.version == 6), v6)
    return v4, v6


async def _alive(peer: _Peer, what: str) -> None:
    await peer.send(frame(PING, struct.pack("!Q", 7)))
    await peer.expect(PONG, what=f"{what}; then PONG for a PING (the session must stay up)")


async def check_packets_accepted(t: Target) -> str | None:
    """A valid PACKETS batch (IPv4 + IPv6 UDP to documentation addresses) is taken without ending the session."""
    peer = await t.open()
    with trio.move_on_after(min(0.5, t.timeout)):
        await peer.expect(SETTINGS, what="SETTINGS")
    v4, v6 = _tunnel_addresses(peer)
    pkts = [udp4(v4, "192.0.2.77", 40000 + i, 9, b"netsim-conformance") for i in range(3)]
    fams = [AF_INET] * 3
    if v6:
        pkts.append(udp6(v6, "2001:db8::77", 40009, 9, b"netsim-conformance"))
        fams.append(AF_INET6)
    await peer.send(packets_frame(pkts, fams))
    await _alive(peer, f"sent PACKETS with {len(pkts)} packets")
    peer.sock.close()
    return None


async def check_packets_echo(t: Target) -> str | None:
    """UDP to ``echo`` port 7 comes back as PACKETS: framing, Darwin families matching each packet's version."""
    if t.echo is None:
        raise Skip("needs --echo ADDR (a host behind the helper answering UDP echo on port 7)")
    peer = await t.open()
    with trio.move_on_after(min(0.5, t.timeout)):
        await peer.expect(SETTINGS, what="SETTINGS")
    v4, v6 = _tunnel_addresses(peer)
    six = ip_address(t.echo).version == 6
    src = v6 if six else v4
    if src is None:
        raise CheckFailed(f"SETTINGS give no IPv6 address to send to {t.echo} from")
    make, fam = (udp6, AF_INET6) if six else (udp4, AF_INET)
    sent = [make(src, t.echo, 41000 + i, 7, b"echo-%d" % i) for i in range(8)]
    got: list[tuple[int, bytes]] = []
    await peer.send(packets_frame(sent, [fam] * len(sent)))
    with trio.move_on_after(t.timeout):
        while len(got) < len(sent):
            f = peer.seen.pop(0) if peer.seen and peer.seen[0].type == PACKETS else None
            if f is None:
                f = await peer.expect(PACKETS, what=f"PACKETS back from {t.echo}:7")
            got += parse_packets(f.payload)
    peer.sock.close()
    if not got:
        raise CheckFailed(f"no PACKETS came back from {t.echo}:7 within {t.timeout:g} s")
    for family, pkt in got:
        version = pkt[0] >> 4
        if (family, version) not in ((AF_INET, 4), (AF_INET6, 6)):
            raise CheckFailed(f"a reply with IP version {version} is framed with family {family}")
    return f"{len(got)} of {len(sent)} echoed"


async def _hello_answer(t: Target, versions: Sequence[int], token: bytes) -> tuple[_Peer, Frame | None]:
    """Send a (possibly unacceptable) HELLO; the first frame back (None: closed), an ERROR BUSY retried."""
    deadline = trio.current_time() + t.busy_retry
    while True:
        peer = await t.connect()
        await peer.send(hello(versions, token))
        first: Frame | None = None
        with trio.move_on_after(t.timeout):
            first = await peer.read_frame()
        busy = first is not None and first.type == ERROR and first.payload[:2] == struct.pack("!H", ERR_BUSY)
        if not busy or trio.current_time() > deadline:
            return peer, first
        peer.sock.close()
        await trio.sleep(0.05)


async def check_version_negotiation(t: Target) -> str | None:
    """HELLO offering versions [7, 1] -> HELLO_ACK picks 1 (the highest both speak)."""
    peer, ack = await _hello_answer(t, (7, 1), t.token or b"")
    peer.sock.close()
    if ack is None or ack.type != HELLO_ACK:
        raise CheckFailed(f"HELLO(versions=[7, 1]) answered with {ack or 'nothing'}; expected HELLO_ACK version 1")
    _check_ack(ack, 1)
    return None


async def _refused(t: Target, versions: Sequence[int], token: bytes, what: str, code: int) -> None:
    """A HELLO the helper must refuse with ERROR ``code`` and close."""
    peer, first = await _hello_answer(t, versions, token)
    try:
        if first is not None and first.type == HELLO_ACK:
            raise CheckFailed(f"{what} was accepted (HELLO_ACK); expected ERROR {_ERROR_NAMES[code]}")
        if first is not None and first.type == ERROR:
            got = struct.unpack_from("!H", first.payload)[0] if len(first.payload) >= 2 else None
            if got != code:
                raise CheckFailed(f"{what}: expected ERROR {_ERROR_NAMES[code]}, got {first}")
        elif first is not None:
            raise CheckFailed(f"{what}: expected ERROR {_ERROR_NAMES[code]}, got {first}")
        if first is not None or not peer.eof:
            await peer.expect_closed(what, code)
    finally:
        peer.sock.close()


async def check_no_common_version(t: Target) -> str | None:
    """HELLO offering only version 9 -> ERROR VERSION, then close."""
    await _refused(t, (9,), t.token or b"", "HELLO(versions=[9])", ERR_VERSION)
    return None


async def check_auth(t: Target) -> str | None:
    """HELLO with a wrong token -> ERROR AUTH, then close (only with the helper's token given)."""
    if not t.token:
        raise Skip("needs the helper's token (--token-file) to know it checks one")
    await _refused(t, (1,), bytes(b ^ 0x5A for b in t.token), "HELLO with a wrong token", ERR_AUTH)
    return None


async def check_missing_token(t: Target) -> str | None:
    """HELLO without a token -> ERROR AUTH, then close (only with the helper's token given)."""
    if not t.token:
        raise Skip("needs the helper's token (--token-file) to know it checks one")
    await _refused(t, (1,), b"", "HELLO without a token", ERR_AUTH)
    return None


async def _closes(t: Target, data: bytes, what: str) -> None:
    """Bytes sent instead of HELLO: the helper must close (an ERROR it sends must be PROTOCOL)."""
    peer = await t.connect()
    await peer.send(data)
    try:
        await peer.expect_closed(what, ERR_PROTOCOL)
    finally:
        peer.sock.close()


async def check_before_hello(t: Target) -> str | None:
    """A PING before HELLO is out of order -> the helper closes (ERROR PROTOCOL if it says why)."""
    await _closes(t, frame(PING, struct.pack("!Q", 1)), "PING before HELLO")
    return None


async def check_garbage(t: Target) -> str | None:
    """12 bytes that are no frame header (bad magic) -> the helper closes (ERROR PROTOCOL if it says why)."""
    await _closes(t, b"GET / HTTP/1.1\r\n", "garbage instead of HELLO")
    return None


async def check_oversize_frame(t: Target) -> str | None:
    """A frame header announcing more than the helper's max_frame -> ERROR TOO_BIG and close, from the header
    alone (we never send the payload: a helper waiting for it would hang here)."""
    peer = await t.open()
    await peer.send(_HEADER.pack(_MAGIC, 1, PACKETS, 0, 0, peer.max_frame + 1))
    await peer.expect_closed(f"a PACKETS header announcing {peer.max_frame + 1} bytes", ERR_TOO_BIG)
    peer.sock.close()
    return None


async def check_bad_family(t: Target) -> str | None:
    """PACKETS with family 10 (Linux AF_INET6, not Darwin's 30) -> the helper closes (ERROR PROTOCOL)."""
    peer = await t.open()
    pkt = udp6("fd00::2", "2001:db8::1", 1, 9, b"x")
    await peer.send(packets_frame([pkt], [10]))
    await peer.expect_closed("PACKETS with family 10", ERR_PROTOCOL)
    peer.sock.close()
    return None


async def check_batch_trailing_bytes(t: Target) -> str | None:
    """PACKETS whose lengths add up to less than the frame carries -> the helper closes (ERROR PROTOCOL)."""
    peer = await t.open()
    pkt = udp4("10.66.0.2", "192.0.2.1", 1, 9, b"x")
    body = struct.pack("!HHHH", 1, 0, AF_INET, len(pkt)) + pkt + b"\0\0\0"
    await peer.send(frame(PACKETS, body))
    await peer.expect_closed("PACKETS with 3 bytes beyond its lengths", ERR_PROTOCOL)
    peer.sock.close()
    return None


async def check_second_hello(t: Target) -> str | None:
    """A second HELLO after the handshake -> the helper closes (ERROR PROTOCOL)."""
    peer = await t.open()
    await peer.send(hello((1,), t.token or b""))
    await peer.expect_closed("a second HELLO", ERR_PROTOCOL)
    peer.sock.close()
    return None


async def check_unsolicited_pong(t: Target) -> str | None:
    """A PONG that answers no PING -> the helper closes (ERROR PROTOCOL)."""
    peer = await t.open()
    await peer.send(frame(PONG, struct.pack("!Q", 0xDEAD)))
    await peer.expect_closed("a PONG nobody asked for", ERR_PROTOCOL)
    peer.sock.close()
    return None


async def check_goodbye(t: Target) -> str | None:
    """GOODBYE -> the helper closes, and frees its slot: the next connection completes its handshake."""
    peer = await t.open()
    await peer.send(frame(GOODBYE, struct.pack("!H", 0) + b"conformance done"))
    await peer.expect_closed("GOODBYE", None)
    peer.sock.close()
    again = await t.open()
    again.sock.close()
    return None


#: name -> check, in the order they run.
CHECKS: dict[str, Check] = {
    "handshake": check_handshake,
    "settings": check_settings,
    "ping_pong": check_ping_pong,
    "stats": check_stats,
    "packets_accepted": check_packets_accepted,
    "packets_echo": check_packets_echo,
    "version_negotiation": check_version_negotiation,
    "no_common_version": check_no_common_version,
    "auth": check_auth,
    "missing_token": check_missing_token,
    "before_hello": check_before_hello,
    "garbage": check_garbage,
    "oversize_frame": check_oversize_frame,
    "bad_family": check_bad_family,
    "batch_trailing_bytes": check_batch_trailing_bytes,
    "second_hello": check_second_hello,
    "unsolicited_pong": check_unsolicited_pong,
    "goodbye": check_goodbye,
}


@dataclass(frozen=True)
class CheckResult:
    """One check: ``status`` is ``"pass"``, ``"fail"`` or ``"skip"``; ``detail`` says why."""

    name: str
    status: str
    detail: str = ""
    doc: str = ""


@dataclass(frozen=True)
class ConformanceReport:
    """All checks run against one helper."""

    socket_path: str
    results: tuple[CheckResult, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count)."""
        return all(r.status != "fail" for r in self.results)

    def by_name(self) -> dict[str, CheckResult]:
        return {r.name: r for r in self.results}

    def render(self) -> str:
        lines = [f"IPC conformance of the helper at {self.socket_path}:"]
        for r in self.results:
            lines.append(f"  {r.status.upper():<4} {r.name:<22} {r.detail}".rstrip())
        failed = [r.name for r in self.results if r.status == "fail"]
        lines.append("all checks passed" if not failed else f"{len(failed)} failed: {', '.join(failed)}")
        return "\n".join(lines)


async def check_helper(
    socket_path: str | Path,
    *,
    token: bytes | None = None,
    echo: str | None = None,
    only: Sequence[str] | None = None,
    timeout: float = 3.0,
) -> ConformanceReport:
    """Run the checks (`CHECKS`, or those named in ``only``) against the helper at ``socket_path``.

    Args:
        token: the helper's IPC secret (the ``token_file`` contents); without it the auth checks are skipped.
        echo: an address behind the helper that answers UDP echo (port 7), for ``packets_echo``.
        timeout: seconds each step waits for the helper.
    """
    unknown = sorted(set(only or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; the checks are {list(CHECKS)}")
    target = Target(str(socket_path), token=token, echo=echo, timeout=timeout)
    results = []
    for name, fn in CHECKS.items():
        if only and name not in only:
            continue
        doc = (fn.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        try:
            with trio.fail_after(timeout * 4 + target.busy_retry):
                detail = await fn(target)
            results.append(CheckResult(name, "pass", detail or "", doc))
        except Skip as exc:
            results.append(CheckResult(name, "skip", str(exc), doc))
        except CheckFailed as exc:
            results.append(CheckResult(name, "fail", str(exc), doc))
        except trio.TooSlowError:
            results.append(CheckResult(name, "fail", f"no verdict within {timeout * 4 + target.busy_retry:g} s", doc))
        finally:
            target.close_all()
    return ConformanceReport(str(socket_path), tuple(results))


def main(argv: list[str] | None = None) -> int:
    """``python -m netsim.testing.conformance --socket PATH [--token-file F] [--echo ADDR] [--only a,b]``."""
    parser = argparse.ArgumentParser(description="check a helper against netsim's IPC protocol (docs/ipc.md)")
    parser.add_argument("--socket", required=True, help="the helper's Unix socket")
    parser.add_argument("--token-file", help="file holding the helper's IPC token (enables the auth checks)")
    parser.add_argument("--echo", metavar="ADDR", help="a host behind the helper answering UDP echo on port 7")
    parser.add_argument("--only", help="comma-separated check names")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per step (default 3)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    token = None
    if args.token_file:
        from netsim.transports.uds import read_token_file

        token = read_token_file(args.token_file)
    only = [n for n in (args.only or "").split(",") if n] or None
    try:
        report = trio.run(
            lambda: check_helper(args.socket, token=token, echo=args.echo, only=only, timeout=args.timeout)
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps([r.__dict__ for r in report.results], indent=2))
    else:
        print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
