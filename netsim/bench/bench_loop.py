"""The provider <-> helper loop: round trips with 64 packets in flight, batch sweep 1/8/32/64/128.

Run: ``python -m netsim.bench.bench_loop [--quick] [--json FILE]`` (or ``netsim bench --only 'loop/*'``).

In-process cases (one trio run each, in a fresh interpreter): a provider task keeps ``max(64, batch)`` packets in
flight as ``batch``-packet PACKETS frames through a pair of `netsim.runtime.channel.IpcChannel` objects; a helper
task receives each `ipc.PacketBatch`, "forwards" every packet by reflecting it in place (addresses and ports
swapped, as the C floor does) and sends the batch back. A round trip per packet is the number: ns/packet,
packets/s, both from CPU time of the process (provider and helper share it here; `netsim.bench._common.measure`'s
convention, the wall-clock median rides along) and allocations per packet (tracemalloc, one untimed pass). Transports:

* ``memory``: `netsim.testing.ipc_pair.open_ipc_pair` (in-memory byte pipes, the in-memory backend);
* ``uds``: a real ``AF_UNIX`` stream socketpair under the same channels (kernel copies and wakeups, one process);
* ``helper``: the real `netsim.runtime.helper.Helper` (``serve_session`` + ``run``: WireGuard encrypt, datagram
  send, receive, decrypt, IPC back) in place of the reflector, its far end an in-process WireGuard server that
  reflects (`case_helper`; the server's own time is reported apart).

The same provider and helper also run as two processes over a real TUN and Unix socket for the end-to-end
``netsim-loop`` path (`provider_main`, `helper_main`, spawned by `netsim.bench.bench_e2e`), next to the C floor and
the naive loop doing the same job.
"""

from __future__ import annotations

import json
import socket
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from netsim.bench._common import parse_args, report, run_isolated, write_json
from netsim.bench.bench_micro import result_from_samples, udp_corpus

__all__ = ["BATCHES", "BUILTIN_PROVIDER", "INFLIGHT", "helper_main", "provider_label", "provider_main", "reflect"]

BATCHES = (1, 8, 32, 64, 128)
INFLIGHT = 64
_ADDR4 = struct.Struct("!4s4s")
_ADDR6 = struct.Struct("!16s16s")
_PORTS = struct.Struct("!HH")


def reflect(pkt: memoryview) -> None:
    """Swap source/destination address (and TCP/UDP ports) in place: a checksum-neutral stand-in for forwarding.

    RFC 1071: the one's-complement sum does not depend on word order, so the IP and L4 checksums stay valid.
    """
    n = len(pkt)
    version = pkt[0] >> 4
    if version == 4 and n >= 20:
        s, d = _ADDR4.unpack_from(pkt, 12)
        _ADDR4.pack_into(pkt, 12, d, s)
        l4, proto = (pkt[0] & 15) * 4, pkt[9]
    elif version == 6 and n >= 40:
        s, d = _ADDR6.unpack_from(pkt, 8)
        _ADDR6.pack_into(pkt, 8, d, s)
        l4, proto = 40, pkt[6]
    else:
        return
    if proto in (6, 17) and n >= l4 + 4:
        sp, dp = _PORTS.unpack_from(pkt, l4)
        _PORTS.pack_into(pkt, l4, dp, sp)


async def _reflector(channel: Any) -> None:
    """Helper side: every PACKETS frame comes back reflected, zero copy (views into the receive buffer)."""
    from netsim.core import ipc

    receive, send = channel.receive_event, channel.send_packets_nowait
    while True:
        ev = await receive()
        if isinstance(ev, ipc.PacketBatch):
            views = ev.packets()
            for v in views:
                reflect(v)
            send(views, ev.families)
        elif isinstance(ev, ipc.ConnectionClosed | ipc.Goodbye | ipc.Error):
            return


async def _pump(channel: Any, batch_pkts: list[bytes], total: int, inflight: int) -> None:
    """Provider side: keep ``inflight`` packets outstanding until ``total`` came back."""
    from netsim.core import ipc

    b = len(batch_pkts)
    sent = received = 0
    send, receive = channel.send_packets_nowait, channel.receive_event
    while sent < total and sent - received + b <= inflight:
        if not send(batch_pkts, ipc.AF_INET):
            raise RuntimeError("IPC queue full: the benchmark must never drop")
        sent += b
    while received < total:
        ev = await receive()
        if not isinstance(ev, ipc.PacketBatch):
            if isinstance(ev, ipc.ConnectionClosed | ipc.Goodbye | ipc.Error):
                raise RuntimeError(f"the helper closed the IPC: {ev!r}")
            continue  # SETTINGS, PONG ...: not packets
        received += len(ev)
        while sent < total and sent - received + b <= inflight:
            if not send(batch_pkts, ipc.AF_INET):
                raise RuntimeError("IPC queue full: the benchmark must never drop")
            sent += b


async def _timed(
    prov: Any, corpus: list[bytes], total: int, inflight: int, reps: int
) -> tuple[list[float], list[float]]:
    """``reps`` timed pumps: per-packet CPU ns of this process (provider and helper both live here) and wall ns."""
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(reps):
        w0, c0 = time.perf_counter_ns(), time.process_time_ns()
        await _pump(prov, corpus, total, inflight)
        c1, w1 = time.process_time_ns(), time.perf_counter_ns()
        cpu.append((c1 - c0) / total)
        wall.append((w1 - w0) / total)
    return cpu, wall


async def _uds_pair(nursery_stack: Any, options: dict[str, Any]) -> tuple[Any, Any]:
    from netsim.core import ipc
    from netsim.runtime.channel import open_ipc_channel
    from netsim.transports.uds import SocketStream, peer_credentials

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chans = []
    for sock, role in ((a, ipc.Role.PROVIDER), (b, ipc.Role.HELPER)):
        tsock = trio.socket.from_stdlib_socket(sock)
        stream = SocketStream(tsock, peer_credentials(sock))
        chans.append(await nursery_stack.enter_async_context(open_ipc_channel(stream, ipc.Connection(role), **options)))
    prov, helper = chans
    async with trio.open_nursery() as n:
        n.start_soon(helper.handshake)
        await prov.handshake()
    return prov, helper


def case_loop(transport: str, batch: int, size: int, packets: int, reps: int, seed: int) -> dict[str, Any]:
    """Round trips through the in-process provider <-> helper loop; see the module docstring."""
    from contextlib import AsyncExitStack

    from netsim.testing.ipc_pair import open_ipc_pair

    inflight = max(INFLIGHT, batch)
    total = packets - packets % batch
    corpus = udp_corpus(size, batch, seed)
    options: dict[str, Any] = {"max_queued_batches": 1024, "max_queued_bytes": 64 << 20}
    out: dict[str, Any] = {}

    async def main() -> None:
        async with AsyncExitStack() as stack:
            if transport == "memory":
                prov, helper = await stack.enter_async_context(open_ipc_pair(capacity=1 << 20, **options))
            else:
                prov, helper = await _uds_pair(stack, options)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_reflector, helper)
                await _pump(prov, corpus, total, inflight)  # warm-up
                out["cpu"], out["wall"] = await _timed(prov, corpus, total, inflight, reps)
                # allocations: one more, untimed pass under tracemalloc (see bench_micro.alloc_profile)
                import tracemalloc

                blocks0 = sys.getallocatedblocks()
                tracemalloc.start()
                base, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                await _pump(prov, corpus, total, inflight)
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                out["alloc_bytes_per_pkt"] = (peak - base) / total
                out["blocks_per_pkt"] = (sys.getallocatedblocks() - blocks0) / total
                nursery.cancel_scope.cancel()

    trio.run(main)
    cpu, wall = out.pop("cpu"), out.pop("wall")
    params = {"transport": transport, "batch": batch, "size": size, "inflight": inflight, **out}
    return result_from_samples(f"loop/{transport} b{batch} {size}B", total, cpu, wall, params)


_SERVER_EP = ("192.0.2.2", 51820)
_CLIENT_EP = ("192.0.2.10", 40000)


class _ReflectingServer:
    """A `netsim.runtime.helper.DatagramTransport` whose far end is an in-process WireGuard server.

    The server (a second `WireGuardDevice`) decrypts what the helper sends, reflects every inner packet and
    encrypts it back, in batches, lazily when the helper next reads. Its CPU time is summed in ``server_cpu_ns`` so
    the helper loop's own cost can be reported without it.
    """

    def __init__(self, server: Any) -> None:
        from collections import deque

        self.server = server
        self.pending: list[bytes] = []
        self.rx: deque[bytes] = deque()
        self.lot = trio.lowlevel.ParkingLot()
        self._bufs = [bytearray(2048) for _ in range(256)]
        self._views = [memoryview(b) for b in self._bufs]
        self._sizes = [0] * 256
        self._addrs: list[Any] = [None] * 256
        self.server_cpu_ns = 0

    def send(self, data: Any, addr: Any) -> str | None:
        self.pending.append(bytes(data))
        self.lot.unpark_all()
        return None

    def _process(self) -> None:
        t0 = time.process_time_ns()
        srv, now = self.server, trio.current_time()
        pend, self.pending = self.pending, []
        srv.receive_datagrams_untrusted(pend, [_CLIENT_EP] * len(pend), now)
        self.rx.extend(d for d, _ in srv.datagrams_to_send(now))
        got = srv.take_received()
        for i in range(0, len(got), 256):
            chunk = []
            for _peer, pkt in got[i : i + 256]:
                b = bytearray(pkt)
                reflect(memoryview(b))
                chunk.append(b)
            srv.encapsulate(chunk, now, self._views, self._sizes, self._addrs)
            self.rx.extend(bytes(self._views[j][: self._sizes[j]]) for j in range(len(chunk)) if self._sizes[j])
        self.rx.extend(d for d, _ in srv.datagrams_to_send(now))
        self.server_cpu_ns += time.process_time_ns() - t0

    def recv_batch(self, bufs: Any, sizes: list[int], addrs: list[Any]) -> int:
        if self.pending:
            self._process()
        n, rx = 0, self.rx
        while rx and n < len(bufs):
            d = rx.popleft()
            bufs[n][: len(d)] = d
            sizes[n] = len(d)
            addrs[n] = _SERVER_EP
            n += 1
        return n

    async def wait_readable(self) -> None:
        await trio.lowlevel.checkpoint()
        while not self.rx and not self.pending:
            await self.lot.park()

    def close(self) -> None:
        self.lot.unpark_all()


def case_helper(batch: int, size: int, packets: int, reps: int, seed: int, policy: str | None = None) -> dict[str, Any]:
    """The loop over the real `netsim.runtime.helper.Helper`: IPC in, WireGuard out and back, IPC to the provider.

    Provider side: a channel of `open_ipc_pair` (as `HelperForwardingProvider` uses in memory) keeping
    ``max(64, batch)`` packets in flight. Helper side: `Helper.serve_session` + `Helper.run`, unchanged, over
    `_ReflectingServer`. ``ns_*`` include the in-process server's decrypt + reflect + encrypt; ``params`` report
    ``server_cpu_ns_per_pkt`` and ``without_server_cpu_ns_per_pkt`` (the difference) separately.
    """
    from ipaddress import ip_interface, ip_network

    from netsim.core.wireguard import PrivateKey, WireGuardDevice
    from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
    from netsim.runtime.helper import Helper
    from netsim.testing.ipc_pair import open_ipc_pair

    r = __import__("random").Random(seed)
    ck, sk = PrivateKey.generate(r.randbytes), PrivateKey.generate(r.randbytes)
    server = WireGuardDevice(
        sk, [PeerConfig(ck.public_key(), allowed_ips=(ip_network("10.77.0.0/24"),))], rng=__import__("random").Random(2)
    )
    config = TunnelConfig(
        InterfaceConfig(ck, addresses=(ip_interface("10.77.0.2/24"),), mtu=1420),
        (PeerConfig(sk.public_key(), endpoint=Endpoint(*_SERVER_EP), allowed_ips=(ip_network("0.0.0.0/0"),)),),
    )
    transport = _ReflectingServer(server)
    inflight = max(INFLIGHT, batch)
    total = packets - packets % batch
    corpus = udp_corpus(size, batch, seed)
    out: dict[str, Any] = {}

    async def main() -> None:
        engine = None
        if policy is not None:  # --policy: the helper decides per packet as the user's helper would
            from netsim.core.policy import PolicyEngine
            from netsim.runtime.policy_file import load_policy_file

            engine = PolicyEngine(load_policy_file(policy))
        helper = Helper(config, transport, batch=max(64, batch), policy=engine)
        opts: dict[str, Any] = {"max_queued_batches": 1024, "max_queued_bytes": 64 << 20}
        async with open_ipc_pair(capacity=1 << 20, **opts) as (prov, hch), trio.open_nursery() as nursery:
            await nursery.start(helper.run)
            nursery.start_soon(helper.serve_session, hch)
            with trio.fail_after(10):
                # the handshake, driven by Helper.run; the device offers no event to wait on
                while helper.device.peers[0].current is None:  # noqa: ASYNC110
                    await trio.sleep(0.001)
            await _pump(prov, corpus, total, inflight)  # warm-up
            srv0 = transport.server_cpu_ns
            out["cpu"], out["wall"] = await _timed(prov, corpus, total, inflight, reps)
            out["server_cpu_ns_per_pkt"] = (transport.server_cpu_ns - srv0) / (total * reps)
            out["helper_drops"] = {k: v for k, v in helper.device.statistics().drops.items() if v}
            nursery.cancel_scope.cancel()

    trio.run(main)
    cpu, wall = out.pop("cpu"), out.pop("wall")
    out["without_server_cpu_ns_per_pkt"] = statistics.median(cpu) - out["server_cpu_ns_per_pkt"]
    params = {"transport": "helper", "batch": batch, "size": size, "inflight": inflight, **out}
    return result_from_samples(f"loop/helper b{batch} {size}B", total, cpu, wall, params)


#: The built-in provider, as the provider cases name it; a user's ``--provider`` runs beside it.
BUILTIN_PROVIDER = "netsim.runtime.forwarding:HelperForwardingProvider"
_ECHO_DST = "203.0.113.10"  # any inet address: the in-memory VPN server answers UDP port 7 for every destination


def provider_label(spec: str) -> str:
    """The name a provider spec gets in case names: its class (``pkg.mod:Class`` -> ``Class``)."""
    return spec.rpartition(":")[2]


@asynccontextmanager
async def _socket_tunnel(spec: str, policy: str | None, seed: int) -> AsyncIterator[tuple[Any, str, Any]]:
    """The in-memory tunnel of `netsim.testing.memory_tunnel`, but the provider reaches the helper as it would
    in the lab: ``provider_configuration = {"helper_socket": <a Unix socket>, "token_file": <0600 file>}``, a
    real `UnixIpcServer` checking the token. Yields ``(utun, client IPv4 address, session)`` once CONNECTED."""
    import random
    import tempfile
    from ipaddress import ip_interface, ip_network
    from pathlib import Path

    from netsim.apple import TunnelProviderProtocol
    from netsim.bench.bench_netsim import connected_session
    from netsim.core import ipc
    from netsim.core.wireguard import PrivateKey
    from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
    from netsim.runtime.channel import UnixIpcServer
    from netsim.runtime.controller import TunnelProviderManager, memory_launcher
    from netsim.runtime.helper import Helper
    from netsim.runtime.netconfig import MemoryNamespace
    from netsim.testing.memory_tun import MemoryTun
    from netsim.testing.memory_tunnel import HELPER_ADDR, SERVER_ADDR, FakeNetwork, MemoryVpnServer
    from netsim.transports.uds import new_token, write_token_file

    engine = None
    if policy is not None:
        from netsim.core.policy import PolicyEngine
        from netsim.runtime.policy_file import load_policy_file

        engine = PolicyEngine(load_policy_file(policy))
    rng = random.Random(seed)
    ck, sk = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
    client_v4 = "10.66.0.2"
    config = TunnelConfig(
        InterfaceConfig(ck, addresses=(ip_interface(f"{client_v4}/32"), ip_interface("fd00:66::2/128")), mtu=1420),
        (PeerConfig(sk.public_key(), endpoint=Endpoint(*SERVER_ADDR), allowed_ips=(ip_network("0.0.0.0/0"),)),),
    )
    network = FakeNetwork(capacity=8192)
    server_peer = PeerConfig(ck.public_key(), allowed_ips=(ip_network(f"{client_v4}/32"), ip_network("fd00:66::2/128")))
    server = MemoryVpnServer(sk, server_peer, network.attach(SERVER_ADDR), 1420)
    helper = Helper(config, network.attach(HELPER_ADDR), policy=engine)
    token = new_token()

    def connection() -> ipc.Connection:
        return ipc.Connection(ipc.Role.HELPER, capabilities=ipc.ALL_CAPABILITIES, expected_token=token)

    with tempfile.TemporaryDirectory(prefix="netsim-bench-loop-") as tmp:
        sock, token_file = str(Path(tmp) / "helper" / "helper.sock"), Path(tmp) / "token"
        write_token_file(token_file, token)
        ipc_server = UnixIpcServer(
            sock, connection_factory=connection, max_queued_batches=1024, max_queued_bytes=64 << 20
        )
        helper.server = ipc_server
        launcher = memory_launcher(
            lambda name, mtu: MemoryTun(name=name, mtu=mtu, capacity=1024), namespace=MemoryNamespace("bench-mac")
        )
        conf = {"helper_socket": sock, "token_file": str(token_file)}
        manager = TunnelProviderManager(
            spec, launcher, TunnelProviderProtocol(server_address=SERVER_ADDR[0], provider_configuration=conf)
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(helper.run)
            await nursery.start(ipc_server.serve, helper.serve_session)
            async with connected_session(manager, f"provider {spec!r}") as session:
                yield launcher.hosts[-1].flow.device, client_v4, session
            nursery.cancel_scope.cancel()


def case_provider(
    spec: str, batch: int, size: int, packets: int, reps: int, seed: int, policy: str | None = None
) -> dict[str, Any]:
    """The whole tunnel in one process with the provider ``spec``: MemoryTun -> provider -> Unix-socket IPC (token
    checked) -> real `Helper` -> WireGuard -> in-memory VPN server (UDP echo) and back, ``batch`` packets per
    round (`_socket_tunnel`).

    Any `PacketTunnelProvider` that reaches the helper through ``provider_configuration["helper_socket"]`` (and
    ``token_file``) runs here as the built-in one does. ``ns_*`` are CPU ns per round-trip packet of the whole
    process (provider, helper and the in-memory server share it); ``params["lost"]`` counts packets that never came
    back (a policy that bypasses the echo destination, a provider that drops); a round waits at most 1 s.
    """
    from netsim.testing.memory_tunnel import udp_packet

    rounds = max(1, packets // batch)
    r = __import__("random").Random(seed)
    out: dict[str, Any] = {"lost": 0}

    async def main() -> None:
        async with _socket_tunnel(spec, policy, seed) as (tun, client_v4, session):
            written = trio.lowlevel.ParkingLot()
            device_write = tun.write_packets

            def write(pkts: Any, offset: int = 0, *, validated: bool = False) -> int:
                n = device_write(pkts, offset, validated=validated)
                written.unpark_all()  # the harness waits for replies without polling
                return int(n)

            tun.write_packets = write
            payload = bytes(max(0, size - 28))
            corpus = [udp_packet(client_v4, _ECHO_DST, r.randrange(1024, 65536), 7, payload) for _ in range(batch)]

            async def pump(n_rounds: int) -> int:
                back = 0
                for _ in range(n_rounds):
                    tun.inject(corpus)
                    got = 0
                    with trio.move_on_after(1.0):
                        while got < batch:
                            got += len(tun.take_written())
                            if got < batch:
                                await written.park()
                    got += len(tun.take_written())
                    out["lost"] += max(0, batch - got)
                    back += got
                return back

            if await pump(2) == 0:  # warm-up; also proves the path carries the probe traffic
                raise RuntimeError(
                    f"provider {spec!r}: no UDP echo came back from {_ECHO_DST}:7 through the in-memory tunnel"
                    + (f" with policy {policy}" if policy else "")
                )
            out["lost"] = 0
            cpu: list[float] = []
            wall: list[float] = []
            for _ in range(reps):
                w0, c0 = time.perf_counter_ns(), time.process_time_ns()
                await pump(rounds)
                c1, w1 = time.process_time_ns(), time.perf_counter_ns()
                cpu.append((c1 - c0) / (rounds * batch))
                wall.append((w1 - w0) / (rounds * batch))
            out["cpu"], out["wall"] = cpu, wall
            try:  # the provider's own account, when it answers the app message b"stats" as the built-in does
                out["provider_stats"] = json.loads(await session.send_provider_message(b"stats") or b"{}")
            except ValueError:
                out["provider_stats"] = {}

    trio.run(main)
    cpu, wall = out.pop("cpu"), out.pop("wall")
    series = "builtin-provider" if spec == BUILTIN_PROVIDER else f"provider:{provider_label(spec)}"
    params = {"transport": series, "provider": spec, "policy": policy, "batch": batch, "size": size, **out}
    name = f"loop/{series} b{batch} {size}B"
    return result_from_samples(name, rounds * batch, cpu, wall, params)


# --------------------------------------------------------------------------------------------------- processes
async def helper_main(path: str) -> None:
    """Helper process for the end-to-end ``netsim-loop`` path: `UnixIpcServer` + the reflector."""
    from netsim.runtime.channel import UnixIpcServer

    server = UnixIpcServer(path, max_queued_batches=1024, max_queued_bytes=64 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, _reflector)
        print(f"READY helper {path}", flush=True)


async def provider_main(tun_name: str, path: str, batch: str = "64") -> None:
    """Provider process: TUN -> `PacketTunnelFlow.read_packets` -> IPC batch; IPC batch -> `write_packets`.

    Exactly the loop a netsim provider runs (one wakeup per batch, one frame per batch), minus the user's code.
    """
    from netsim.core import ipc
    from netsim.runtime.channel import connect_ipc_unix
    from netsim.runtime.flow import PacketTunnelFlow
    from netsim.transports.tun import TunDevice

    dev = TunDevice.create(None, tun_name)
    flow = PacketTunnelFlow(dev, batch_limit=int(batch))
    async with connect_ipc_unix(path, max_queued_batches=1024, max_queued_bytes=64 << 20) as channel:
        print(f"READY provider {dev.name}", flush=True)

        async def outbound() -> None:
            read, send = flow.read_packets, channel.send_packets_nowait
            while True:
                pkts, fams = await read()
                send(pkts, fams)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbound)
            receive, write = channel.receive_event, flow.write_packets
            while True:
                ev = await receive()
                if isinstance(ev, ipc.PacketBatch):
                    write(ev.packets(), ev.families)
                elif isinstance(ev, ipc.ConnectionClosed | ipc.Goodbye | ipc.Error):
                    nursery.cancel_scope.cancel()
                    return


# --------------------------------------------------------------------------------------------------- plan
def plan(
    quick: bool, seed: int = 1, providers: tuple[str, ...] = (), policy: str | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    """``(case name, function, kwargs)`` of every loop case.

    With ``providers`` (``--provider`` specs), each runs the provider cases beside the built-in provider
    (``loop/builtin-provider/b64``, ``loop/provider:<Class>/b64``); ``policy`` (a file) goes to every case that
    runs netsim's `Helper`.
    """
    packets = 4096 if quick else 16384
    reps = 5 if quick else 7
    out: list[tuple[str, str, dict[str, Any]]] = []
    for transport in ("memory", "uds"):
        for batch in (1, 64) if quick else BATCHES:
            kw = {"transport": transport, "batch": batch, "size": 64, "packets": packets, "reps": reps, "seed": seed}
            if batch == 1:
                kw["packets"] = packets // 4  # one frame per packet is slow; keep the case short
            out.append((f"loop/{transport}/b{batch}", "case_loop", kw))
    for batch in (64,) if quick else (8, 64, 128):
        kw = {"batch": batch, "size": 64, "packets": packets // 2, "reps": reps, "seed": seed}
        if policy is not None:
            kw["policy"] = policy
        out.append((f"loop/helper/b{batch}", "case_helper", kw))
    if providers:
        for label, spec in (
            ("builtin-provider", BUILTIN_PROVIDER),
            *((f"provider:{provider_label(p)}", p) for p in providers),
        ):
            kw = {"spec": spec, "batch": 64, "size": 64, "packets": packets // 4, "reps": reps, "seed": seed}
            if policy is not None:
                kw["policy"] = policy
            out.append((f"loop/{label}/b64", "case_provider", kw))
    if not quick:
        for transport in ("memory", "uds"):
            kw = {"transport": transport, "batch": 64, "size": 1400, "packets": packets, "reps": reps, "seed": seed}
            out.append((f"loop/{transport}/b64/1400", "case_loop", kw))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0] if __doc__ else "", argv)
    results = [run_isolated("netsim.bench.bench_loop", fn, **kw) for _, fn, kw in plan(args.quick, args.seed)]
    report(results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("helper", "provider"):
        fn: Any = helper_main if sys.argv[1] == "helper" else provider_main
        try:
            trio.run(fn, *sys.argv[2:])
        except KeyboardInterrupt:
            pass
        sys.exit(0)
    sys.exit(main())
