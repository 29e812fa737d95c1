"""`netsim.testing.conformance`: every check passes against netsim's own helper, and each deliberately broken
fake helper fails exactly the check about what it breaks, for that reason (docs/ipc.md, "Checking a helper").

netsim's helper here is the real `Helper` behind a real `UnixIpcServer` (token checked), its WireGuard peer the
in-memory VPN server of `netsim.testing.memory_tunnel` (which answers UDP echo), so no packet leaves the process.
The fakes are a small raw-socket helper (`FakeHelper`) that follows docs/ipc.md except for one knob.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from ipaddress import ip_interface, ip_network
from pathlib import Path

import pytest
import trio

from netsim.core import ipc
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
from netsim.core.wireguard.keys import PrivateKey
from netsim.runtime.channel import UnixIpcServer
from netsim.runtime.helper import Helper
from netsim.testing import conformance
from netsim.testing.memory_tunnel import HELPER_ADDR, SERVER_ADDR, FakeNetwork, MemoryVpnServer
from netsim.transports.uds import write_token_file

TOKEN = b"conformance-token-0123456789abcdef"
ECHO = "203.0.113.10"


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


@asynccontextmanager
async def netsim_helper(path: Path, token: bytes | None = TOKEN) -> AsyncIterator[Helper]:
    """netsim's helper on ``path``: real Helper and UnixIpcServer, WireGuard to an in-memory echoing server."""
    rng = random.Random(5)
    ck, sk = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
    config = TunnelConfig(
        InterfaceConfig(ck, addresses=(ip_interface("10.66.0.2/32"), ip_interface("fd00:66::2/128")), mtu=1420),
        (
            PeerConfig(
                sk.public_key(),
                endpoint=Endpoint(*SERVER_ADDR),
                allowed_ips=(ip_network("0.0.0.0/0"), ip_network("::/0")),
            ),
        ),
    )
    network = FakeNetwork()
    peer = PeerConfig(ck.public_key(), allowed_ips=(ip_network("10.66.0.2/32"), ip_network("fd00:66::2/128")))
    server = MemoryVpnServer(sk, peer, network.attach(SERVER_ADDR), 1420)
    helper = Helper(config, network.attach(HELPER_ADDR))

    def connection() -> ipc.Connection:
        caps = ipc.Capability.STATS | ipc.Capability.POLICY | ipc.Capability.PING
        return ipc.Connection(ipc.Role.HELPER, capabilities=caps, expected_token=token)

    ipc_server = UnixIpcServer(path, connection_factory=connection, handshake_timeout=2.0)
    helper.server = ipc_server
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(helper.run)
        await nursery.start(ipc_server.serve, helper.serve_session)
        yield helper
        nursery.cancel_scope.cancel()


def test_netsims_own_helper_passes_every_check(tmp_path: Path) -> None:
    path = tmp_path / "h" / "helper.sock"

    async def main() -> None:
        async with netsim_helper(path):
            report = await conformance.check_helper(path, token=TOKEN, echo=ECHO)
        assert report.ok, report.render()
        assert [r.name for r in report.results] == list(conformance.CHECKS)
        assert {r.status for r in report.results} == {"pass"}, report.render()
        assert "8 of 8 echoed" in report.by_name()["packets_echo"].detail

    _run(main)


def test_without_token_or_echo_those_checks_are_skipped_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "h" / "helper.sock"

    async def main() -> None:
        async with netsim_helper(path, token=None):
            report = await conformance.check_helper(path, only=["handshake", "auth", "missing_token", "packets_echo"])
        by = report.by_name()
        assert report.ok and by["handshake"].status == "pass"
        assert by["auth"].status == by["missing_token"].status == by["packets_echo"].status == "skip"
        assert "--token-file" in by["auth"].detail and "--echo" in by["packets_echo"].detail

    _run(main)


def test_the_command_line_reports_each_check_and_exits_zero(tmp_path: Path) -> None:
    """``python -m netsim.testing.conformance --socket P --token-file F`` in a fresh process."""
    path = tmp_path / "h" / "helper.sock"
    token_file = tmp_path / "token"
    write_token_file(token_file, TOKEN)

    async def main() -> None:
        async with netsim_helper(path):
            argv = [sys.executable, "-m", "netsim.testing.conformance", "--socket", str(path)]
            argv += ["--token-file", str(token_file), "--only", "handshake,ping_pong,auth,garbage"]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, env=env)
        out = proc.stdout.decode()
        assert proc.returncode == 0, out + proc.stderr.decode()
        for name in ("handshake", "ping_pong", "auth", "garbage"):
            assert f"PASS {name}" in out
        assert "all checks passed" in out

    _run(main)


# ------------------------------------------------------------------------------------------------ the fakes
_HDR = struct.Struct("!HBBHHI")


class FakeHelper:
    """A raw helper following docs/ipc.md, except where ``breaks`` says otherwise (one knob per test)."""

    def __init__(self, path: Path, breaks: str, token: bytes = TOKEN) -> None:
        self.path = path
        self.breaks = breaks
        self.token = token

    def frame(self, mtype: int, payload: bytes = b"", version: int = 1) -> bytes:
        return _HDR.pack(0x4E53, version, mtype, 0, 0, len(payload)) + payload

    def error(self, code: int, text: str) -> bytes:
        return self.frame(8, struct.pack("!H", code) + text.encode())

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            await listener.bind(str(self.path))
            listener.listen(8)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self.session, sock)

    async def session(self, sock: trio.socket.SocketType) -> None:
        try:
            await self._session(sock)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the checker hung up first

    async def _session(self, sock: trio.socket.SocketType) -> None:
        with sock:
            buf = bytearray()

            async def read(n: int) -> bytes | None:
                while len(buf) < n:
                    chunk = await sock.recv(65536)
                    if not chunk:
                        return None
                    buf.extend(chunk)
                out = bytes(buf[:n])
                del buf[:n]
                return out

            async def send(data: bytes) -> None:
                await sock.send(data)

            async def linger() -> None:  # a broken helper that keeps the connection open
                await trio.sleep(30)

            head = await read(12)
            if head is None:
                return
            magic, _v, mtype, _f, _r, length = _HDR.unpack(head)
            if magic != 0x4E53 or mtype != 1:
                if self.breaks in ("garbage", "before_hello"):
                    return await linger()
                return await send(self.error(1, "expected HELLO"))
            body = await read(length)
            assert body is not None
            _role, n, _caps, _mf, tlen = struct.unpack_from("!BBIIH", body)
            versions = body[12 : 12 + n]
            token = body[12 + n : 12 + n + tlen]
            if token != self.token and self.breaks not in ("auth", "missing_token"):
                return await send(self.error(3, "bad token"))
            if 1 not in versions:
                if self.breaks == "no_common_version":
                    pass  # answers as if version 1 were offered
                else:
                    return await send(self.error(2, "no common version"))
            ack_version = max(versions) if self.breaks == "version_negotiation" else 1
            max_frame = 1 << 20
            ack_header_version = 2 if self.breaks == "handshake" else 1
            await send(self.frame(2, struct.pack("!BBII", ack_version, 2, 7, max_frame), ack_header_version))
            settings = {"v": 1, "addresses": ["10.66.0.2/32"], "routes": ["0.0.0.0/0"], "mtu": 1420}
            settings["server"] = "192.0.2.2"
            if self.breaks == "settings":
                settings["addresses"] = "10.66.0.2"  # a string, not a list
            await send(self.frame(4, json.dumps(settings).encode()))
            while True:
                head = await read(12)
                if head is None:
                    return
                magic, _v, mtype, _f, _r, length = _HDR.unpack(head)
                if length > max_frame:
                    if self.breaks == "oversize_frame":
                        await read(length)  # waits for a payload that never comes
                        return
                    return await send(self.error(4, "frame too big"))
                body = await read(length)
                if body is None:
                    return
                if mtype == 10:  # PING
                    nonce = struct.unpack("!Q", body)[0]
                    await send(self.frame(11, struct.pack("!Q", nonce + (self.breaks == "ping_pong"))))
                elif mtype == 5:  # STATS_REQUEST
                    rid = struct.unpack("!I", body)[0] + (self.breaks == "stats")
                    await send(self.frame(6, struct.pack("!I", rid) + b'{"ok": 1}'))
                elif mtype == 3:  # PACKETS
                    count = struct.unpack_from("!H", body)[0]
                    fams = struct.unpack_from(f"!{count}H", body, 4)
                    lens = struct.unpack_from(f"!{count}H", body, 4 + 2 * count)
                    if any(f not in (2, 30) for f in fams) and self.breaks != "bad_family":
                        return await send(self.error(1, "bad family"))
                    if sum(lens) != len(body) - 4 - 4 * count and self.breaks != "batch_trailing_bytes":
                        return await send(self.error(1, "trailing bytes"))
                    if self.breaks == "packets_accepted":
                        return  # closes on a valid batch
                    if self.breaks == "packets_echo":  # echoes with the family swapped
                        fams = tuple(30 if f == 2 else 2 for f in fams)
                    await send(self.frame(3, struct.pack(f"!HH{count}H", count, 0, *fams) + body[4 + 2 * count :]))
                elif mtype == 1 and self.breaks != "second_hello":
                    return await send(self.error(1, "second HELLO"))
                elif mtype == 11 and self.breaks != "unsolicited_pong":
                    return await send(self.error(1, "unsolicited PONG"))
                elif mtype == 9:  # GOODBYE
                    if self.breaks == "goodbye":
                        await linger()
                    return


#: knob -> the check that must fail, and words its reason must contain
BROKEN = {
    "handshake": ("handshake", "header version 2"),
    "settings": ("settings", "bad helper settings"),
    "ping_pong": ("ping_pong", "does not echo the nonce"),
    "stats": ("stats", "request_id 4242"),
    "packets_accepted": ("packets_accepted", "closed the connection"),
    "packets_echo": ("packets_echo", "framed with family"),
    "version_negotiation": ("version_negotiation", "picked version 7, expected 1"),
    "no_common_version": ("no_common_version", "was accepted (HELLO_ACK); expected ERROR VERSION"),
    "auth": ("auth", "wrong token was accepted"),
    "missing_token": ("missing_token", "without a token was accepted"),
    "before_hello": ("before_hello", "did not close"),
    "garbage": ("garbage", "did not close"),
    "oversize_frame": ("oversize_frame", "did not close"),
    "bad_family": ("bad_family", "PACKETS with family 10: the helper did not close"),
    "batch_trailing_bytes": ("batch_trailing_bytes", "did not close"),
    "second_hello": ("second_hello", "did not close"),
    "unsolicited_pong": ("unsolicited_pong", "did not close"),
    "goodbye": ("goodbye", "did not close"),
}


def test_the_fake_helper_unbroken_passes_every_check(tmp_path: Path) -> None:
    """The fake is a fair baseline: with no knob turned it conforms, so each failure below is its knob's."""
    path = tmp_path / "fake.sock"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(FakeHelper(path, "nothing").serve)
            report = await conformance.check_helper(path, token=TOKEN, echo=ECHO, timeout=1.0)
            nursery.cancel_scope.cancel()
        assert report.ok and {r.status for r in report.results} == {"pass"}, report.render()

    _run(main)


@pytest.mark.parametrize("knob", sorted(BROKEN))
def test_each_broken_helper_fails_its_check_for_the_right_reason(knob: str, tmp_path: Path) -> None:
    check, reason = BROKEN[knob]
    path = tmp_path / "fake.sock"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(FakeHelper(path, knob).serve)
            report = await conformance.check_helper(path, token=TOKEN, echo=ECHO, only=[check], timeout=0.5)
            nursery.cancel_scope.cancel()
        [result] = report.results
        assert result.status == "fail", report.render()
        assert reason in result.detail, result.detail
        assert not report.ok and f"1 failed: {check}" in report.render()

    _run(main)


def test_unknown_check_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown checks \\['nope'\\]"):
        trio.run(lambda: conformance.check_helper("/nonexistent", only=["nope"]))


def test_no_helper_listening_fails_the_checks_without_hanging(tmp_path: Path) -> None:
    async def main() -> None:
        target = str(tmp_path / "absent.sock")
        report = await conformance.check_helper(target, only=["handshake"], timeout=0.2)
        [result] = report.results
        assert result.status == "fail" and "cannot connect" in result.detail

    _run(main)


def test_module_runs_as_a_script_with_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "netsim.testing.conformance", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "--socket" in proc.stdout and "--token-file" in proc.stdout
