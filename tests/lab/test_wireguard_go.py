"""netsim.lab.wireguard: a real wireguard-go pair in the lab, driven and witnessed through `WireGuardGo`.

Root tier: a server in ``vpn`` and a client in ``mac`` (behind the home router's NAT), handshake, ping across
the tunnel, `show()` counters cross-checked between the two independent processes, `showconf()` as an oracle
for the rendered configuration, restart and stop. The dump parser and naming rules are tested without root in
tests/test_wireguard_go_units.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import trio

from netsim.core.wireguard.config import Endpoint, parse_config
from netsim.core.wireguard.keys import PresharedKey, PrivateKey
from netsim.errors import LabError
from netsim.lab.lab import Lab
from netsim.lab.wireguard import (
    WgInterfaceStatus,
    WireGuardGo,
    wg_ifname,
)
from netsim.testing.fixtures import LeakCheck, assert_root_unchanged, root_snapshot
from netsim.testing.require import require_binary, require_root

SERVER_TUN, CLIENT_TUN = "10.77.0.1", "10.77.0.2"

# --- root tier ----------------------------------------------------------------------------------------------


def _gate() -> None:
    require_root()
    require_binary("wireguard-go", "wg", "ip", "nft", "ping")


async def _ping(lab: Lab, role: str, dst: str, count: int = 3) -> None:
    # -i 0.2: root may go below the default 1 s interval; -w bounds the whole run.
    await lab.run(role, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", "10", dst], timeout=15)


async def _stable_pair(a: WireGuardGo, b: WireGuardGo) -> tuple[WgInterfaceStatus, WgInterfaceStatus]:
    """Snapshots of both sides with no datagram in flight: a's counters unchanged across reading b."""
    for _ in range(20):
        sa, sb, sa2 = await a.show(), await b.show(), await a.show()
        if sa == sa2:
            return sa, sb
        await trio.sleep(0.05)
    raise AssertionError("wireguard-go counters never settled")


@pytest.mark.lab
def test_handshake_ping_counters_restart_stop() -> None:
    _gate()
    before, leaks = root_snapshot(), LeakCheck()

    async def main() -> str:
        async with Lab(services=False) as lab:
            psk = PresharedKey.generate()
            server = WireGuardGo.in_lab(lab, "vpn", stem="s0", addresses=[f"{SERVER_TUN}/24"], mtu=1400)
            client = WireGuardGo.in_lab(lab, "mac", stem="c0", listen_port=None, addresses=[f"{CLIENT_TUN}/24"])
            await server.add_peer(client.public_key, allowed_ips=[f"{CLIENT_TUN}/32"], preshared_key=psk)
            await client.add_peer(
                server.public_key,
                allowed_ips=["10.77.0.0/24"],
                endpoint=f"{lab.addr.vpn_wan_v4}:51820",
                preshared_key=psk,
            )
            try:
                async with server, client:
                    assert server.running and client.running and server.pid != client.pid
                    # What wireguard-go holds is what we configured (showconf is the oracle for our renderer).
                    conf = await server.showconf()
                    assert conf.interface.private_key == server.private_key
                    assert conf.interface.listen_port == 51820
                    assert conf.peers == server.config().peers
                    fresh = await client.show()
                    assert fresh.peer(server.public_key).latest_handshake is None
                    assert fresh.listen_port != 0  # wireguard-go picked a port

                    await _ping(lab, "mac", SERVER_TUN)
                    s, c = await _stable_pair(server, client)
                    sc, cs = s.peer(client.public_key), c.peer(server.public_key)
                    assert sc.latest_handshake is not None and cs.latest_handshake is not None
                    assert sc.has_preshared_key and cs.has_preshared_key
                    # The server learned the client's endpoint as the home router's NATed address.
                    assert sc.endpoint is not None and sc.endpoint.host == str(lab.addr.isp_wan_v4)
                    assert cs.endpoint == Endpoint(str(lab.addr.vpn_wan_v4), 51820)
                    # Two independent processes agree byte for byte: nothing lost, nothing counted twice.
                    assert cs.tx_bytes == sc.rx_bytes > 0
                    assert sc.tx_bytes == cs.rx_bytes > 0
                    # 1 initiation (148) + 3 echo requests of 84 B inner, padded to 96 + 32 B overhead
                    assert cs.tx_bytes >= 148 + 3 * 128

                    old_pid = client.pid
                    await client.restart()
                    assert client.pid != old_pid
                    after = (await client.show()).peer(server.public_key)
                    assert after.latest_handshake is None and after.rx_bytes == after.tx_bytes == 0
                    await _ping(lab, "mac", SERVER_TUN, count=2)
                    renewed = await client.wait_handshake(server.public_key, timeout=5)
                    assert renewed.rx_bytes > 0 and renewed.tx_bytes > 0
                    with pytest.raises(LabError, match="no handshake"):
                        await client.wait_handshake(server.public_key, after=2**40, timeout=0.3)

                    # Peers can be added and replaced on a running instance (wg set ... allowed-ips replaces).
                    extra = PrivateKey.generate().public_key()
                    await server.add_peer(extra, allowed_ips=["10.77.0.99/32"])
                    await server.add_peer(extra, allowed_ips=["10.77.0.98/32", "10.77.0.97/32"])
                    live = (await server.showconf()).peer(extra)
                    assert sorted(str(n) for n in live.allowed_ips) == ["10.77.0.97/32", "10.77.0.98/32"]
                    await server.remove_peer(extra)
                    assert all(p.public_key != extra for p in (await server.showconf()).peers)

                    # A second wireguard-go with a name already served is refused before it can steal it.
                    dup = WireGuardGo(lab.netns("inet"), server.ifname, PrivateKey.generate())
                    with pytest.raises(LabError, match="in use"):
                        await dup.start()
                    assert server.running and server.socket_path.exists()
                    return lab.run_id
            finally:
                print(server.logs(), client.logs())

    run_id = trio.run(main)
    leaks.check([run_id])
    assert_root_unchanged(before)


@pytest.mark.lab
def test_stop_removes_process_socket_and_interface() -> None:
    _gate()

    async def main() -> None:
        async with Lab(services=False) as lab:
            # standalone form (no Lab.spawn), built from a wg-quick file; logs in a temporary dir removed by stop()
            peer_key = PrivateKey.generate().public_key()
            text = (
                f"[Interface]\nPrivateKey = {PrivateKey.generate().to_base64()}\nAddress = 10.78.0.1/24\n"
                f"MTU = 1380\nDNS = 10.78.0.53\n[Peer]\nPublicKey = {peer_key}\nAllowedIPs = 10.78.0.2/32\n"
                "Endpoint = 192.0.2.99:51820\nPersistentKeepalive = 25\n"
            )
            wg = WireGuardGo.from_config(lab.netns("vpn"), wg_ifname(lab.run_id, "x0"), parse_config(text))
            wg.log_level = "verbose"
            await wg.start()
            assert "UAPI listener started" in wg.logs()
            assert wg._own_log_dir is not None
            log_dir = wg._own_log_dir
            pid, sock = wg.pid, wg.socket_path
            assert pid is not None and sock.exists()
            addr = await lab.run("vpn", ["ip", "-j", "addr", "show", "dev", wg.ifname])
            (link,) = json.loads(addr.stdout)
            assert "UP" in link["flags"] and link["mtu"] == 1380
            assert (await wg.showconf()).peers == parse_config(text).peers
            assert {"local": "10.78.0.1", "prefixlen": 24} in [
                {"local": a["local"], "prefixlen": a["prefixlen"]} for a in link["addr_info"]
            ]
            await wg.stop()
            await wg.stop()  # idempotent
            assert not wg.running and wg.pid is None and not sock.exists() and not log_dir.exists()
            gone = await lab.run("vpn", ["ip", "link", "show", "dev", wg.ifname], check=False)
            assert gone.returncode != 0
            assert subprocess.run(["kill", "-0", str(pid)], check=False, capture_output=True).returncode != 0

    trio.run(main)


@pytest.mark.lab
def test_start_failures_are_lab_errors_with_the_reason() -> None:
    _gate()

    async def main() -> None:
        async with Lab(services=False) as lab:
            a = WireGuardGo.in_lab(lab, "vpn", stem="f0", listen_port=51999)
            b = WireGuardGo.in_lab(lab, "vpn", stem="f1", listen_port=51999)
            async with a:
                # the port is taken: wireguard-go starts, `wg setconf` is refused, b is torn down again
                with pytest.raises(LabError, match="setconf"):
                    await b.start()
                assert not b.running and not b.socket_path.exists()
                assert a.running
            # the process itself exits: the error carries its output
            ghost = WireGuardGo(f"netsim-{lab.run_id}-nonexistent", wg_ifname(lab.run_id, "g0"), PrivateKey.generate())
            with pytest.raises(LabError, match=r"exited with status [1-9](.|\n)*Cannot open network namespace"):
                await ghost.start()
            await ghost.stop()

    trio.run(main)
