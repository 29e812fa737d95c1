"""`HelperClient`: the public, typed API a `PacketTunnelProvider` uses to talk to the netsim helper.

Theory of operation
-------------------
A provider that forwards its utun to the helper needs four things: connect (with the per-tunnel token from
``provider_configuration``), receive the helper's SETTINGS and turn them into `PacketTunnelNetworkSettings`, move
packet batches both ways, and ask the helper for its statistics. This module is exactly that, with no IPC event
classes, no channel and no SETTINGS JSON in sight:

* `open_helper_client(provider_configuration)` (an async context manager) connects, waits for the helper's first
  SETTINGS and yields a `HelperClient` whose `HelperClient.settings` holds them; leaving the block says GOODBYE.
* `start_helper_client(provider)` does the same for the life of a tunnel: call it from ``start_tunnel``; it
  applies the settings with ``set_tunnel_network_settings`` (optionally through your ``on_settings``) and
  returns the connected client. The connection lives in one of the provider's ``start_soon`` tasks.
* `HelperClient.send_packets(packets, families)` sends one batch as one IPC frame (scatter-gather ``sendmsg``,
  never blocks: a batch the socket cannot take is queued, bounded, or dropped and counted), the shape
  ``packet_flow.read_packets()`` returns.
* `HelperClient.receive_packets()` waits for the next inbound batch and returns ``(packets, families)``, the
  shape ``packet_flow.write_packets`` takes (memoryviews into the receive buffer, valid until the next call).
  Control frames are handled inside it: PING is answered, statistics answers and PONGs go to their waiters, a
  changed SETTINGS goes to ``on_settings``. So one task must run the inbound loop; that task is also the one
  that wakes per batch (one trio wakeup per inbound batch, no per-packet objects).
* `HelperClient.helper_statistics()` and `HelperClient.ping()` are requests answered through that loop.

Reconnecting is the provider's policy, not the client's: when the connection ends `receive_packets` raises
`TunnelDown` (or `RemoteProtocolError` for a helper that broke the protocol; the connection is then closed and
the helper told why) and the provider either fails the tunnel or opens a new client
(`netsim.runtime.forwarding.HelperForwardingProvider` reasserts and reconnects with backoff; it is built on this
module).

``provider_configuration`` keys read here (`HelperClientConfig`): ``helper_socket`` (required; a path, or
``memory:<name>`` for the in-memory backend), ``token_file``, ``connect_timeout`` (10 s), ``backoff_max`` (1 s),
``ping_interval`` (5 s; 0 turns liveness off) and ``ping_timeout`` (10 s). `netsim_tunnel` and `memory_tunnel`
set ``helper_socket`` and ``token_file`` for any provider.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_interface, ip_network
from typing import TYPE_CHECKING, Any

import trio

from netsim.apple.settings import (
    DNSSettings,
    IPv4Route,
    IPv4Settings,
    IPv6Route,
    IPv6Settings,
    PacketTunnelNetworkSettings,
)
from netsim.core import ipc
from netsim.core.ledger import Ledger
from netsim.errors import ConfigError, LocalProtocolError, RemoteProtocolError, TunnelDown
from netsim.runtime.channel import IpcChannel, IpcChannelStatistics, connect_ipc_unix
from netsim.transports.uds import read_token_file

if TYPE_CHECKING:
    from netsim.runtime.provider import PacketTunnelProvider

__all__ = [
    "MEMORY_SCHEME",
    "HelperBusy",
    "HelperClient",
    "HelperClientConfig",
    "SettingsCallback",
    "open_helper_channel",
    "open_helper_client",
    "register_memory_helper",
    "settings_from_payload",
    "start_helper_client",
    "unregister_memory_helper",
]

#: ``helper_socket`` values starting with this name an in-process helper (`register_memory_helper`).
MEMORY_SCHEME = "memory:"
Connector = Callable[[Ledger], AbstractAsyncContextManager[IpcChannel]]
SettingsCallback = Callable[[PacketTunnelNetworkSettings], Awaitable[None]]
"""``async def on_settings(settings)``: called with the helper's settings, first and whenever they change."""

_MEMORY_HELPERS: dict[str, Connector] = {}
_MAX_NONCE = (1 << 63) - 1  # the connection's own liveness PINGs use the top bit


class HelperBusy(TunnelDown):
    """The helper refused the connection with ERROR BUSY: it already serves another provider."""


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


def _seconds(conf: Mapping[str, Any], key: str, default: float) -> float:
    value = conf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"provider_configuration[{key!r}] must be a number of seconds >= 0, not {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class HelperClientConfig:
    """How to reach the helper, read from ``provider_configuration`` (`from_provider_configuration`).

    Attributes:
        helper_socket: the helper's Unix socket path, or ``memory:<name>`` (the in-memory backend).
        token_file: a 0600 file with the per-tunnel secret the helper checks in HELLO (None: no token).
        connect_timeout: seconds to reach the helper and get its SETTINGS.
        backoff_max: the longest pause between connection attempts while the socket is absent.
        ping_interval: seconds between liveness PINGs (0: off); a helper silent for ``ping_timeout`` is dead.
        ping_timeout: see ``ping_interval``.
    """

    helper_socket: str
    token_file: str | None = None
    connect_timeout: float = 10.0
    backoff_max: float = 1.0
    ping_interval: float = ipc.DEFAULT_PING_INTERVAL
    ping_timeout: float = ipc.DEFAULT_PING_TIMEOUT

    @classmethod
    def from_provider_configuration(cls, conf: Mapping[str, Any] | None) -> HelperClientConfig:
        """Read the keys from Apple's ``providerConfiguration`` (other keys are the provider's own, ignored).

        Raises:
            ConfigError: ``helper_socket`` missing, or a value of the wrong type (names the key).
        """
        conf = conf or {}
        socket_path = conf.get("helper_socket")
        if not isinstance(socket_path, str) or not socket_path:
            raise ConfigError("provider_configuration['helper_socket'] must name the helper's socket path")
        token = conf.get("token_file")
        if token is not None and not isinstance(token, str):
            raise ConfigError(f"provider_configuration['token_file'] must be a path string, not {token!r}")
        return cls(
            helper_socket=socket_path,
            token_file=token or None,
            connect_timeout=_seconds(conf, "connect_timeout", 10.0),
            backoff_max=_seconds(conf, "backoff_max", 1.0),
            ping_interval=_seconds(conf, "ping_interval", ipc.DEFAULT_PING_INTERVAL),
            ping_timeout=_seconds(conf, "ping_timeout", ipc.DEFAULT_PING_TIMEOUT),
        )

    def connection(self) -> ipc.Connection:
        """The provider end of the IPC: the token (read from ``token_file`` now) and liveness PINGs."""
        return ipc.Connection(
            ipc.Role.PROVIDER,
            capabilities=ipc.ALL_CAPABILITIES,
            token=read_token_file(self.token_file) if self.token_file else None,
            ping_interval=self.ping_interval if self.ping_interval > 0 else None,
            ping_timeout=self.ping_timeout,
        )


def open_helper_channel(
    config: HelperClientConfig, *, retry_for: float | None = None, ledger: Ledger | None = None
) -> AbstractAsyncContextManager[IpcChannel]:
    """The raw, handshaken IPC channel to the helper (the layer below `HelperClient`; most code never needs it).

    ``retry_for`` (default ``config.connect_timeout``) bounds the wait for an absent socket; ``ledger`` receives
    the channel's ``ipc_out`` stage.
    """
    path = config.helper_socket
    if path.startswith(MEMORY_SCHEME):
        connector = _MEMORY_HELPERS.get(path[len(MEMORY_SCHEME) :])
        if connector is None:
            return _Unreachable(path)
        return connector(ledger if ledger is not None else Ledger("provider", ("ipc_out",)))
    return connect_ipc_unix(
        path,
        connection=config.connection(),
        retry_for=config.connect_timeout if retry_for is None else retry_for,
        backoff_max=config.backoff_max,
        ledger=ledger,
    )


class HelperClient:
    """A provider's connection to the netsim helper: settings in, packet batches both ways, statistics.

    Get one from `open_helper_client` or `start_helper_client` (they connect and wait for SETTINGS). Only one
    task may call `receive_packets` at a time; any task may call `send_packets`, `helper_statistics`, `ping`.

    Args:
        channel: a handshaken IPC channel (`open_helper_channel`).
        on_settings: awaited with the helper's settings when `wait_settings` receives them and whenever the
            helper sends different ones (its policy changed the route exclusions).
    """

    def __init__(self, channel: IpcChannel, *, on_settings: SettingsCallback | None = None) -> None:
        self.channel = channel
        self.on_settings = on_settings
        self.settings: PacketTunnelNetworkSettings | None = None
        """The helper's latest settings (None until `wait_settings` returned)."""
        self.settings_received = 0
        """SETTINGS frames that changed the settings (the first one included)."""
        self._settings_payload: bytes | None = None
        self._waiters: dict[tuple[str, int], tuple[trio.Event, list[Any]]] = {}
        self._next_id = 0
        self._closed: BaseException | None = None
        self._done = trio.Event()

    # -- state -----------------------------------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        """False once the connection ended (packets sent then are dropped and counted as ``ipc_closed``)."""
        return self._closed is None and not self.channel.is_broken

    def statistics(self) -> IpcChannelStatistics:
        """The connection's counters: frames and bytes each way, and the ``ipc_out`` ledger stage (what was
        written, dropped ``ipc_queue_full`` / ``ipc_closed`` / ``ipc_local_error``, queued)."""
        return self.channel.statistics()

    async def wait_closed(self) -> None:
        """Return once the connection ended (`receive_packets` saw its end, or `aclose` ran)."""
        await self._done.wait()

    # -- settings --------------------------------------------------------------------------------------------
    async def wait_settings(self, timeout: float = 10.0) -> PacketTunnelNetworkSettings:
        """Receive the helper's first frame, which must be SETTINGS, and return them (``on_settings`` first).

        Raises:
            HelperBusy: the helper serves another provider (ERROR BUSY).
            TunnelDown: the helper closed, or sent nothing within ``timeout`` seconds.
            RemoteProtocolError: the helper sent something else first, or bad SETTINGS (connection closed).
            ConfigError: the SETTINGS are well-formed JSON but not netsim's (names the field).
        """
        ev: ipc.Event | None = None
        with trio.move_on_after(timeout):
            try:
                ev = await self.channel.receive_event()
            except RemoteProtocolError as exc:  # a malformed frame: the channel told the helper and closed
                raise self._end(exc) from None
        if ev is None:
            self.channel.close()
            raise self._end(TunnelDown(f"the helper sent no SETTINGS within {timeout:g} s"))
        if isinstance(ev, ipc.Error) and ev.code == ipc.ErrorCode.BUSY:
            raise self._end(HelperBusy(f"the helper refused the connection with BUSY ({ev.message})"))
        if isinstance(ev, ipc.Error | ipc.Goodbye | ipc.ConnectionClosed):
            raise self._end(TunnelDown(f"the helper closed the connection before SETTINGS: {ev!r}"))
        if not isinstance(ev, ipc.Settings):
            self.channel.close()
            raise self._end(RemoteProtocolError("no_settings", f"the helper sent {type(ev).__name__} before SETTINGS"))
        await self._settings(ev)
        assert self.settings is not None
        return self.settings

    async def _settings(self, ev: ipc.Settings) -> None:
        if ev.payload == self._settings_payload:
            return
        try:
            payload = json.loads(ev.payload)
        except ValueError as exc:
            payload = exc
        if not isinstance(payload, dict):
            self.channel.close()
            detail = str(payload) if isinstance(payload, ValueError) else "SETTINGS must be a JSON object"
            raise self._end(RemoteProtocolError("bad_settings", detail))
        try:
            settings = settings_from_payload(payload)
        except ConfigError as exc:  # JSON, but not a netsim helper's settings: names the field
            self.channel.close()
            raise self._end(exc) from None
        self._settings_payload = ev.payload
        self.settings = settings
        self.settings_received += 1
        if self.on_settings is not None:
            await self.on_settings(copy.deepcopy(settings))

    # -- packets ---------------------------------------------------------------------------------------------
    def send_packets(self, packets: Sequence[ipc.Buffer], families: Sequence[int] | int) -> bool:
        """Send one batch (parallel lists, as ``packet_flow.read_packets()`` returns) as one IPC frame.

        Never blocks: the batch is written at once if the socket takes it, else queued (bounded). Returns False
        when it was dropped (queue full, connection closed); the channel's ``ipc_out`` ledger stage counts it.
        Buffers must not be changed until written (``bytes`` and the flow's read buffers are fine). Never raises.
        """
        try:
            return self.channel.send_packets_nowait(packets, families)
        except LocalProtocolError:  # the connection is closing (GOODBYE sent): counted as ipc_local_error
            return False

    async def receive_packets(self) -> tuple[list[memoryview], Sequence[int]]:
        """Wait for the next inbound batch: ``(packets, families)``, as ``packet_flow.write_packets`` takes.

        The packets are views into the receive buffer, valid until the next call. Control frames are handled
        here (PING answered, statistics answers and PONGs delivered, changed SETTINGS to ``on_settings``).

        Raises:
            TunnelDown: the helper closed the connection (GOODBYE, ERROR, EOF); `is_connected` is then False.
            RemoteProtocolError: the helper broke the protocol (a malformed frame, bad SETTINGS): the connection
                is closed (the helper is sent an ERROR naming the reason).
        """
        if self._closed is not None:
            raise self._closed
        receive = self.channel.receive_event
        while True:
            try:
                ev = await receive()
            except RemoteProtocolError as exc:
                raise self._end(exc) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._end(TunnelDown(f"the helper connection broke: {exc!r}")) from None
            if isinstance(ev, ipc.PacketBatch):
                return ev.packets(), ev.families
            await self._control(ev)

    async def _control(self, ev: ipc.Event) -> None:
        if isinstance(ev, ipc.Settings):
            await self._settings(ev)
        elif isinstance(ev, ipc.StatsResponse):
            self._deliver(("stats", ev.request_id), ev.stats)
        elif isinstance(ev, ipc.Pong):
            self._deliver(("pong", ev.nonce), trio.current_time())
        elif isinstance(ev, ipc.Ping):
            await self.channel.send(ipc.Pong(ev.nonce))
        elif isinstance(ev, ipc.Goodbye | ipc.Error | ipc.ConnectionClosed):
            raise self._end(TunnelDown(f"the helper closed the connection: {ev!r}"))
        # anything else a helper may send (POLICY_RESULT...) is not the data plane's business

    # -- requests --------------------------------------------------------------------------------------------
    async def helper_statistics(self, timeout: float = 5.0) -> dict[str, Any]:
        """Ask the helper for its statistics (`netsim.runtime.statistics.HelperStatistics` as JSON).

        The answer arrives through `receive_packets`, so the inbound loop must be running.

        Raises:
            TunnelDown: the connection ended, or no answer within ``timeout`` seconds.
        """
        ident = self._new_id()
        stats: dict[str, Any] = await self._request(("stats", ident), ipc.StatsRequest(ident), timeout, "statistics")
        return stats

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip a PING to the helper; returns the seconds it took (answered through `receive_packets`).

        Raises:
            TunnelDown: the connection ended, or no PONG within ``timeout`` seconds.
        """
        nonce = self._new_id()
        sent = trio.current_time()
        answered: float = await self._request(("pong", nonce), ipc.Ping(nonce), timeout, "PING")
        return answered - sent

    def _new_id(self) -> int:
        self._next_id = self._next_id + 1 if self._next_id < _MAX_NONCE else 1
        return self._next_id

    async def _request(self, key: tuple[str, int], request: ipc.Event, timeout: float, what: str) -> Any:
        if not self.is_connected:
            raise TunnelDown(f"not connected to the helper ({self._closed or 'connection closed'})")
        done = trio.Event()
        box: list[Any] = []
        self._waiters[key] = (done, box)
        try:
            await self.channel.send(request)
            with trio.move_on_after(timeout):
                await done.wait()
        finally:
            self._waiters.pop(key, None)
        if not box:
            raise TunnelDown(f"the helper did not answer the {what} ({self._closed or f'{timeout:g} s'})")
        return box[0]

    def _deliver(self, key: tuple[str, int], value: Any) -> None:
        waiter = self._waiters.pop(key, None)
        if waiter is not None:
            waiter[1].append(value)
            waiter[0].set()

    # -- closing ---------------------------------------------------------------------------------------------
    def _end(self, exc: BaseException) -> BaseException:
        """Record why the connection ended (the first reason wins), wake every waiter; returns the reason."""
        if self._closed is None:
            self._closed = exc
        for done, _ in self._waiters.values():
            done.set()
        self._waiters.clear()
        self._done.set()
        return self._closed

    async def aclose(self, message: str = "tunnel stopping") -> None:
        """Say GOODBYE (bounded by 1 s) and close; idempotent."""
        self._end(TunnelDown("closed by the provider"))
        with trio.move_on_after(1.0):
            await self.channel.aclose(ipc.Goodbye(ipc.GoodbyeReason.SHUTDOWN, message))


@asynccontextmanager
async def open_helper_client(
    provider_configuration: Mapping[str, Any] | HelperClientConfig | None,
    *,
    on_settings: SettingsCallback | None = None,
    retry_for: float | None = None,
    ledger: Ledger | None = None,
) -> AsyncIterator[HelperClient]:
    """Connect to the helper, wait for its SETTINGS, yield the `HelperClient`; GOODBYE and close on exit.

    Args:
        provider_configuration: Apple's ``providerConfiguration`` (``protocol_configuration.
            provider_configuration``), or a `HelperClientConfig`.
        on_settings: see `HelperClient` (called once before this yields, then on every change).
        retry_for: seconds to wait for an absent socket (default ``connect_timeout``).
        ledger: where the channel's ``ipc_out`` stage is counted.

    Raises:
        ConfigError: a bad ``provider_configuration`` (before any I/O).
        HelperBusy: the helper serves another provider.
        TunnelDown: unreachable, closed, or no SETTINGS within ``connect_timeout``.
        RemoteProtocolError: the helper broke the protocol.
    """
    config = (
        provider_configuration
        if isinstance(provider_configuration, HelperClientConfig)
        else HelperClientConfig.from_provider_configuration(provider_configuration)
    )
    try:
        async with open_helper_channel(config, retry_for=retry_for, ledger=ledger) as channel:
            client = HelperClient(channel, on_settings=on_settings)
            await client.wait_settings(config.connect_timeout)
            try:
                yield client
            finally:
                client._end(TunnelDown("closed by the provider"))
    except RemoteProtocolError as exc:
        if exc.reason != "peer_busy":
            raise
        raise HelperBusy(f"the helper at {config.helper_socket} refused the connection with BUSY") from None
    except BaseExceptionGroup as group:  # a connector's nursery wrapped our own error: hand it back bare
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None


def _single_leaf(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """The one `Exception` a chain of one-member groups holds, else None (Cancelled and the like stay grouped)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        if len(leaf.exceptions) != 1:
            return None
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, Exception) else None


async def start_helper_client(
    provider: PacketTunnelProvider,
    *,
    on_settings: SettingsCallback | None = None,
    ledger: Ledger | None = None,
) -> HelperClient:
    """Connect for the life of the tunnel and apply the helper's settings; call it from ``start_tunnel``.

    The connection runs in a ``provider.start_soon`` task (closed when the tunnel stops); the settings are
    applied with ``provider.set_tunnel_network_settings``, or handed to ``on_settings`` (to change them first;
    it must apply them itself), first and whenever the helper changes them. Returns once they are applied.
    When the connection ends, `HelperClient.receive_packets` raises; a provider that lets that escape its
    ``start_soon`` task stops the tunnel with that error (no reconnect: `HelperForwardingProvider` has one).

    The first connection raises what `open_helper_client` raises (`HelperBusy`, `TunnelDown`, `ConfigError`,
    `RemoteProtocolError`).
    """
    apply = on_settings or provider.set_tunnel_network_settings
    conf = provider.protocol_configuration.provider_configuration
    ready = trio.Event()
    box: list[HelperClient | BaseException] = []

    async def hold() -> None:
        try:
            async with open_helper_client(conf, on_settings=apply, ledger=ledger) as client:
                box.append(client)
                ready.set()
                await client.wait_closed()
        except Exception as exc:
            if ready.is_set():
                raise  # a later failure (e.g. SETTINGS that do not apply): the tunnel fails with it
            box.append(exc)
        finally:
            ready.set()

    provider.start_soon(hold)
    await ready.wait()
    result = box[0] if box else TunnelDown("the helper connection was cancelled")
    if isinstance(result, BaseException):
        raise result
    return result


class _Unreachable(AbstractAsyncContextManager[IpcChannel]):
    """A connector for a memory helper that is not registered: entering it fails like a dead socket."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def __aenter__(self) -> IpcChannel:
        raise TunnelDown(f"no in-memory helper is registered as {self.path!r}")

    async def __aexit__(self, *exc: object) -> None:
        return None
