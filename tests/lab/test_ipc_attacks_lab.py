"""IPC attacks on the real tunnel (root tier): impostor after a helper restart (S8), a stopped helper (F4).

One lab and one tunnel for the module: the fixture runs the scenario once and records what it saw.

* S8: the provider is frozen (SIGSTOP) and the helper killed; while it restarts, a same-uid impostor connects to
  the socket in a tight loop and says HELLO without the tunnel's secret, and a second one connects and stays
  silent. The first answer must be ERROR AUTH; then the provider is resumed and races the impostors. The
  impostor must never see SETTINGS, the new helper must serve exactly one session (the real provider's), and
  traffic must flow.
* F4: the helper is SIGSTOPped: the provider must notice within ping_interval + ping_timeout (5 + 10 s by
  default) and go reasserting; after SIGCONT it must reconnect and traffic must flow again.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest
import trio

from netsim.core import ipc
from netsim.lab.lab import Lab
from netsim.lab.tunnel import LabTunnel, netsim_tunnel
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(300)]
DEADLINE = ipc.DEFAULT_PING_INTERVAL + ipc.DEFAULT_PING_TIMEOUT


async def _ping(lab: Lab) -> int:
    r = await lab.run("mac", ["ping", "-c", "2", "-W", "3", str(lab.addr.www_v4)], check=False, timeout=20)
    return r.returncode


async def _impostor_hello(path: str, rec: dict[str, Any], stop: trio.Event) -> None:
    """Connect in a tight loop and say HELLO without a token; record every answer."""
    answers: list[str] = []
    rec["impostor_answers"] = answers
    while not stop.is_set():
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await s.connect(path)
        except OSError:
            s.close()
            await trio.sleep(0.005)
            continue
        conn = ipc.Connection(ipc.Role.PROVIDER)
        try:
            await s.send(b"".join(conn.send(conn.hello())))
            with trio.move_on_after(3):
                while True:
                    data = await s.recv(65536)
                    conn.receive_data(data)
                    ev = conn.next_event()
                    while not isinstance(ev, ipc.NeedData):
                        answers.append(type(ev).__name__ if not isinstance(ev, ipc.Error) else f"Error{ev.code}")
                        if isinstance(ev, ipc.ConnectionClosed):
                            break
                        ev = conn.next_event()
                    if not data:
                        break
        except Exception as exc:
            answers.append(f"closed:{type(exc).__name__}")
        finally:
            s.close()
        await trio.sleep(0.005)


async def _impostor_silent(path: str, rec: dict[str, Any], stop: trio.Event) -> None:
    """Connect as soon as the socket exists and say nothing, holding the connection open."""
    while not stop.is_set():
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await s.connect(path)
        except OSError:
            s.close()
            await trio.sleep(0.005)
            continue
        rec["silent_connected"] = True
        with trio.move_on_after(30):
            await stop.wait()
        s.close()
        return


async def _slot_race(lab: Lab, t: LabTunnel, rec: dict[str, Any]) -> None:
    assert t.token_path is not None
    rec["token_mode"] = os.stat(t.token_path).st_mode & 0o777
    token = t.token_path.read_bytes()
    with open(f"/proc/{t.helper.pid}/cmdline", "rb") as f:
        cmdline = f.read()
    rec["token_in_argv"] = token in cmdline
    before = await t.provider_stats()
    # The provider is frozen while the helper restarts, so the impostors meet the new helper with its session
    # slot free: a tokenless HELLO must get ERROR AUTH, not the slot. Without the freeze the outcome was a race:
    # when the provider reconnected first, every impostor was told BUSY before its HELLO was read (stop 22's CI).
    t.signal_provider(signal.SIGSTOP)
    try:
        await t.kill_helper()
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_impostor_silent, str(t.socket_path), rec, stop)
            nursery.start_soon(_impostor_hello, str(t.socket_path), rec, stop)
            await trio.sleep(0.2)  # the impostors are polling for the socket before the helper exists
            await t.start_helper()
            with trio.move_on_after(10):
                while not (rec.get("silent_connected") and rec["impostor_answers"]):
                    await trio.sleep(0.01)
            rec["answers_while_slot_free"] = list(rec["impostor_answers"])
            t.signal_provider(signal.SIGCONT)  # now the real provider races the impostors, who keep going
            await t.wait_connected(after_connects=before["connects"], timeout=60)
            rec["ping_after_race"] = await _ping(lab)
            rec["helper_after_race"] = await t.helper_stats()
            stop.set()
    finally:
        t.signal_provider(signal.SIGCONT)


async def _stop_helper(lab: Lab, t: LabTunnel, rec: dict[str, Any]) -> None:
    before = await t.provider_stats()
    changes = t.session.status_changes()
    rec["statuses_during_stop"] = statuses = []

    def drain() -> None:
        while True:
            try:
                ch = changes.receive_nowait()
            except trio.WouldBlock:
                return
            statuses.append((round(trio.current_time() - start, 2), ch.status.name, str(ch.error)[:200]))

    t.helper.send_signal(signal.SIGSTOP)
    start = trio.current_time()
    try:
        with trio.move_on_after(DEADLINE + 15):
            while not (await t.provider_stats())["reasserting"]:
                drain()
                await trio.sleep(0.1)
            rec["sigstop_detected_after"] = trio.current_time() - start
    finally:
        t.helper.send_signal(signal.SIGCONT)
    cont = trio.current_time()
    stats = await t.wait_connected(after_connects=before["connects"], timeout=60)
    rec["sigcont_reconnected_after"] = trio.current_time() - cont
    rec["provider_after_stop"] = stats
    rec["ping_after_stop"] = await _ping(lab)


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    async def main(lab: Lab, rec: dict[str, Any]) -> None:
        async with netsim_tunnel(lab) as t:
            try:
                rec["ping_before"] = await _ping(lab)
                await _slot_race(lab, t, rec)
                await _stop_helper(lab, t, rec)
            except BaseException:
                rec.setdefault("statuses_during_stop", None)
                provider_log = t.helper.stderr_path.parent / "provider.log"
                tail = provider_log.read_text(errors="replace")[-4000:] if provider_log.exists() else ""
                rec["logs"] = (
                    f"{rec['statuses_during_stop']}\n{t.logs()}\n--- provider ({t.session.status.name}, "
                    f"{t.session.last_disconnect_error!r}) ---\n{tail}"
                )
                raise

    rec = run_lab_scenario(main, "wireguard-go", "wg", "ip", "nft", "ping")
    print(f"[ipc attacks] { ({k: v for k, v in rec.items() if k.endswith('_after')}) }")
    return rec


def _need(rec: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        pytest.fail(f"scenario did not reach {missing}: {rec.get('error', 'no error recorded')}")


@pytest.mark.reliability("S8")
def test_tunnel_secret_is_private_and_not_in_argv(scenario: dict[str, Any]) -> None:
    _need(scenario, "token_mode")
    assert scenario["token_mode"] == 0o600
    assert scenario["token_in_argv"] is False


@pytest.mark.reliability("S8")
def test_impostor_after_helper_restart_is_refused_and_the_provider_reconnects(scenario: dict[str, Any]) -> None:
    _need(scenario, "helper_after_race")
    answers = scenario["impostor_answers"]
    assert answers, "the impostor never reached the helper"
    assert "Settings" not in answers and "HelloAck" not in answers, answers
    assert scenario["answers_while_slot_free"][:1] == [f"Error{int(ipc.ErrorCode.AUTH)}"], answers
    assert scenario.get("silent_connected") is True
    h = scenario["helper_after_race"]
    assert h["sessions"] == 1  # the new helper served exactly one session: the real provider's
    assert h["server"]["rejected_auth"] >= 1
    assert scenario["ping_before"] == 0 and scenario["ping_after_race"] == 0


@pytest.mark.reliability("F4")
def test_stopped_helper_is_detected_and_the_tunnel_recovers_after_sigcont(scenario: dict[str, Any]) -> None:
    _need(scenario, "ping_after_stop")
    detected = scenario.get("sigstop_detected_after")
    assert detected is not None, "the provider never noticed the stopped helper"
    assert detected <= DEADLINE + 3  # a PING is due within 5 s, its PONG within 10 s more (plus polling slack)
    assert scenario["provider_after_stop"]["reasserting"] is False
    assert scenario["ping_after_stop"] == 0


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == []
    assert scenario["root_changed"] is None
