"""An in-memory backend for proxy providers: apps, the claim rules and servers, all in one trio process.

The same `ProxyHost` logic as the lab (``handle_new_flow``, direct relays, isolation), with the kernel's part
played here: an app's `MemoryProxyHost.connect_tcp` / `MemoryProxyHost.udp_socket` is matched against the
provider's `TransparentProxyNetworkSettings` (`netsim.core.netrules.decide`); unclaimed flows reach the server
directly, claimed ones become flows for the provider. Each server connection is logged with who opened it
(``"app"`` or ``"provider"``), the in-memory analogue of the lab's captures.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

import trio
import trio.testing

from netsim.apple.protocol import AppRule
from netsim.apple.proxy import (
    AppProxyProvider,
    AppProxyTCPFlow,
    AppProxyUDPFlow,
    DatagramIO,
    HostEndpoint,
    StreamIO,
)
from netsim.core.netrules import FlowKey
from netsim.runtime.proxy import DatagramQueue, ProxyHost, metadata_for_uid

__all__ = ["MemoryProxyHost", "MemoryUDPSocket", "ServerContact", "echo_tcp_server"]

TcpServer = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]
UdpServer = Callable[[bytes], "bytes | None"]
UDP_QUEUE = 64


async def echo_tcp_server(stream: trio.abc.HalfCloseableStream) -> None:
    """A TCP echo server: every byte back, then end of stream."""
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
        await stream.send_eof()


@dataclass(frozen=True, slots=True)
class ServerContact:
    """One connection or datagram a server received: protocol, where, and who sent it (app or provider)."""

    protocol: str
    endpoint: HostEndpoint
    sender: str


class _Datagrams(DatagramQueue):
    """A `DatagramQueue` whose sends go to ``deliver``: one side of a memory UDP flow or session."""

    def __init__(self, deliver: Callable[[bytes, HostEndpoint], Awaitable[None]], host: MemoryProxyHost) -> None:
        super().__init__(host, UDP_QUEUE)
        self._deliver = deliver

    async def send_datagrams(self, datagrams: Sequence[tuple[bytes, HostEndpoint]]) -> None:
        for data, remote in datagrams:
            await self._deliver(data, remote)

    async def aclose(self) -> None:
        self.close()


class MemoryUDPSocket:
    """An app's UDP socket in the memory backend: `sendto` and `recvfrom`, as a Python socket has."""

    def __init__(self, host: MemoryProxyHost, local: HostEndpoint, uid: int | None) -> None:
        self.host, self.local, self.uid = host, local, uid
        self.inbox = _Datagrams(self._no_send, host)
        self.flow: AppProxyUDPFlow | None = None
        self._flow_io: _Datagrams | None = None

    async def _no_send(self, data: bytes, remote: HostEndpoint) -> None:
        raise RuntimeError("unreachable")

    async def sendto(self, data: bytes, remote: HostEndpoint) -> None:
        """Send one datagram: claimed by the rules -> this socket's flow; else straight to the server."""
        key = FlowKey(17, ip_address(remote.hostname), remote.port, ip_address(self.local.hostname), self.local.port)
        if not self.host.claims(key):
            reply = self.host.udp_server(remote, "app", data)
            if reply is not None:
                self.inbox.put(reply, remote)
            return
        if self._flow_io is None or self._flow_io.closed:
            self._flow_io = _Datagrams(self._to_app, self.host)
            meta = metadata_for_uid(self.uid, self.host.apps)
            self.flow = AppProxyUDPFlow(
                self._flow_io, self.local, meta, initial_remote_endpoint=remote, source_uid=self.uid
            )
            if not self.host.admit():
                return
            self.host.start(self.host.dispatch, self.flow)
        self._flow_io.put(data, remote)

    async def _to_app(self, data: bytes, remote: HostEndpoint) -> None:
        self.inbox.put(data, remote)

    async def recvfrom(self) -> tuple[bytes, HostEndpoint]:
        """The next datagram for this socket and who sent it."""
        return await self.inbox.receive_one()


class _Session:
    def __init__(self, host: MemoryProxyHost, endpoint: HostEndpoint) -> None:
        self.host, self.endpoint = host, endpoint
        self.queue = _Datagrams(self._send, host)

    async def _send(self, data: bytes, remote: HostEndpoint) -> None:
        raise RuntimeError("unreachable")

    async def receive_datagrams(self) -> list[tuple[bytes, HostEndpoint]]:
        return await self.queue.receive_datagrams()

    async def send_datagrams(self, datagrams: Sequence[tuple[bytes, HostEndpoint]]) -> None:
        for data, _ in datagrams:
            reply = self.host.udp_server(self.endpoint, "provider", data)
            if reply is not None:
                self.queue.put(reply, self.endpoint)

    async def aclose(self) -> None:
        await self.queue.aclose()


class MemoryProxyHost(ProxyHost):
    """`ProxyHost` over memory streams (see the module docstring). Use as ``async with MemoryProxyHost(...)``.

    Args:
        provider: the provider under test.
        tcp_servers: endpoint -> ``async handler(stream)`` (e.g. `echo_tcp_server`).
        udp_servers: endpoint -> ``handler(datagram) -> reply or None``.
        app_rules: apps by uid, for `FlowMetaData`.
    """

    def __init__(
        self,
        provider: AppProxyProvider,
        *,
        tcp_servers: dict[HostEndpoint, TcpServer] | None = None,
        udp_servers: dict[HostEndpoint, UdpServer] | None = None,
        app_rules: list[AppRule] | None = None,
        max_flows: int = 64,
    ) -> None:
        super().__init__(provider, app_rules=app_rules, max_flows=max_flows)
        self.tcp_servers = dict(tcp_servers or {})
        self.udp_servers = dict(udp_servers or {})
        self.contacts: list[ServerContact] = []
        self._cm: Any = None

    async def __aenter__(self) -> MemoryProxyHost:
        self._cm = trio.open_nursery()
        self.nursery = await self._cm.__aenter__()
        await self.provider.start_proxy(None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.provider.stop_proxy(0)
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()
        await self._cm.__aexit__(*exc)

    def start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a task in the host's nursery."""
        assert self.nursery is not None
        self.nursery.start_soon(fn, *args)

    def claims(self, key: FlowKey) -> bool:
        """Whether the provider's settings claim ``key`` (no settings: nothing is claimed)."""
        return self.settings is not None and self.settings.decide(key).claimed

    def udp_server(self, endpoint: HostEndpoint, sender: str, data: bytes) -> bytes | None:
        """Deliver one datagram to the server at ``endpoint`` (none there: dropped)."""
        self.contacts.append(ServerContact("udp", endpoint, sender))
        server = self.udp_servers.get(endpoint)
        return server(data) if server is not None else None

    async def _server_stream(self, endpoint: HostEndpoint, sender: str) -> trio.abc.HalfCloseableStream:
        server = self.tcp_servers.get(endpoint)
        if server is None:
            raise ConnectionRefusedError(f"nothing listens on {endpoint}")
        self.contacts.append(ServerContact("tcp", endpoint, sender))
        client, server_side = trio.testing.memory_stream_pair()
        self.start(server, server_side)
        return client

    async def connect_tcp(
        self, remote: HostEndpoint, *, uid: int | None = None, local_port: int = 40000, hostname: str | None = None
    ) -> trio.abc.HalfCloseableStream:
        """An app's TCP connection: claimed by the rules -> a flow for the provider; else straight to the server."""
        local = "192.0.2.1" if ":" not in remote.hostname else "2001:db8::1"
        key = FlowKey(6, ip_address(remote.hostname), remote.port, ip_address(local), local_port, 2, hostname)
        if not self.claims(key):
            return await self._server_stream(remote, "app")
        app_side, proxy_side = trio.testing.memory_stream_pair()
        meta = metadata_for_uid(uid, self.apps)
        flow = AppProxyTCPFlow(proxy_side, remote, meta, remote_hostname=hostname, source_uid=uid)
        if self.admit():
            self.start(self.dispatch, flow)
        else:
            await proxy_side.aclose()
        return app_side

    def udp_socket(self, local: HostEndpoint, *, uid: int | None = None) -> MemoryUDPSocket:
        """An app's UDP socket bound to ``local``."""
        return MemoryUDPSocket(self, local, uid)

    async def create_tcp_connection(self, endpoint: HostEndpoint) -> StreamIO:
        return await self._server_stream(endpoint, "provider")

    async def create_udp_session(self, endpoint: HostEndpoint) -> DatagramIO:
        return _Session(self, endpoint)
