"""The memory backend's faults (the memory side of netsim.lab.faults): the uplink down and up, the VPN server
blackholed, and a NAT rebinding the server must follow (WireGuard roaming). Virtual time (MockClock)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import trio
import trio.testing

from netsim.apple.enums import VPNStatus
from netsim.core.ledger import LedgerSnapshot
from netsim.testing.memory_tunnel import HELPER_ADDR, MemoryTunnel, icmp_echo, memory_tunnel

WWW4 = "203.0.113.10"


def run_memory(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def balanced(stats: dict[str, Any]) -> None:
    assert LedgerSnapshot.from_json_untrusted(stats["ledger"]).check() == []


async def first_answer(t: MemoryTunnel, seq: int, *, within: float = 60.0) -> tuple[int, float]:
    """Probe once a second until one is answered: (probes sent, virtual seconds it took)."""
    start = trio.current_time()
    sent = 0
    while trio.current_time() - start < within:
        sent += 1
        if await t.exchange([icmp_echo(t.client_v4, WWW4, seq + sent)], timeout=1.0):
            return sent, trio.current_time() - start
    raise AssertionError(f"no answer within {within} virtual seconds")


@pytest.mark.reliability("F8")
def test_uplink_down_loses_every_probe_and_the_tunnel_carries_traffic_again_after_it_is_up() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            t.link_down()
            lost = [await t.exchange([icmp_echo(t.client_v4, WWW4, 100 + i)], timeout=1.0) for i in range(5)]
            assert lost == [[]] * 5
            assert t.network.blackholed_drops >= 5
            path = t.provider.default_path
            assert path is not None and not path.is_satisfied and t.session.status is VPNStatus.REASSERTING
            t.link_up()
            sent, _ = await first_answer(t, 200)
            assert sent >= 1
            with trio.fail_after(10):
                await t.session.wait_status(VPNStatus.CONNECTED)  # the helper re-handshook: path ready again
            assert (await t.helper_stats())["path"]["handshakes_by_reason"]["path_change"] >= 1
            balanced(await t.helper_stats())
            balanced(await t.provider_stats())

    run_memory(main)


@pytest.mark.reliability("F6")
def test_blackholed_server_blocks_traffic_without_a_crash_and_it_resumes_after() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            before = t.network.blackholed_drops
            with t.blackhole_server():
                # past REKEY_AFTER_TIME's neighbour timers: the client keeps trying, nothing gets through
                for i in range(20):
                    assert await t.exchange([icmp_echo(t.client_v4, WWW4, 10 + i)], timeout=1.0) == []
            assert t.network.blackholed_drops - before >= 20
            await first_answer(t, 100)
            balanced(await t.helper_stats())

    run_memory(main)


@pytest.mark.reliability("F11")
def test_nat_rebinding_the_server_follows_the_new_endpoint_and_traffic_continues() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            assert t.server_endpoint() == HELPER_ADDR
            unreachable = t.network.unreachable
            new = t.nat_rebind()
            assert new != HELPER_ADDR and t.helper_address == new
            # the next authenticated datagram from the new address moves the server's endpoint (roaming)
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 2)])) == 1
            assert t.server_endpoint() == new
            assert t.network.unreachable == unreachable  # no reply went to the dead mapping
            h = await t.helper_stats()
            assert h["device"]["handshakes_completed"] == 1  # roaming needs no new handshake
            balanced(h)

    run_memory(main)


def test_after_a_rebinding_the_old_mapping_is_dead() -> None:
    """Positive control for the roaming test: what the server sends to the old mapping is lost, so a server that
    did not follow the client would answer into the void and the test above would fail."""

    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            t.nat_rebind()
            before = t.network.unreachable
            assert t.server.transport.send(b"\x04" + bytes(40), HELPER_ADDR) is None
            assert t.network.unreachable == before + 1

    run_memory(main)


@pytest.mark.reliability("F6")
def test_the_provider_reasserts_while_the_server_does_not_answer_and_clears_it_after() -> None:
    """Row F6: the blackholed server makes the built-in provider reassert once WireGuard takes the session for
    dead (data unanswered for 15 s); it is CONNECTED again once a handshake completes after the hole is gone."""

    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            seen = []
            with t.blackhole_server():
                for i in range(25):  # steady traffic, one probe a second, all unanswered
                    await t.exchange([icmp_echo(t.client_v4, WWW4, 10 + i)], timeout=1.0)
                    seen.append(t.session.status)
            assert seen[:10] == [VPNStatus.CONNECTED] * 10  # before WireGuard's 15 s no-reply time: connected
            assert seen[-1] is VPNStatus.REASSERTING, seen
            await first_answer(t, 100)
            with trio.fail_after(10):
                await t.session.wait_status(VPNStatus.CONNECTED)
            h = await t.helper_stats()
            assert h["tunnel"]["responding"] is True and h["tunnel"]["unanswered_for"] == 0

    run_memory(main)


def test_an_idle_tunnel_is_never_taken_for_an_unanswering_server() -> None:
    """Control: without traffic nothing is unanswered, so minutes of silence do not reassert."""

    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            with t.blackhole_server():
                await trio.sleep(60)
                assert t.session.status is VPNStatus.CONNECTED
                assert (await t.helper_stats())["tunnel"]["responding"] is True

    run_memory(main)
