"""Sleep and wake in the memory backend (row F17): Apple's callbacks, disconnect_on_sleep, and a clock jump past
REJECT_AFTER_TIME that the tunnel survives by handshaking again. MockClock: minutes of protocol time, no waiting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

from netsim.apple.enums import ProviderStopReason, VPNStatus
from netsim.core.wireguard.timers import REJECT_AFTER_TIME
from netsim.runtime.clock import MAX_JUMP, SleepClock, read_slept_untrusted, write_slept
from netsim.runtime.driver import DatagramDriver
from netsim.runtime.forwarding import HelperForwardingProvider
from netsim.testing.memory_tunnel import MemoryTunnel, icmp_echo, memory_tunnel

T = TypeVar("T")


def mock_run(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


class SleepRecorder(HelperForwardingProvider):
    """The built-in provider, recording Apple's sleep/wake callbacks in the order they came; the app message
    ``b"calls"`` answers them as JSON (tests/lab/test_sleep_wake_lab.py runs it in the lab's provider process)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def sleep(self) -> None:
        self.calls.append("sleep")

    def wake(self) -> None:
        self.calls.append("wake")

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"calls":
            return json.dumps(self.calls).encode()
        return await super().handle_app_message(data)


async def _echo(t: MemoryTunnel, seq: int) -> bool:
    return len(await t.exchange([icmp_echo(t.client_v4, "203.0.113.10", seq)], timeout=5)) == 1


def _live(t: MemoryTunnel) -> bool:
    dev = t.helper.device
    return dev.session_live(dev.peers[0], t.helper.clock())


@pytest.mark.reliability("F17")
def test_sleep_then_wake_runs_the_callbacks_in_order_and_the_tunnel_stays_connected() -> None:
    async def main() -> dict[str, Any]:
        async with memory_tunnel(provider=SleepRecorder) as t:
            provider = t.provider_instance
            assert isinstance(provider, SleepRecorder)
            await t.sleep()
            asleep = (list(provider.calls), t.session.asleep, t.session.status)
            await t.wake()
            await t.session.send_provider_message(b"stats")  # ordered after the wake on the control channel
            return {"asleep": asleep, "calls": provider.calls, "status": t.session.status, "echo": await _echo(t, 1)}

    rec = mock_run(main)
    assert rec["asleep"] == (["sleep"], True, VPNStatus.CONNECTED)
    assert rec["calls"] == ["sleep", "wake"]
    assert rec["status"] is VPNStatus.CONNECTED and rec["echo"]


@pytest.mark.reliability("F17")
@pytest.mark.parametrize("disconnect_on_sleep", [True, False])
def test_disconnect_on_sleep_stops_the_tunnel_with_reason_sleep_and_wake_does_not_restart_it(
    disconnect_on_sleep: bool,
) -> None:
    async def main() -> dict[str, Any]:
        protocol = {"disconnect_on_sleep": disconnect_on_sleep}
        async with memory_tunnel(provider=SleepRecorder, protocol=protocol) as t:
            provider = t.provider_instance
            assert isinstance(provider, SleepRecorder)
            await t.sleep()
            asleep = (t.session.status, t.session.stop_reason)
            await t.wake()
            await trio.sleep(5)  # nothing starts it again (no on-demand rules)
            return {"asleep": asleep, "after": t.session.status, "calls": provider.calls}

    rec = mock_run(main)
    if disconnect_on_sleep:
        assert rec["asleep"] == (VPNStatus.DISCONNECTED, ProviderStopReason.SLEEP)
        assert rec["after"] is VPNStatus.DISCONNECTED
        assert rec["calls"] == []  # the system stops the tunnel instead of calling sleep/wake
    else:  # the control: the same sleep leaves the tunnel up
        assert rec["asleep"] == (VPNStatus.CONNECTED, None)
        assert rec["after"] is VPNStatus.CONNECTED and rec["calls"] == ["sleep", "wake"]


@pytest.mark.reliability("F17")
@pytest.mark.parametrize("jump", [REJECT_AFTER_TIME + 20, 0.0])
def test_a_clock_jump_past_reject_after_time_forces_a_new_handshake_and_traffic_flows(jump: float) -> None:
    async def main() -> dict[str, Any]:
        async with memory_tunnel() as t:
            assert await _echo(t, 1)
            before = t.helper.device.handshakes_completed
            await t.sleep(1.0, clock_jump=jump)  # a real second asleep, then the jump on wake
            live_after_jump = _live(t)  # checked before any traffic could start a handshake
            echo = await _echo(t, 2)
            return {
                "live_after_jump": live_after_jump,
                "echo": echo,
                "new_handshakes": t.helper.device.handshakes_completed - before,
                "offset": t.helper.clock.offset,  # type: ignore[attr-defined]
            }

    rec = mock_run(main)
    assert rec["echo"]  # the tunnel recovered without user code
    assert rec["offset"] == jump
    if jump:
        assert not rec["live_after_jump"]  # the keys are older than REJECT_AFTER_TIME: unusable
        assert rec["new_handshakes"] >= 1
    else:  # the control: no jump, same keys, no handshake
        assert rec["live_after_jump"] and rec["new_handshakes"] == 0


class _OneTimer:
    """A `DatagramCore` with one timer ``delay`` after its first look at the clock; records ``now`` when it fires."""

    def __init__(self, clock: SleepClock, delay: float) -> None:
        self.due = clock() + delay
        self.fired: list[float] = []

    def receive_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any], n: int, now: float) -> None:
        pass

    def datagrams_to_send(self, now: float) -> Iterator[tuple[bytes, Any]]:
        return iter(())

    def get_timer(self) -> float | None:
        return self.due if not self.fired else None

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)


class _Silent:
    def recv_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any]) -> int:
        return 0

    async def wait_readable(self) -> None:
        await trio.sleep_forever()

    def send(self, data: Any, addr: Any) -> str | None:
        return None

    def close(self) -> None:
        pass


@pytest.mark.reliability("F17")
def test_the_driver_fires_a_timer_the_jump_made_due_at_once() -> None:
    """The core's timers are on the SleepClock: the driver converts them to trio deadlines. Without that, a
    timer 10 s out would fire 100 s late after a 100 s jump (trio waited on the jumped clock's value)."""

    async def main() -> tuple[float, list[float]]:
        clock = SleepClock()
        core = _OneTimer(clock, 10.0)
        driver = DatagramDriver(core, _Silent(), batch=1, clock=clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            await trio.sleep(1)
            start = clock()
            clock.jump(100.0)
            driver.rearm()
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        return start, core.fired

    start, fired = mock_run(main)
    assert len(fired) == 1
    assert start + 100 <= fired[0] < start + 100 + 1  # fired at the first wakeup after the jump


def test_sleep_clock_only_moves_forward_by_bounded_jumps() -> None:
    clock = SleepClock()
    for bad in (0, -1, math.nan, math.inf, MAX_JUMP * 2, "5"):
        with pytest.raises(ValueError, match="clock jump"):
            clock.jump(bad)  # type: ignore[arg-type]
    assert clock.set_slept(30) == 30 and clock.offset == 30
    assert clock.set_slept(30) == 0 and clock.set_slept(10) == 0  # a total already applied, or less: nothing
    assert clock.set_slept(45) == 15 and clock.jumps == 2


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"nan", b"inf", b"-5", b"1e300", b"9" * 100, b"\xff\xfe", b"12\x00", b"1" + b" " * 80],
)
def test_a_garbled_clock_file_jumps_nothing(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "clock"
    path.write_bytes(content)
    assert read_slept_untrusted(path) is None
    write_slept(path, 200.5)  # the positive control: what the lab writes is read back
    assert read_slept_untrusted(path) == 200.5
    assert read_slept_untrusted(tmp_path / "missing") is None


class _WakeRaises(HelperForwardingProvider):
    def wake(self) -> None:
        raise RuntimeError("wake went wrong")


@pytest.mark.reliability("F17")
def test_a_wake_that_raises_fails_the_tunnel_like_a_crashed_extension_and_the_app_lives_on() -> None:
    """Regression: ``wake()`` ran unguarded in the host's dispatcher, so a RuntimeError in it tore down the app's
    session nursery (an ExceptionGroup out of the session) and a ValueError stopped the tunnel as a control-channel
    error. Now it is the extension crashing: PROVIDER_FAILED with the provider's own error."""

    async def main() -> tuple[VPNStatus, ProviderStopReason | None, str | None]:
        async with memory_tunnel(provider=_WakeRaises) as t:
            await t.sleep()
            await t.wake()
            with trio.fail_after(30):
                await t.session.wait_status(VPNStatus.DISCONNECTED)
            return t.session.status, t.session.stop_reason, t.session.last_disconnect_error

    status, reason, error = mock_run(main)
    assert status is VPNStatus.DISCONNECTED and reason is ProviderStopReason.PROVIDER_FAILED
    assert error is not None and "wake went wrong" in error
