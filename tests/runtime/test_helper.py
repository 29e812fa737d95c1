"""The helper over the in-memory backend: forwarding, ledger, tunnel state across reconnects, policy hook, and
the IPC server's rejections on a real Unix socket (no root needed)."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from collections.abc import Callable, Coroutine
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from netsim.core import ipc
from netsim.core.ledger import LedgerSnapshot
from netsim.core.packet import PacketView
from netsim.core.policy import Action, Policy, PolicyEngine, Rule
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
from netsim.core.wireguard.keys import PrivateKey
from netsim.runtime.channel import UnixIpcServer, connect_ipc_unix
from netsim.runtime.forwarding import register_memory_helper, unregister_memory_helper
from netsim.runtime.helper import Helper, JsonLogFormatter
from netsim.testing.memory_tunnel import (
    HELPER_ADDR,
    FakeNetwork,
    MemoryTunnel,
    _connector,
    icmp_echo,
    memory_tunnel,
    udp_packet,
)

WWW4, WWW6 = "203.0.113.10", "2001:db8:113::10"


def run_memory(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def balanced(stats: dict[str, Any]) -> None:
    assert LedgerSnapshot.from_json_untrusted(stats["ledger"]).check() == []


def sources(packets: list[bytes]) -> list[str]:
    return [str(PacketView.parse_untrusted(p).src_address) for p in packets]


def test_ping_and_udp_echo_both_families_ledgers_balance() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            probes = [icmp_echo(t.client_v4, WWW4, i) for i in range(10)]
            probes += [icmp_echo(t.client_v6, WWW6, i) for i in range(10)]
            probes += [udp_packet(t.client_v4, WWW4, 5000 + i, 7, b"echo-%d" % i) for i in range(5)]
            probes += [udp_packet(t.client_v6, WWW6, 6000 + i, 7, b"echo6-%d" % i) for i in range(5)]
            replies = await t.exchange(probes)
            assert len(replies) == 30
            assert sorted(sources(replies)) == sorted([WWW4] * 15 + [WWW6] * 15)
            udp = [PacketView.parse_untrusted(r) for r in replies if PacketView.parse_untrusted(r).protocol == 17]
            assert sorted(v.dport for v in udp) == [*range(5000, 5005), *range(6000, 6005)]
            h, p = await t.helper_stats(), await t.provider_stats()
            balanced(h)
            balanced(p)
            hs, ps = h["ledger"]["stages"], p["ledger"]["stages"]
            assert ps["ipc_out"]["forwarded"] == hs["ipc_in"]["read"] == 30
            assert hs["wg_encrypt"]["forwarded"] == 30 and hs["wg_decrypt"]["forwarded"] == 30
            assert hs["ipc_out"]["forwarded"] == ps["ipc_in"]["forwarded"] == 30
            assert h["device"]["handshakes_completed"] == 1
            assert p["read_batches"] == 1, "one flow read (one trio wakeup) carried the whole burst"

    run_memory(main)


def test_settings_come_from_the_helper_config() -> None:
    async def main() -> None:
        async with memory_tunnel(mtu=1380) as t:
            applied = t.session.applied_settings
            assert applied is not None
            assert applied["mtu"] == 1380
            assert sorted(applied["addresses"]) == ["10.66.0.2/32", "fd00:66::2/128"]
            included = {r["network"] for r in applied["routes"] if r["kind"] == "included"}
            assert {"0.0.0.0/0", "::/0"} <= included
            excluded = {r["network"] for r in applied["routes"] if r["kind"] != "included"}
            assert "192.0.2.2/32" in excluded  # the server itself never routes into the tunnel
            assert applied["resolver"]["nameservers"] == ["203.0.113.53"]

    run_memory(main)


def test_helper_keeps_tunnel_state_when_the_provider_reconnects() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            ch = t.provider._channel
            assert ch is not None
            ch.close()  # the provider loses its connection; the helper process lives on
            await t.wait_connected(after_connects=1)
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 2)])) == 1
            h = await t.helper_stats()
            assert h["sessions"] == 2
            assert h["device"]["handshakes_completed"] == 1, "same WireGuard session across the reconnect"
            balanced(h)
            balanced(await t.provider_stats())

    run_memory(main)


@pytest.mark.reliability("F5")
def test_server_restart_forces_a_new_handshake_and_traffic_resumes() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            t.restart_server()
            start = trio.current_time()
            seq = 2
            while True:  # the helper hears nothing back, gives up on the session and handshakes again (§6.2)
                if await t.exchange([icmp_echo(t.client_v4, WWW4, seq)], timeout=1.0):
                    break
                seq += 1
                assert trio.current_time() - start < 60
            h = await t.helper_stats()
            assert h["device"]["handshakes_completed"] == 2
            assert h["device"]["drops"] == {}  # the server dropped; the client only saw silence
            balanced(h)

    run_memory(main)


def test_lossy_network_every_loss_is_counted_somewhere() -> None:
    async def main() -> None:
        async with memory_tunnel(loss=0.2, seed=7) as t:
            sent = 100
            replies = await t.exchange([icmp_echo(t.client_v4, WWW4, i) for i in range(sent)], timeout=30.0)
            assert 0 < len(replies) < sent
            assert t.network.lost > 0
            # each echo is one datagram out and one back: every missing reply is one lost data datagram, either way
            assert sent - len(replies) == t.network.lost_data
            h = await t.helper_stats()
            balanced(h)
            balanced(await t.provider_stats())
            # what left the helper and did not come back was lost on the wire (both directions)
            out = h["ledger"]["stages"]["udp_out"]["forwarded"]
            assert out >= sent

    run_memory(main)


def test_policy_hook_counts_verdicts_and_named_drops() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            rules = (
                Rule("block-echo", Action.DROP, dst=(ip_network("203.0.113.99/32"),)),
                Rule("lan", Action.BYPASS, dst=(ip_network("198.51.100.0/24"),)),
            )
            t.helper.policy = PolicyEngine(Policy(rules))
            probes = [icmp_echo(t.client_v4, WWW4, 1), icmp_echo(t.client_v4, "203.0.113.99", 2)]
            probes += [icmp_echo(t.client_v4, "198.51.100.7", 3), b"\x45" + bytes(10)]
            replies = await t.exchange(probes, expect=1, timeout=2.0)
            assert sources(replies) == [WWW4]
            h = await t.helper_stats()
            assert h["verdicts"] == {"tunnel": 1, "bypass": 1, "drop": 1}
            st = h["ledger"]["stages"]
            assert st["ipc_in"]["dropped"] == {"policy_drop:block-echo": 1, "malformed": 1}
            assert st["bypass"]["dropped"] == {"bypass_unavailable": 1}
            balanced(h)

    run_memory(main)


def server_push(t: MemoryTunnel, packet: bytes) -> None:
    """The VPN server sends ``packet`` to the client unprompted (e.g. a late reply)."""
    dev = t.server.device
    bufs, sizes, addrs = [bytearray(2048)], [0], [None]
    dev.encapsulate([packet], trio.current_time(), bufs, sizes, addrs)  # type: ignore[arg-type]
    assert sizes[0] and addrs[0] is not None
    t.server.transport.send(memoryview(bufs[0])[: sizes[0]], addrs[0])


def test_inbound_without_provider_is_a_named_drop_then_the_provider_returns() -> None:
    async def main() -> None:
        async with memory_tunnel(reconnect_for=600) as t:
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 1)])) == 1
            unregister_memory_helper(t.name)  # the socket is unreachable for a while
            ch = t.provider._channel
            assert ch is not None
            ch.close()
            await trio.sleep(1)
            assert t.provider.reasserting and not t.helper.connected
            server_push(t, udp_packet(WWW4, t.client_v4, 7, 5000, b"late"))
            t.tun.inject([icmp_echo(t.client_v4, WWW4, 2)])  # an app sends while the helper is away
            await trio.sleep(1)
            h = await t.helper_stats()
            assert h["ledger"]["stages"]["ipc_out"]["dropped"] == {"no_provider": 1}
            balanced(h)
            p = await t.provider_stats()
            assert p["ledger"]["stages"]["tun_read"]["dropped"] == {"helper_down": 1}
            balanced(p)
            register_memory_helper(t.name, _connector(t))
            await t.wait_connected(after_connects=1)
            assert len(await t.exchange([icmp_echo(t.client_v4, WWW4, 3)])) == 1
            assert (await t.helper_stats())["device"]["handshakes_completed"] == 1

    run_memory(main)


def test_json_log_formatter_emits_one_object_per_record() -> None:
    record = logging.LogRecord("netsim.helper", logging.INFO, "x", 1, "hello %s", ("world",), None)
    record.event = "ready"
    out = json.loads(JsonLogFormatter().format(record))
    assert out["msg"] == "hello world" and out["event"] == "ready" and out["level"] == "info"


# ---------------------------------------------------------------------------------------------- real UDS server
def _helper_in_memory() -> Helper:
    rng = random.Random(1)
    cfg = TunnelConfig(
        InterfaceConfig(private_key=PrivateKey.generate(rng.randbytes), mtu=1420),
        (
            PeerConfig(
                public_key=PrivateKey.generate(rng.randbytes).public_key(),
                endpoint=Endpoint("192.0.2.2", 51820),
                allowed_ips=(ip_network("0.0.0.0/0"),),
            ),
        ),
    )
    return Helper(cfg, FakeNetwork().attach(HELPER_ADDR))


@pytest.mark.timeout(60)
def test_uds_server_rejects_malformed_and_wrong_uid_then_serves_the_real_provider(tmp_path: Path) -> None:
    sock_path = tmp_path / "helper" / "helper.sock"

    async def main() -> None:
        helper = _helper_in_memory()
        server = UnixIpcServer(sock_path, max_clients=1, handshake_timeout=2.0, ledger=helper.ledger)
        helper.server = server
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, helper.serve_session)
            # 1. garbage instead of HELLO: closed with a protocol error, nothing else changes
            raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await raw.connect(str(sock_path))
            await raw.send(b"\xde\xad\xbe\xef" * 8)
            reply = b""
            with trio.fail_after(5):
                while chunk := await raw.recv(4096):
                    reply += chunk
            raw.close()
            conn = ipc.Connection(ipc.Role.PROVIDER)
            conn.receive_data(reply)
            ev = conn.next_event()
            assert isinstance(ev, ipc.Error) and ev.code == ipc.ErrorCode.PROTOCOL
            # 2. a uid the helper does not allow: closed before any byte is read
            server.allowed_uids = frozenset({os.geteuid() + 1})
            raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await raw.connect(str(sock_path))
            with trio.fail_after(5):
                assert await raw.recv(100) == b""
            raw.close()
            server.allowed_uids = frozenset({os.geteuid()})
            stats = server.statistics()
            assert stats.rejected_uid == 1
            assert stats.handshake_failed + stats.protocol_errors == 1
            assert helper.sessions == 0
            # 3. the real provider connects and gets the tunnel settings
            async with connect_ipc_unix(sock_path, retry_for=2) as ch:
                ev = await ch.receive_event()
                assert isinstance(ev, ipc.Settings)
                assert b'"server": "192.0.2.2"' in ev.payload
                await ch.send(ipc.StatsRequest(1))
                resp = await ch.receive_event()
                assert isinstance(resp, ipc.StatsResponse)
                assert resp.stats["server"]["rejected_uid"] == 1
                assert resp.stats["sessions"] == 1
            assert oct(os.stat(sock_path.parent).st_mode & 0o777) == "0o700"
            nursery.cancel_scope.cancel()
        helper.close()

    trio.run(main)


@pytest.mark.reliability("F13")
def test_policy_update_over_ipc_is_applied_atomically_and_bad_ones_are_refused() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            ch = t.provider._channel
            assert ch is not None
            policy = b'[[rule]]\nname = "block"\naction = "drop"\ndst = ["203.0.113.99/32"]\n'
            await ch.send(ipc.PolicyUpdate(1, policy))
            await ch.send(ipc.PolicyUpdate(2, b"[[rule]]\naction = 'explode'\n"))
            probes = [icmp_echo(t.client_v4, WWW4, 1), icmp_echo(t.client_v4, "203.0.113.99", 2)]
            assert sources(await t.exchange(probes, expect=1, timeout=2.0)) == [WWW4]
            h = await t.helper_stats()
            assert (h["policy_updates"], h["policy_rejected"]) == (1, 1)
            assert h["ledger"]["stages"]["ipc_in"]["dropped"] == {"policy_drop:block": 1}
            balanced(h)

    run_memory(main)
