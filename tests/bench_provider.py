"""Providers for the ``netsim bench --provider`` tests (tests/test_bench_cli.py); importable as ``bench_provider``.

`TaggingProvider` is a user's provider built on the built-in one: it answers its own app message. `NotAProvider`
is a class a user might point ``--provider`` at by mistake.
"""

from __future__ import annotations

import json

import trio

from netsim.runtime.forwarding import HelperForwardingProvider

__all__ = ["BlackHoleProvider", "NeedsArguments", "NotAProvider", "TaggingProvider"]


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
