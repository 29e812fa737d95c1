"""Per-app VPN (routingMethod == sourceApplication) in the lab: uid routing rules and FlowMetaData.

A provider in ``mac`` claims a virtual address with SOURCE_APPLICATION routing and one app rule for uid 65534.
A UDP datagram sent by a process running as uid 65534 enters the utun, reaches ``read_packet_objects()`` with
metadata naming the app and is echoed back; the same datagram sent as root never enters the utun (it takes the
physical path and gets no reply).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.apple import AppRule, Packet, RoutingMethod, TunnelProviderProtocol, VPNStatus
from netsim.runtime.controller import SubprocessLauncher, TunnelProviderManager
from netsim.runtime.netconfig import TUNNEL_TABLE
from netsim.testing.require import require_binary, require_root, require_tun

ROOT = str(Path(__file__).resolve().parents[2])  # the provider process loads this file by path
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from examples.ping_responder import PingResponder, echo_reply  # noqa: E402

pytestmark = [pytest.mark.lab, pytest.mark.tun]

VIRTUAL_V4, VIRTUAL_V6 = "10.66.0.1", "fd00:66::1"
NOBODY = 65534
SENDER_PYTHON = "/usr/bin/python3"  # readable by every uid; the app rule names it as the executable
APP = AppRule("dev.netsim.test.nobody", uid=NOBODY, executable_path=SENDER_PYTHON)
SENDER = """
import socket, sys
host, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
s.sendto(payload, (host, port))
try:
    print("reply", s.recvfrom(2048)[0].decode())
except (TimeoutError, OSError) as exc:
    print("noreply", type(exc).__name__)
"""


class PerAppEcho(PingResponder):
    """PingResponder that records each echo request's metadata (app message ``b"seen"`` returns them)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[Any]] = []

    async def _answer(self, virtual: set[bytes], udp_port: int) -> None:
        flow = self.packet_flow
        while True:
            replies = []
            for packet in await flow.read_packet_objects():
                data = bytes(packet.data)
                reply = echo_reply(data, virtual, udp_port)
                if reply is None:
                    continue
                m = packet.metadata
                payload = data[(20 if data[0] >> 4 == 4 else 40) + 8 :].decode(errors="replace")
                self.seen.append(
                    [
                        payload,
                        None if m is None else m.source_app_signing_identifier,
                        None if m is None else m.source_app_unique_identifier.hex(),
                    ]
                )
                replies.append(Packet(reply, packet.protocol_family))
            if replies:
                flow.write_packet_objects(replies)

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"seen":
            return json.dumps({"seen": self.seen, "flow": self.packet_flow.statistics().metadata_attributed}).encode()
        return await super().handle_app_message(data)


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    require_root()
    require_tun()
    require_binary("ip", "nft", "setpriv")
    from netsim.lab import Lab
    from netsim.testing.fixtures import assert_root_unchanged, root_snapshot

    before = root_snapshot()
    with Lab(services=False) as the_lab:
        yield the_lab
    assert_root_unchanged(before)


def manager_for(lab: Any, tmp_path: Any, routing_method: RoutingMethod) -> TunnelProviderManager:
    return TunnelProviderManager(
        f"{__file__}:PerAppEcho",
        SubprocessLauncher(lab.netns("mac"), log_path=tmp_path / "provider.log"),
        TunnelProviderProtocol(
            server_address="192.0.2.2",
            provider_configuration={"virtual_v4": VIRTUAL_V4, "virtual_v6": VIRTUAL_V6},
            routing_method=routing_method,
            app_rules=[APP],
        ),
    )


async def tunnel_rules(lab: Any) -> list[dict[str, Any]]:
    out = []
    for family in ("-4", "-6"):
        rules = json.loads((await lab.run("mac", ["ip", "-j", family, "rule", "show"])).stdout)
        out += [r for r in rules if str(r.get("table")) == str(TUNNEL_TABLE)]
    return out


async def route_dev(lab: Any, address: str, uid: int) -> str:
    result = await lab.run("mac", ["ip", "-j", "route", "get", address, "uid", str(uid)])
    return str(json.loads(result.stdout)[0]["dev"])


async def send(lab: Any, target: str, payload: str, *, as_nobody: bool, timeout: float) -> str:
    argv = [SENDER_PYTHON, "-I", "-c", SENDER, target, "7", payload, str(timeout)]
    if as_nobody:
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    result = await lab.run("mac", argv, timeout=timeout + 10)
    return str(result.stdout.decode()).strip()


def test_only_the_listed_app_enters_the_tunnel_and_is_named(lab: Any, tmp_path: Any) -> None:
    manager = manager_for(lab, tmp_path, RoutingMethod.SOURCE_APPLICATION)

    async def main() -> None:
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
            assert session.status is VPNStatus.CONNECTED, session.last_disconnect_error
            utun = (session.applied_settings or {})["device"]

            # The kernel's view: one uid rule per family instead of the catch-all.
            rules = await tunnel_rules(lab)
            assert len(rules) == 2, rules
            for rule in rules:
                assert (rule.get("uid_start"), rule.get("uid_end")) == (NOBODY, NOBODY), rule
                assert rule.get("fwmask") == "0x6e73" and rule.get("fwmark") == "0", rule
            for target in (VIRTUAL_V4, VIRTUAL_V6):
                assert await route_dev(lab, target, NOBODY) == utun
                assert await route_dev(lab, target, 0) != utun

            # The app's datagrams reach the provider with its metadata and are answered.
            assert await send(lab, VIRTUAL_V4, "from-nobody-v4", as_nobody=True, timeout=5) == "reply from-nobody-v4"
            assert await send(lab, VIRTUAL_V6, "from-nobody-v6", as_nobody=True, timeout=5) == "reply from-nobody-v6"
            # Root's identical datagram takes the physical path: the provider never sees it, nobody answers.
            out = await send(lab, VIRTUAL_V4, "from-root", as_nobody=False, timeout=1.5)
            assert out.startswith("noreply"), out

            report = json.loads(await session.send_provider_message(b"seen") or b"{}")
            unique = APP.unique_identifier.hex()
            assert report["seen"] == [
                ["from-nobody-v4", APP.signing_identifier, unique],
                ["from-nobody-v6", APP.signing_identifier, unique],
            ]
            assert report["flow"] >= 2

            await session.stop_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.DISCONNECTED)
        assert await tunnel_rules(lab) == []

    trio.run(main)


def test_destination_ip_ignores_app_rules(lab: Any, tmp_path: Any) -> None:
    manager = manager_for(lab, tmp_path, RoutingMethod.DESTINATION_IP)

    async def main() -> None:
        async with manager.open_session() as session:
            await session.start_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
            assert session.status is VPNStatus.CONNECTED, session.last_disconnect_error
            utun = (session.applied_settings or {})["device"]
            rules = await tunnel_rules(lab)
            assert len(rules) == 2 and not any("uid_start" in r for r in rules), rules
            assert await route_dev(lab, VIRTUAL_V4, 0) == utun
            assert await send(lab, VIRTUAL_V4, "from-root", as_nobody=False, timeout=5) == "reply from-root"
            report = json.loads(await session.send_provider_message(b"seen") or b"{}")
            assert report["seen"] == [["from-root", None, None]] and report["flow"] == 0
            await session.stop_vpn_tunnel()
            with trio.fail_after(30):
                await session.wait_status(VPNStatus.DISCONNECTED)

    trio.run(main)


def test_routing_method_changes_are_applied_in_place(lab: Any) -> None:
    """The configurator alone: switching modes and app lists rewrites exactly the tunnel rules."""
    from netsim.apple import IPv4Route, IPv4Settings, PacketTunnelNetworkSettings
    from netsim.runtime.netconfig import KernelNetworkConfigurator

    other = AppRule("dev.netsim.test.other", uid=NOBODY - 1)
    settings = PacketTunnelNetworkSettings("192.0.2.2")
    settings.ipv4_settings = IPv4Settings(["10.66.0.2"], ["255.255.255.255"])
    settings.ipv4_settings.included_routes = [IPv4Route(VIRTUAL_V4, "255.255.255.255")]
    configurator = KernelNetworkConfigurator(lab.netns("mac"), device_name="utunpa%d")

    def uid_rules() -> list[tuple[int, int]]:
        rules = json.loads(lab.run_sync("mac", ["ip", "-j", "-4", "rule", "show"]).stdout)
        return [(r["priority"], r.get("uid_start", -1)) for r in rules if str(r.get("table")) == str(TUNNEL_TABLE)]

    def dev(uid: int, mark: int = 0) -> str:
        argv = ["ip", "-j", "route", "get", VIRTUAL_V4, "uid", str(uid), "mark", str(mark)]
        return str(json.loads(lab.run_sync("mac", argv).stdout)[0]["dev"])

    try:
        configurator.apply(settings)
        utun = configurator.applied.device if configurator.applied else ""
        assert uid_rules() == [(6101, -1)] and dev(0) == utun

        configurator.set_routing_method(RoutingMethod.SOURCE_APPLICATION, [APP, other])
        assert sorted(uid_rules()) == [(6101, NOBODY - 1), (6101, NOBODY)]
        assert configurator.applied is not None and configurator.applied.app_uids == (NOBODY - 1, NOBODY)
        assert (dev(NOBODY), dev(NOBODY - 1), dev(0)) == (utun, utun, "en0")
        assert dev(NOBODY, mark=0x6E73) == "en0"  # the bypass mark still skips the tunnel table

        configurator.set_routing_method(RoutingMethod.SOURCE_APPLICATION, [APP])
        assert uid_rules() == [(6101, NOBODY)] and dev(NOBODY - 1) == "en0"
        configurator.apply(settings)  # re-applying settings keeps the per-app rules
        assert uid_rules() == [(6101, NOBODY)]

        configurator.set_routing_method(RoutingMethod.DESTINATION_IP, [APP])
        assert uid_rules() == [(6101, -1)] and dev(0) == utun
    finally:
        configurator.close()
    assert uid_rules() == []
