"""Mirrors of Apple's flow-level proxy providers: NETransparentProxyProvider, NEAppProxyProvider, their flows and rules.

A packet tunnel sees packets; a proxy provider sees **flows**: one object per TCP connection or UDP "socket
conversation", handed to ``handle_new_flow`` before any data moves. Returning False from a
`TransparentProxyProvider` lets the flow go directly to its destination, which is Apple's supported on-device
bypass (TN3120, R52); an `AppProxyProvider` returning False refuses the flow instead.

The flows do their I/O through a small backend (`StreamIO`, `DatagramIO`): the lab's TPROXY sockets
(`netsim.runtime.proxy`) or in-memory streams (`netsim.runtime.proxy_memory`). The life cycle is the table in
`netsim.core.proxyflow`; rule matching is `netsim.core.netrules`. See docs/proxy.md.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, Protocol

from netsim.apple.enums import TrafficDirection
from netsim.apple.packet import FlowMetaData
from netsim.apple.settings import DNSSettings
from netsim.core import netrules, proxyflow
from netsim.errors import ConfigError, NetsimError

__all__ = [
    "APP_PROXY_ERROR_DOMAIN",
    "AppProxyError",
    "AppProxyFlow",
    "AppProxyFlowError",
    "AppProxyProvider",
    "AppProxyTCPFlow",
    "AppProxyUDPFlow",
    "DNSProxyProvider",
    "DatagramIO",
    "HostEndpoint",
    "NetworkRule",
    "NetworkRuleProtocol",
    "StreamIO",
    "TransparentProxyNetworkSettings",
    "TransparentProxyProvider",
]

APP_PROXY_ERROR_DOMAIN = "NEAppProxyErrorDomain"
#: the most a single ``read_data`` returns (Apple does not document a size; netsim bounds every buffer)
MAX_READ = 65536


class NetworkRuleProtocol(enum.IntEnum):
    """Mirrors NENetworkRuleProtocol (Apple: NENetworkRule.h): ANY matches TCP and UDP only."""

    ANY = 0
    TCP = 1
    UDP = 2


class AppProxyFlowError(enum.IntEnum):
    """Mirrors NEAppProxyFlowError.Code (Apple: NEAppProxyFlow.h, NEAppProxyErrorDomain)."""

    NOT_CONNECTED = 1
    PEER_RESET = 2
    HOST_UNREACHABLE = 3
    INVALID_ARGUMENT = 4
    ABORTED = 5
    REFUSED = 6
    TIMED_OUT = 7
    INTERNAL = 8
    DATAGRAM_TOO_LARGE = 9
    READ_ALREADY_PENDING = 10


class AppProxyError(NetsimError):
    """Mirrors NSError in NEAppProxyErrorDomain with an `AppProxyFlowError` code.

    Differences from Apple: raised from the awaited call instead of passed to a completion handler.

    Attributes:
        code: the `AppProxyFlowError`.
        domain: always ``"NEAppProxyErrorDomain"``.
    """

    domain = APP_PROXY_ERROR_DOMAIN

    def __init__(self, code: AppProxyFlowError | int, message: str = "") -> None:
        self.code = AppProxyFlowError(code)
        text = f"{self.code.name} ({int(self.code)})"
        super().__init__(f"{text}: {message}" if message else text)


@dataclass(frozen=True, slots=True)
class HostEndpoint:
    """Mirrors NWHostEndpoint: a host (address or name) and a port.

    Differences from Apple: ``port`` is an int (Apple: a string, where ``"0"`` and ``""`` both mean any port).
    """

    hostname: str
    port: int = 0

    def __str__(self) -> str:
        return f"[{self.hostname}]:{self.port}" if ":" in self.hostname else f"{self.hostname}:{self.port}"


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class NetworkRule:
    """Mirrors NENetworkRule: which flows a rule matches (Apple: NENetworkRule.h, R13).

    Build one with Apple's three initialisers: `NetworkRule.destination_network` (address + prefix),
    `NetworkRule.destination_host` (a hostname) or the full constructor (remote network, local network, protocol,
    direction). The matching semantics (wildcards and loopback, port 0, one-label hostnames) are in
    `netsim.core.netrules`.

    Differences from Apple: the endpoint ports are ints; ``match_remote_prefix`` / ``match_local_prefix`` are None
    where Apple returns ``NSNotFound``; a hostname rule matches a flow only when the flow carries the name the app
    connected to (in the lab's TPROXY backend flows arrive by address, so hostname rules match nothing there).
    """

    remote_network: HostEndpoint | None = None
    remote_prefix: int = 0
    local_network: HostEndpoint | None = None
    local_prefix: int = 0
    protocol: NetworkRuleProtocol = NetworkRuleProtocol.ANY
    direction: TrafficDirection = TrafficDirection.OUTBOUND
    _fields: netrules.RuleFields = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        remote_net = remote_host = local_net = None
        if self.remote_network is not None:
            if _is_address(self.remote_network.hostname):
                remote_net = self._network(self.remote_network, self.remote_prefix, "remote")
            else:
                remote_host = self.remote_network.hostname
        if self.local_network is not None:
            if not _is_address(self.local_network.hostname):
                raise ConfigError("NetworkRule local_network must contain an address, not a hostname")
            local_net = self._network(self.local_network, self.local_prefix, "local")
        fields = netrules.RuleFields(
            remote_network=remote_net,
            remote_port=self.remote_network.port if self.remote_network else 0,
            remote_hostname=remote_host,
            local_network=local_net,
            local_port=self.local_network.port if self.local_network else 0,
            protocol=int(NetworkRuleProtocol(self.protocol)),
            direction=int(TrafficDirection(self.direction)),
        )
        object.__setattr__(self, "_fields", fields)

    @staticmethod
    def _network(endpoint: HostEndpoint, prefix: int, which: str) -> netrules.Network:
        bits = 32 if ":" not in endpoint.hostname else 128
        if not 0 <= prefix <= bits:
            raise ConfigError(f"NetworkRule {which} prefix {prefix} is out of range 0..{bits}")
        if not 0 <= endpoint.port <= 65535:
            raise ConfigError(f"NetworkRule {which} port {endpoint.port} is out of range 0..65535")
        return netrules.parse_network(endpoint.hostname, prefix)

    @classmethod
    def destination_network(
        cls, endpoint: HostEndpoint, prefix: int, protocol: NetworkRuleProtocol = NetworkRuleProtocol.ANY
    ) -> NetworkRule:
        """Apple: ``init(destinationNetwork:prefix:protocol:)``; the endpoint must hold an address."""
        if not _is_address(endpoint.hostname):
            raise ConfigError(
                f"destination_network needs an address, not {endpoint.hostname!r}; use destination_host for names"
            )
        return cls(remote_network=endpoint, remote_prefix=prefix, protocol=protocol)

    @classmethod
    def destination_host(
        cls, endpoint: HostEndpoint, protocol: NetworkRuleProtocol = NetworkRuleProtocol.ANY
    ) -> NetworkRule:
        """Apple: ``init(destinationHost:protocol:)``; the endpoint must hold a hostname."""
        if _is_address(endpoint.hostname):
            raise ConfigError(f"destination_host needs a hostname, not the address {endpoint.hostname!r}")
        return cls(remote_network=endpoint, protocol=protocol)

    @property
    def match_remote_endpoint(self) -> HostEndpoint | None:
        """Apple: ``matchRemoteEndpoint``."""
        return self.remote_network

    @property
    def match_remote_prefix(self) -> int | None:
        """Apple: ``matchRemotePrefix`` (None where Apple has NSNotFound: no address in the remote endpoint)."""
        return self.remote_prefix if self._fields.remote_network is not None else None

    @property
    def match_local_network(self) -> HostEndpoint | None:
        """Apple: ``matchLocalNetwork``."""
        return self.local_network

    @property
    def match_local_prefix(self) -> int | None:
        """Apple: ``matchLocalPrefix`` (None where Apple has NSNotFound)."""
        return self.local_prefix if self.local_network is not None else None

    @property
    def match_protocol(self) -> NetworkRuleProtocol:
        """Apple: ``matchProtocol``."""
        return NetworkRuleProtocol(self.protocol)

    @property
    def match_direction(self) -> TrafficDirection:
        """Apple: ``matchDirection``."""
        return TrafficDirection(self.direction)

    @property
    def fields(self) -> netrules.RuleFields:
        """The compiled, matchable form (`netsim.core.netrules.RuleFields`)."""
        return self._fields

    def matches(self, flow: netrules.FlowKey) -> bool:
        """Whether this rule matches ``flow`` (`netsim.core.netrules.rule_matches`)."""
        return netrules.rule_matches(self._fields, flow)


@dataclass
class TransparentProxyNetworkSettings:
    """Mirrors NETransparentProxyNetworkSettings: which flows the proxy gets (Apple: R50, R51).

    Exclusion rules take priority: a flow matching any ``excluded_network_rules`` is not proxied; otherwise it
    is proxied when it matches any ``included_network_rules`` (`netsim.core.netrules.decide`). `validate` applies
    Apple's documented restrictions on included rules and raises `ConfigError` naming the rule and the fix.

    Differences from Apple: Apple ignores the inherited DNS and proxy settings here; netsim does not model them.
    ``tunnel_remote_address`` is carried as data.
    """

    tunnel_remote_address: str = "127.0.0.1"
    included_network_rules: list[NetworkRule] | None = None
    excluded_network_rules: list[NetworkRule] | None = None

    def validate(self) -> None:
        """Raise `ConfigError` for an included rule Apple's restrictions forbid (R51)."""
        for i, rule in enumerate(self.included_network_rules or []):
            problems = netrules.included_rule_problems(rule.fields)
            if problems:
                raise ConfigError(f"included_network_rules[{i}]: " + "; ".join(problems))

    def decide(self, flow: netrules.FlowKey) -> netrules.ClaimDecision:
        """Whether the system hands ``flow`` to the proxy, and which rule decided."""
        return netrules.decide(
            [r.fields for r in self.included_network_rules or []],
            [r.fields for r in self.excluded_network_rules or []],
            flow,
        )


class StreamIO(Protocol):
    """The byte-stream backend of an `AppProxyTCPFlow` (a trio stream satisfies it)."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...
    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...
    async def send_eof(self) -> None: ...
    async def aclose(self) -> None: ...


class DatagramIO(Protocol):
    """The datagram backend of an `AppProxyUDPFlow`: datagrams with the remote endpoint each goes to or came from."""

    async def receive_datagrams(self) -> list[tuple[bytes, HostEndpoint]]: ...
    async def send_datagrams(self, datagrams: Sequence[tuple[bytes, HostEndpoint]]) -> None: ...
    async def aclose(self) -> None: ...


class AppProxyFlow:
    """Mirrors NEAppProxyFlow: the shared life cycle of a proxied flow (Apple: NEAppProxyFlow.h).

    Unopened when handed to ``handle_new_flow``; `open` before any data; `close_read` / `close_write` when done
    (the transition table is `netsim.core.proxyflow.TRANSITIONS`). Misuse (data before open, after close) raises
    `AppProxyError` with Apple's code.

    Differences from Apple: async calls instead of completion handlers; ``source_uid`` (netsim: the uid that owns
    the app's socket, from which `meta_data` is derived) has no Apple counterpart beyond the audit token.
    """

    def __init__(self, meta_data: FlowMetaData, *, remote_hostname: str | None = None, source_uid: int | None = None):
        self.meta_data = meta_data
        self.remote_hostname = remote_hostname
        self.source_uid = source_uid
        self.state = proxyflow.NEW
        self.close_errors: dict[str, AppProxyFlowError | None] = {}

    def _step(self, operation: str) -> None:
        nxt = proxyflow.next_state(self.state, operation)
        if isinstance(nxt, int):
            raise AppProxyError(nxt, f"{operation} on a {self.state} flow")
        self.state = nxt

    @property
    def is_open(self) -> bool:
        """Netsim: whether `open` succeeded and the flow is not closed yet."""
        return self.state in (proxyflow.OPEN, proxyflow.READ_CLOSED, proxyflow.WRITE_CLOSED)

    async def open(self, local_endpoint: HostEndpoint | None = None) -> None:
        """Apple: ``open(withLocalEndpoint:completionHandler:)``; netsim ignores ``local_endpoint`` (the app's
        socket is already bound, the case where Apple ignores it too)."""
        self._step("open")

    async def close_read(self, error: AppProxyFlowError | None = None) -> None:
        """Apple: ``closeReadWithError(_:)``: no more data will be read from the flow."""
        self.close_errors.setdefault("read", error)
        self._step("close_read")
        await self._closed_direction("read", error)

    async def close_write(self, error: AppProxyFlowError | None = None) -> None:
        """Apple: ``closeWriteWithError(_:)``: no more data will be written (the app reads EOF, or a reset when
        ``error`` is set)."""
        self.close_errors.setdefault("write", error)
        self._step("close_write")
        await self._closed_direction("write", error)

    async def _closed_direction(self, direction: str, error: AppProxyFlowError | None) -> None:
        raise NotImplementedError


class AppProxyTCPFlow(AppProxyFlow):
    """Mirrors NEAppProxyTCPFlow: a TCP connection to proxy (Apple: NEAppProxyTCPFlow.h).

    Has ``remote_endpoint`` (where the app connected) and, as on Apple, **no** ``local_endpoint``: the forum's
    "why is localEndpoint not available for NEAppProxyTCPFlow" has the same answer here. Identify the source by
    `meta_data` (Apple: ``sourceAppAuditToken``), not by the source port.

    Differences from Apple: ``read_data`` returns ``b""`` at end of stream (Apple: empty Data) and at most
    `MAX_READ` bytes; closing with an error closes the app's connection (the error is kept in ``close_errors``).
    """

    def __init__(
        self,
        io: StreamIO,
        remote_endpoint: HostEndpoint,
        meta_data: FlowMetaData,
        *,
        remote_hostname: str | None = None,
        source_uid: int | None = None,
    ) -> None:
        super().__init__(meta_data, remote_hostname=remote_hostname, source_uid=source_uid)
        self._io = io
        self.remote_endpoint = remote_endpoint
        self.bytes_read = 0
        self.bytes_written = 0

    async def read_data(self) -> bytes:
        """Apple: ``readData(completionHandler:)``: the next bytes the app sent, ``b""`` at its end of stream."""
        self._step("read")
        data = bytes(await self._io.receive_some(MAX_READ))
        self.bytes_read += len(data)
        return data

    async def write_data(self, data: bytes | bytearray | memoryview) -> None:
        """Apple: ``write(_:withCompletionHandler:)``: bytes for the app to read."""
        self._step("write")
        await self._io.send_all(data)
        self.bytes_written += len(data)

    async def _closed_direction(self, direction: str, error: AppProxyFlowError | None) -> None:
        if direction == "write" and error is None and self.state != proxyflow.CLOSED:
            await self._io.send_eof()
        if self.state == proxyflow.CLOSED or error is not None:
            await self._io.aclose()

    def __repr__(self) -> str:
        return f"AppProxyTCPFlow(remote={self.remote_endpoint}, app={self.meta_data.source_app_signing_identifier!r})"


class AppProxyUDPFlow(AppProxyFlow):
    """Mirrors NEAppProxyUDPFlow: the datagrams of one app UDP socket (Apple: NEAppProxyUDPFlow.h).

    Has ``local_endpoint`` (the app socket's address and port, as on Apple); each datagram carries its remote
    endpoint, because one UDP socket may talk to many. ``initial_remote_endpoint`` is where the first datagram
    goes (Apple passes it to ``handleNewUDPFlow(_:initialRemoteEndpoint:)``).

    Differences from Apple: ``read_datagrams`` returns at most the backend's batch (bounded), ``[]`` once the
    flow's backend has closed.
    """

    def __init__(
        self,
        io: DatagramIO,
        local_endpoint: HostEndpoint,
        meta_data: FlowMetaData,
        *,
        initial_remote_endpoint: HostEndpoint | None = None,
        remote_hostname: str | None = None,
        source_uid: int | None = None,
    ) -> None:
        super().__init__(meta_data, remote_hostname=remote_hostname, source_uid=source_uid)
        self._io = io
        self.local_endpoint = local_endpoint
        self.initial_remote_endpoint = initial_remote_endpoint
        self.datagrams_read = 0
        self.datagrams_written = 0

    async def read_datagrams(self) -> list[tuple[bytes, HostEndpoint]]:
        """Apple: ``readDatagrams(completionHandler:)``: (payload, remote endpoint) pairs the app sent."""
        self._step("read")
        batch = await self._io.receive_datagrams()
        self.datagrams_read += len(batch)
        return batch

    async def write_datagrams(self, datagrams: Sequence[tuple[bytes, HostEndpoint]]) -> None:
        """Apple: ``writeDatagrams(_:sentBy:completionHandler:)``: datagrams for the app, each from an endpoint."""
        self._step("write")
        await self._io.send_datagrams(datagrams)
        self.datagrams_written += len(datagrams)

    async def _closed_direction(self, direction: str, error: AppProxyFlowError | None) -> None:
        if self.state == proxyflow.CLOSED or error is not None:
            await self._io.aclose()

    def __repr__(self) -> str:
        return f"AppProxyUDPFlow(local={self.local_endpoint}, app={self.meta_data.source_app_signing_identifier!r})"


FlowHandler = Callable[[Any], Awaitable[None]]


class AppProxyProvider:
    """Mirrors NEAppProxyProvider: the provider an app proxy extension subclasses (Apple: NEAppProxyProvider.h).

    Override `start_proxy`, `stop_proxy` and `handle_new_flow`. ``handle_new_flow`` answers at once (as Apple's
    returns a Bool): True claims the flow, which the provider then serves, typically with
    ``self.run_flow(flow, handler)``; False **refuses** it (the app sees "connection refused").

    Differences from Apple: `run_flow` is netsim's task spawner (Apple providers use dispatch queues): the host
    runs ``await handler(flow)`` and then closes the flow; an exception in it closes only that flow, with
    ``INTERNAL``. `create_tcp_connection` / `create_udp_session` (Apple: ``NEProvider.createTCPConnection``,
    ``createUDPSession``) open sockets the system does not capture again.
    """

    #: what returning False from `handle_new_flow` means for this provider type
    declines_go_direct = False

    def __init__(self) -> None:
        self.network_settings: TransparentProxyNetworkSettings | None = None
        self._host: Any = None  # bound by the provider host (netsim.runtime.proxy / proxy_memory)

    async def start_proxy(self, options: dict[str, Any] | None) -> None:
        """Apple: ``startProxy(options:completionHandler:)``. Call `set_tunnel_network_settings` here."""

    async def stop_proxy(self, reason: int) -> None:
        """Apple: ``stopProxy(with:completionHandler:)``."""

    def handle_new_flow(self, flow: AppProxyFlow) -> bool:
        """Apple: ``handleNewFlow(_:)``. Default: decline every flow."""
        return False

    async def set_tunnel_network_settings(self, settings: TransparentProxyNetworkSettings | None) -> None:
        """Apple: ``setTunnelNetworkSettings(_:completionHandler:)``: which flows come to this provider."""
        if settings is not None:
            settings.validate()
        self.network_settings = settings
        if self._host is not None:
            await self._host.apply_settings(settings)

    def run_flow(self, flow: AppProxyFlow, handler: FlowHandler) -> None:
        """Netsim: serve a claimed flow with ``await handler(flow)`` in the host (see the class docstring)."""
        self._require_host().run_flow(flow, handler)

    async def create_tcp_connection(self, endpoint: HostEndpoint) -> StreamIO:
        """Apple: ``NEProvider.createTCPConnection(to:...)``: a connection from the provider itself, never
        captured by its own rules."""
        stream: StreamIO = await self._require_host().create_tcp_connection(endpoint)
        return stream

    async def create_udp_session(self, endpoint: HostEndpoint) -> DatagramIO:
        """Apple: ``NEProvider.createUDPSession(to:from:)``: datagrams to ``endpoint`` from the provider itself."""
        session: DatagramIO = await self._require_host().create_udp_session(endpoint)
        return session

    def _require_host(self) -> Any:
        if self._host is None:
            raise NetsimError("this provider is not running in a host; start it with netsim.runtime.proxy")
        return self._host


class TransparentProxyProvider(AppProxyProvider):
    """Mirrors NETransparentProxyProvider (macOS 11+, Apple: R52): returning False from `handle_new_flow` lets
    the flow proceed directly to its destination, Apple's supported per-flow bypass (TN3120).

    Differences from Apple: in the lab, a TCP flow is decided at its SYN (queued before TPROXY answers it), so a
    declined TCP flow continues as the app's own connection, as on Apple, at the cost of one round trip through
    the host per handshake; when the host's queue is full or it is not reading, new connections go direct
    without the provider (fail open). A declined UDP flow has already been taken by TPROXY, so the host relays it
    on the app's behalf (from a provider socket, not the app's); on Apple the system hands the app's socket back.
    See docs/proxy.md.
    """

    declines_go_direct = True


class DNSProxyProvider(AppProxyProvider):
    """Mirrors NEDNSProxyProvider: every DNS flow (an app socket to UDP or TCP port 53) comes to the provider
    (Apple: NEDNSProxyProvider, macOS 10.15+).

    The system chooses the flows, not the provider: there are no claim rules, and returning False from
    `handle_new_flow` **terminates** the flow (Apple DTS: "NEDNSProxyProvider and NEAppProxyProvider do not allow
    for selectively handling flows"). ``system_dns_settings`` are the resolvers the system would have used
    (Apple: ``systemDNSSettings``), so the provider can forward there.

    Differences from Apple: in the lab the host intercepts the flows to the Mac's own resolver (``127.0.0.53``
    and ``::1`` port 53, where every app's resolution goes), not an app's socket to a server it names itself;
    ``set_tunnel_network_settings`` is not used.
    """

    declines_go_direct = False
    #: Apple: ``systemDNSSettings``; set by the host before ``start_proxy``
    system_dns_settings: list[DNSSettings] | None = None
