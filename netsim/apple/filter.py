"""NEFilterPacketProvider mirrors: a content filter answering allow, drop or delay for each packet (docs/filters.md).

The provider sees every packet on the physical interfaces, both directions (Apple: NEFilterPacketProvider.h,
macOS 10.15+).

Pure data and bookkeeping: the host that presents packets (`netsim.runtime.filter`, over an NFQUEUE in the lab)
attaches itself to the provider; `FilterPacketProvider.delay_current_packet` and `FilterPacketProvider.allow`
delegate to it.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, Protocol

from netsim.apple.enums import ProviderStopReason, TrafficDirection
from netsim.apple.packet import Packet
from netsim.apple.proxy import HostEndpoint, NetworkRule
from netsim.core.family import DARWIN_AF_INET, DARWIN_AF_INET6
from netsim.core.filterdata import VerdictKind
from netsim.core.netrules import FlowKey
from netsim.errors import ConfigError, LocalProtocolError

__all__ = [
    "MAX_FILTER_RULES",
    "FilterAction",
    "FilterControlProvider",
    "FilterControlVerdict",
    "FilterDataProvider",
    "FilterDataVerdict",
    "FilterFlow",
    "FilterNewFlowVerdict",
    "FilterPacketContext",
    "FilterPacketHandler",
    "FilterPacketProvider",
    "FilterPacketProviderVerdict",
    "FilterProviderConfiguration",
    "FilterReport",
    "FilterReportEvent",
    "FilterRule",
    "FilterSettings",
    "FilterSocketFlow",
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
    """Mirrors NEFilterProviderConfiguration (Apple: NEFilterProviderConfiguration).

    Attributes:
        filter_packets: Apple's ``filterPackets``: a `FilterPacketProvider` is started and sees packets.
        vendor_configuration: Apple's ``vendorConfiguration``: the provider's own settings (JSON-able).
        filter_sockets: Apple's ``filterSockets``: a `FilterDataProvider` is started and sees socket flows.

    Differences from Apple: ``filterBrowsers``, the server address, credentials and bundle identifiers are not
    mirrored (there are no browser flows and no bundle here); the host is told which interfaces and whether to
    fail open (docs/filters.md), which Apple decides itself.
    """

    filter_packets: bool = True
    vendor_configuration: dict[str, Any] = field(default_factory=dict)
    filter_sockets: bool = False


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


# ====================================================================== the data half: NEFilterDataProvider
#: Apple: NEFilterSettings.rules holds at most 1000 rules
MAX_FILTER_RULES = 1000


class FilterAction(enum.IntEnum):
    """Mirrors NEFilterAction (Apple: NEFilterSettings.h, macOS 10.15+). Differences from Apple: REMEDIATE is
    accepted in a rule and treated as DROP (netsim has no remediation page)."""

    INVALID = 0
    ALLOW = 1
    DROP = 2
    REMEDIATE = 3
    FILTER_DATA = 4


class FilterReportEvent(enum.IntEnum):
    """Mirrors NEFilterReportEvent (Apple: NEFilterReport.h). The host records one `FilterReport` per event; the
    control provider's ``handleReport`` is not called (docs/filters.md)."""

    NEW_FLOW = 1
    DATA_DECISION = 2
    FLOW_CLOSED = 3
    STATISTICS = 4


@dataclass(frozen=True, slots=True)
class FilterReport:
    """Mirrors NEFilterReport: ``flow``, ``action`` and ``event`` (Apple: NEFilterReport). Differences from Apple:
    ``bytes_inbound`` / ``bytes_outbound`` (Apple: on STATISTICS reports) are filled on every report."""

    flow: FilterSocketFlow
    action: FilterAction
    event: FilterReportEvent
    bytes_inbound: int = 0
    bytes_outbound: int = 0


@dataclass(frozen=True)
class FilterRule:
    """Mirrors NEFilterRule(networkRule:action:) (Apple: NEFilterRule, macOS 10.15+)."""

    network_rule: NetworkRule
    action: FilterAction


@dataclass
class FilterSettings:
    """Mirrors NEFilterSettings(rules:defaultAction:) (Apple: NEFilterSettings, macOS 10.15+): the first rule whose
    network rule matches a flow decides it; no match: ``default_action``.

    Differences from Apple: none in meaning; `validate` raises `ConfigError` for more than `MAX_FILTER_RULES`
    rules or a default action other than ALLOW, DROP or FILTER_DATA (Apple fails ``apply`` with an error).
    """

    rules: list[FilterRule] = field(default_factory=list)
    default_action: FilterAction = FilterAction.FILTER_DATA

    def validate(self) -> None:
        if len(self.rules) > MAX_FILTER_RULES:
            raise ConfigError(f"NEFilterSettings holds at most {MAX_FILTER_RULES} rules, not {len(self.rules)}")
        allowed = (FilterAction.ALLOW, FilterAction.DROP, FilterAction.FILTER_DATA)
        if self.default_action not in allowed:
            raise ConfigError(f"default_action must be ALLOW, DROP or FILTER_DATA, not {self.default_action!r}")
        for rule in self.rules:
            if rule.action is FilterAction.INVALID:
                raise ConfigError(f"{rule!r}: INVALID is not an action")

    def action_for(self, key: FlowKey) -> FilterAction:
        """The action for a flow: the first matching rule's, else the default (REMEDIATE counts as DROP)."""
        for rule in self.rules:
            if rule.network_rule.matches(key):
                return FilterAction.DROP if rule.action is FilterAction.REMEDIATE else rule.action
        return self.default_action


class FilterFlow:
    """Mirrors NEFilterFlow: what every filtered flow has (Apple: NEFilterFlow).

    Attributes:
        identifier: Apple's ``identifier`` (a UUID).
        url: Apple's ``URL``: None (set only for browser flows, which netsim does not have).
        source_app_identifier: the app's signing identifier (the socket owner's `AppRule` label), or None.
        source_app_audit_token: always None (no audit tokens on Linux).
        direction: Apple's ``direction`` (`TrafficDirection`).
    """

    def __init__(
        self, *, direction: TrafficDirection = TrafficDirection.OUTBOUND, source_app_identifier: str | None = None
    ) -> None:
        self.identifier = uuid.uuid4()
        self.url: str | None = None
        self.source_app_identifier = source_app_identifier
        self.source_app_audit_token: bytes | None = None
        self.direction = direction


class FilterSocketFlow(FilterFlow):
    """Mirrors NEFilterSocketFlow (Apple: NEFilterSocketFlow, macOS 10.15+).

    Differences from Apple: ``socket_family`` uses Darwin's numbers (AF_INET 2, AF_INET6 30) as Apple's does;
    in the lab ``remote_hostname`` is None (the kernel does not know the name an app resolved; Apple: "may be
    nil"), and only outbound TCP flows are filtered (docs/filters.md).
    """

    def __init__(
        self,
        remote_endpoint: HostEndpoint,
        local_endpoint: HostEndpoint | None = None,
        *,
        socket_type: int = 1,
        socket_protocol: int = 6,
        remote_hostname: str | None = None,
        direction: TrafficDirection = TrafficDirection.OUTBOUND,
        source_app_identifier: str | None = None,
    ) -> None:
        super().__init__(direction=direction, source_app_identifier=source_app_identifier)
        self.remote_endpoint = remote_endpoint
        self.local_endpoint = local_endpoint
        self.socket_family = DARWIN_AF_INET6 if ":" in remote_endpoint.hostname else DARWIN_AF_INET
        self.socket_type, self.socket_protocol = socket_type, socket_protocol
        self.remote_hostname = remote_hostname

    def flow_key(self) -> FlowKey:
        """The flow as `netsim.core.netrules.FlowKey` (for `FilterSettings.action_for`)."""
        local = self.local_endpoint or HostEndpoint("0.0.0.0" if ":" not in self.remote_endpoint.hostname else "::")
        return FlowKey(
            self.socket_protocol,
            ip_address(self.remote_endpoint.hostname),
            self.remote_endpoint.port,
            ip_address(local.hostname),
            local.port,
            int(self.direction),
            self.remote_hostname,
        )

    def __repr__(self) -> str:
        return f"FilterSocketFlow(remote={self.remote_endpoint}, app={self.source_app_identifier!r})"


@dataclass(frozen=True, slots=True)
class FilterNewFlowVerdict:
    """Mirrors NEFilterNewFlowVerdict (Apple: NEFilterNewFlowVerdict): build one with `allow`, `drop`,
    `need_rules`, `pause` or `filter_data_verdict`.

    Differences from Apple: ``remediate``/``URLAppendStringVerdict`` are not mirrored (no browser flows);
    NEED_RULES asks the host's `FilterControlProvider` (none: the flow is dropped, docs/filters.md).
    """

    kind: VerdictKind
    filter_inbound: bool = False
    peek_inbound_bytes: int = 0
    filter_outbound: bool = False
    peek_outbound_bytes: int = 0

    @classmethod
    def allow(cls) -> FilterNewFlowVerdict:
        return cls(VerdictKind.ALLOW)

    @classmethod
    def drop(cls) -> FilterNewFlowVerdict:
        return cls(VerdictKind.DROP)

    @classmethod
    def need_rules(cls) -> FilterNewFlowVerdict:
        return cls(VerdictKind.NEED_RULES)

    @classmethod
    def pause(cls) -> FilterNewFlowVerdict:
        return cls(VerdictKind.PAUSE)

    @classmethod
    def filter_data_verdict(
        cls,
        *,
        filter_inbound: bool,
        peek_inbound_bytes: int,
        filter_outbound: bool,
        peek_outbound_bytes: int,
    ) -> FilterNewFlowVerdict:
        """Apple: ``filterDataVerdict(withFilterInbound:peekInboundBytes:filterOutbound:peekOutboundBytes:)``;
        peeks are clamped to ``[1, netsim.core.filterdata.MAX_PEEK]``."""
        if peek_inbound_bytes < 0 or peek_outbound_bytes < 0:
            raise LocalProtocolError("peek sizes must be >= 0")
        return cls(VerdictKind.FILTER, filter_inbound, peek_inbound_bytes, filter_outbound, peek_outbound_bytes)


@dataclass(frozen=True, slots=True)
class FilterDataVerdict:
    """Mirrors NEFilterDataVerdict (Apple: NEFilterDataVerdict): `allow` (the rest of the flow passes), `drop`,
    `need_rules`, `pause`, or ``FilterDataVerdict(pass_bytes=N, peek_bytes=M)`` (Apple:
    ``init(passBytes:peekBytes:)``: pass N bytes from the call's offset, then peek the next M).

    Differences from Apple: ``remediate``/``statistics`` verdicts are not mirrored; ``allow`` passes the rest of
    this direction (the other direction keeps its own filter state, as Apple's per-direction verdicts).
    """

    pass_bytes: int = 0
    peek_bytes: int = 0
    kind: VerdictKind = VerdictKind.FILTER

    def __post_init__(self) -> None:
        if self.pass_bytes < 0 or self.peek_bytes < 0:
            raise LocalProtocolError(f"pass_bytes and peek_bytes must be >= 0 ({self.pass_bytes}, {self.peek_bytes})")

    @classmethod
    def allow(cls) -> FilterDataVerdict:
        return cls(kind=VerdictKind.ALLOW)

    @classmethod
    def drop(cls) -> FilterDataVerdict:
        return cls(kind=VerdictKind.DROP)

    @classmethod
    def need_rules(cls) -> FilterDataVerdict:
        return cls(kind=VerdictKind.NEED_RULES)

    @classmethod
    def pause(cls) -> FilterDataVerdict:
        return cls(kind=VerdictKind.PAUSE)


class _DataHost(Protocol):
    async def apply_settings(self, settings: FilterSettings | None) -> None: ...

    def resume_flow(self, flow: FilterFlow, verdict: FilterNewFlowVerdict | FilterDataVerdict) -> None: ...


class FilterDataProvider:
    """Mirrors NEFilterDataProvider: sees each new flow, then (if it asks) the flow's bytes, and returns verdicts
    (Apple: NEFilterDataProvider, macOS 10.15+). Constructed with no arguments by the host
    (`netsim.runtime.filter_data`); `filter_configuration` is set before `start_filter`.

    Override `handle_new_flow` (and the data handlers if it returns `FilterNewFlowVerdict.filter_data_verdict`).
    Every handler answers at once with a verdict; a handler that raises or returns something else drops the flow
    (counted ``handler_errors``). A filter never owns a flow: allowed bytes go on to their original destination.

    Differences from Apple:
        * Handlers run on one trio task per flow direction, not on Apple's serial queue; they must not block.
        * NEED_RULES asks the host's `FilterControlProvider`, which runs in the same process (Apple: a separate
          one); without one the flow is dropped.
        * In the lab only outbound TCP flows of the ``mac`` namespace are filtered (the TPROXY interception,
          docs/filters.md); the kernel has accepted the connection before `handle_new_flow` runs, so a dropped
          flow is closed (the app sees a reset or an end of stream) rather than never connected.
        * Peek sizes are clamped to ``[1, MAX_PEEK]`` (64 KiB), and a verdict that cannot make progress drops the
          flow (netsim.core.filterdata).
    """

    def __init__(self) -> None:
        self.filter_configuration = FilterProviderConfiguration(filter_packets=False, filter_sockets=True)
        self._host: _DataHost | None = None

    async def start_filter(self) -> None:
        """Apple: ``startFilter(completionHandler:)``; raise to fail the start."""

    async def stop_filter(self, reason: ProviderStopReason) -> None:
        """Apple: ``stopFilter(with:completionHandler:)``."""

    def handle_new_flow(self, flow: FilterFlow) -> FilterNewFlowVerdict:
        """Apple: ``handleNewFlow(_:)``. Default: allow."""
        return FilterNewFlowVerdict.allow()

    def handle_outbound_data(
        self, flow: FilterFlow, read_bytes_start_offset: int, read_bytes: bytes
    ) -> FilterDataVerdict:
        """Apple: ``handleOutboundData(from:readBytesStartOffset:readBytes:)``. Default: allow."""
        return FilterDataVerdict.allow()

    def handle_inbound_data(
        self, flow: FilterFlow, read_bytes_start_offset: int, read_bytes: bytes
    ) -> FilterDataVerdict:
        """Apple: ``handleInboundData(from:readBytesStartOffset:readBytes:)``. Default: allow."""
        return FilterDataVerdict.allow()

    def handle_outbound_data_complete(self, flow: FilterFlow) -> FilterDataVerdict:
        """Apple: ``handleOutboundDataComplete(for:)``: the app ended its stream. Default: allow."""
        return FilterDataVerdict.allow()

    def handle_inbound_data_complete(self, flow: FilterFlow) -> FilterDataVerdict:
        """Apple: ``handleInboundDataComplete(for:)``: the server ended its stream. Default: allow."""
        return FilterDataVerdict.allow()

    def handle_rules_changed(self) -> None:
        """Apple: ``handleRulesChanged()``: the control provider updated the rules (`FilterControlVerdict`,
        `FilterControlProvider.notify_rules_changed`)."""

    async def apply(self, settings: FilterSettings | None) -> None:
        """Apple: ``apply(_:completionHandler:)``: rules the system applies before asking `handle_new_flow`
        (ALLOW and DROP rules decide a flow without the provider). Raises `ConfigError` for invalid settings."""
        if settings is not None:
            settings.validate()
        if self._host is None:
            raise LocalProtocolError("apply: the provider is not attached to a filter host")
        await self._host.apply_settings(settings)

    def resume_flow(self, flow: FilterFlow, verdict: FilterNewFlowVerdict | FilterDataVerdict) -> None:
        """Apple: ``resumeFlow(_:with:)``: give a paused flow its verdict (a new-flow verdict for a flow paused
        in `handle_new_flow`, a data verdict for a paused direction). A flow that is not paused is ignored
        (counted ``stale_resumes``)."""
        if self._host is None:
            raise LocalProtocolError("resume_flow: the provider is not attached to a filter host")
        self._host.resume_flow(flow, verdict)

    # --- for the host (netsim.runtime.filter_data)
    def _attach(self, host: _DataHost | None, configuration: Mapping[str, Any] | None = None) -> None:
        self._host = host
        if configuration is not None:
            self.filter_configuration = FilterProviderConfiguration(False, dict(configuration), filter_sockets=True)


@dataclass(frozen=True, slots=True)
class FilterControlVerdict:
    """Mirrors NEFilterControlVerdict (Apple: NEFilterControlVerdict): `allow` / `drop` (each optionally
    ``with_update_rules``) or `update_rules`.

    Differences from Apple: none in meaning. ``update_rules`` (or ``with_update_rules=True``) calls the data
    provider's ``handle_rules_changed``; ``update_rules`` then asks the data provider again (once: a second
    NEED_RULES drops the flow).
    """

    kind: VerdictKind
    update_rules_first: bool = False

    @classmethod
    def allow(cls, *, with_update_rules: bool = False) -> FilterControlVerdict:
        """Apple: ``allow(withUpdateRules:)``."""
        return cls(VerdictKind.ALLOW, with_update_rules)

    @classmethod
    def drop(cls, *, with_update_rules: bool = False) -> FilterControlVerdict:
        """Apple: ``drop(withUpdateRules:)``."""
        return cls(VerdictKind.DROP, with_update_rules)

    @classmethod
    def update_rules(cls) -> FilterControlVerdict:
        """Apple: ``updateRules()``: the data provider's rules changed; it is asked again."""
        return cls(VerdictKind.NEED_RULES, True)


class FilterControlProvider:
    """Mirrors NEFilterControlProvider: asked about a flow when the data provider returns NEED_RULES
    (Apple: NEFilterControlProvider, handleNewFlow(_:completionHandler:)).

    Differences from Apple: it runs in the data provider's process (Apple: a separate, unsandboxed process that
    may reach the network to fetch rules, which the data provider cannot); share rules with plain attributes or
    files. ``handle_new_flow`` answers at once (Apple: a completion handler); raising drops the flow. There is no
    ``remediationMap`` / ``URLAppendStringMap`` (no browser flows), and ``handleReport`` is not called (the data
    filter host keeps the reports, docs/filters.md).
    """

    def __init__(self) -> None:
        self.filter_configuration = FilterProviderConfiguration(filter_packets=False, filter_sockets=True)
        self._host: Any = None

    async def start_filter(self) -> None:
        """Apple: ``startFilter(completionHandler:)``."""

    async def stop_filter(self, reason: ProviderStopReason) -> None:
        """Apple: ``stopFilter(with:completionHandler:)``."""

    def handle_new_flow(self, flow: FilterFlow) -> FilterControlVerdict:
        """Apple: ``handleNewFlow(_:completionHandler:)``. Default: drop."""
        return FilterControlVerdict.drop()

    def notify_rules_changed(self) -> None:
        """Apple: ``notifyRulesChanged()``: the data provider's ``handle_rules_changed`` runs."""
        if self._host is not None:
            self._host.rules_changed()
