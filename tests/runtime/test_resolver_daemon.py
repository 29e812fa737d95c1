"""The Mac's resolver daemon (netsim.runtime.resolver) against fake upstreams on loopback: no lab, no root needed
except for the tunnel cases (SO_BINDTODEVICE needs CAP_NET_RAW; the tunnel's "utun" is ``lo`` here)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dnslib
import pytest
import trio

from netsim.core.resolver import SystemDns, TunnelDns
from netsim.runtime.resolver import (
    STATS_FILE,
    SYSTEM_FILE,
    TUNNEL_FILE,
    MacResolver,
    ResolverLimits,
    read_stats,
    servfail,
    write_state_file,
)

SYSTEM_IP, TUNNEL_IP = "127.0.0.2", "127.0.0.3"
SYSTEM_ANSWER, TUNNEL_ANSWER = "192.0.2.1", "192.0.2.2"
LIMITS = ResolverLimits(upstream_timeout=0.5, poll_interval=0.02)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE needs CAP_NET_RAW")


class FakeUpstream:
    """A UDP DNS server answering every A query with ``answer``; records the names it was asked."""

    def __init__(self, answer: str, *, mismatch_first: bool = False, silent: bool = False) -> None:
        self.answer = answer
        self.mismatch_first = mismatch_first
        self.silent = silent
        self.asked: list[str] = []
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def serve(self) -> None:
        while True:
            data, peer = await self.sock.recvfrom(4096)
            q = dnslib.DNSRecord.parse(data)
            self.asked.append(str(q.q.qname).rstrip("."))
            if self.silent:
                continue
            reply = q.reply()
            reply.add_answer(dnslib.RR(q.q.qname, rdata=dnslib.A(self.answer), ttl=60))
            packed = bytes(reply.pack())
            if self.mismatch_first:
                await self.sock.sendto(struct.pack("!H", (q.header.id + 1) & 0xFFFF) + packed[2:], peer)
            await self.sock.sendto(packed, peer)


def _query(name: str, ident: int = 0x1234) -> bytes:
    q = dnslib.DNSRecord.question(name, "A")
    q.header.id = ident
    return bytes(q.pack())


async def _ask_udp(addr: tuple[str, int], payload: bytes, timeout: float = 2.0) -> dnslib.DNSRecord | None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.connect(addr)
        await sock.send(payload)
        with trio.move_on_after(timeout):
            return dnslib.DNSRecord.parse(await sock.recv(65535))
    return None


async def _ask_tcp(addr: tuple[str, int], payload: bytes) -> dnslib.DNSRecord:
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(struct.pack("!H", len(payload)) + payload)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = await stream.receive_some(65535)
            assert chunk
            buf += chunk
        return dnslib.DNSRecord.parse(buf[2:])


def _answer(rec: dnslib.DNSRecord | None) -> str:
    assert rec is not None, "no reply"
    if rec.header.rcode:
        return str(dnslib.RCODE.get(rec.header.rcode))
    return str(rec.rr[0].rdata)


Body = Callable[[MacResolver, tuple[str, int], FakeUpstream, FakeUpstream], Awaitable[None]]


def _run(
    tmp_path: Path,
    body: Body,
    *,
    tunnel: TunnelDns | None = None,
    limits: ResolverLimits = LIMITS,
    **upstream_kw: Any,
) -> MacResolver:
    write_state_file(tmp_path / SYSTEM_FILE, SystemDns((SYSTEM_IP,)).to_json())
    if tunnel is not None:
        write_state_file(tmp_path / TUNNEL_FILE, tunnel.to_json())

    async def main() -> MacResolver:
        system, tun = FakeUpstream(SYSTEM_ANSWER, **upstream_kw), FakeUpstream(TUNNEL_ANSWER, **upstream_kw)
        await system.sock.bind((SYSTEM_IP, 0))
        port = system.sock.getsockname()[1]
        await tun.sock.bind((TUNNEL_IP, port))
        resolver = MacResolver(tmp_path, [("127.0.0.1", 0)], limits, upstream_port=port)
        with trio.fail_after(20), system.sock, tun.sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(system.serve)
                nursery.start_soon(tun.serve)
                await nursery.start(resolver.serve)
                await body(resolver, resolver.bound[0], system, tun)
                nursery.cancel_scope.cancel()
        return resolver

    return trio.run(main)


def _tunnel(**kw: Any) -> TunnelDns:
    base: dict[str, Any] = {"servers": (TUNNEL_IP,), "interface": "lo", "owner_pid": os.getpid()}
    base.update(kw)
    return TunnelDns(**base)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_system_resolver_answers_without_a_tunnel(tmp_path: Path) -> None:
    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        assert _answer(await _ask_udp(addr, _query("www.lab.test"))) == SYSTEM_ANSWER
        assert _answer(await _ask_tcp(addr, _query("tcp.lab.test"))) == SYSTEM_ANSWER
        reply = await _ask_udp(addr, _query("id.lab.test", ident=0xBEEF))
        assert reply is not None and reply.header.id == 0xBEEF  # the client's id comes back

    r = _run(tmp_path, body)
    assert r.stats["via_system"] == 3 and r.stats["answered"] == 3 and not r.stats["via_tunnel"]


@needs_root
def test_default_route_tunnel_takes_every_name(tmp_path: Path) -> None:
    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        assert _answer(await _ask_udp(addr, _query("www.lab.test"))) == TUNNEL_ANSWER
        assert system.asked == [] and tun.asked == ["www.lab.test"]

    r = _run(tmp_path, body, tunnel=_tunnel(claims_default_route=True))
    assert r.stats["via_tunnel"] == 1


@needs_root
def test_split_dns_sends_only_match_domains_to_the_tunnel(tmp_path: Path) -> None:
    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        assert _answer(await _ask_udp(addr, _query("wiki.corp.example"))) == TUNNEL_ANSWER
        assert _answer(await _ask_udp(addr, _query("www.lab.test"))) == SYSTEM_ANSWER
        assert tun.asked == ["wiki.corp.example"] and system.asked == ["www.lab.test"]

    _run(tmp_path, body, tunnel=_tunnel(match_domains=("corp.example",)))


@pytest.mark.parametrize("dead", ["interface", "pid"])
def test_stale_tunnel_is_never_queried(tmp_path: Path, dead: str) -> None:
    """A crashed provider's tunnel.json: its utun is gone or its pid is dead. Its servers get nothing; a split
    tunnel's private names get SERVFAIL, everything else the system resolver (macOS restores it)."""
    kw = {"interface": "nsgone0"} if dead == "interface" else {"owner_pid": _dead_pid()}

    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        assert _answer(await _ask_udp(addr, _query("wiki.corp.example"))) == "SERVFAIL"
        assert _answer(await _ask_udp(addr, _query("www.lab.test"))) == SYSTEM_ANSWER
        assert tun.asked == []

    r = _run(tmp_path, body, tunnel=_tunnel(match_domains=("corp.example",), **kw))
    assert r.stats["tunnel_stale"] == 2 and r.stats["servfail_tunnel_gone"] == 1


def test_stale_default_route_tunnel_falls_back_to_the_system_resolver(tmp_path: Path) -> None:
    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        assert _answer(await _ask_udp(addr, _query("www.lab.test"))) == SYSTEM_ANSWER
        assert tun.asked == []

    _run(tmp_path, body, tunnel=_tunnel(claims_default_route=True, owner_pid=_dead_pid()))


@needs_root
def test_state_changes_are_picked_up(tmp_path: Path) -> None:
    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        assert _answer(await _ask_udp(addr, _query("a.lab.test"))) == SYSTEM_ANSWER
        # no waiting: the query right after a change follows it (the daemon re-checks the files per query)
        write_state_file(tmp_path / TUNNEL_FILE, _tunnel(claims_default_route=True).to_json())
        assert _answer(await _ask_udp(addr, _query("b.lab.test"))) == TUNNEL_ANSWER
        (tmp_path / TUNNEL_FILE).unlink()
        assert _answer(await _ask_udp(addr, _query("c.lab.test"))) == SYSTEM_ANSWER
        (tmp_path / TUNNEL_FILE).write_text('{"version": 1, "kind": "tunnel", "servers": "junk"')
        assert _answer(await _ask_udp(addr, _query("d.lab.test"))) == "SERVFAIL"  # fails closed (row F14)
        assert tun.asked == ["b.lab.test"] and system.asked == ["a.lab.test", "c.lab.test"]
        await trio.sleep(0.2)  # stats.json follows within the poll interval

    r = _run(tmp_path, body, limits=ResolverLimits(upstream_timeout=0.5, poll_interval=0.15))
    assert r.stats["state_tunnel_state_bad_json"] == 1
    assert read_stats(tmp_path)["counters"]["via_tunnel"] == 1  # stats.json follows the counters
    assert (tmp_path / STATS_FILE).exists()


def test_bad_input_is_dropped_counted_and_survived(tmp_path: Path) -> None:
    response = bytes(dnslib.DNSRecord.question("x.test").reply().pack())

    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        for junk in (b"", b"\x00" * 5, response, b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6, b"\xff" * 5000):
            assert await _ask_udp(addr, junk, timeout=0.2) is None
        # a TCP client that sends a length and stalls, and one that claims a huge message
        stream = await trio.open_tcp_stream(*addr)
        await stream.send_all(b"\xff\xff")
        assert await stream.receive_some(10) == b""
        await stream.aclose()
        assert _answer(await _ask_udp(addr, _query("still.lab.test"))) == SYSTEM_ANSWER

    r = _run(tmp_path, body)
    assert r.stats["drop_dns_truncated"] == 2
    assert r.stats["drop_dns_not_query"] == 1 and r.stats["drop_dns_bad_question"] == 1
    assert r.stats["drop_too_big"] == 2  # the 5000-byte datagram and the 65535-byte TCP length


def test_mismatched_replies_are_ignored(tmp_path: Path) -> None:
    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        assert _answer(await _ask_udp(addr, _query("www.lab.test"))) == SYSTEM_ANSWER

    r = _run(tmp_path, body, mismatch_first=True)
    assert r.stats["reply_mismatch"] == 1 and r.stats["answered"] == 1


def test_silent_upstream_gives_servfail_and_inflight_is_bounded(tmp_path: Path) -> None:
    limits = ResolverLimits(upstream_timeout=0.5, poll_interval=0.02, max_inflight=2)

    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        results: list[str] = []

        async def one(i: int) -> None:
            rec = await _ask_udp(addr, _query(f"q{i}.lab.test"), timeout=1.5)
            results.append("none" if rec is None else _answer(rec))

        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(one, i)
        assert sorted(results) == ["SERVFAIL", "SERVFAIL", "none", "none", "none"]

    r = _run(tmp_path, body, limits=limits, silent=True)
    assert r.stats["drop_busy"] == 3 and r.stats["upstream_timeout"] == 2 and r.stats["servfail_upstream"] == 2


def test_servfail_keeps_id_and_question() -> None:
    raw = servfail(_query("x.lab.test", ident=7))
    assert raw is not None
    rec = dnslib.DNSRecord.parse(raw)
    assert rec.header.id == 7 and rec.header.rcode == dnslib.RCODE.SERVFAIL and str(rec.q.qname) == "x.lab.test."


def test_configurator_hands_dns_settings_to_the_daemon(tmp_path: Path) -> None:
    """KernelNetworkConfigurator's DNS half (no netlink needed): tunnel.json with the settings, the utun and its
    own pid, resolv.conf untouched; removed on clear, and only by the configurator that wrote it."""
    from netsim.apple.settings import DNSSettings
    from netsim.runtime.netconfig import KernelNetworkConfigurator

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.53\n")
    c = KernelNetworkConfigurator("netsim-unit-mac", dns_state_dir=tmp_path, resolv_conf=resolv)
    dns = DNSSettings(["10.8.0.1"], search_domains=["Corp.Example"], match_domains=["Corp.Example.", ""])
    c._write_tunnel_dns(dns, "utun7", False)
    state = TunnelDns.from_json((tmp_path / TUNNEL_FILE).read_bytes())
    assert state == TunnelDns(
        servers=("10.8.0.1",),
        interface="utun7",
        owner_pid=os.getpid(),
        match_domains=("corp.example", ""),
        search_domains=("corp.example",),
    )
    assert resolv.read_text() == "nameserver 127.0.0.53\n"
    other = KernelNetworkConfigurator("netsim-unit-mac", dns_state_dir=tmp_path, resolv_conf=resolv)
    other._clear_dns()  # never wrote it: leaves it alone
    assert (tmp_path / TUNNEL_FILE).exists()
    c._clear_dns()
    assert not (tmp_path / TUNNEL_FILE).exists()
    assert resolv.read_text() == "nameserver 127.0.0.53\n"


def test_an_internal_error_costs_one_query_not_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = MacResolver._exchange

    async def flaky(self: MacResolver, *args: Any) -> bytes | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(24, "Too many open files")  # e.g. EMFILE creating the upstream socket
        return await real(self, *args)

    monkeypatch.setattr(MacResolver, "_exchange", flaky)

    async def body(r: MacResolver, addr: tuple[str, int], system: FakeUpstream, tun: FakeUpstream) -> None:
        assert await _ask_udp(addr, _query("a.lab.test"), timeout=0.3) is None
        assert _answer(await _ask_udp(addr, _query("b.lab.test"))) == SYSTEM_ANSWER

    assert _run(tmp_path, body).stats["error_internal"] == 1
