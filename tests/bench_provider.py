"""Providers for the ``netsim bench --provider`` tests (tests/test_bench_cli.py); importable as ``bench_provider``.

`TaggingProvider` is a user's provider built on the built-in one: it answers its own app message;
`SocketProvider` is one written from scratch on the documented IPC pieces. `NotAProvider` and `NeedsArguments`
are classes a user might point ``--provider`` at by mistake; `BlackHoleProvider` connects but carries nothing.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from netsim.core import ipc
from netsim.runtime.channel import connect_ipc_unix
from netsim.runtime.forwarding import HelperForwardingProvider, settings_from_payload
from netsim.runtime.provider import PacketTunnelProvider
from netsim.transports.uds import read_token_file

__all__ = ["BlackHoleProvider", "NeedsArguments", "NotAProvider", "SocketProvider", "TaggingProvider"]


class TaggingProvider(HelperForwardingProvider):
    """The built-in forwarding loop plus an app message ``b"tag"`` answering how many batches it read."""

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"tag":
            return json.dumps({"tag": "bench", "read_batches": self.read_batches}).encode()
        return await super().handle_app_message(data)


class NotAProvider:
    """Not a `PacketTunnelProvider`: ``--provider bench_provider:NotAProvider`` must be refused."""


class NeedsArguments(HelperForwardingProvider):
    """A provider a provider host cannot make (it needs an argument): ``--provider`` must refuse it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class BlackHoleProvider(HelperForwardingProvider):
    """Connects like the built-in provider but never forwards a packet: the bench must fail it, not hang."""

    async def _outbound(self) -> None:
        await trio.sleep_forever()


class SocketProvider(PacketTunnelProvider):
    """A provider *not* built on `HelperForwardingProvider`: its own loop on the documented pieces only.

    It reads ``provider_configuration["helper_socket"]`` and ``["token_file"]``, connects with
    `connect_ipc_unix`, applies the helper's SETTINGS (`settings_from_payload`) and moves PACKETS both ways,
    counting what it forwarded (app message ``b"stats"``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.forwarded = 0
        self.returned = 0

    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        conf = self.protocol_configuration.provider_configuration or {}
        token = read_token_file(conf["token_file"]) if conf.get("token_file") else None
        ready = trio.Event()
        self.start_soon(self._run, str(conf["helper_socket"]), token, ready)
        with trio.fail_after(10):
            await ready.wait()

    async def _run(self, path: str, token: bytes | None, ready: trio.Event) -> None:
        connection = ipc.Connection(ipc.Role.PROVIDER, token=token)
        async with connect_ipc_unix(path, connection=connection) as channel, trio.open_nursery() as nursery:

            async def outbound() -> None:
                while True:
                    packets, families = await self.packet_flow.read_packets()
                    if channel.send_packets_nowait(packets, families):
                        self.forwarded += len(packets)

            while True:
                event = await channel.receive_event()
                if isinstance(event, ipc.Settings) and not ready.is_set():
                    await self.set_tunnel_network_settings(settings_from_payload(json.loads(event.payload)))
                    nursery.start_soon(outbound)
                    ready.set()
                elif isinstance(event, ipc.PacketBatch):
                    self.packet_flow.write_packets(event.packets(), event.families)
                    self.returned += len(event)
                elif isinstance(event, ipc.ConnectionClosed | ipc.Goodbye | ipc.Error):
                    nursery.cancel_scope.cancel()
                    return

    async def handle_app_message(self, data: bytes) -> bytes | None:
        if data == b"stats":
            return json.dumps({"forwarded": self.forwarded, "returned": self.returned}).encode()
        return None
