"""Two netsim helpers as each other's WireGuard peer over loopback UDP (importable as ``loopback_helpers``).

The GRO and hop tests run real sockets without a lab: helper A (10.9.0.1) and helper B (10.9.0.2), each on a
`UdpTransport` bound to 127.0.0.1, each the other's only peer.
"""

from __future__ import annotations

import random
import socket
from ipaddress import ip_interface, ip_network

import trio

from netsim.core import ipc
from netsim.core.family import DARWIN_AF_INET
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
from netsim.core.wireguard.keys import PrivateKey
from netsim.runtime.helper import Helper
from netsim.testing.memory_tunnel import udp_packet
from netsim.transports.udp import UdpTransport


def helper_pair(*, gro: bool = True, gso: bool = True, batch: int = 64) -> tuple[Helper, Helper]:
    """Helpers A and B (not running yet); close both when done."""
    rng = random.Random(7)
    keys = [PrivateKey.generate(rng.randbytes) for _ in range(2)]
    transports = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):  # a burst must not overflow it
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
                break
            except OSError:
                continue
        sock.bind(("127.0.0.1", 0))
        transports.append(UdpTransport(sock, gso=gso, gro=gro))
    helpers = []
    for me, other in ((0, 1), (1, 0)):
        cfg = TunnelConfig(
            InterfaceConfig(private_key=keys[me], addresses=(ip_interface(f"10.9.0.{me + 1}/32"),), mtu=1420),
            (
                PeerConfig(
                    public_key=keys[other].public_key(),
                    endpoint=Endpoint("127.0.0.1", transports[other].local_port),
                    allowed_ips=(ip_network(f"10.9.0.{other + 1}/32"),),
                ),
            ),
        )
        helpers.append(Helper(cfg, transports[me], batch=batch))
    return helpers[0], helpers[1]


def a_to_b_packets(n: int, payload: int = 400) -> list[bytes]:
    """``n`` equal-sized UDP packets from A's tunnel address to B's."""
    return [udp_packet("10.9.0.1", "10.9.0.2", 4000, 5000, i.to_bytes(4, "big") * (payload // 4)) for i in range(n)]


def batch_of(packets: list[bytes]) -> ipc.PacketBatch:
    """``packets`` as the decoded PACKETS frame the helper's session loop hands `Helper._outbound`."""
    return ipc.PacketBatch(memoryview(b"".join(packets)), (DARWIN_AF_INET,) * len(packets), tuple(map(len, packets)))


async def wait_live(a: Helper, b: Helper) -> None:
    """Until both ends hold a confirmed, live session with each other (both initiate when they start)."""
    with trio.fail_after(10):
        while not (
            a.device.session_live(a.device.peers[0], trio.current_time())
            and b.device.session_live(b.device.peers[0], trio.current_time())
        ):
            await trio.sleep(0.01)
