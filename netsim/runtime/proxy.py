"""Hosting a flow-level proxy provider under trio: the flow decision, per-flow tasks, direct relays.

`ProxyHost` is what the system does around an `AppProxyProvider` on Apple: it hands each new flow to
``handle_new_flow``, runs the claimed ones (``provider.run_flow``), and for a `TransparentProxyProvider` that
declines a flow, relays it directly to its destination (`relay_tcp`, `relay_udp`); an `AppProxyProvider`'s
declined flow is refused. Backends subclass it: `netsim.runtime.proxy_tproxy` (the lab's TPROXY sockets) and
`netsim.runtime.proxy_memory` (in-memory streams).

Isolation: every flow runs in its own task; an exception from the provider's code (``handle_new_flow`` or a
flow handler) or from a flow's I/O closes that flow with ``INTERNAL`` and is counted, never spreads.
Every queue is bounded (``max_flows`` concurrent flows; a UDP flow's inbound queue, see the backends).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from netsim.apple.packet import FlowMetaData
from netsim.apple.protocol import AppRule
from netsim.apple.proxy import (
    AppProxyError,
    AppProxyFlow,
    AppProxyFlowError,
    AppProxyProvider,
    AppProxyTCPFlow,
    AppProxyUDPFlow,
    DatagramIO,
    HostEndpoint,
    StreamIO,
    TransparentProxyNetworkSettings,
)

__all__ = [
    "CLAIMED",
    "DIRECT",
    "FAILED",
    "REFUSED",
    "DatagramQueue",
    "ProxyHost",
    "ProxyHostStatistics",
    "metadata_for_uid",
    "relay_tcp",
    "relay_udp",
]

log = logging.getLogger(__name__)
_EMPTY_META = FlowMetaData()
UDP_IDLE_SECONDS = 30.0
MAX_UDP_SESSIONS = 16  # per flow: distinct remote endpoints one app socket may talk to through a relay
#: `ProxyHost.decide`'s answers
CLAIMED, DIRECT, REFUSED, FAILED = "claimed", "direct", "refused", "failed"


@dataclass(frozen=True, slots=True)
class ProxyHostStatistics:
    """Counters of a `ProxyHost` (plain ints; ``flows = claimed + declined + refused + dropped``).

    ``decided_at_syn``: flows the provider was asked about when the app's SYN was queued (the TPROXY backend);
    ``undecided_accepts``: captured connections accepted with no SYN-time decision (decided then, the old way);
    ``udp_reply_errors``: UDP replies to an app that were lost: too long for one packet, or refused by the kernel.
    """

    flows: int
    claimed: int
    declined: int
    refused: int
    not_claimed_by_rules: int
    capture_loops: int
    flow_limit: int
    flow_errors: int
    udp_queue_full: int
    direct_bytes: int
    decided_at_syn: int = 0
    undecided_accepts: int = 0
    udp_reply_errors: int = 0


class DatagramQueue:
    """A bounded queue of ``(payload, remote endpoint)`` datagrams: the inbound side of a UDP flow's backend.

    `put` never blocks: a full queue drops the datagram and counts ``udp_queue_full`` on ``host`` (UDP may lose
    datagrams; memory may not grow). `receive_datagrams` waits for one and returns everything queued (a batch),
    ``[]`` once `close` was called.
    """

    def __init__(self, host: ProxyHost, size: int = 64) -> None:
        self.host, self.size = host, size
        self._send, self._recv = trio.open_memory_channel[tuple[bytes, HostEndpoint]](size)
        self.closed = False

    def put(self, data: bytes, remote: HostEndpoint) -> None:
        try:
            self._send.send_nowait((data, remote))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.host.count("udp_queue_full")

    async def receive_datagrams(self) -> list[tuple[bytes, HostEndpoint]]:
        try:
            batch = [await self._recv.receive()]
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return []
        while len(batch) < self.size:
            try:
                batch.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        return batch

    async def receive_one(self) -> tuple[bytes, HostEndpoint]:
        """The next datagram (for an app socket's ``recvfrom``)."""
        return await self._recv.receive()

    def close(self) -> None:
        self.closed = True
        self._send.close()


def metadata_for_uid(uid: int | None, apps: dict[int, AppRule]) -> FlowMetaData:
    """`FlowMetaData` for a socket owner uid: the app rule's identifiers, else empty (Apple: empty for system
    processes). One shared instance per rule, as the packet flow does."""
    rule = apps.get(uid) if uid is not None else None
    if rule is None:
        return _EMPTY_META
    return FlowMetaData(rule.signing_identifier, rule.unique_identifier)


async def relay_tcp(flow: AppProxyTCPFlow, upstream: StreamIO, *, count: Callable[[int], None] | None = None) -> None:
    """Open ``flow`` and splice it with ``upstream`` both ways until both ends finish (half-closes kept).

    A reset or error on either side ends both directions and closes the flow with ``PEER_RESET``.
    """
    await flow.open()

    async def app_to_upstream() -> None:
        while data := await flow.read_data():
            await upstream.send_all(data)
            if count is not None:
                count(len(data))
        await upstream.send_eof()
        await flow.close_read()

    async def upstream_to_app() -> None:
        while data := bytes(await upstream.receive_some(65536)):
            await flow.write_data(data)
            if count is not None:
                count(len(data))
        await flow.close_write()

    failed: list[BaseException] = []
    try:
        async with trio.open_nursery() as nursery:

            async def guarded(direction: Callable[[], Awaitable[None]]) -> None:
                try:
                    await direction()
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, AppProxyError) as exc:
                    failed.append(exc)  # a reset or a closed side: end both directions
                    nursery.cancel_scope.cancel()

            nursery.start_soon(guarded, app_to_upstream)
            nursery.start_soon(guarded, upstream_to_app)
    finally:
        with trio.CancelScope(shield=True):
            if failed:
                log.debug("relay of %r ended: %r", flow, failed[0])
                await _abort(flow, AppProxyFlowError.PEER_RESET)
            await upstream.aclose()


async def relay_udp(
    flow: AppProxyUDPFlow,
    open_session: Callable[[HostEndpoint], Awaitable[DatagramIO]],
    *,
    idle: float = UDP_IDLE_SECONDS,
    count: Callable[[int], None] | None = None,
) -> None:
    """Open ``flow`` and relay its datagrams through one session per remote endpoint (at most
    `MAX_UDP_SESSIONS`; more are dropped), replies written back from the endpoint they came from. Ends when the
    app's socket has been idle ``idle`` seconds or the flow's backend closes."""
    await flow.open()
    sessions: dict[HostEndpoint, DatagramIO] = {}

    async def replies(remote: HostEndpoint, session: DatagramIO) -> None:
        while batch := await session.receive_datagrams():
            await flow.write_datagrams([(data, remote) for data, _ in batch])
            if count is not None:
                count(sum(len(d) for d, _ in batch))

    try:
        async with trio.open_nursery() as nursery:
            while True:
                batch: list[tuple[bytes, HostEndpoint]] = []
                with trio.move_on_after(idle):
                    batch = await flow.read_datagrams()
                if not batch:
                    break
                for data, remote in batch:
                    session = sessions.get(remote)
                    if session is None:
                        if len(sessions) >= MAX_UDP_SESSIONS:
                            continue
                        session = sessions[remote] = await open_session(remote)
                        nursery.start_soon(replies, remote, session)
                    await session.send_datagrams([(data, remote)])
                    if count is not None:
                        count(len(data))
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for session in sessions.values():
                await session.aclose()
            await _close(flow)


async def _close(flow: AppProxyFlow) -> None:
    try:
        await flow.close_read()
        await flow.close_write()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, AppProxyError):
        pass


async def _abort(flow: AppProxyFlow, error: AppProxyFlowError) -> None:
    with trio.CancelScope(shield=True):
        try:
            await flow.close_write(error)
            await flow.close_read(error)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, AppProxyError):
            pass


class ProxyHost:
    """Runs an `AppProxyProvider`: the system's side of ``handle_new_flow`` (see the module docstring).

    Backends call `dispatch` for each new flow (inside the host's nursery, `nursery`), and implement
    `apply_settings`, `create_tcp_connection` and `create_udp_session`.
    """

    def __init__(
        self, provider: AppProxyProvider, *, app_rules: list[AppRule] | None = None, max_flows: int = 256
    ) -> None:
        self.provider = provider
        provider._host = self
        self.apps = {r.uid: r for r in app_rules or [] if r.uid is not None}
        self.max_flows = max_flows
        self.active = 0
        self.nursery: trio.Nursery | None = None
        self.settings: TransparentProxyNetworkSettings | None = None
        self.settings_applied = trio.Event()
        self._c = dict.fromkeys(ProxyHostStatistics.__slots__, 0)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (a `ProxyHostStatistics` field)."""
        self._c[name] += n

    def statistics(self) -> ProxyHostStatistics:
        """A frozen snapshot of the counters."""
        return ProxyHostStatistics(**self._c)

    async def apply_settings(self, settings: TransparentProxyNetworkSettings | None) -> None:
        """Make ``settings`` the system's claim rules (the backend installs them)."""
        self.settings = settings
        self.settings_applied.set()

    async def create_tcp_connection(self, endpoint: HostEndpoint) -> StreamIO:
        """A connection from the provider itself (never captured again)."""
        raise NotImplementedError

    async def create_udp_session(self, endpoint: HostEndpoint) -> DatagramIO:
        """A UDP session from the provider itself (never captured again)."""
        raise NotImplementedError

    def run_flow(self, flow: AppProxyFlow, handler: Callable[[Any], Awaitable[None]]) -> None:
        """Serve ``flow`` with ``handler`` in its own task (the provider's ``run_flow``)."""
        if self.nursery is None:
            raise RuntimeError("the proxy host is not running")
        self.nursery.start_soon(self._guarded, flow, handler)

    async def _guarded(self, flow: AppProxyFlow, handler: Callable[[Any], Awaitable[None]]) -> None:
        try:
            await handler(flow)
        except Exception as exc:  # provider code: its failure ends this flow only
            self.count("flow_errors")
            log.warning("flow %r failed: %r", flow, exc, exc_info=True)
            await _abort(flow, AppProxyFlowError.INTERNAL)
        else:
            with trio.CancelScope(shield=True):
                await _close(flow)
        finally:
            self.active -= 1

    def admit(self) -> bool:
        """Reserve a flow slot (False, counted, at ``max_flows``): a new flow beyond it is refused."""
        if self.active >= self.max_flows:
            self.count("flow_limit")
            return False
        self.active += 1
        return True

    def decide(self, flow: AppProxyFlow, claimed_by_rules: bool = True) -> str:
        """Ask the provider about ``flow`` (``handle_new_flow``) and count the answer; no I/O.

        Returns `CLAIMED` (the provider serves it), `DIRECT` (declined by a transparent proxy, or not claimed by
        the rules: the flow goes to its destination without the provider), `REFUSED` (declined by an app proxy)
        or `FAILED` (``handle_new_flow`` raised: the flow is refused with ``INTERNAL``, counted in
        ``flow_errors``). A backend that decides before the connection exists (SYN time) calls this directly;
        `dispatch` calls it and then acts.
        """
        self.count("flows")
        try:
            claimed = claimed_by_rules and bool(self.provider.handle_new_flow(flow))
        except Exception as exc:
            self.count("flow_errors")
            log.warning("handle_new_flow(%r) raised %r; the flow is refused", flow, exc)
            return FAILED
        if not claimed_by_rules:
            self.count("not_claimed_by_rules")
        if claimed:
            self.count("claimed")
            return CLAIMED
        if self.provider.declines_go_direct or not claimed_by_rules:
            self.count("declined")
            return DIRECT
        self.count("refused")
        return REFUSED

    async def dispatch(self, flow: AppProxyFlow, claimed_by_rules: bool = True) -> None:
        """Decide ``flow``: the provider's ``handle_new_flow``, then serve, relay directly or refuse.

        Call after `admit` returned True. ``claimed_by_rules`` False (the kernel captured a flow the settings do
        not claim) relays it directly without asking the provider.
        """
        verdict = self.decide(flow, claimed_by_rules)
        if verdict == CLAIMED:
            return
        if verdict == DIRECT:
            self.run_flow(flow, self._direct)
            return
        self.active -= 1
        await _abort(flow, AppProxyFlowError.INTERNAL if verdict == FAILED else AppProxyFlowError.REFUSED)

    async def _direct(self, flow: AppProxyFlow) -> None:
        def add(n: int) -> None:
            self._c["direct_bytes"] += n

        if isinstance(flow, AppProxyTCPFlow):
            upstream = await self.create_tcp_connection(flow.remote_endpoint)
            await relay_tcp(flow, upstream, count=add)
        elif isinstance(flow, AppProxyUDPFlow):
            await relay_udp(flow, self.create_udp_session, count=add)
