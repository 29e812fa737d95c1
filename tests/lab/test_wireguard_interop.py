"""Interop: netsim's sans-IO WireGuard against a real wireguard-go, in the lab (root tier).

Both directions: netsim initiator in ``mac`` <-> wireguard-go in ``vpn`` (through the home NAT), and
wireguard-go initiator in ``mac`` <-> netsim responder in ``vpn``. ``wg show`` on the wireguard-go side is the
independent witness: latest handshake set, transfer counters equal to what netsim counted.
"""

from __future__ import annotations

import subprocess
from ipaddress import ip_network

import pytest
import trio
from scapy.layers.inet import ICMP, IP, UDP

from netsim.core.wireguard import (
    HandshakeCompleted,
    PeerConfig,
    PrivateKey,
    Timers,
    WireGuardDevice,
)
from netsim.core.wireguard.config import Endpoint
from netsim.lab.lab import Lab
from netsim.lab.wireguard import WireGuardGo, wg_ifname
from netsim.runtime.wgsocket import WireGuardSocket
from netsim.testing.require import require_binary, require_root

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SERVER_TUN = "10.66.0.1"
CLIENT_TUN = "10.66.0.2"
PORT = 51820


def _gate() -> None:
    require_root()
    require_binary("wireguard-go", "wg", "ip", "nft")


def echo_request(src: str, dst: str, seq: int, size: int = 56) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(type=8, id=0x4E53, seq=seq) / (bytes([seq & 0xFF]) * size))


async def expect_echo_replies(wgs: WireGuardSocket, seqs: set[int], timeout: float = 10.0) -> None:
    """Wait until an ICMP echo reply for every sequence number in ``seqs`` came back through the tunnel."""
    missing = set(seqs)
    with trio.fail_after(timeout):
        while missing:
            _peer, pkt = await wgs.received.receive()
            ip = IP(pkt)
            if ip.haslayer(ICMP) and ip[ICMP].type == 0 and ip[ICMP].id == 0x4E53:
                missing.discard(ip[ICMP].seq)


async def ping_round(wgs: WireGuardSocket, seqs: range) -> None:
    await wgs.send_packets([echo_request(CLIENT_TUN, SERVER_TUN, s) for s in seqs])
    await expect_echo_replies(wgs, set(seqs))


def handshakes(dev: WireGuardDevice) -> int:
    return dev.statistics().handshakes_completed


async def assert_counters_match(wg: WireGuardGo, dev: WireGuardDevice, client_pub: object) -> None:
    """wireguard-go's per-peer transfer counters equal netsim's, in both directions."""
    status = (await wg.show()).peer(client_pub)  # type: ignore[arg-type]
    peer = dev.peers[0]
    assert status.latest_handshake is not None
    assert peer.last_handshake is not None
    assert abs(status.latest_handshake - peer.last_handshake) < 5
    assert status.rx_bytes == peer.tx_bytes, (status, peer.tx_bytes, peer.rx_bytes)
    assert status.tx_bytes == peer.rx_bytes, (status, peer.tx_bytes, peer.rx_bytes)


def test_netsim_client_against_wireguard_go_server() -> None:
    _gate()

    async def main() -> None:
        async with Lab(services=False) as lab:
            server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
            wg = WireGuardGo(
                lab.netns("vpn"),
                wg_ifname(lab.run_id, "s0"),
                server_key,
                listen_port=PORT,
                addresses=[f"{SERVER_TUN}/24"],
            )
            # peers are configured before start (applied with `wg setconf`)
            await wg.add_peer(client_key.public_key(), allowed_ips=[f"{CLIENT_TUN}/32"])
            await wg.start()
            try:
                # A lowered message threshold forces rekeys mid-run; a short keepalive/rekey timeout makes
                # the "stopped hearing back" handshake after a server restart come in seconds.
                timers = Timers(rekey_after_messages=40, keepalive_timeout=2.0, rekey_timeout=1.0)
                dev = WireGuardDevice(
                    client_key,
                    [
                        PeerConfig(
                            public_key=server_key.public_key(),
                            endpoint=Endpoint(str(lab.addr.vpn_wan_v4), PORT),
                            allowed_ips=(ip_network("10.66.0.0/24"),),
                        )
                    ],
                    timers=timers,
                )
                sock = lab.socket("mac")
                sock.bind(("0.0.0.0", 0))
                wgs = WireGuardSocket(dev, sock)
                async with trio.open_nursery() as nursery:
                    await nursery.start(wgs.run)
                    # 1. handshake (triggered by the first staged packet) and ICMP both ways
                    await ping_round(wgs, range(0, 5))
                    assert handshakes(dev) == 1
                    assert isinstance(dev.next_event(), HandshakeCompleted)
                    await assert_counters_match(wg, dev, client_key.public_key())
                    # UDP through the tunnel to a socket bound on the server's tunnel address: the server
                    # kernel checks the inner checksums, so this proves the packets arrive intact
                    echo = trio.socket.from_stdlib_socket(lab.socket("vpn"))
                    await echo.bind((SERVER_TUN, 7777))

                    async def udp_echo() -> None:
                        while True:
                            data, src = await echo.recvfrom(2048)
                            await echo.sendto(data.upper(), src)

                    nursery.start_soon(udp_echo)
                    payloads = [f"netsim-udp-{i}".encode() * (i + 1) for i in range(5)]
                    await wgs.send_packets(
                        [
                            bytes(IP(src=CLIENT_TUN, dst=SERVER_TUN) / UDP(sport=40000 + i, dport=7777) / p)
                            for i, p in enumerate(payloads)
                        ]
                    )
                    echoed: dict[int, bytes] = {}
                    with trio.fail_after(10):
                        while len(echoed) < len(payloads):
                            _peer, pkt = await wgs.received.receive()
                            ip = IP(pkt)
                            if ip.haslayer(UDP) and ip[UDP].sport == 7777:
                                echoed[ip[UDP].dport - 40000] = bytes(ip[UDP].payload)
                    assert echoed == {i: p.upper() for i, p in enumerate(payloads)}
                    # 2. forced rekey after 40 messages: traffic continues across the new session
                    # (initiations are rate-limited to one per REKEY_TIMEOUT, so pace the rounds)
                    seq = 5
                    with trio.fail_after(20):
                        while handshakes(dev) < 3:
                            await ping_round(wgs, range(seq, seq + 10))
                            seq += 10
                            await trio.sleep(0.1)
                    assert dev.statistics().handshakes_initiated == 3
                    await ping_round(wgs, range(100, 105))
                    await assert_counters_match(wg, dev, client_key.public_key())
                    before = handshakes(dev)
                    # 3. server restart: its session state is gone; the client notices silence and re-handshakes
                    await wg.restart()
                    with trio.fail_after(30):
                        while True:
                            await wgs.send_packets([echo_request(CLIENT_TUN, SERVER_TUN, 200)])
                            with trio.move_on_after(0.5):
                                await expect_echo_replies(wgs, {200}, timeout=0.5)
                                break
                    assert handshakes(dev) > before
                    await ping_round(wgs, range(201, 211))
                    status = (await wg.show()).peer(client_key.public_key())
                    assert status.latest_handshake is not None
                    # after a restart wireguard-go's counters restart at zero: compare from the new session on
                    assert status.rx_bytes > 0 and status.tx_bytes > 0
                    stats = dev.statistics()
                    assert stats.drops["decrypt_failed"] == 0
                    assert stats.drops["inner_src_not_allowed"] == 0
                    nursery.cancel_scope.cancel()
                sock.close()
                echo.close()
            except BaseException:
                print(wg.logs())
                raise
            finally:
                await wg.stop()

    trio.run(main)


def test_wireguard_go_client_against_netsim_server() -> None:
    _gate()

    async def main() -> None:
        async with Lab(services=False) as lab:
            server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
            server_tun, client_tun = "10.67.0.1", "10.67.0.2"
            dev = WireGuardDevice(
                server_key,
                [PeerConfig(public_key=client_key.public_key(), allowed_ips=(ip_network(f"{client_tun}/32"),))],
            )
            sock = lab.socket("vpn")
            sock.bind(("0.0.0.0", PORT))
            wgs = WireGuardSocket(dev, sock)
            wg = WireGuardGo(lab.netns("mac"), wg_ifname(lab.run_id, "c0"), client_key, addresses=[f"{client_tun}/24"])
            await wg.add_peer(
                server_key.public_key(), allowed_ips=["10.67.0.0/24"], endpoint=f"{lab.addr.vpn_wan_v4}:{PORT}"
            )
            await wg.start()
            try:
                echoed = 0

                async def responder() -> None:
                    # play the server's IP stack: answer ICMP echo requests addressed to server_tun
                    nonlocal echoed
                    async for _peer, pkt in wgs.received:
                        ip = IP(pkt)
                        if ip.dst == server_tun and ip.haslayer(ICMP) and ip[ICMP].type == 8:
                            reply = (
                                IP(src=server_tun, dst=ip.src)
                                / ICMP(type=0, id=ip[ICMP].id, seq=ip[ICMP].seq)
                                / bytes(ip[ICMP].payload)
                            )
                            await wgs.send_packets([bytes(reply)])
                            echoed += 1

                async def ping(count: int) -> subprocess.CompletedProcess[bytes]:
                    return await lab.run(
                        "mac", ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "3", server_tun], timeout=30
                    )

                async with trio.open_nursery() as nursery:
                    await nursery.start(wgs.run)
                    nursery.start_soon(responder)
                    result = await ping(5)
                    assert b" 0% packet loss" in result.stdout, result.stdout
                    assert echoed >= 5
                    assert handshakes(dev) == 1
                    status = (await wg.show()).peer(server_key.public_key())
                    peer = dev.peers[0]
                    assert status.latest_handshake is not None and peer.last_handshake is not None
                    assert status.tx_bytes == peer.rx_bytes, (status, peer.rx_bytes, peer.tx_bytes)
                    assert status.rx_bytes == peer.tx_bytes, (status, peer.rx_bytes, peer.tx_bytes)
                    # client restart: a fresh wireguard-go handshakes again with a newer TAI64N timestamp
                    await wg.restart()
                    result = await ping(3)
                    assert b" 0% packet loss" in result.stdout, result.stdout
                    assert handshakes(dev) == 2
                    assert dev.statistics().drops["stale_timestamp"] == 0
                    nursery.cancel_scope.cancel()
                sock.close()
            except BaseException:
                print(wg.logs())
                raise
            finally:
                await wg.stop()

    trio.run(main)
