"""The in-memory backend of the lab tunnel: MemoryTun, in-process IPC pair, WireGuard peers over a fake network.

Same parts as `netsim.lab.tunnel.netsim_tunnel`, none of which needs root: the provider
(`HelperForwardingProvider`, run by an `InProcessLauncher` on a `MemoryTun`), the real `Helper` (its datagrams go
over a `FakeNetwork` instead of UDP), and a `MemoryVpnServer` -- a netsim `WireGuardDevice` that plays both the
VPN server and the internet hosts behind it (it answers ICMP/ICMPv6 echo and UDP echo on port 7 for any
destination, so probes from the "Mac" get answers). The IPC between provider and helper is a
`netsim.testing.ipc_pair` byte-stream pair with socket-like backpressure.

Under `trio.testing.MockClock(autojump_threshold=0)` everything is deterministic: WireGuard timers, the
provider's reconnect backoff and network delays all run on virtual time. ``netsim demo`` uses this when it cannot
use the lab (no root).

Any provider runs here with the arguments `netsim.lab.tunnel.netsim_tunnel` takes (``provider=``,
``provider_configuration=``, ``policy=``; docs/lab.md), validated the same way before anything starts. The
simulated Mac is one namespace: a second provider (`MemoryTunnel.another_manager`) is refused as in the lab.

Example::

    async with memory_tunnel() as t:
        replies = await t.exchange([icmp_echo(t.client_v4, "203.0.113.10", 1)])
"""

from __future__ import annotations

import json
import os
import random
import secrets
import struct
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface, ip_network
from typing import TYPE_CHECKING, Any

import trio

from netsim.apple.enums import VPNStatus
from netsim.apple.path import NWPath, NWPathStatus
from netsim.apple.protocol import TunnelProviderProtocol
from netsim.core import ipc
from netsim.core.checksum import fill_checksums
from netsim.core.impairment import Action, Impairment, ImpairmentModel, ImpairmentStatistics
from netsim.core.ledger import Ledger
from netsim.core.packet import PacketView
from netsim.core.policy import PolicyEngine
from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig
from netsim.core.wireguard.device import WireGuardDevice
from netsim.core.wireguard.keys import PrivateKey
from netsim.core.wireguard.peer import Endpoint as Address
from netsim.core.wireguard.timers import Timers
from netsim.errors import BadPacket, LabError
from netsim.runtime.channel import IpcChannel, open_ipc_channel
from netsim.runtime.clock import SleepClock
from netsim.runtime.controller import InProcessLauncher, TunnelProviderManager, TunnelProviderSession, memory_launcher
from netsim.runtime.driver import DatagramDriver
from netsim.runtime.forwarding import HelperForwardingProvider, register_memory_helper, unregister_memory_helper
from netsim.runtime.helper import Helper
from netsim.runtime.netconfig import MemoryNamespace, MemoryNetworkConfigurator
from netsim.runtime.provider import PacketTunnelProvider
from netsim.runtime.tunnelspec import resolve_inputs, resolve_protocol_fields

if TYPE_CHECKING:
    from netsim.runtime.helper import NatBypassFactory
from netsim.testing.ipc_pair import memory_stream_pair
from netsim.testing.memory_tun import MemoryTun

__all__ = [
    "FakeNetwork",
    "MemoryDatagramTransport",
    "MemoryTunnel",
    "MemoryVpnServer",
    "icmp_echo",
    "memory_tunnel",
    "udp_packet",
]

HELPER_ADDR: Address = ("192.168.1.10", 40000)
SERVER_ADDR: Address = ("192.0.2.2", 51820)
_ICMP, _UDP, _ICMPV6 = 1, 17, 58


# ------------------------------------------------------------------------------------------------ fake network
class FakeNetwork:
    """Datagrams between `MemoryDatagramTransport` endpoints, with seeded loss and bounded inboxes.

    Args:
        loss: probability that a datagram is dropped (counted in ``lost``; those carrying an inner packet also in
            ``lost_data``), from ``random.Random(seed)``.
        capacity: datagrams an endpoint's inbox holds; more are dropped (counted in ``overflow``).
        impairment: a `netsim.core.impairment.Impairment` run on every datagram (the same model as the lab's
            impairer, on trio's clock: virtual time under ``MockClock``), or a mapping from a destination address
            to the impairment of datagrams sent to it (one direction each). Its drops count in ``lost`` too;
            `impairment_statistics` gives each model's counters.

    Faults (the memory side of `netsim.lab.faults`): a host in ``blackholed`` neither sends nor receives (its
    datagrams are counted in ``blackholed_drops``), which is how `MemoryTunnel.link_down` and
    `MemoryTunnel.blackhole_server` cut a path; `MemoryTunnel.nat_rebind` moves an endpoint to a new address.
    """

    def __init__(
        self,
        *,
        loss: float = 0.0,
        seed: int = 0,
        capacity: int = 4096,
        impairment: Impairment | Mapping[Address, Impairment] | None = None,
    ) -> None:
        self.loss = loss
        self.rng = random.Random(seed)
        self.capacity = capacity
        self.endpoints: dict[Address, MemoryDatagramTransport] = {}
        self.delivered = 0
        self.lost = 0
        self.lost_data = 0
        self.overflow = 0
        self.unreachable = 0
        self.blackholed: set[str] = set()
        self.blackholed_drops = 0
        # ---- impairment (docs/impairment.md): one model per impaired direction, datagrams held by handle
        self._impair_all = impairment.model() if isinstance(impairment, Impairment) else None
        self._impair_to = (
            {tuple(k): v.model() for k, v in (impairment or {}).items()} if isinstance(impairment, Mapping) else {}
        )
        self._in_flight: dict[int, tuple[Address, Address, bytes]] = {}
        self._copies: set[int] = set()  # in flight with a copy still to come
        self._handles = 0

    def attach(self, addr: Address) -> MemoryDatagramTransport:
        """A transport bound to ``addr`` (replacing any earlier one: a restarted process rebinding)."""
        transport = MemoryDatagramTransport(self, addr)
        self.endpoints[addr] = transport
        return transport

    def move(self, old: Address, new: Address) -> None:
        """Give the endpoint at ``old`` the address ``new`` (a NAT that forgot its mapping and made a new one):
        what it sends comes from ``new`` from now on, and what is sent to ``old`` is unreachable."""
        transport = self.endpoints.pop(old)
        transport.addr = new
        self.endpoints[new] = transport

    def impairment_statistics(self, dst: Address | None = None) -> ImpairmentStatistics:
        """The counters of the impairment on every datagram (``dst`` None) or on those sent to ``dst``."""
        model = self._impair_all if dst is None else self._impair_to.get(tuple(dst))
        if model is None:
            raise LabError(f"no impairment on {'this network' if dst is None else dst}")
        return model.statistics()

    def _impairment_timer(self) -> float | None:
        timers = [t for m in self._models() if (t := m.next_timer()) is not None]
        return min(timers) if timers else None

    def _models(self) -> list[ImpairmentModel]:
        return [self._impair_all] if self._impair_all is not None else list(self._impair_to.values())

    def _pump(self) -> None:
        """Carry out what the impairment models release by now."""
        now = trio.current_time()
        for model in self._models():
            for release in model.release_due(now):
                if release.action == Action.DROP:
                    self._lose(self._in_flight.pop(release.handle)[2])
                    continue
                src, dst, data = self._in_flight[release.handle]
                if release.action == Action.COPY or release.handle not in self._copies:
                    del self._in_flight[release.handle]
                    self._copies.discard(release.handle)
                self._arrive(src, dst, data)

    def _deliver(self, src: Address, dst: Address, data: bytes) -> None:
        if self.blackholed and (src[0] in self.blackholed or dst[0] in self.blackholed):
            self.blackholed_drops += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self._lose(data)
            return
        model = self._impair_all or self._impair_to.get(dst)
        if model is not None:
            self._handles += 1
            self._in_flight[self._handles] = (src, dst, data)
            if model.packet_in(self._handles, len(data), trio.current_time()):
                self._copies.add(self._handles)
            self._pump()
            if (target := self.endpoints.get(dst)) is not None:
                target.lot.unpark_all()  # a parked receiver re-arms its wakeup for the held datagram
            return
        self._arrive(src, dst, data)

    def _lose(self, data: bytes) -> None:
        self.lost += 1
        # WireGuard transport data carrying a packet (type 4, longer than a 32-byte keepalive): whitepaper §5.4.6
        self.lost_data += len(data) > 32 and data[:4] == b"\x04\x00\x00\x00"

    def _arrive(self, src: Address, dst: Address, data: bytes) -> None:
        target = self.endpoints.get(dst)
        if target is None or target.closed:
            self.unreachable += 1  # a closed port: the datagram vanishes (no ICMP in this model)
            return
        if len(target.inbox) >= self.capacity:
            self.overflow += 1
            return
        target.inbox.append((data, src))
        self.delivered += 1
        target.lot.unpark_all()


class MemoryDatagramTransport:
    """`netsim.runtime.driver.DatagramTransport` on a `FakeNetwork` (what the helper uses instead of UDP)."""

    def __init__(self, network: FakeNetwork, addr: Address) -> None:
        self.network = network
        self.addr = addr
        self.inbox: deque[tuple[bytes, Address]] = deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.closed = False
        self.recv_errors = 0

    def recv_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Address | None]) -> int:
        if self.network._in_flight:
            self.network._pump()
        n = 0
        inbox = self.inbox
        while inbox and n < len(bufs):
            data, src = inbox.popleft()
            size = min(len(data), len(bufs[n]))
            bufs[n][:size] = data[:size]
            sizes[n] = size
            addrs[n] = src
            n += 1
        return n

    def send(self, data: ipc.Buffer, addr: Address) -> str | None:
        if self.closed:
            return "udp_error"
        self.network._deliver(self.addr, tuple(addr), bytes(data))
        return None

    async def wait_readable(self) -> None:
        if self.network._in_flight:
            self.network._pump()
        if self.inbox:
            await trio.lowlevel.checkpoint()
            return
        due = self.network._impairment_timer() if self.network._in_flight else None  # nothing held: no timer
        if due is None:
            await self.lot.park()
            return
        with trio.move_on_at(due):  # an impaired datagram is due: wake to release it (to whichever endpoint)
            await self.lot.park()
        self.network._pump()

    def close(self) -> None:
        self.closed = True
        self.inbox.clear()
        self.lot.unpark_all()


# ------------------------------------------------------------------------------------------------ packets
def icmp_echo(src: str, dst: str, seq: int, payload: bytes = b"netsim-probe", ident: int = 0x4E53) -> bytes:
    """An ICMP (IPv4) or ICMPv6 echo request from ``src`` to ``dst`` (RFC 792 / RFC 4443 §4.1)."""
    v6 = ip_address(src).version == 6
    icmp = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, seq) + payload
    return _ip(src, dst, _ICMPV6 if v6 else _ICMP, icmp)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram in an IPv4 or IPv6 packet (RFC 768), checksums filled."""
    return _ip(src, dst, _UDP, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def _ip(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    s, d = ip_address(src), ip_address(dst)
    if s.version == 4:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, s.packed, d.packed)
    else:
        head = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, s.packed, d.packed)
    buf = bytearray(head + l4)
    fill_checksums(buf)
    return bytes(buf)


def echo_response(packet: bytes) -> bytes | None:
    """The answer an internet host would give: ICMP/ICMPv6 echo reply or UDP echo (port 7), else None."""
    try:
        view = PacketView.parse_untrusted(packet)
    except BadPacket:
        return None
    if view.is_fragment:
        return None
    off = view.l4_offset
    end = view.total_length
    if view.protocol == _ICMP and view.icmp_type == 8:
        return _ip(_addr(view.dst), _addr(view.src), _ICMP, b"\x00\x00\x00\x00" + packet[off + 4 : end])
    if view.protocol == _ICMPV6 and view.icmp_type == 128:
        return _ip(_addr(view.dst), _addr(view.src), _ICMPV6, b"\x81\x00\x00\x00" + packet[off + 4 : end])
    if view.protocol == _UDP and view.dport == 7:
        return udp_packet(_addr(view.dst), _addr(view.src), 7, view.sport, packet[off + 8 : end])
    return None


def _addr(raw: bytes) -> str:
    return str(ip_address(raw))


# ------------------------------------------------------------------------------------------------ server
class MemoryVpnServer:
    """A netsim WireGuard peer playing the VPN server and the internet behind it (echo responder).

    Args:
        key: the server's static key.
        client: the client's public key and its tunnel addresses (its AllowedIPs on the server).
        transport: the server's side of the fake network.
    """

    def __init__(self, key: PrivateKey, client: PeerConfig, transport: MemoryDatagramTransport, mtu: int) -> None:
        self.key = key
        self.client = client
        self.transport = transport
        self.mtu = mtu
        self.device = WireGuardDevice(key, [client], mtu=mtu)
        self.answered = 0
        self.ignored = 0
        self._bufs = [bytearray(mtu + 64) for _ in range(64)]
        self._sizes = [0] * 64
        self._addrs: list[Address | None] = [None] * 64

    def restart(self) -> None:
        """Lose every session (a server reboot): a fresh device with the same key and peer."""
        self.device = WireGuardDevice(self.key, [self.client], mtu=self.mtu)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The server's network loop (`netsim.runtime.driver.DatagramDriver`); cancel to stop."""
        await DatagramDriver(self, self.transport, batch=64).run(task_status=task_status)

    # `netsim.runtime.driver.DatagramCore`, delegating to the current device (restart() replaces it)
    def receive_batch(self, bufs: Sequence[memoryview], sizes: list[int], addrs: list[Any], n: int, now: float) -> None:
        self.device.receive_datagrams_untrusted([bufs[i][: sizes[i]] for i in range(n)], addrs[:n], now)

    def get_timer(self) -> float | None:
        return self.device.get_timer()

    def handle_timer(self, now: float) -> None:
        self.device.handle_timer(now)

    def datagrams_to_send(self, now: float) -> Iterator[tuple[ipc.Buffer, Any]]:
        """Echo replies to what was decrypted (encrypted in chunks of 64), then the device's own datagrams."""
        dev = self.device
        replies = []
        for _, pkt in dev.take_received():
            reply = echo_response(pkt)
            if reply is None:
                self.ignored += 1
            else:
                replies.append(reply)
        for start in range(0, len(replies), 64):
            chunk = replies[start : start + 64]
            dev.encapsulate(chunk, now, self._bufs, self._sizes, self._addrs)
            for i in range(len(chunk)):
                addr = self._addrs[i]
                if self._sizes[i] and addr is not None:
                    yield memoryview(self._bufs[i])[: self._sizes[i]], addr
            self.answered += len(chunk)
        yield from dev.datagrams_to_send(now)


# ------------------------------------------------------------------------------------------------ tunnel
@dataclass
class MemoryTunnel:
    """A running in-memory tunnel (from `memory_tunnel`).

    ``session``, ``provider_configuration``, ``provider_spec`` and the methods ``send_provider_message``,
    ``provider_stats``, ``helper_stats`` and ``another_manager`` mean what they mean on `netsim.lab.tunnel.LabTunnel`
    (docs/lab.md, "Your own provider"); ``namespace`` is the simulated Mac's tunnel ownership (`MemoryNamespace`).
    """

    network: FakeNetwork
    server: MemoryVpnServer
    config: TunnelConfig
    session: TunnelProviderSession
    launcher: InProcessLauncher
    name: str
    client_v4: str
    client_v6: str
    helper: Helper
    _helper_scope: trio.CancelScope
    _nursery: trio.Nursery
    timers: Timers | None = None
    helpers_started: int = 1
    provider_configuration: dict[str, Any] = field(default_factory=dict)
    provider_spec: type[PacketTunnelProvider] | str = HelperForwardingProvider
    namespace: MemoryNamespace = field(default_factory=MemoryNamespace)
    policy: PolicyEngine | None = None
    nat_bypass: NatBypassFactory | None = None
    #: True between `sleep` and `wake`
    asleep: bool = False
    _pending_jump: float = 0.0

    @property
    def tun(self) -> MemoryTun:
        """The provider's utun stand-in (inject what apps send, take what the provider wrote)."""
        device = self.launcher.hosts[-1].flow.device
        if not isinstance(device, MemoryTun):
            raise LabError("the provider has no utun yet (settings not applied)")
        return device

    @property
    def provider(self) -> HelperForwardingProvider:
        """The running provider instance, when it is a `HelperForwardingProvider` (see `provider_instance`)."""
        provider = self.provider_instance
        if not isinstance(provider, HelperForwardingProvider):
            raise LabError(f"the provider is a {type(provider).__name__}; use provider_instance")
        return provider

    @property
    def provider_instance(self) -> PacketTunnelProvider:
        """The running provider instance, whatever its class."""
        return self.launcher.hosts[-1].provider

    def set_path(self, status: NWPathStatus = NWPathStatus.SATISFIED, **path: Any) -> NWPath:
        """Simulate a path change on the memory Mac (keywords as `MemoryNetworkConfigurator.set_path`): the
        provider's ``default_path`` changes (its ``default_path_did_change`` runs) and the helper sees the same
        change (`Helper.path_changed`: it forces a handshake when the path is back), as both do on a real path
        change. Returns the new path."""
        configurator = self.launcher.hosts[-1].configurator
        if not isinstance(configurator, MemoryNetworkConfigurator):
            raise LabError(f"the provider's configurator is a {type(configurator).__name__}, not the memory one")
        new = configurator.set_path(status, **path)
        self.helper.path_changed(new.interface_name if new.is_satisfied else None)
        return new

    async def send_provider_message(self, data: bytes) -> bytes | None:
        """Send an app message to the provider (``sendProviderMessage``); its ``handle_app_message`` answer."""
        return await self.session.send_provider_message(data)

    async def provider_stats(self) -> dict[str, Any]:
        """The provider's answer to the app message ``b"stats"`` as a JSON object, as in the lab (``{}`` when it
        has none); the built-in provider answers with its statistics and flow counters."""
        reply = await self.session.send_provider_message(b"stats")
        try:
            value = json.loads(reply or b"{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    async def helper_stats(self) -> dict[str, Any]:
        """The helper's own statistics (`HelperStatistics.to_json`), read from the helper itself."""
        return self.helper.stats_json()

    def another_manager(
        self, provider: type[PacketTunnelProvider] | str | None = None, **configuration: Any
    ) -> TunnelProviderManager:
        """A `TunnelProviderManager` for a second provider on this simulated Mac with the same configuration
        (``configuration`` keywords override its keys, e.g. ``connect_timeout=5.0``).

        As in the lab its start is refused (the helper answers BUSY; the namespace refuses its settings) and the
        running tunnel is left alone.
        """
        return TunnelProviderManager(
            provider or self.provider_spec,
            # its own launcher (so `tun` and `provider` stay this tunnel's), on the same simulated Mac
            memory_launcher(_memory_utun, namespace=self.namespace),
            TunnelProviderProtocol(
                server_address=SERVER_ADDR[0], provider_configuration={**self.provider_configuration, **configuration}
            ),
            start_timeout=15.0,
        )

    async def exchange(
        self, packets: Iterable[bytes], *, expect: int | None = None, timeout: float = 10.0
    ) -> list[bytes]:
        """Inject ``packets`` as if apps sent them; return what came back to the utun (``expect`` many)."""
        sent = list(packets)
        want = len(sent) if expect is None else expect
        tun = self.tun
        tun.inject(sent)
        got: list[bytes] = []
        with trio.move_on_after(timeout):
            while len(got) < want:
                got += tun.take_written()
                if len(got) < want:
                    await trio.sleep(0.001)
        got += tun.take_written()
        return got

    def kill_helper(self) -> None:
        """Stop the helper at once, as SIGKILL would: its sessions and network loop vanish."""
        self._helper_scope.cancel()
        unregister_memory_helper(self.name)
        self.helper.close()

    async def start_helper(self) -> None:
        """Start a fresh helper (new WireGuard session) and make it reachable again (its clock keeps the time
        the simulated Mac slept, `sleep`)."""
        slept = self.helper.clock.offset if isinstance(self.helper.clock, SleepClock) else 0.0
        self.helper = Helper(
            self.config,
            self.network.attach(HELPER_ADDR),
            timers=self.timers,
            policy=self.policy,
            nat_bypass=self.nat_bypass,
            clock=SleepClock(),
        )
        if slept:
            self.helper.jump_clock(slept)
        self._helper_scope = await self._nursery.start(_run_helper, self.helper)
        register_memory_helper(self.name, _connector(self))
        self.helpers_started += 1

    async def restart_helper(self) -> None:
        self.kill_helper()
        await self.start_helper()

    def restart_server(self) -> None:
        """Reboot the VPN server: every session is lost; the client must handshake again."""
        self.server.restart()

    # -- faults (the memory side of netsim.lab.faults; docs/faults.md) ----------------------------------------
    @property
    def helper_address(self) -> Address:
        """Where the helper's datagrams come from, as the server sees it (changes with `nat_rebind`)."""
        transport = self.helper.transport
        assert isinstance(transport, MemoryDatagramTransport)
        return transport.addr

    def link_down(self) -> None:
        """The simulated Mac's uplink goes down (`netsim.lab.faults.link_down` of en0): no datagram leaves or
        reaches the helper until `link_up` (each one is counted in ``network.blackholed_drops``), and the path is
        UNSATISFIED for the provider and the helper (`set_path`), as a real link going down makes it."""
        self.network.blackholed.add(self.helper_address[0])
        self.set_path(NWPathStatus.UNSATISFIED)

    def link_up(self) -> None:
        """The uplink is back (`netsim.lab.faults.link_up`): datagrams flow and the path is SATISFIED on en0."""
        self.network.blackholed.discard(self.helper_address[0])
        self.set_path(NWPathStatus.SATISFIED)

    @contextmanager
    def blackhole_server(self) -> Iterator[None]:
        """The VPN server is unreachable while the block runs (process alive; `netsim.lab.faults.Blackhole`)."""
        self.network.blackholed.add(SERVER_ADDR[0])
        try:
            yield
        finally:
            self.network.blackholed.discard(SERVER_ADDR[0])

    def nat_rebind(self, new: Address | None = None) -> Address:
        """The home router forgot its mapping (`netsim.lab.faults.nat_flush`): the helper's datagrams now come from
        ``new`` (default: the next port). The server must follow the new endpoint on the next authenticated
        datagram (WireGuard roaming, whitepaper §2.1); returns the new address."""
        old = self.helper_address
        target = new if new is not None else (old[0], old[1] + 1)
        self.network.move(old, target)
        return target

    def server_endpoint(self) -> Address | None:
        """The client endpoint the VPN server would reply to now (it follows roaming)."""
        peers = self.server.device.peers
        return None if not peers or peers[0].endpoint is None else tuple(peers[0].endpoint)

    # ---- sleep/wake (docs/faults.md, "Sleep and wake") ----
    async def sleep(self, seconds: float | None = None, *, clock_jump: float = 0.0) -> None:
        """Put the simulated Mac to sleep, as `netsim.lab.tunnel.LabTunnel.sleep` does, but nothing is frozen
        (the tasks are the test's own): the session's ``simulate_sleep`` runs, and `wake` jumps the helper's
        clock ``clock_jump`` seconds forward (`Helper.jump_clock`). With ``seconds`` it waits (virtual time
        under ``MockClock``) and wakes."""
        if self.asleep:
            raise LabError("the simulated Mac is already asleep; wake() it first")
        await self.session.simulate_sleep()
        self.asleep = True
        self._pending_jump = clock_jump
        if seconds is not None:
            await trio.sleep(seconds)
            await self.wake()

    async def wake(self) -> None:
        """Wake the simulated Mac: the helper's clock jumps, then the provider's ``wake()`` runs; no-op if awake."""
        if not self.asleep:
            return
        if self._pending_jump:
            self.helper.jump_clock(self._pending_jump)
        self._pending_jump = 0.0
        self.asleep = False
        await self.session.simulate_wake()

    async def wait_connected(self, *, after_connects: int = 0, timeout: float = 30.0) -> None:
        with trio.fail_after(timeout):
            while True:
                provider = self.provider_instance
                if isinstance(provider, HelperForwardingProvider):
                    if provider.connects > after_connects and not provider.reasserting:
                        return
                elif self.helper.sessions > after_connects and self.helper.connected:
                    return
                await trio.sleep(0.01)


async def _run_helper(helper: Helper, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(helper.run)
            task_status.started(scope)
            await trio.sleep_forever()


def _connector(t: MemoryTunnel) -> Any:
    helper = t.helper

    @asynccontextmanager
    async def connect(ledger: Ledger) -> AsyncIterator[IpcChannel]:
        a, b = memory_stream_pair()
        async with (
            open_ipc_channel(a, ipc.Connection(ipc.Role.PROVIDER), ledger=ledger) as prov,
            open_ipc_channel(b, ipc.Connection(ipc.Role.HELPER), ledger=helper.ledger) as side,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(side.handshake)
            await prov.handshake()

            async def serve() -> None:
                try:
                    await helper.serve_session(side)
                finally:
                    side.close()

            # the session runs under the helper's lifetime scope in spirit: killing the helper closes it
            nursery.start_soon(serve)
            try:
                yield prov
            finally:
                nursery.cancel_scope.cancel()

    return connect


def _memory_utun(name: str, mtu: int) -> MemoryTun:
    return MemoryTun(name=name, mtu=mtu, capacity=1024)


@asynccontextmanager
async def memory_tunnel(
    *,
    provider: type[PacketTunnelProvider] | str = HelperForwardingProvider,
    provider_configuration: Mapping[str, Any] | None = None,
    policy: str | os.PathLike[str] | None = None,
    loss: float = 0.0,
    seed: int = 0,
    mtu: int = 1420,
    timers: Timers | None = None,
    reconnect_for: float = 60.0,
    nat_bypass: NatBypassFactory | None = None,
    protocol: Mapping[str, Any] | None = None,
    wait_connected: bool = True,
    impairment: Impairment | Mapping[Address, Impairment] | None = None,
) -> AsyncIterator[MemoryTunnel]:
    """Bring up the in-memory tunnel and yield it once the session is CONNECTED.

    Args:
        provider: as for `netsim.lab.tunnel.netsim_tunnel` (validated, with the next two, before anything starts).
        provider_configuration: as for `netsim.lab.tunnel.netsim_tunnel`; netsim adds ``helper_socket``,
            ``reconnect_for`` and ``backoff_max``.
        policy: as for `netsim.lab.tunnel.netsim_tunnel`. The policy's route exclusions reach the provider in
            SETTINGS; with the NAT mechanism BYPASS verdicts have no physical link here and are counted by the helper.
        loss: datagram loss on the fake network (seeded by ``seed``).
        mtu: tunnel MTU.
        timers: WireGuard timers for the helper (tests shorten them to see rekeys quickly).
        reconnect_for: seconds the provider reasserts before giving up.
        nat_bypass: the helper's NAT bypass factory (`netsim.runtime.helper.Helper`'s ``nat_bypass``), e.g. a
            `netsim.runtime.bypass.NatBypass` over a `netsim.testing.memory_bypass.MemoryBypassTransport`.
        protocol: NEVPNProtocol fields, as for `netsim.lab.tunnel.netsim_tunnel`.
        wait_connected: as for `netsim.lab.tunnel.netsim_tunnel`: False yields once ``start_vpn_tunnel`` returned.
        impairment: impaired links on the fake network (`FakeNetwork`'s ``impairment``; docs/impairment.md), e.g.
            ``{SERVER_ADDR: Impairment(loss=0.1)}`` for the uplink only.
    """
    inputs = resolve_inputs(provider, provider_configuration, policy)
    protocol_fields = resolve_protocol_fields(protocol)
    engine = PolicyEngine(inputs.policy) if inputs.policy is not None else None
    rng = random.Random(seed)
    server_key = PrivateKey.generate(rng.randbytes)
    client_key = PrivateKey.generate(rng.randbytes)
    client_v4, client_v6 = "10.66.0.2", "fd00:66::2"
    network = FakeNetwork(loss=loss, seed=seed, impairment=impairment)
    config = TunnelConfig(
        InterfaceConfig(
            private_key=client_key,
            addresses=(ip_interface(f"{client_v4}/32"), ip_interface(f"{client_v6}/128")),
            dns_servers=(ip_address("203.0.113.53"),),
            mtu=mtu,
        ),
        (
            PeerConfig(
                public_key=server_key.public_key(),
                endpoint=Endpoint(SERVER_ADDR[0], SERVER_ADDR[1]),
                allowed_ips=(ip_network("0.0.0.0/0"), ip_network("::/0")),
            ),
        ),
    )
    server_peer = PeerConfig(
        public_key=client_key.public_key(),
        allowed_ips=(ip_network(f"{client_v4}/32"), ip_network(f"{client_v6}/128")),
    )
    server = MemoryVpnServer(server_key, server_peer, network.attach(SERVER_ADDR), mtu)
    name = f"tunnel-{secrets.token_hex(4)}"
    namespace = MemoryNamespace(name)
    launcher = memory_launcher(_memory_utun, namespace=namespace)
    configuration = inputs.provider_configuration(
        {"helper_socket": f"memory:{name}", "reconnect_for": reconnect_for, "backoff_max": 0.5}
    )
    manager = TunnelProviderManager(
        inputs.spec,
        launcher,
        TunnelProviderProtocol(server_address=SERVER_ADDR[0], provider_configuration=configuration, **protocol_fields),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        helper = Helper(
            config, network.attach(HELPER_ADDR), timers=timers, policy=engine, nat_bypass=nat_bypass, clock=SleepClock()
        )
        scope = await nursery.start(_run_helper, helper)
        try:
            async with manager.open_session() as session:
                tunnel = MemoryTunnel(
                    network=network,
                    server=server,
                    config=config,
                    session=session,
                    launcher=launcher,
                    name=name,
                    client_v4=client_v4,
                    client_v6=client_v6,
                    helper=helper,
                    _helper_scope=scope,
                    _nursery=nursery,
                    timers=timers,
                    provider_configuration=configuration,
                    provider_spec=inputs.spec,
                    namespace=namespace,
                    policy=engine,
                    nat_bypass=nat_bypass,
                )
                register_memory_helper(name, _connector(tunnel))
                await session.start_vpn_tunnel()
                if wait_connected:
                    with trio.fail_after(30):
                        await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
                if wait_connected and session.status is not VPNStatus.CONNECTED:
                    raise LabError(f"the in-memory tunnel did not connect: {session.last_disconnect_error}")
                yield tunnel
        finally:
            unregister_memory_helper(name)
            nursery.cancel_scope.cancel()
