"""Hosting a `FilterDataProvider` under trio: each intercepted TCP flow is decided, then spliced to its original
destination through a filtering relay (docs/filters.md, "Data filters").

The interception is a proxy host's: `FilterDataHost` is a `TransparentProxyProvider` that claims every TCP flow
and serves each one itself, so any `netsim.runtime.proxy.ProxyHost` backend can carry it: the lab's TPROXY host
(`netsim.runtime.proxy_tproxy.TproxyHost` with `FILTER_DATA_NAMES`, its own nftables table, marks, route table
and rule priority; ``python -m netsim.runtime.filter_data``) or the in-memory one
(`netsim.runtime.proxy_memory.MemoryProxyHost`). Per flow:

1. `FilterSettings` (Apple: ``apply(_:)``) first: an ALLOW or DROP rule decides without the provider.
2. ``handle_new_flow``: ALLOW relays the flow unseen; DROP closes it with a reset; NEED_RULES asks the
   `FilterControlProvider` if there is one (its allow / drop decides; updateRules runs ``handle_rules_changed``
   and asks the data provider again, once), else drops; PAUSE waits for ``resume_flow``; FILTER runs one
   `netsim.core.filterdata.DirectionFilter` per direction, calling ``handle_outbound_data`` /
   ``handle_inbound_data`` (and ``*_complete``) with Apple's pass/peek accounting. A drop in either direction
   resets both sides.
3. The upstream connection (the provider host's own socket, never captured again) is opened only when the first
   outbound byte has passed (or the app ended its stream), so a flow dropped on its first peek never reaches the
   server at all; a protocol where the server speaks first needs ``filter_outbound=False`` (documented).

Isolation: a handler that raises or returns a wrong type drops only its flow (``handler_errors``); reports are a
bounded deque (`MAX_REPORTS`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import logging
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from netsim.apple.enums import ProviderStopReason
from netsim.apple.filter import (
    FilterAction,
    FilterControlProvider,
    FilterControlVerdict,
    FilterDataProvider,
    FilterDataVerdict,
    FilterFlow,
    FilterNewFlowVerdict,
    FilterReport,
    FilterReportEvent,
    FilterSettings,
    FilterSocketFlow,
)
from netsim.apple.protocol import AppRule
from netsim.apple.proxy import (
    AppProxyError,
    AppProxyFlow,
    AppProxyFlowError,
    AppProxyTCPFlow,
    HostEndpoint,
    NetworkRule,
    NetworkRuleProtocol,
    StreamIO,
    TransparentProxyNetworkSettings,
    TransparentProxyProvider,
)
from netsim.core import filterdata as fd
from netsim.runtime.proxy import relay_tcp

__all__ = [
    "FILTER_DATA_NAMES",
    "MAX_REPORTS",
    "FilterDataHost",
    "FilterDataStatistics",
    "load_filter_data_provider",
    "main",
]

log = logging.getLogger(__name__)

#: the data filter's owned kernel names: distinct from the transparent proxy (netsim_tproxy, 0x7470/0x7471,
#: priority 6000), the DNS proxy (netsim_dnsproxy, 0x7472/0x7473, 5990) and the packet tunnel (6100)
FILTER_DATA_NAMES: dict[str, Any] = {
    "table": "netsim_filterdata",
    "intercept_mark": 0x7474,
    "own_mark": 0x7475,
    "route_table": 0x7474,
    "priority": 5980,
}
MAX_REPORTS = 1000
_READ = 65536


@dataclass(frozen=True, slots=True)
class FilterDataStatistics:
    """Counters of a `FilterDataHost` (``flows = allowed + dropped + filtered``; rule decisions included)."""

    flows: int
    allowed: int
    dropped: int
    filtered: int
    rule_allowed: int
    rule_dropped: int
    need_rules: int
    rules_changed: int
    paused: int
    stale_resumes: int
    handler_errors: int
    stalled: int
    peeks: int
    data_dropped: int
    bytes_outbound: int
    bytes_inbound: int
    upstream_errors: int


class _Dropped(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reset(stream: object) -> None:
    """Make a real socket behind ``stream`` (an app's flow, or the host's own connection) close with a TCP RST
    (SO_LINGER 0); a memory stream has none, and is left alone."""
    inner = getattr(stream, "_io", None) or getattr(stream, "_stream", None)
    sock = getattr(inner, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


class _Paused:
    """One paused wait (a new flow, or a direction): resumed by `FilterDataHost.resume_flow`."""

    def __init__(self, direction: fd.DirectionFilter | None) -> None:
        self.direction = direction
        self.event = trio.Event()
        self.verdict: FilterNewFlowVerdict | FilterDataVerdict | None = None


class FilterDataHost(TransparentProxyProvider):
    """The system's side of a `FilterDataProvider` (see the module docstring), carried by a proxy host backend.

    Args:
        provider: the data filter provider.
        configuration: its ``filter_configuration.vendor_configuration``.
        ports: the TCP ports intercepted (empty: every TCP port).
        control: a `FilterControlProvider` asked when the data provider returns NEED_RULES (None: such flows are
            dropped).
    """

    def __init__(
        self,
        provider: FilterDataProvider,
        *,
        configuration: dict[str, Any] | None = None,
        ports: tuple[int, ...] = (),
        control: FilterControlProvider | None = None,
    ) -> None:
        super().__init__()
        self.filter = provider
        self.control = control
        self.configuration = configuration or {}
        self.ports = ports
        self.filter_settings: FilterSettings | None = None
        self.reports: collections.deque[FilterReport] = collections.deque(maxlen=MAX_REPORTS)
        self._paused: dict[int, list[_Paused]] = {}
        self._c = dict.fromkeys(FilterDataStatistics.__slots__, 0)

    # ---------------------------------------------------------------- bookkeeping
    def count(self, name: str, n: int = 1) -> None:
        self._c[name] += n

    def statistics(self) -> FilterDataStatistics:
        """A frozen snapshot of the counters."""
        return FilterDataStatistics(**self._c)

    def _report(self, flow: FilterSocketFlow, action: FilterAction, event: FilterReportEvent, io: list[int]) -> None:
        self.reports.append(FilterReport(flow, action, event, io[1], io[0]))

    # ---------------------------------------------------------------- the provider's host (_DataHost)
    async def apply_settings(self, settings: FilterSettings | None) -> None:
        """Apple: ``NEFilterDataProvider.apply``: the rules used before ``handle_new_flow``."""
        self.filter_settings = settings

    def rules_changed(self) -> None:
        """The control provider changed the rules: the data provider's ``handle_rules_changed`` runs."""
        self.count("rules_changed")
        try:
            self.filter.handle_rules_changed()
        except Exception as exc:  # provider code
            self.count("handler_errors")
            log.warning("handle_rules_changed raised %r", exc)

    def _ask_control(self, flow: FilterSocketFlow, again: Callable[[], Any]) -> Any:
        """NEED_RULES: the control provider's verdict as the data provider's kind (``again`` re-asks the data
        provider after updateRules, once). No control provider: the need-rules verdict stands (a drop)."""
        self.count("need_rules")
        if self.control is None:
            return None
        verdict = self._call(self.control.handle_new_flow, FilterControlVerdict, flow)
        if verdict.update_rules_first:
            self.rules_changed()
        if verdict.kind is not fd.VerdictKind.NEED_RULES:
            return verdict.kind
        answer = again()
        if answer.kind is fd.VerdictKind.NEED_RULES:
            raise _Dropped("need_rules")
        return answer

    def resume_flow(self, flow: FilterFlow, verdict: FilterNewFlowVerdict | FilterDataVerdict) -> None:
        waits = self._paused.get(id(flow), [])
        for wait in waits:
            if wait.verdict is None and (wait.direction is None) == isinstance(verdict, FilterNewFlowVerdict):
                wait.verdict = verdict
                wait.event.set()
                return
        self.count("stale_resumes")

    # ---------------------------------------------------------------- the proxy side
    async def start_proxy(self, options: dict[str, Any] | None) -> None:
        rules = []
        for any_address in ("0.0.0.0", "::"):
            for port in self.ports or (0,):
                rules.append(
                    NetworkRule.destination_network(HostEndpoint(any_address, port), 0, NetworkRuleProtocol.TCP)
                )
        # the system's choice, not a provider's: not validated (Apple refuses a wildcard port-0 proxy rule)
        self.network_settings = TransparentProxyNetworkSettings(included_network_rules=rules)
        await self._require_host().apply_settings(self.network_settings)
        self.filter._attach(self, self.configuration)
        if self.control is not None:
            self.control._host = self
            self.control.filter_configuration = self.filter.filter_configuration
            await self.control.start_filter()
        await self.filter.start_filter()

    async def stop_proxy(self, reason: int) -> None:
        with trio.move_on_after(5.0):
            await self.filter.stop_filter(ProviderStopReason.USER_INITIATED)
            if self.control is not None:
                await self.control.stop_filter(ProviderStopReason.USER_INITIATED)

    def handle_new_flow(self, flow: AppProxyFlow) -> bool:
        if not isinstance(flow, AppProxyTCPFlow):
            return False  # only TCP is filtered (docs/filters.md): UDP goes direct
        self.run_flow(flow, self._serve)
        return True

    # ---------------------------------------------------------------- one flow
    def _call(self, fn: Callable[..., Any], want: type, *args: Any) -> Any:
        try:
            verdict = fn(*args)
        except Exception as exc:  # provider code: its failure drops this flow only
            self.count("handler_errors")
            log.warning("%s raised %r; the flow is dropped", getattr(fn, "__name__", fn), exc)
            raise _Dropped("handler_error") from exc
        if not isinstance(verdict, want):
            self.count("handler_errors")
            log.warning("%s returned %r, not a %s; the flow is dropped", fn, verdict, want.__name__)
            raise _Dropped("handler_error")
        return verdict

    async def _wait_paused(self, flow: FilterSocketFlow, direction: fd.DirectionFilter | None) -> Any:
        wait = _Paused(direction)
        self._paused.setdefault(id(flow), []).append(wait)
        self.count("paused")
        try:
            await wait.event.wait()
        finally:
            self._paused[id(flow)].remove(wait)
        return wait.verdict

    async def _serve(self, app: AppProxyTCPFlow) -> None:
        meta = app.meta_data.source_app_signing_identifier
        flow = FilterSocketFlow(
            app.remote_endpoint, remote_hostname=app.remote_hostname, source_app_identifier=meta or None
        )
        io = [0, 0]  # outbound, inbound bytes delivered
        self.count("flows")
        try:
            action = (
                self.filter_settings.action_for(flow.flow_key()) if self.filter_settings else FilterAction.FILTER_DATA
            )
            if action is not FilterAction.FILTER_DATA:
                verdict = FilterNewFlowVerdict.allow() if action is FilterAction.ALLOW else FilterNewFlowVerdict.drop()
                self.count("rule_allowed" if action is FilterAction.ALLOW else "rule_dropped")
            else:
                verdict = self._call(self.filter.handle_new_flow, FilterNewFlowVerdict, flow)
                while verdict.kind is fd.VerdictKind.PAUSE:
                    verdict = await self._wait_paused(flow, None)
                if verdict.kind is fd.VerdictKind.NEED_RULES:
                    answer = self._ask_control(
                        flow, lambda: self._call(self.filter.handle_new_flow, FilterNewFlowVerdict, flow)
                    )
                    if isinstance(answer, fd.VerdictKind):
                        verdict = FilterNewFlowVerdict(answer)
                    elif answer is not None:
                        verdict = answer
            self._report(flow, _action(verdict.kind), FilterReportEvent.NEW_FLOW, io)
            if verdict.kind is fd.VerdictKind.ALLOW:
                self.count("allowed")
                upstream = await self.create_tcp_connection(app.remote_endpoint)
                await relay_tcp(app, upstream, count=lambda n: self.count("bytes_outbound", n))
                return
            self._refuse_unless_filter(verdict.kind)
            self.count("filtered")
            await self._filter(app, flow, verdict, io)
            self._report(flow, FilterAction.ALLOW, FilterReportEvent.FLOW_CLOSED, io)
        except _Dropped as dropped:
            self.count("dropped")
            log.info("dropped %r (%s)", flow, dropped.reason)
            self._report(flow, FilterAction.DROP, FilterReportEvent.DATA_DECISION, io)
            _reset(app)
            with trio.CancelScope(shield=True):
                try:
                    await app.close_write(AppProxyFlowError.ABORTED)
                    await app.close_read(AppProxyFlowError.ABORTED)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, AppProxyError):
                    pass
        finally:
            self._paused.pop(id(flow), None)

    def _refuse_unless_filter(self, kind: fd.VerdictKind) -> None:
        if kind is not fd.VerdictKind.FILTER:
            raise _Dropped(kind.value)

    def _control_data(
        self, flow: FilterSocketFlow, verdict: FilterDataVerdict, again: Callable[[], Any]
    ) -> FilterDataVerdict:
        answer = self._ask_control(flow, again)
        if answer is None:
            return verdict  # no control provider: the core drops it
        if isinstance(answer, fd.VerdictKind):
            return FilterDataVerdict(kind=answer)
        assert isinstance(answer, FilterDataVerdict)
        return answer

    async def _filter(
        self, app: AppProxyTCPFlow, flow: FilterSocketFlow, verdict: FilterNewFlowVerdict, io: list[int]
    ) -> None:
        out = fd.DirectionFilter(verdict.filter_outbound, verdict.peek_outbound_bytes)
        inb = fd.DirectionFilter(verdict.filter_inbound, verdict.peek_inbound_bytes)
        upstream: list[StreamIO] = []
        connected = trio.Event()
        p = self.filter

        async def connect() -> None:
            if not upstream:
                try:
                    upstream.append(await self.create_tcp_connection(app.remote_endpoint))
                except AppProxyError:
                    self.count("upstream_errors")
                    raise
                connected.set()

        async def send_up(data: bytes) -> None:
            await connect()
            await upstream[0].send_all(data)
            io[0] += len(data)

        async def eof_up() -> None:
            await connect()
            await upstream[0].send_eof()

        async def read_up(n: int) -> bytes:
            await connected.wait()
            return bytes(await upstream[0].receive_some(n))

        async def send_app(data: bytes) -> None:
            await app.write_data(data)
            io[1] += len(data)

        async def pump(
            df: fd.DirectionFilter,
            *,
            read: Callable[[int], Awaitable[bytes]],
            write: Callable[[bytes], Awaitable[None]],
            write_eof: Callable[[], Awaitable[None]],
            data_handler: Callable[..., Any],
            complete: Callable[..., Any],
        ) -> None:
            pending = b""
            while True:
                ev = df.next_event()
                if isinstance(ev, fd.Deliver):
                    await write(ev.data)
                elif isinstance(ev, fd.Peek):
                    self.count("peeks")
                    offset, data = ev.offset, ev.data
                    v = self._call(data_handler, FilterDataVerdict, flow, offset, data)
                    if v.kind is fd.VerdictKind.NEED_RULES:
                        again = functools.partial(self._call, data_handler, FilterDataVerdict, flow, offset, data)
                        v = self._control_data(flow, v, again)
                    df.verdict(v.kind, v.pass_bytes, v.peek_bytes)
                elif isinstance(ev, fd.Complete):
                    self.count("peeks")
                    v = self._call(complete, FilterDataVerdict, flow)
                    if v.kind is fd.VerdictKind.NEED_RULES:
                        v = self._control_data(flow, v, lambda: self._call(complete, FilterDataVerdict, flow))
                    df.verdict(v.kind, v.pass_bytes, v.peek_bytes)
                elif isinstance(ev, fd.End):
                    await write_eof()
                    return
                elif isinstance(ev, fd.Drop):
                    if ev.reason == "stalled":
                        self.count("stalled")
                    self.count("data_dropped")
                    raise _Dropped(ev.reason)
                elif ev is fd.PAUSED:
                    v = await self._wait_paused(flow, df)
                    df.resume(v.kind, v.pass_bytes, v.peek_bytes)
                else:  # NEED_DATA
                    if not pending:
                        pending = await read(_READ)
                        if not pending:
                            df.receive_eof()
                            continue
                    room = df.room()
                    df.receive_data(pending[:room])
                    pending = pending[room:]

        async def read_app(n: int) -> bytes:
            return await app.read_data()

        async def eof_app() -> None:
            await app.close_write()

        await app.open()
        failed: list[BaseException] = []
        try:
            async with trio.open_nursery() as nursery:

                async def guarded(fn: Callable[[], Awaitable[None]]) -> None:
                    try:
                        await fn()
                    except (_Dropped, OSError, trio.BrokenResourceError, trio.ClosedResourceError, AppProxyError) as e:
                        failed.append(e)
                        nursery.cancel_scope.cancel()

                nursery.start_soon(
                    guarded,
                    lambda: pump(
                        out,
                        read=read_app,
                        write=send_up,
                        write_eof=eof_up,
                        data_handler=p.handle_outbound_data,
                        complete=p.handle_outbound_data_complete,
                    ),
                )
                nursery.start_soon(
                    guarded,
                    lambda: pump(
                        inb,
                        read=read_up,
                        write=send_app,
                        write_eof=eof_app,
                        data_handler=p.handle_inbound_data,
                        complete=p.handle_inbound_data_complete,
                    ),
                )
        finally:
            with trio.CancelScope(shield=True):
                for up in upstream:
                    if failed:
                        _reset(up)
                    await up.aclose()
        self.count("bytes_outbound", io[0])
        self.count("bytes_inbound", io[1])
        for exc in failed:
            if isinstance(exc, _Dropped):
                raise exc
        if failed:
            raise AppProxyError(AppProxyFlowError.PEER_RESET, repr(failed[0]))


def _action(kind: fd.VerdictKind) -> FilterAction:
    return {
        fd.VerdictKind.ALLOW: FilterAction.ALLOW,
        fd.VerdictKind.FILTER: FilterAction.FILTER_DATA,
    }.get(kind, FilterAction.DROP)


def load_filter_data_provider(spec: str, base: type = FilterDataProvider) -> type[Any]:
    """Load ``"package.module:Class"`` naming a `FilterDataProvider` (or ``base``) subclass."""
    from netsim.runtime.proxy_tproxy import load_proxy_provider

    return load_proxy_provider(spec, base)


async def _serve(args: argparse.Namespace) -> None:
    from netsim.runtime.proxy_tproxy import TproxyHost, serve_until_signalled

    apps = [AppRule(label, uid=int(uid)) for uid, _, label in (a.partition("=") for a in args.app)]
    filter_host = FilterDataHost(
        load_filter_data_provider(args.provider)(),
        configuration=json.loads(args.configuration) if args.configuration else None,
        ports=tuple(args.port),
        control=load_filter_data_provider(args.control, FilterControlProvider)() if args.control else None,
    )
    host = TproxyHost(filter_host, app_rules=apps, kernel_names=FILTER_DATA_NAMES)
    await serve_until_signalled(host)
    stats = filter_host.statistics()
    proxy = host.statistics()
    out = {
        "statistics": {k: getattr(stats, k) for k in stats.__slots__},
        "proxy": {k: getattr(proxy, k) for k in proxy.__slots__},
        "ruleset": host.ruleset,
    }
    print("STATS " + json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m netsim.runtime.filter_data``: host a data filter provider in this namespace until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m netsim.runtime.filter_data", description=main.__doc__)
    parser.add_argument("--provider", required=True, help="package.module:Class (a FilterDataProvider)")
    parser.add_argument("--control", help="package.module:Class (a FilterControlProvider), asked on NEED_RULES")
    parser.add_argument("--configuration", help="JSON object: the provider's vendor_configuration")
    parser.add_argument("--app", action="append", default=[], metavar="UID=LABEL", help="an app by uid (repeat)")
    parser.add_argument("--port", action="append", type=int, default=[], help="filter only this TCP port (repeat)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    trio.run(_serve, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
