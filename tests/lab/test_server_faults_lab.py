"""The VPN server blackholed (process alive) and restarted with a new key and port (issue 16; row F6).

One lab and one built-in tunnel; captures on mac/en0 and isp/wan from the start. Each phase sends UDP datagrams
carrying a marker to the internet host's echo port:

* blackholed: `faults.Blackhole` on the server's own address in ``vpn`` (input, output, forward, counted):
  nothing comes back, and the marker never appears in the clear on en0 or the ISP's WAN (the tunnel carries
  it encrypted, into the hole); once the hole goes the same tunnel works again, without user code;
* rekeyed: wireguard-go restarts with a new static key on a new port (`WireGuardGo.restart_with`): the client
  fails closed (no echo, nothing in the clear, the provider alive) until it gets the new configuration as a
  user would give it: the helper's config rewritten with the server's new key and endpoint, the helper
  restarted; the provider reconnects by itself;
* control: the tunnel stopped, the same datagram *is* seen in the clear on both captures (the capture can fail).

The built-in provider reasserts once WireGuard takes the session for dead (data unanswered for 15 s: the helper's
``tunnel.responding``), and is CONNECTED again when a handshake completes after the hole is gone.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import pytest
import trio

from netsim.apple.enums import VPNStatus
from netsim.core.wireguard.config import render_wg_quick
from netsim.core.wireguard.keys import PrivateKey
from netsim.lab import faults
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tunnel import client_config, netsim_tunnel
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.timeout(240)]
PHASES = ("before", "blackholed", "recovered", "rekeyed", "reconfigured", "control")
NEW_PORT = 51821
_SEND = (  # argv[3] tries of 1 s each; prints "echo" when the marker came back
    "import socket, sys; a, m = sys.argv[1], sys.argv[2].encode(); r = 'timeout'\n"
    "s = socket.socket(socket.AF_INET6 if ':' in a else socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)\n"
    "for _ in range(int(sys.argv[3])):\n"
    " try:\n  s.sendto(m, (a, 7)); r = 'echo' if s.recv(64) == m else 'other'; break\n"
    " except TimeoutError:\n  continue\n"
    " except OSError as e:\n  r = type(e).__name__; break\n"
    "print(r)"
)


def marker(phase: str) -> str:
    return f"netsim-srv-{phase}"


async def _echo(lab: Lab, phase: str, tries: int) -> str:
    argv = [sys.executable, "-c", _SEND, str(lab.addr.www_v4), marker(phase), str(tries)]
    return (await lab.run("mac", argv, check=False, timeout=60)).stdout.decode().strip()


async def _until_echo(lab: Lab, phase: str, *, rounds: int) -> str:
    """Bounded retries (``rounds`` x 3 tries) until the echo comes back."""
    result = ""
    for _ in range(rounds):
        result = await _echo(lab, phase, 3)
        if result == "echo":
            break
    return result


async def _scenario(lab: Lab, rec: dict[str, Any]) -> None:
    async with netsim_tunnel(lab) as t:
        try:
            rec["before"] = await _until_echo(lab, "before", rounds=3)
            with faults.Blackhole(lab.netns("vpn"), str(lab.addr.vpn_wan_v4)) as hole:
                rec["blackholed"] = await _echo(lab, "blackholed", 3)
                rec["blackholed_dropped"] = hole.dropped()
                rec["blackholed_status"] = t.session.status.name
                rec["blackholed_provider_alive"] = t.provider_pid is not None
                # steady traffic into the hole until WireGuard takes the session for dead (15 s): reasserting
                with trio.move_on_after(30):
                    while t.session.status is not VPNStatus.REASSERTING:
                        await _echo(lab, "blackholed", 1)
                rec["blackholed_later_status"] = t.session.status.name
            rec["recovered"] = await _until_echo(lab, "recovered", rounds=10)
            with trio.move_on_after(10):
                await t.session.wait_status(VPNStatus.CONNECTED)
            rec["recovered_status"] = t.session.status.name
            new_key = PrivateKey.generate()
            await t.server.restart_with(private_key=new_key, listen_port=NEW_PORT)
            rec["server_port"] = (await t.server.show()).listen_port
            rec["rekeyed"] = await _echo(lab, "rekeyed", 4)
            rec["rekeyed_status"] = t.session.status.name
            rec["rekeyed_provider_alive"] = t.provider_pid is not None
            rec["rekeyed_helper_alive"] = t.helper.returncode is None
            # the user's part: the new server key and endpoint in the configuration, the helper restarted
            plan = dataclasses.replace(t.plan, port=NEW_PORT)
            t.config_path.write_text(render_wg_quick(client_config(lab, plan, t.client_key, new_key)))
            await t.restart_helper()
            await t.wait_connected(after_connects=1)
            rec["reconfigured"] = await _until_echo(lab, "reconfigured", rounds=10)
            rec["reconfigured_status"] = t.session.status.name
        except BaseException:
            rec["logs"] = t.logs()
            raise
    rec["control"] = await _echo(lab, "control", 1)  # no tunnel: straight out of en0
    for name in ("mac-en0", "isp-wan"):
        await trio.to_thread.run_sync(lab.stop_capture, name)
        assert lab.pcap_dir is not None
        packets = [bytes(p) for p in read_pcap(lab.pcap_dir / f"{name}.pcap")]
        rec[f"seen_{name}"] = {phase: sum(marker(phase).encode() in p for p in packets) for phase in PHASES}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pcap_dir = tmp_path_factory.mktemp("server-faults-pcap")
    rec = run_lab_scenario(_scenario, "wireguard-go", "wg", "nft", "tcpdump", pcap_dir=pcap_dir)
    print("[server faults]", {k: v for k, v in rec.items() if k not in ("logs", "error")})
    assert "error" not in rec, rec["error"]
    return rec


@pytest.mark.reliability("F6")
def test_a_blackholed_server_blocks_without_leaking_and_the_tunnel_recovers(scenario: dict[str, Any]) -> None:
    assert scenario["before"] == "echo"
    assert scenario["blackholed"] == "timeout" and scenario["blackholed_dropped"] >= 1
    assert scenario["blackholed_provider_alive"] and scenario["blackholed_status"] == "CONNECTED"
    assert scenario["blackholed_later_status"] == "REASSERTING"  # the server stopped answering: re-establishing
    for cap in ("seen_mac-en0", "seen_isp-wan"):
        assert scenario[cap]["blackholed"] == 0, (cap, scenario[cap])
    assert scenario["recovered"] == "echo" and scenario["recovered_status"] == "CONNECTED"


def test_a_server_with_a_new_key_and_port_fails_closed_until_reconfigured(scenario: dict[str, Any]) -> None:
    assert scenario["server_port"] == NEW_PORT
    assert scenario["rekeyed"] == "timeout"
    assert scenario["rekeyed_provider_alive"] and scenario["rekeyed_helper_alive"]
    for cap in ("seen_mac-en0", "seen_isp-wan"):
        assert scenario[cap]["rekeyed"] == 0, (cap, scenario[cap])
    assert scenario["reconfigured"] == "echo" and scenario["reconfigured_status"] == "CONNECTED"


def test_the_captures_see_cleartext_when_there_is_no_tunnel(scenario: dict[str, Any]) -> None:
    assert scenario["control"] == "echo"
    for cap in ("seen_mac-en0", "seen_isp-wan"):
        assert scenario[cap]["control"] >= 1, (cap, scenario[cap])  # the positive control
        assert scenario[cap]["before"] == 0 and scenario[cap]["reconfigured"] == 0, (cap, scenario[cap])


def test_lab_left_nothing_behind(scenario: dict[str, Any]) -> None:
    assert scenario["leaks"] == [] and scenario["root_changed"] is None
