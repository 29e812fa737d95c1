"""Issue 13 in the lab (root): the user's provider through `netsim_tunnel`, and the second-tunnel leak.

One lab with per-link captures serves the module (2-core CI). `test_the_shared_scenario...` runs the same
`tunnel_scenario.scenario` as the memory backend (tests/runtime/test_tunnel_backends.py) with a provider given as
a ``"module:Class"`` spec that must see a key of ``provider_configuration``.

The leak: a second provider started in ``mac`` while a tunnel is CONNECTED got BUSY from the helper, and its
teardown removed the first tunnel's ip rules (priorities 6100/6101, table 28275), so the first session still said
CONNECTED while its traffic left en0 in the clear. Proof of the fix on the wire: after the refused second start a
UDP probe whose payload carries a per-run token still comes back through the tunnel and the token never appears
on ``mac-en0``; the positive control sends the same kind of probe (another token) with the tunnel down and finds
it on ``mac-en0`` in clear, so the capture can see such a packet.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from tunnel_scenario import SPEC, TAG, scenario

from netsim.apple import VPNStatus
from netsim.errors import RemoteProtocolError
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tunnel import LabTunnel, fetch_helper_stats, netsim_tunnel, udp_echo_argv
from netsim.runtime.forwarding import HelperForwardingProvider
from netsim.runtime.netconfig import TUNNEL_LOCK_DIR
from netsim.testing.fixtures import assert_root_unchanged, root_snapshot
from netsim.testing.require import require_binary, require_root, require_tun

pytestmark = [pytest.mark.lab, pytest.mark.tun, pytest.mark.timeout(300)]
SECOND_VPN = f"{Path(__file__).parent.parent}/tunnel_scenario.py:SecondVpn"

# One UDP datagram carrying a token to the lab's echo service; prints the echo (bounded: 3 s timeout).
TOKEN_ECHO = (
    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
    "s.sendto(sys.argv[1].encode(), ('203.0.113.10', 7)); print(s.recv(256).decode())"
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    require_tun()
    require_binary("wireguard-go", "wg", "ip", "nft", "tcpdump")
    before = root_snapshot()
    with Lab(pcap_dir=tmp_path_factory.mktemp("backends-pcap")) as the_lab:
        yield the_lab
    assert_root_unchanged(before)
    # every tunnel's ownership claim is gone with the lab (released by its owner, or removed by the teardown)
    assert not list(TUNNEL_LOCK_DIR.glob(f"netsim-{the_lab.run_id}-*"))


def _en0(lab: Lab) -> bytes:
    assert lab.pcap_dir is not None
    return b"".join(bytes(p) for p in read_pcap(lab.pcap_dir / "mac-en0.pcap"))


async def _token_echo(lab: Lab, token: str) -> tuple[int, str]:
    r = await lab.run("mac", [sys.executable, "-c", TOKEN_ECHO, token], check=False, timeout=20)
    return r.returncode, r.stdout.decode(errors="replace").strip()


def test_the_shared_scenario_runs_a_users_provider_in_the_lab_tunnel(lab: Lab) -> None:
    async def main() -> tuple[dict[str, Any], Any]:
        async with netsim_tunnel(lab, provider=SPEC, provider_configuration={"tag": TAG}) as t:

            async def tunnel_works() -> bool:
                result = await t.run_probe("udp echo v4", udp_echo_argv("203.0.113.10"))
                return result.ok and result.path == "tunnel" and result.unavailable == ()

            seen = await scenario(t, tunnel_works)
            return seen, await t.helper_stats()

    seen, helper = trio.run(main)
    assert helper["sessions"] == 1  # the refused second provider never took the helper's session slot
    assert seen["second_error"]


def test_run_probe_works_with_a_provider_without_a_ledger(lab: Lab) -> None:
    """A provider that answers no app message: `helper_stats` still reads the helper (its observer socket; before,
    it asked the provider and silently got ``{}``), and `run_probe` says the provider ledger was unavailable and
    still finds the path (before: ``KeyError: 'ledger'``)."""

    async def main() -> tuple[Any, dict[str, Any]]:
        async with netsim_tunnel(lab, provider=f"{Path(__file__).parent.parent}/tunnel_scenario.py:Quiet") as t:
            assert await t.provider_stats() == {}
            helper = await t.helper_stats()
            assert t.stats_socket is not None
            with pytest.raises(RemoteProtocolError, match="auth"):  # the observer socket checks the token too
                await fetch_helper_stats(t.stats_socket, timeout=5)
            return await t.run_probe("udp echo v4", udp_echo_argv("203.0.113.10")), helper

    result, helper = trio.run(main)
    assert helper["sessions"] == 1 and helper["connected"] is True and "ledger" in helper
    assert result.ok and result.path == "tunnel" and result.unavailable == ("provider ledger",)
    assert result.tunnelled >= 1


@pytest.mark.parametrize("second", ["builtin", "second_vpn"])
def test_a_refused_second_provider_does_not_open_a_leak(lab: Lab, second: str) -> None:
    """Either second provider is refused: the built-in one at the helper (BUSY), a second VPN app that applies
    settings of its own by the namespace's ownership claim (before the fix its settings replaced the first's
    table and its teardown deleted the first's rules: this probe then left en0 in clear)."""
    inside, control = f"NSLEAK{secrets.token_hex(6)}", f"NSCTRL{secrets.token_hex(6)}"
    rec: dict[str, Any] = {}

    async def main() -> None:
        async with netsim_tunnel(lab) as t:
            rec["before"] = await _token_echo(lab, inside + "-before")
            await _second_provider(lab, t, rec, HelperForwardingProvider if second == "builtin" else SECOND_VPN)
            rec["status_after"] = t.session.status
            rec["after"] = await _token_echo(lab, inside + "-after")
            rec["helper"] = await t.helper_stats()
        rec["control"] = await _token_echo(lab, control)  # tunnel down: this one leaves en0 in clear

    trio.run(main)
    assert rec["second_status"] is VPNStatus.DISCONNECTED, rec
    assert second == "builtin" or "already has a tunnel" in str(rec["second_error"])
    assert rec["status_after"] is VPNStatus.CONNECTED
    assert rec["before"] == (0, inside + "-before") and rec["after"] == (0, inside + "-after"), rec
    en0 = _en0(lab)
    assert control.encode() in en0  # positive control: a cleartext probe on en0 is visible in this capture
    assert rec["control"] == (0, control)
    assert inside.encode() not in en0  # with the tunnel up, before and after the refused start: never in clear


async def _second_provider(lab: Lab, t: LabTunnel, rec: dict[str, Any], provider: Any) -> None:
    """Start ``provider`` as a second tunnel in ``mac`` (configured for the same helper), as a second app would."""
    manager = t.another_manager(provider, connect_timeout=5.0, reconnect_for=5.0, backoff_max=0.5)
    async with manager.open_session() as other:
        await other.start_vpn_tunnel()
        with trio.fail_after(60):
            await other.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
        rec["second_status"] = other.status
        rec["second_error"] = other.last_disconnect_error
