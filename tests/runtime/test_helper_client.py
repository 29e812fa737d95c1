"""HelperClient (issue 13, part 1): the public helper-client API, and the CountingProvider built only on it.

The unit tests script the helper's end of the IPC (a `memory:` connector, or a real `UnixIpcServer` with a
token), so every frame the client sees is chosen: SETTINGS, batches, PING, statistics answers, a settings change,
and hostile frames. The CountingProvider tests run real packets through `memory_tunnel` (the real `Helper` and a
WireGuard peer).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from examples.counting_provider import CountingProvider
from netsim.apple import PacketTunnelNetworkSettings, VPNStatus
from netsim.core import ipc
from netsim.core.ledger import Ledger
from netsim.errors import ConfigError, RemoteProtocolError, TunnelDown
from netsim.runtime.channel import IpcChannel, UnixIpcServer, open_ipc_channel
from netsim.runtime.forwarding import HelperForwardingProvider
from netsim.runtime.helper_client import (
    HelperBusy,
    HelperClient,
    HelperClientConfig,
    open_helper_client,
    register_memory_helper,
    unregister_memory_helper,
)
from netsim.testing.ipc_pair import memory_stream_pair
from netsim.testing.memory_tunnel import icmp_echo, memory_tunnel, udp_packet
from netsim.transports.uds import write_token_file

WWW4, WWW6 = "203.0.113.10", "2001:db8:113::10"
SETTINGS = {
    "v": 1,
    "addresses": ["10.66.0.2/32", "fd00:66::2/128"],
    "dns": ["203.0.113.53"],
    "routes": ["0.0.0.0/0", "::/0"],
    "mtu": 1400,
    "server": "192.0.2.2",
}
Script = Callable[[IpcChannel], Awaitable[None]]


def run_memory(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def settings_frame(**change: Any) -> ipc.Settings:
    return ipc.Settings(json.dumps({**SETTINGS, **change}).encode())


@asynccontextmanager
async def scripted_helper(script: Script, name: str = "scripted") -> AsyncIterator[list[BaseException]]:
    """Register ``memory:<name>``: each connection's helper end runs ``script(channel)`` after the handshake.

    Yields the list of exceptions the helper side raised (a test asserts on what the helper saw).
    """
    errors: list[BaseException] = []

    @asynccontextmanager
    async def connect(ledger: Ledger) -> AsyncIterator[IpcChannel]:
        a, b = memory_stream_pair()
        async with (
            open_ipc_channel(
                a, ipc.Connection(ipc.Role.PROVIDER, capabilities=ipc.Capability.PING), ledger=ledger
            ) as prov,
            open_ipc_channel(b, ipc.Connection(ipc.Role.HELPER, capabilities=ipc.Capability.PING)) as side,
            trio.open_nursery() as nursery,
        ):

            async def serve() -> None:
                await side.handshake()
                try:
                    await script(side)
                except Exception as exc:
                    errors.append(exc)

            nursery.start_soon(serve)
            await prov.handshake()
            try:
                yield prov
            finally:
                nursery.cancel_scope.cancel()

    register_memory_helper(name, connect)
    try:
        yield errors
    finally:
        unregister_memory_helper(name)


CONF = {"helper_socket": "memory:scripted", "connect_timeout": 5}


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({}, "helper_socket"),
        ({"helper_socket": 7}, "helper_socket"),
        ({"helper_socket": "/x", "ping_interval": "5"}, "ping_interval"),
        ({"helper_socket": "/x", "connect_timeout": -1}, "connect_timeout"),
        ({"helper_socket": "/x", "token_file": 3}, "token_file"),
    ],
)
def test_bad_configuration_is_a_config_error_naming_the_key(conf: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HelperClientConfig.from_provider_configuration(conf)


def test_configuration_defaults_and_the_providers_own_keys_are_ignored() -> None:
    config = HelperClientConfig.from_provider_configuration({"helper_socket": "/run/h.sock", "mine": [1]})
    assert config == HelperClientConfig("/run/h.sock")
    assert config.connect_timeout == 10.0 and config.ping_interval == ipc.DEFAULT_PING_INTERVAL


# ------------------------------------------------------------------------------------------------ the happy path
def test_settings_packets_ping_and_statistics_through_the_client() -> None:
    got: list[tuple[list[bytes], tuple[int, ...]]] = []

    async def helper(ch: IpcChannel) -> None:
        await ch.send(settings_frame())
        await ch.send(ipc.Ping(41))  # the client answers PING inside receive_packets
        await ch.send_packets([b"\x45one", b"\x60two"], [ipc.AF_INET, ipc.AF_INET6])
        while True:
            ev = await ch.receive_event()
            if isinstance(ev, ipc.PacketBatch):
                got.append(([bytes(p) for p in ev.packets()], tuple(ev.families)))
            elif isinstance(ev, ipc.StatsRequest):
                await ch.send(ipc.StatsResponse(ev.request_id, {"ledger": "yes", "id": ev.request_id}))
            elif isinstance(ev, ipc.Pong):
                got.append(([b"pong"], (ev.nonce,)))
            elif isinstance(ev, ipc.Ping):
                await ch.send(ipc.Pong(ev.nonce))
            elif isinstance(ev, ipc.Goodbye | ipc.ConnectionClosed):
                return

    async def main() -> None:
        applied: list[PacketTunnelNetworkSettings] = []

        async def on_settings(s: PacketTunnelNetworkSettings) -> None:
            applied.append(s)

        async with scripted_helper(helper) as errors, open_helper_client(CONF, on_settings=on_settings) as client:
            assert client.settings is not None and applied == [client.settings]
            assert client.settings.tunnel_remote_address == "192.0.2.2" and client.settings.mtu == 1400
            assert client.settings.ipv4_settings is not None
            assert client.settings.ipv4_settings.addresses == ["10.66.0.2"]
            packets, families = await client.receive_packets()
            assert [bytes(p) for p in packets] == [b"\x45one", b"\x60two"]
            assert list(families) == [ipc.AF_INET, ipc.AF_INET6]
            assert client.send_packets([b"\x45out"], [ipc.AF_INET]) is True
            out = client.statistics().ipc_out
            assert (out.read, out.forwarded) == (1, 1)

            async with trio.open_nursery() as nursery:  # answers come through the inbound loop
                nursery.start_soon(client.receive_packets)
                stats = await client.helper_statistics()
                rtt = await client.ping()
                nursery.cancel_scope.cancel()
            assert stats["ledger"] == "yes" and rtt >= 0
            assert client.is_connected
        assert errors == []
        assert ([b"pong"], (41,)) in got  # the helper's PING was answered
        assert ([b"\x45out"], (ipc.AF_INET,)) in got

    run_memory(main)


def test_a_settings_change_reaches_on_settings_and_a_repeat_does_not() -> None:
    async def helper(ch: IpcChannel) -> None:
        await ch.send(settings_frame())
        await ch.send(settings_frame())  # the same again: nothing to apply
        await ch.send(settings_frame(excluded_routes=["198.51.100.0/24"]))
        await ch.send_packets([b"\x45end"], ipc.AF_INET)
        await trio.sleep_forever()

    async def main() -> None:
        applied: list[PacketTunnelNetworkSettings] = []

        async def on_settings(s: PacketTunnelNetworkSettings) -> None:
            applied.append(s)

        async with scripted_helper(helper), open_helper_client(CONF, on_settings=on_settings) as client:
            await client.receive_packets()
            assert len(applied) == 2 and client.settings_received == 2
            v4 = applied[1].ipv4_settings
            assert v4 is not None and v4.excluded_routes is not None
            assert [r.destination_address for r in v4.excluded_routes] == ["198.51.100.0"]

    run_memory(main)


# ------------------------------------------------------------------------------------------------ refusals
def test_busy_is_a_helper_busy_error() -> None:
    async def helper(ch: IpcChannel) -> None:
        await ch.send(ipc.Error(ipc.ErrorCode.BUSY, "the helper already serves a provider"))

    async def main() -> None:
        async with scripted_helper(helper):
            with pytest.raises(HelperBusy, match="BUSY"):
                async with open_helper_client(CONF):
                    raise AssertionError("connected")

    run_memory(main)


def test_a_silent_helper_times_out_waiting_for_settings() -> None:
    async def main() -> None:
        async with scripted_helper(lambda ch: trio.sleep_forever()):
            with pytest.raises(TunnelDown, match="no SETTINGS within 5 s"):
                async with open_helper_client(CONF):
                    raise AssertionError("connected")

    run_memory(main)


def test_an_unregistered_memory_helper_is_unreachable() -> None:
    async def main() -> None:
        with pytest.raises(TunnelDown, match="no in-memory helper"):
            async with open_helper_client({"helper_socket": "memory:nobody"}):
                raise AssertionError("connected")

    run_memory(main)


# ------------------------------------------------------------------------------------------------ hostile helpers
BAD_FRAMES = {
    "bad_magic": b"\xde\xad" + bytes(10),
    "bad_settings_json": b"not json",
    "settings_not_an_object": b"[1, 2]",
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_a_malicious_frame_closes_the_connection_with_a_clear_error(case: str) -> None:
    """After SETTINGS the helper sends garbage: the client raises RemoteProtocolError naming it, tells the helper
    (ERROR frame), is no longer connected, keeps raising the same error, and nothing else breaks."""
    seen_by_helper: list[ipc.Event] = []

    async def helper(ch: IpcChannel) -> None:
        await ch.send(settings_frame())
        if case == "bad_magic":
            ch.stream.send_nowait([BAD_FRAMES[case]])  # raw bytes on the stream: not a frame at all
        else:
            await ch.send(ipc.Settings(BAD_FRAMES[case]))
        while True:
            ev = await ch.receive_event()
            seen_by_helper.append(ev)
            if isinstance(ev, ipc.ConnectionClosed):
                return

    async def main() -> None:
        async with scripted_helper(helper) as errors, open_helper_client(CONF) as client:
            with pytest.raises(RemoteProtocolError) as info:
                await client.receive_packets()
            expected = "bad_magic" if case == "bad_magic" else "bad_settings"
            assert info.value.reason == expected
            assert not client.is_connected
            assert client.send_packets([b"\x45late"], ipc.AF_INET) is False  # dropped, counted, no exception
            with pytest.raises(RemoteProtocolError):
                await client.receive_packets()
            with pytest.raises(TunnelDown, match="not connected"):
                await client.helper_statistics()
            with trio.fail_after(5):
                while not seen_by_helper or not isinstance(seen_by_helper[-1], ipc.ConnectionClosed):
                    await trio.sleep(0.01)
        assert errors == []
        if case == "bad_magic":  # the protocol error is reported to the peer before the close
            assert any(isinstance(ev, ipc.Error) and ev.code == ipc.ErrorCode.PROTOCOL for ev in seen_by_helper)

    run_memory(main)


def test_settings_that_are_not_netsims_are_a_config_error_naming_the_field() -> None:
    async def helper(ch: IpcChannel) -> None:
        await ch.send(settings_frame(server=None))
        await trio.sleep_forever()

    async def main() -> None:
        async with scripted_helper(helper):
            with pytest.raises(ConfigError, match="server"):
                async with open_helper_client(CONF):
                    raise AssertionError("connected")

    run_memory(main)


def test_packets_before_settings_are_a_protocol_error() -> None:
    async def helper(ch: IpcChannel) -> None:
        await ch.send_packets([b"\x45early"], ipc.AF_INET)
        await trio.sleep_forever()

    async def main() -> None:
        async with scripted_helper(helper):
            with pytest.raises(RemoteProtocolError, match="no_settings"):
                async with open_helper_client(CONF):
                    raise AssertionError("connected")

    run_memory(main)


def test_goodbye_ends_receive_packets_with_tunnel_down() -> None:
    async def helper(ch: IpcChannel) -> None:
        await ch.send(settings_frame())
        await ch.aclose(ipc.Goodbye(ipc.GoodbyeReason.SHUTDOWN, "helper stopping"))

    async def main() -> None:
        async with scripted_helper(helper), open_helper_client(CONF) as client:
            with pytest.raises(TunnelDown, match="closed the connection"):
                await client.receive_packets()
            with trio.fail_after(1):
                await client.wait_closed()

    run_memory(main)


# ------------------------------------------------------------------------------------------------ a real socket
@pytest.mark.timeout(60)
def test_over_a_unix_socket_with_the_token_and_busy_for_a_second_client(tmp_path: Path) -> None:
    token = b"t" * 32
    token_file = tmp_path / "ipc.token"
    write_token_file(token_file, token)
    sock = tmp_path / "helper" / "helper.sock"
    conf = {"helper_socket": str(sock), "token_file": str(token_file), "connect_timeout": 3}

    async def session(ch: IpcChannel) -> None:
        await ch.send(settings_frame())
        while True:
            ev = await ch.receive_event()
            if isinstance(ev, ipc.PacketBatch):
                await ch.send_packets([bytes(p) for p in ev.packets()], ev.families)  # echo
            elif isinstance(ev, ipc.Goodbye | ipc.ConnectionClosed):
                return

    async def main() -> None:
        server = UnixIpcServer(sock, connection_factory=lambda: ipc.Connection(ipc.Role.HELPER, expected_token=token))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, session)
            async with open_helper_client(conf) as client:
                client.send_packets([b"\x45echo", b"\x60echo"], [ipc.AF_INET, ipc.AF_INET6])
                packets, families = await client.receive_packets()
                assert [bytes(p) for p in packets] == [b"\x45echo", b"\x60echo"]
                assert list(families) == [ipc.AF_INET, ipc.AF_INET6]
                with pytest.raises(HelperBusy, match="BUSY"):
                    async with open_helper_client({**conf, "connect_timeout": 0.5}):
                        raise AssertionError("a second client got a session")
                assert client.is_connected
            with pytest.raises(RemoteProtocolError, match="token does not match"):
                wrong = tmp_path / "wrong.token"
                write_token_file(wrong, b"w" * 32)
                async with open_helper_client({**conf, "token_file": str(wrong)}):
                    raise AssertionError("a wrong token got a session")
            nursery.cancel_scope.cancel()

    trio.run(main)


# ------------------------------------------------------------------------------------------------ CountingProvider
def test_counting_provider_forwards_and_counts_per_protocol_in_the_memory_tunnel() -> None:
    async def main() -> None:
        async with memory_tunnel(provider=CountingProvider) as t:
            assert isinstance(t.provider_instance, CountingProvider)
            assert not isinstance(t.provider_instance, HelperForwardingProvider)
            pings = [icmp_echo(t.client_v4, WWW4, seq) for seq in range(5)]
            pings += [icmp_echo(t.client_v6, WWW6, seq) for seq in range(2)]
            udp = [udp_packet(t.client_v4, WWW4, 40000 + i, 7, b"count-me") for i in range(3)]
            replies = await t.exchange(pings + udp)
            assert len(replies) == 10
            assert sum(r.endswith(b"count-me") for r in replies) == 3
            counts = json.loads(await t.send_provider_message(b"counts") or b"")
            assert counts == {
                "out": {"icmp": 7, "tcp": 0, "udp": 3, "other": 0},
                "in": {"icmp": 7, "tcp": 0, "udp": 3, "other": 0},
            }
            helper = json.loads(await t.send_provider_message(b"helper-stats") or b"")
            assert helper["ledger"]["stages"]["ipc_in"]["read"] == 10  # what the helper got is what was counted
            assert (await t.helper_stats())["connected"] is True
            assert await t.send_provider_message(b"unknown") is None
            assert t.session.status is VPNStatus.CONNECTED

    run_memory(main)


def test_counting_provider_stops_with_the_error_when_the_helper_dies() -> None:
    """No reconnect policy: the tunnel fails with a message saying the helper went away."""

    async def main() -> None:
        async with memory_tunnel(provider=CountingProvider) as t:
            t.kill_helper()
            with trio.fail_after(30):
                await t.session.wait_status(VPNStatus.DISCONNECTED)
            error = t.session.last_disconnect_error or ""
            assert error.startswith("TunnelDown: the helper"), error

    run_memory(main)


def test_a_second_counting_provider_is_refused_busy_and_the_first_keeps_working() -> None:
    async def main() -> None:
        async with memory_tunnel(provider=CountingProvider) as t:
            async with t.another_manager().open_session() as other:
                await other.start_vpn_tunnel()
                with trio.fail_after(60):
                    await other.wait_status(VPNStatus.DISCONNECTED)
                assert "BUSY" in (other.last_disconnect_error or ""), other.last_disconnect_error
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1

    run_memory(main)


def test_counting_provider_is_constructible_with_no_arguments() -> None:
    provider = CountingProvider()  # the provider host (and `netsim bench --provider`) construct it so
    assert provider.counts["out"] == {"icmp": 0, "tcp": 0, "udp": 0, "other": 0}


def test_helper_client_is_usable_directly_over_a_channel() -> None:
    """`HelperClient(channel)` for code that opens its own channel (`open_helper_channel` or a transport)."""

    async def helper(ch: IpcChannel) -> None:
        await ch.send(settings_frame())
        await trio.sleep_forever()

    async def main() -> None:
        async with scripted_helper(helper):
            from netsim.runtime.helper_client import open_helper_channel

            config = HelperClientConfig.from_provider_configuration(CONF)
            async with open_helper_channel(config) as ch:
                client = HelperClient(ch)
                settings = await client.wait_settings()
                assert settings.tunnel_remote_address == "192.0.2.2"
                await client.aclose()
                assert not client.is_connected

    run_memory(main)


def test_the_counting_provider_in_docs_helper_md_runs() -> None:
    """docs/helper.md's CountingProvider listing is code that works (extracted, run in the memory tunnel)."""
    import re
    import types

    doc = (Path(__file__).parents[2] / "docs" / "helper.md").read_text()
    section = doc[doc.index("### Your own provider: the counting provider end to end") :]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    module = types.ModuleType("helper_md_listing")
    exec(compile(code, "docs/helper.md", "exec"), module.__dict__)  # our own doc's listing

    async def main() -> None:
        async with memory_tunnel(provider=module.CountingProvider) as t:
            sent = [icmp_echo(t.client_v4, WWW4, 1), udp_packet(t.client_v4, WWW4, 40000, 7, b"doc")]
            assert len(await t.exchange(sent)) == 2
            counts = json.loads(await t.send_provider_message(b"counts") or b"")
            assert counts["out"] == counts["in"] == {"icmp": 1, "tcp": 0, "udp": 1, "other": 0}

    run_memory(main)


class _MtuProvider(CountingProvider):
    """start_helper_client with an ``on_settings`` of its own: change the helper's settings, then apply them."""

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        async def apply(settings: PacketTunnelNetworkSettings) -> None:
            settings.mtu = 1280
            await self.set_tunnel_network_settings(settings)

        from netsim.runtime.helper_client import start_helper_client

        self.helper = await start_helper_client(self, on_settings=apply)
        assert self.helper.settings is not None and self.helper.settings.mtu == 1420  # the helper's own, unchanged
        self.start_soon(self._outbound, self.helper)
        self.start_soon(self._inbound, self.helper)


def test_start_helper_client_hands_the_settings_to_on_settings_to_change_and_apply() -> None:
    async def main() -> None:
        async with memory_tunnel(provider=_MtuProvider) as t:
            assert t.session.applied_settings is not None and t.session.applied_settings["mtu"] == 1280
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1

    run_memory(main)
