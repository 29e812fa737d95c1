"""Issue 13 without root: the user's provider in the memory tunnel, the shared scenario, and input validation.

The same `tunnel_scenario.scenario` runs in the lab in tests/lab/test_tunnel_backends.py. Validation must fail
before anything starts: for `netsim_tunnel` a recording stand-in for the lab proves that nothing was asked of it
(no wireguard-go, no helper, no nft), for `memory_tunnel` no helper task is started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from tunnel_scenario import SPEC, TAG, scenario

from netsim.apple import IPv4Route, IPv4Settings, PacketTunnelNetworkSettings, TunnelProviderProtocol, VPNStatus
from netsim.core import ipc
from netsim.errors import ConfigError, LabError
from netsim.lab.tunnel import netsim_tunnel
from netsim.runtime.channel import open_ipc_channel
from netsim.runtime.controller import TunnelProviderManager
from netsim.runtime.provider import PacketTunnelProvider
from netsim.testing.ipc_pair import memory_stream_pair
from netsim.testing.memory_tunnel import icmp_echo, memory_tunnel


def test_the_shared_scenario_runs_a_users_provider_in_the_memory_tunnel() -> None:
    async def main() -> dict[str, Any]:
        async with memory_tunnel(provider=SPEC, provider_configuration={"tag": TAG}) as t:

            async def tunnel_works() -> bool:
                replies = await t.exchange([icmp_echo(t.client_v4, "203.0.113.10", 1)], timeout=5)
                return len(replies) == 1

            seen = await scenario(t, tunnel_works)
            return seen

    seen = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen["second_error"]


class RecordingLab:
    """Stands in for a `Lab`: records every attribute asked for, so a test can assert nothing was started."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.asked.append(name)
        raise AssertionError(f"netsim_tunnel used lab.{name} before validating its inputs")


BAD_POLICY = '[[rule]]\naction = "bypass"\ndst = "not-an-address"\n'


def _bad_inputs(tmp_path: Path) -> list[tuple[dict[str, Any], str]]:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_POLICY)
    return [
        ({"policy": bad}, f"{bad}"),
        ({"policy": str(bad)}, f"{bad}"),  # a str naming a file is a path, not policy text
        ({"policy": tmp_path / "missing.toml"}, "no such policy file: "),
        ({"policy": str(tmp_path / "missing.yaml")}, "no such policy file: "),
        ({"policy": "mechanism = 'warp'\n"}, "policy text"),
        ({"provider": "no_such_module_xyz:Provider"}, "does not import: ModuleNotFoundError"),
        ({"provider": "netsim.errors:ConfigError"}, "is not a PacketTunnelProvider subclass"),
        ({"provider": "missing-colon"}, "must look like"),
        ({"provider_configuration": {"tag": object()}}, "must be JSON-able"),
        ({"provider_configuration": {"helper_socket": "/tmp/x"}}, "netsim's own"),
        ({"protocol": {"include_all_network": True}}, "['include_all_network'] are not NEVPNProtocol fields"),
        ({"protocol": {"server_address": "1.2.3.4"}}, "['server_address'] are not NEVPNProtocol fields"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_netsim_tunnel_validates_every_input_before_anything_starts(tmp_path: Path, case: int) -> None:
    kwargs, message = _bad_inputs(tmp_path)[case]
    lab = RecordingLab()

    async def main() -> None:
        async with netsim_tunnel(lab, **kwargs):  # type: ignore[arg-type]
            raise AssertionError("started")

    with pytest.raises(ConfigError) as info:
        trio.run(main)
    assert message in str(info.value)
    assert lab.asked == []  # nothing was spawned: the lab was never touched


@pytest.mark.parametrize("case", range(12))
def test_memory_tunnel_validates_the_same_inputs(tmp_path: Path, case: int) -> None:
    kwargs, message = _bad_inputs(tmp_path)[case]

    async def main() -> None:
        async with memory_tunnel(**kwargs):
            raise AssertionError("started")

    with pytest.raises(ConfigError) as info:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert message in str(info.value)


def test_a_bad_policy_file_error_names_the_file_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_POLICY)
    lab = RecordingLab()

    async def main() -> None:
        async with netsim_tunnel(lab, policy=bad):  # type: ignore[arg-type]
            pass

    with pytest.raises(ConfigError) as info:
        trio.run(main)
    text = str(info.value)
    assert str(bad) in text and "dst" in text and "{" not in text  # no JSON logs of started processes


def test_a_good_policy_path_given_as_str_is_read_as_a_file(tmp_path: Path) -> None:
    good = tmp_path / "p.toml"
    good.write_text('mechanism = "route"\n[[rule]]\naction = "bypass"\ndst = "198.51.100.0/24"\n')

    async def main() -> dict[str, Any]:
        async with memory_tunnel(policy=str(good)) as t:
            return await t.helper_stats()

    stats = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert stats["policy"] is not None


def test_a_second_tunnel_in_a_lab_is_refused_before_anything_starts() -> None:
    from netsim.lab import tunnel as tunnel_module

    class OneNamespaceLab(RecordingLab):
        def netns(self, role: str) -> str:
            return f"netsim-test{os.getpid()}-{role}"

    lab = OneNamespaceLab()
    tunnel_module._ACTIVE.add(lab.netns("mac"))
    try:

        async def main() -> None:
            async with netsim_tunnel(lab):  # type: ignore[arg-type]
                pass

        with pytest.raises(LabError, match="already has a tunnel"):
            trio.run(main)
        assert lab.asked == []
    finally:
        tunnel_module._ACTIVE.discard(lab.netns("mac"))


class SettingsOnly(PacketTunnelProvider):
    """A provider that never talks to the helper: it only claims the Mac's routes (a second VPN app)."""

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        settings = PacketTunnelNetworkSettings("192.0.2.99")
        settings.ipv4_settings = IPv4Settings(["10.99.0.2"], ["255.255.255.255"])
        settings.ipv4_settings.included_routes = [IPv4Route.default()]
        await self.set_tunnel_network_settings(settings)


def test_memory_backend_refuses_a_second_tunnel_on_the_same_mac() -> None:
    """Issue 13: the memory backend let a second provider on the same simulated Mac become CONNECTED too."""

    async def main() -> tuple[VPNStatus, str | None, VPNStatus, int]:
        async with memory_tunnel() as t:
            # the tunnel's own launcher: the same Mac, as a second app on it would be
            second = TunnelProviderManager(
                SettingsOnly, t.launcher, TunnelProviderProtocol(server_address="192.0.2.99")
            )
            async with second.open_session() as other:
                await other.start_vpn_tunnel()
                with trio.fail_after(30):
                    await other.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
                status, error = other.status, other.last_disconnect_error
            return status, error, t.session.status, t.helper.sessions

    status, error, first, sessions = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert status is VPNStatus.DISCONNECTED and "already has a tunnel" in str(error)
    assert first is VPNStatus.CONNECTED and sessions == 1


def test_the_helper_observer_answers_stats_and_closes_on_anything_else() -> None:
    """`Helper.serve_observer` (``--stats-socket``): STATS_REQUEST/PING only, never the provider's slot; a PACKETS
    frame from an observer is a protocol violation that ends that connection (counted), not the helper."""

    async def observe(t: Any, events: list[ipc.Event | bytes]) -> list[ipc.Event]:
        a, b = memory_stream_pair()
        got: list[ipc.Event] = []
        async with (
            open_ipc_channel(a, ipc.Connection(ipc.Role.PROVIDER, capabilities=ipc.Capability.STATS)) as obs,
            open_ipc_channel(b, ipc.Connection(ipc.Role.HELPER, capabilities=ipc.Capability.STATS)) as side,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(side.handshake)
            await obs.handshake()
            nursery.start_soon(t.helper.serve_observer, side)
            for ev in events:
                if isinstance(ev, bytes):
                    await obs.send_packets([ev], 2)  # PACKETS: what only a provider may send
                else:
                    await obs.send(ev)
                with trio.fail_after(5):
                    got.append(await obs.receive_event())
            nursery.cancel_scope.cancel()
        return got

    async def main() -> tuple[list[ipc.Event], list[ipc.Event], int, int, bool]:
        async with memory_tunnel() as t:
            good = await observe(t, [ipc.StatsRequest(7), ipc.Ping(9)])
            bad = await observe(t, [icmp_echo(t.client_v4, "203.0.113.10", 1)])
            replies = await t.exchange([icmp_echo(t.client_v4, "203.0.113.10", 2)], timeout=5)
            return good, bad, t.helper.observers, t.helper.observer_rejected, len(replies) == 1 and t.helper.connected

    good, bad, observers, rejected, still_tunnelling = trio.run(
        main, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    assert isinstance(good[0], ipc.StatsResponse) and good[0].request_id == 7 and good[0].stats["sessions"] == 1
    assert isinstance(good[1], ipc.Pong) and good[1].nonce == 9
    assert isinstance(bad[0], ipc.Error) and bad[0].code == ipc.ErrorCode.PROTOCOL
    assert observers == 2 and rejected == 1 and still_tunnelling


def test_protocol_fields_reach_the_session_and_wait_connected_false_yields_while_connecting() -> None:
    """``protocol`` sets NEVPNProtocol fields on the session's protocol; ``wait_connected=False`` yields at once."""

    async def main() -> tuple[TunnelProviderProtocol, VPNStatus, VPNStatus]:
        async with memory_tunnel(protocol={"include_all_networks": True}, wait_connected=False) as t:
            first = t.session.status
            await t.session.wait_status(VPNStatus.CONNECTED)
            return t.session.manager.protocol_configuration, first, t.session.status

    proto, first, later = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert proto.include_all_networks is True and proto.exclude_local_networks is False
    assert first is VPNStatus.CONNECTING and later is VPNStatus.CONNECTED
