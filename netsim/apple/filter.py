"""NEFilterPacketProvider mirrors: a content filter answering allow, drop or delay for each packet (docs/filters.md).

The provider sees every packet on the physical interfaces, both directions (Apple: NEFilterPacketProvider.h,
macOS 10.15+).

Pure data and bookkeeping: the host that presents packets (`netsim.runtime.filter`, over an NFQUEUE in the lab)
attaches itself to the provider; `FilterPacketProvider.delay_current_packet` and `FilterPacketProvider.allow`
delegate to it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from netsim.apple.enums import ProviderStopReason, TrafficDirection
from netsim.apple.packet import Packet
from netsim.errors import LocalProtocolError

__all__ = [
    "FilterPacketContext",
    "FilterPacketHandler",
    "FilterPacketProvider",
    "FilterPacketProviderVerdict",
    "FilterProviderConfiguration",
]


class FilterPacketProviderVerdict(enum.IntEnum):
    """Mirrors NEFilterPacketProviderVerdict (``NEFilterPacketProvider.Verdict``; Apple: NEFilterPacketProvider.h).

    Differences from Apple: none in values. A handler that returns DELAY without having called
    `FilterPacketProvider.delay_current_packet` (Apple: "the framework assumes the handler already called" it)
    gets the host's failure verdict instead, counted as ``bad_verdicts``.
    """

    ALLOW = 0
    DROP = 1
    DELAY = 2


class FilterPacketContext:
    """Mirrors NEFilterPacketContext: the opaque context a packet handler receives (Apple: NEFilterPacketContext).

    Differences from Apple: one context per host (a filtering source), reused for every packet it presents (no
    object per packet); it names the packet being presented only while the handler runs, which is the only time
    `FilterPacketProvider.delay_current_packet` accepts it (Apple: "only valid within the packetHandler").
    """

    __slots__ = ("_current", "_host")

    def __init__(self, host: _FilterHost) -> None:
        self._host = host
        self._current: int | None = None  # the host's handle of the packet being presented

    def __repr__(self) -> str:
        return f"FilterPacketContext(presenting={self._current is not None})"


#: Apple: ``NEFilterPacketHandler = (NEFilterPacketContext, nw_interface_t, NETrafficDirection, UnsafeRawPointer,
#: Int) -> NEFilterPacketProvider.Verdict``; here the interface is its name and the bytes are a `bytes`.
FilterPacketHandler = Callable[[FilterPacketContext, str, TrafficDirection, bytes, int], FilterPacketProviderVerdict]


class _FilterHost(Protocol):
    """What a provider needs from the host presenting its packets (`netsim.runtime.filter.PacketFilterEngine`)."""

    def delay(self, context: FilterPacketContext) -> Packet: ...

    def release(self, packet: Packet, allow: bool) -> None: ...


@dataclass
class FilterProviderConfiguration:
    """Mirrors NEFilterProviderConfiguration, the packet half (Apple: NEFilterProviderConfiguration).

    Attributes:
        filter_packets: Apple's ``filterPackets``: a `FilterPacketProvider` is started and sees packets.
        vendor_configuration: Apple's ``vendorConfiguration``: the provider's own settings (JSON-able).

    Differences from Apple: ``filterSockets``, ``filterBrowsers``, the server address, credentials and bundle
    identifiers are not mirrored (there is no flow filter and no bundle here); the host is told which
    interfaces and whether to fail open (docs/filters.md), which Apple decides itself.
    """

    filter_packets: bool = True
    vendor_configuration: dict[str, Any] = field(default_factory=dict)


class FilterPacketProvider:
    """Mirrors NEFilterPacketProvider: set `packet_handler` in `start_filter`; it is called for every packet on
    the physical interfaces, both directions, and returns a `FilterPacketProviderVerdict` (Apple:
    NEFilterPacketProvider, packetHandler, delayCurrentPacket(_:), allow(_:); NEFilterProvider startFilter /
    stopFilter). Constructed with no arguments by the host; `filter_configuration` is set before `start_filter`.

    Differences from Apple:
        * The handler is called on one thread, packet after packet, a batch per wakeup (Apple: possibly on many
          threads at once). It must not block: a slow handler holds every packet behind it.
        * ``interface`` is the interface's name (``"en0"``), not an ``nw_interface_t``; the packet is a `bytes`
          from its IP header on (no link-layer header, as Apple's), and ``packet_length`` is its length.
        * Completion handlers become coroutines (`start_filter`, `stop_filter`), as for `PacketTunnelProvider`.
        * A delayed packet is dropped by `drop` (Apple: "drop it by releasing it", which Python cannot observe).
        * Delayed packets are bounded (the host's ``max_delayed``): delaying one more drops the oldest delayed
          packet (counted ``delay_evicted``), so held packets never fill the kernel's queue. When the filter
          stops, packets still delayed get the host's failure verdict (dropped fail-closed, allowed fail-open).
        * A handler that raises, or returns something not a verdict, gets the failure verdict (counted).
    """

    packet_handler: FilterPacketHandler | None = None

    def __init__(self) -> None:
        self.filter_configuration = FilterProviderConfiguration()
        self._host: _FilterHost | None = None

    async def start_filter(self) -> None:
        """Start filtering (Apple: ``startFilter(completionHandler:)``); set `packet_handler` here. Raise to fail
        the start. Until a handler is set, packets are allowed."""

    async def stop_filter(self, reason: ProviderStopReason) -> None:
        """The filter is stopping (Apple: ``stopFilter(with:completionHandler:)``)."""

    def delay_current_packet(self, context: FilterPacketContext) -> Packet:
        """Hold the packet being presented (Apple: ``delayCurrentPacket(_:)``): only valid inside `packet_handler`,
        which must then return DELAY. Returns the packet (a `Packet`, as Apple's NEPacket) to pass to `allow` or
        `drop` later.

        Raises:
            LocalProtocolError: outside the handler, or with another host's context.
        """
        if self._host is None or context._host is not self._host:
            raise LocalProtocolError("delay_current_packet: this context is not from this provider's host")
        return self._host.delay(context)

    def allow(self, packet: Packet) -> None:
        """Let a delayed packet continue into or out of the stack (Apple: ``allow(_:)``). A packet that is no
        longer delayed (already released, evicted past the bound, or the filter stopped) is ignored (counted
        ``stale_releases``)."""
        if self._host is None:
            raise LocalProtocolError("allow: the provider is not attached to a filter host")
        self._host.release(packet, True)

    def drop(self, packet: Packet) -> None:
        """Drop a delayed packet (netsim: Apple drops one when the NEPacket is released)."""
        if self._host is None:
            raise LocalProtocolError("drop: the provider is not attached to a filter host")
        self._host.release(packet, False)

    # --- for the host (netsim.runtime.filter)
    def _attach(self, host: _FilterHost | None, configuration: Mapping[str, Any] | None = None) -> None:
        self._host = host
        if configuration is not None:
            self.filter_configuration = FilterProviderConfiguration(True, dict(configuration))
