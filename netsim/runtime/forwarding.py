"""`HelperForwardingProvider`: a ready-made PacketTunnelProvider that forwards the utun to the helper over IPC.

Theory of operation
-------------------
``start_tunnel`` connects to the helper's Unix socket (``provider_configuration["helper_socket"]``), receives the
helper's SETTINGS frame (addresses, DNS, AllowedIPs, MTU and server address from the WireGuard config: the keys
stay in the helper) and applies them with ``set_tunnel_network_settings``. Two loops then run for the life of
the tunnel:

* **outbound**: ``await packet_flow.read_packets()`` (Apple: ``readPackets``; one trio wakeup returns every queued
  packet as parallel lists of packets and Darwin families) -> one IPC PACKETS frame with those same lists
  (`IpcChannel.send_packets_nowait`: scatter-gather ``sendmsg``, the payload bytes are never copied into a frame).
  While the helper is away the batch is dropped and counted as ``helper_down``: reading on keeps the utun queue
  from filling with stale packets, and the count says exactly what was lost.
* **inbound**: each IPC PACKETS frame -> ``packet_flow.write_packets(batch.packets(), batch.families)`` (Apple:
  ``writePackets(_:withProtocols:)``): memoryview slices of the IPC receive buffer (zero copy until the TUN write)
  and the frame's families as they came.

No `Packet` object is made on either path (they are Apple's per-packet objects, for providers that want them);
the families travel end to end as the parallel lists both APIs already use. When a write is refused, the
provider reads the flow's plain ``packets_written`` counter to book what was taken: no statistics snapshot and
no I/O on the event loop under load.

If the helper dies, the connection breaks: the provider sets ``reasserting`` (Apple: the tunnel is re-establishing,
R24), reconnects with exponential backoff and, when the helper answers again, clears ``reasserting`` and resumes.
The settings are re-applied only when the helper announces different ones.

Ledger (``Ledger("provider")``): ``tun_read`` (packets read -> handed to IPC, dropped ``helper_down``, and
``malformed`` for what the flow discards before the provider sees it),
``ipc_out`` (the channel's queue: written, ``ipc_queue_full``, ``ipc_closed``), ``ipc_in`` (packets received ->
accepted by the utun, dropped ``tun_refused``).

App messages (``session.send_provider_message``): ``b"stats"`` returns the provider's statistics as JSON,
``b"helper-stats"`` asks the helper over IPC and returns its answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_interface, ip_network
from typing import Any

import trio

from netsim.apple.enums import ProviderStopReason
from netsim.apple.settings import (
    DNSSettings,
    IPv4Route,
    IPv4Settings,
    IPv6Route,
    IPv6Settings,
    PacketTunnelNetworkSettings,
)
from netsim.core import ipc
from netsim.core.ledger import Ledger, LedgerSnapshot
from netsim.errors import ConfigError, LabError, LocalProtocolError, RemoteProtocolError, TunnelDown
from netsim.runtime.channel import IpcChannel, connect_ipc_unix
from netsim.runtime.provider import PacketTunnelProvider
from netsim.transports.uds import read_token_file

__all__ = [
    "MEMORY_SCHEME",
    "ForwardingStatistics",
    "HelperForwardingProvider",
    "register_memory_helper",
    "settings_from_payload",
    "unregister_memory_helper",
]

log = logging.getLogger("netsim.forwarding")

#: ``helper_socket`` values starting with this name an in-process helper (`register_memory_helper`).
MEMORY_SCHEME = "memory:"
Connector = Callable[[Ledger], AbstractAsyncContextManager[IpcChannel]]
_MEMORY_HELPERS: dict[str, Connector] = {}
_CONNECTION_ERRORS = (
    TunnelDown,
    RemoteProtocolError,
    LabError,
    ConfigError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def register_memory_helper(name: str, connector: Connector) -> None:
    """Make ``helper_socket = "memory:<name>"`` connect through ``connector(ledger)`` (the in-memory backend).

    The connector yields a handshaken provider-side `IpcChannel` whose ``ipc_out`` stage lives in ``ledger``.
    """
    _MEMORY_HELPERS[name] = connector


def unregister_memory_helper(name: str) -> None:
    """Forget an in-memory helper; providers connecting to it then see it as down."""
    _MEMORY_HELPERS.pop(name, None)


def settings_from_payload(payload: dict[str, Any]) -> PacketTunnelNetworkSettings:
    """Build ``PacketTunnelNetworkSettings`` from the helper's SETTINGS payload (`tunnel_settings_payload`).

    AllowedIPs become included routes (0.0.0.0/0 and ::/0 claim the default route, as wg-quick does); the server
    is the ``tunnel_remote_address``, which the route table excludes from the tunnel automatically; the policy's
    ``excluded_routes`` (route mechanism) become excluded routes of their family.

    Raises:
        ConfigError: the payload is not what a netsim helper sends (names the field).
    """
    try:
        if payload.get("v") != 1:
            raise ConfigError(f"helper settings version {payload.get('v')!r} is not 1")
        server = payload.get("server")
        if not isinstance(server, str):
            raise ConfigError("helper settings have no server address (the peer has no resolved Endpoint)")
        addrs = [ip_interface(a) for a in payload.get("addresses", [])]
        routes = [ip_network(r) for r in payload.get("routes", [])]
        dns = [str(s) for s in payload.get("dns", [])]
        search = [str(s) for s in payload.get("dns_search", [])]
        mtu = payload.get("mtu")
        excluded = [ip_network(r) for r in payload.get("excluded_routes", [])]
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"bad helper settings: {exc}") from None
    settings = PacketTunnelNetworkSettings(tunnel_remote_address=server, mtu=mtu if isinstance(mtu, int) else None)
    v4 = [a for a in addrs if a.version == 4]
    v6 = [a for a in addrs if a.version == 6]
    r4 = [r for r in routes if isinstance(r, IPv4Network)]
    r6 = [r for r in routes if isinstance(r, IPv6Network)]
    x4 = [r for r in excluded if isinstance(r, IPv4Network)]
    x6 = [r for r in excluded if isinstance(r, IPv6Network)]
    if v4:
        settings.ipv4_settings = IPv4Settings([str(a.ip) for a in v4], [str(a.netmask) for a in v4])
        settings.ipv4_settings.included_routes = [IPv4Route(str(r.network_address), str(r.netmask)) for r in r4]
        if x4:  # the policy's route mechanism: these never enter the utun (Apple: excludedRoutes)
            settings.ipv4_settings.excluded_routes = [IPv4Route(str(r.network_address), str(r.netmask)) for r in x4]
    if v6:
        settings.ipv6_settings = IPv6Settings([str(a.ip) for a in v6], [a.network.prefixlen for a in v6])
        settings.ipv6_settings.included_routes = [IPv6Route(str(r.network_address), r.prefixlen) for r in r6]
        if x6:
            settings.ipv6_settings.excluded_routes = [IPv6Route(str(r.network_address), r.prefixlen) for r in x6]
    if dns:
        # The tunnel's resolvers answer everything ([""]: Apple's "all domains"), so DNS never leaks.
        settings.dns_settings = DNSSettings(dns, search_domains=search or None, match_domains=[""])
    return settings


@dataclass(frozen=True, slots=True)
class ForwardingStatistics:
    """Counters of a `HelperForwardingProvider`.

    Attributes:
        ledger: ``tun_read``, ``ipc_out``, ``ipc_in`` (see the module docstring).
        connects: successful helper connections (the first one plus every reconnect).
        disconnects: helper connections lost.
        reasserting: True while reconnecting.
        settings_applied: times the helper's settings were applied.
        read_batches / write_batches: flow reads and writes (packets per wakeup = packets / batches).
    """

    ledger: LedgerSnapshot
    connects: int
    disconnects: int
    reasserting: bool
    settings_applied: int
    read_batches: int
    write_batches: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.to_json(),
            "connects": self.connects,
            "disconnects": self.disconnects,
            "reasserting": self.reasserting,
            "settings_applied": self.settings_applied,
            "read_batches": self.read_batches,
            "write_batches": self.write_batches,
        }


class HelperForwardingProvider(PacketTunnelProvider):
    """Forwards every utun packet to the netsim helper and writes its replies back (use as is, or copy it).

    ``provider_configuration`` keys: ``helper_socket`` (path, or ``memory:<name>``), ``connect_timeout``
    (seconds to reach the helper at start, default 10), ``reconnect_for`` (seconds of reasserting before the
    tunnel gives up and stops with an error, default 300), ``backoff_max`` (default 1.0), ``token_file`` (a
    0600 file holding the per-tunnel secret the helper checks in HELLO; `netsim_tunnel` writes one),
    ``ping_interval`` / ``ping_timeout`` (liveness, seconds, defaults 5 and 10; ``ping_interval = 0`` turns it
    off): a helper that does not answer a PING within the deadline is treated as dead and the provider reasserts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger("provider", ("tun_read", "ipc_out", "ipc_in"))
        self._tun_read = self.ledger.stage("tun_read")
        self._ipc_in = self.ledger.stage("ipc_in")
        self._channel: IpcChannel | None = None
        self._settings_json: bytes | None = None
        self._ready = trio.Event()
        self._stats_waiters: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._next_request = 0
        self.connects = 0
        self.disconnects = 0
        self.settings_applied = 0
        self.read_batches = 0
        self.write_batches = 0
        self._start_error: BaseException | None = None
        self._session_ok = False
        self._stopping = False
        self._written_seen = 0  # flow.packets_written as of our last write

    # -- configuration -------------------------------------------------------------------------------------
    def _conf(self) -> dict[str, Any]:
        conf = dict(self.protocol_configuration.provider_configuration or {})
        if not isinstance(conf.get("helper_socket"), str):
            raise ConfigError("provider_configuration['helper_socket'] must name the helper's socket path")
        return conf

    def connect_helper(self, retry_for: float) -> AbstractAsyncContextManager[IpcChannel]:
        """Open an IPC channel to the helper (override to use another transport)."""
        path = self._conf()["helper_socket"]
        if path.startswith(MEMORY_SCHEME):
            connector = _MEMORY_HELPERS.get(path[len(MEMORY_SCHEME) :])
            if connector is None:
                return _Unreachable(path)
            return connector(self.ledger)
        return connect_ipc_unix(
            path,
            connection=self._ipc_connection(),
            retry_for=retry_for,
            backoff_max=float(self._conf().get("backoff_max", 1.0)),
            ledger=self.ledger,
        )

    def _ipc_connection(self) -> ipc.Connection:
        """The provider end of the IPC: the per-tunnel token (read from ``token_file``) and liveness PINGs."""
        conf = self._conf()
        token = read_token_file(conf["token_file"]) if conf.get("token_file") else None
        interval = float(conf.get("ping_interval", ipc.DEFAULT_PING_INTERVAL))
        return ipc.Connection(
            ipc.Role.PROVIDER,
            capabilities=ipc.Capability.STATS
            | ipc.Capability.POLICY
            | ipc.Capability.PING
            | ipc.Capability.POLICY_RESULT,
            token=token,
            ping_interval=interval if interval > 0 else None,
            ping_timeout=float(conf.get("ping_timeout", ipc.DEFAULT_PING_TIMEOUT)),
        )

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        conf = self._conf()
        self.start_soon(self._outbound)
        self.start_soon(self._maintain)
        with trio.fail_after(float(conf.get("connect_timeout", 10.0))):
            await self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    async def stop_tunnel(self, reason: ProviderStopReason) -> None:
        self._stopping = True
        ch = self._channel
        if ch is not None:
            with trio.move_on_after(1.0):
                await ch.aclose(ipc.Goodbye(ipc.GoodbyeReason.SHUTDOWN, "tunnel stopping"))

    async def _maintain(self) -> None:
        """Keep one helper connection up; reassert and reconnect with backoff whenever it breaks."""
        conf = self._conf()
        reconnect_for = float(conf.get("reconnect_for", 300.0))
        backoff_max = float(conf.get("backoff_max", 1.0))
        attempt_for = min(float(conf.get("connect_timeout", 10.0)), 2.0)
        down_since: float | None = None
        delay = 0.05
        while True:
            exc = await self._attempt(attempt_for)
            if self._stopping:
                return
            if isinstance(exc, ConfigError):
                if self._ready.is_set():
                    raise exc
                self._start_error = exc
                self._ready.set()
                return
            log.info("helper connection ended: %s", exc)
            self._channel = None
            self._fail_waiters()
            now = trio.current_time()
            if self._session_ok:
                # a working session just broke: the tunnel is re-establishing (Apple: reasserting, R24)
                self._session_ok = False
                self.disconnects += 1
                self.reasserting = True
                down_since, delay = now, 0.05
            elif down_since is None:
                down_since = now
            if now - down_since > reconnect_for:
                error = TunnelDown(f"the helper stayed unreachable for {reconnect_for:g} s")
                if not self._ready.is_set():
                    self._start_error = error
                    self._ready.set()
                else:
                    self.cancel_tunnel_with_error(error)
                return
            await trio.sleep(delay)
            delay = min(delay * 2, backoff_max)

    async def _attempt(self, retry_for: float) -> Exception | None:
        """One connection's lifetime; returns why it ended (connection errors are expected, not raised)."""
        try:
            async with self.connect_helper(retry_for) as ch:
                await self._session(ch)
        except _CONNECTION_ERRORS as exc:
            return exc
        except BaseExceptionGroup as group:  # trio nurseries inside the channel wrap what they raise
            match, rest = group.split(_CONNECTION_ERRORS)
            if rest is not None:
                raise rest from None  # e.g. Cancelled while stopping: the connection errors are moot then
            if match is None:  # pragma: no cover - split of a non-empty group
                raise
            leaf: BaseException = match
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, Exception)
            return leaf
        return None

    async def _session(self, ch: IpcChannel) -> None:
        """One helper connection: wait for its SETTINGS, apply them, then move inbound frames to the utun."""
        ev = await ch.receive_event()
        if not isinstance(ev, ipc.Settings):
            raise RemoteProtocolError("no_settings", f"the helper sent {type(ev).__name__} before SETTINGS")
        await self._apply_settings(ev)
        self.connects += 1
        self._session_ok = True
        self._channel = ch
        if self.reasserting:
            self.reasserting = False
        self._ready.set()
        log.info("connected to the helper (connection %d)", self.connects)
        flow = self.packet_flow
        write = flow.write_packets
        ipc_in = self._ipc_in
        try:
            while True:
                ev = await ch.receive_event()
                if isinstance(ev, ipc.PacketBatch):
                    n = len(ev)
                    ipc_in.count_read(n)
                    if write(ev.packets(), ev.families):
                        accepted = n
                        self._written_seen += n
                    else:  # rare: the flow's plain counter says how many it took (only this loop writes to it)
                        total = flow.packets_written
                        accepted, self._written_seen = total - self._written_seen, total
                    self.write_batches += 1
                    ipc_in.count_forwarded(accepted)
                    if accepted != n:
                        ipc_in.count_dropped("tun_refused", n - accepted)
                elif isinstance(ev, ipc.Settings):
                    await self._apply_settings(ev)  # the helper's policy changed its route exclusions
                elif isinstance(ev, ipc.StatsResponse):
                    waiter = self._stats_waiters.pop(ev.request_id, None)
                    if waiter is not None:
                        waiter[1].append(ev.stats)
                        waiter[0].set()
                elif isinstance(ev, ipc.Ping):
                    await ch.send(ipc.Pong(ev.nonce))
                elif isinstance(ev, ipc.Goodbye | ipc.Error | ipc.ConnectionClosed):
                    raise TunnelDown(f"the helper closed the connection: {ev!r}")
        finally:
            if self._channel is ch:
                self._channel = None

    async def _apply_settings(self, ev: ipc.Settings) -> None:
        """Apply the helper's SETTINGS unless they equal what is already applied."""
        if ev.payload == self._settings_json:
            return
        try:
            payload = json.loads(ev.payload)
        except ValueError as exc:
            raise RemoteProtocolError("bad_settings", str(exc)) from None
        if not isinstance(payload, dict):
            raise RemoteProtocolError("bad_settings", "SETTINGS must be a JSON object")
        await self.set_tunnel_network_settings(settings_from_payload(payload))
        self._settings_json = ev.payload
        self.settings_applied += 1

    async def _outbound(self) -> None:
        """utun -> helper: one flow read, one IPC frame (the performance-critical loop)."""
        flow = self.packet_flow
        read = flow.read_packets
        st = self._tun_read
        flow.count_reads_in(st)  # packets the flow drops as malformed are booked here too
        while True:
            packets, families = await read()  # Apple: readPackets; families stay with their packets to the IPC
            n = len(packets)
            st.count_read(n)
            self.read_batches += 1
            ch = self._channel
            if ch is None or ch.is_broken:
                st.count_dropped("helper_down", n)
                continue
            st.count_forwarded(n)
            try:
                ch.send_packets_nowait(packets, families)
            except LocalProtocolError:
                pass  # counted by the channel's ipc_out stage (ipc_local_error): the session is closing

    def _fail_waiters(self) -> None:
        for done, _ in self._stats_waiters.values():
            done.set()
        self._stats_waiters.clear()

    # -- statistics ----------------------------------------------------------------------------------------
    def statistics(self) -> ForwardingStatistics:
        """A frozen snapshot of the provider's counters."""
        return ForwardingStatistics(
            ledger=self.ledger.snapshot(),
            connects=self.connects,
            disconnects=self.disconnects,
            reasserting=self.reasserting,
            settings_applied=self.settings_applied,
            read_batches=self.read_batches,
            write_batches=self.write_batches,
        )

    async def helper_statistics(self, timeout: float = 5.0) -> dict[str, Any]:
        """Ask the helper for its statistics over IPC (STATS_REQUEST).

        Raises:
            TunnelDown: no helper connection, or it broke or did not answer within ``timeout``.
        """
        ch = self._channel
        if ch is None:
            raise TunnelDown("not connected to the helper")
        self._next_request = (self._next_request + 1) & 0xFFFFFFFF
        ident = self._next_request
        done = trio.Event()
        box: list[dict[str, Any]] = []
        self._stats_waiters[ident] = (done, box)
        try:
            await ch.send(ipc.StatsRequest(ident))
            with trio.move_on_after(timeout):
                await done.wait()
        finally:
            self._stats_waiters.pop(ident, None)
        if not box:
            raise TunnelDown("the helper did not answer the statistics request")
        return box[0]

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"stats":
            out = self.statistics().to_json()
            out["flow"] = _flow_json(self.packet_flow.statistics())
            return json.dumps(out).encode()
        if data == b"helper-stats":
            return json.dumps(await self.helper_statistics()).encode()
        return None


def _flow_json(s: Any) -> dict[str, Any]:
    return {
        k: getattr(s, k)
        for k in (
            "read_batches",
            "packets_read",
            "read_dropped_malformed",
            "write_calls",
            "packets_written",
            "write_dropped_family",
            "write_dropped_malformed",
            "write_dropped_too_big",
            "write_dropped_refused",
            "write_dropped_no_device",
        )
    }


class _Unreachable(AbstractAsyncContextManager[IpcChannel]):
    """A connector for a memory helper that is not registered: entering it fails like a dead socket."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def __aenter__(self) -> IpcChannel:
        raise TunnelDown(f"no in-memory helper is registered as {self.path!r}")

    async def __aexit__(self, *exc: object) -> None:
        return None
