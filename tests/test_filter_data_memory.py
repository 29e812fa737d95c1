"""FilterDataProvider over the in-memory proxy backend: new-flow and data verdicts, rules, pause, reports."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio

from netsim.apple.filter import (
    MAX_FILTER_RULES,
    FilterAction,
    FilterControlProvider,
    FilterControlVerdict,
    FilterDataProvider,
    FilterDataVerdict,
    FilterFlow,
    FilterNewFlowVerdict,
    FilterReportEvent,
    FilterRule,
    FilterSettings,
)
from netsim.apple.proxy import HostEndpoint, NetworkRule
from netsim.core.hostsniff import sniff_tls_sni
from netsim.errors import ConfigError
from netsim.examples.content_filter import ContentFilter
from netsim.runtime.filter_data import FilterDataHost
from netsim.runtime.proxy_memory import MemoryProxyHost

HTTP, HTTPS, SSH = HostEndpoint("203.0.113.10", 80), HostEndpoint("203.0.113.10", 443), HostEndpoint("203.0.113.10", 22)
RESPONSE = b"HTTP/1.0 200 OK\r\n\r\nhello"


def request(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n".encode()


def client_hello(name: str) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Server:
    """Records every byte it receives per connection; answers RESPONSE once the peer ended its stream."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def __call__(self, stream: trio.abc.HalfCloseableStream) -> None:
        got = bytearray()
        self.received.append(b"")
        try:
            while chunk := await stream.receive_some(65536):
                got += chunk
                self.received[-1] = bytes(got)
            await stream.send_all(RESPONSE)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def exchange(host: MemoryProxyHost, remote: HostEndpoint, chunks: list[bytes]) -> bytes | None:
    """Send ``chunks`` and EOF, read to the end; None when nothing came back (the filter closed or reset the flow:
    a memory stream has no RST, so a drop reads as an empty stream)."""
    stream = await host.connect_tcp(remote, uid=1000)
    try:
        for chunk in chunks:
            await stream.send_all(chunk)
            await trio.sleep(0)
        await stream.send_eof()
        out = bytearray()
        while got := await stream.receive_some(65536):
            out += got
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return bytes(out) or None


def run(
    provider: FilterDataProvider, body: Any, configuration: dict[str, Any] | None = None
) -> tuple[Any, Server, FilterDataHost]:
    server = Server()
    fhost = FilterDataHost(provider, configuration=configuration)

    async def main() -> Any:
        servers = {HTTP: server, HTTPS: server, SSH: server}
        async with MemoryProxyHost(fhost, tcp_servers=servers) as host:  # type: ignore[arg-type]
            with trio.fail_after(20):
                return await body(host)

    return trio.run(main), server, fhost


def test_content_filter_blocks_by_name_and_logs() -> None:
    cf = ContentFilter()

    async def body(host: MemoryProxyHost) -> list[bytes | None]:
        return [
            await exchange(host, HTTP, [request("www.lab.test")]),
            await exchange(host, HTTP, [request("blocked.lab.test")[:9], request("blocked.lab.test")[9:]]),
            await exchange(host, HTTPS, [client_hello("ads.blocked.lab.test")]),
            await exchange(host, HTTPS, [client_hello("www.lab.test")]),
            await exchange(host, SSH, [b"SSH-2.0-x\r\n"]),
        ]

    out, server, fhost = run(cf, body, {"block": ["blocked.lab.test"]})
    assert out == [RESPONSE, None, None, RESPONSE, RESPONSE]
    # the blocked requests never reached the server: it only saw the three allowed flows
    assert len(server.received) == 3  # only the allowed flows were connected upstream
    assert server.received[0] == request("www.lab.test") and server.received[2] == b"SSH-2.0-x\r\n"
    assert sniff_tls_sni(server.received[1]) == (True, "www.lab.test")  # the whole ClientHello passed
    assert b"blocked" not in b"".join(server.received)
    assert [(e["scheme"], e["hostname"], e["verdict"]) for e in cf.log] == [
        ("http", "www.lab.test", "allow"),
        ("http", "blocked.lab.test", "drop"),
        ("https", "ads.blocked.lab.test", "drop"),
        ("https", "www.lab.test", "allow"),
    ]
    s = fhost.statistics()
    assert (s.flows, s.filtered, s.allowed, s.dropped, s.handler_errors) == (5, 4, 1, 2, 0)
    assert [r.event for r in fhost.reports].count(FilterReportEvent.NEW_FLOW) == 5


class Scripted(FilterDataProvider):
    """Answers from a script, recording every call."""

    def __init__(
        self, new: FilterNewFlowVerdict, data: list[FilterDataVerdict], inbound: list[FilterDataVerdict] | None = None
    ):
        super().__init__()
        self.new, self.data, self.inbound = new, list(data), list(inbound or [])
        self.calls: list[tuple[str, int, bytes]] = []

    def handle_new_flow(self, flow: FilterFlow) -> FilterNewFlowVerdict:
        return self.new

    def handle_outbound_data(
        self, flow: FilterFlow, read_bytes_start_offset: int, read_bytes: bytes
    ) -> FilterDataVerdict:
        self.calls.append(("out", read_bytes_start_offset, read_bytes))
        return self.data.pop(0) if self.data else FilterDataVerdict.allow()

    def handle_inbound_data(
        self, flow: FilterFlow, read_bytes_start_offset: int, read_bytes: bytes
    ) -> FilterDataVerdict:
        self.calls.append(("in", read_bytes_start_offset, read_bytes))
        return self.inbound.pop(0) if self.inbound else FilterDataVerdict.allow()

    def handle_outbound_data_complete(self, flow: FilterFlow) -> FilterDataVerdict:
        self.calls.append(("out-complete", 0, b""))
        return FilterDataVerdict.allow()


def both(peek_out: int, peek_in: int) -> FilterNewFlowVerdict:
    return FilterNewFlowVerdict.filter_data_verdict(
        filter_inbound=True, peek_inbound_bytes=peek_in, filter_outbound=True, peek_outbound_bytes=peek_out
    )


def test_pass_and_peek_offsets_both_directions() -> None:
    p = Scripted(
        both(4, 5), [FilterDataVerdict(pass_bytes=6, peek_bytes=4)], [FilterDataVerdict(pass_bytes=5, peek_bytes=3)]
    )

    async def body(host: MemoryProxyHost) -> bytes | None:
        return await exchange(host, HTTP, [b"abcd", b"efghijkl"])

    out, server, _ = run(p, body)
    assert out == RESPONSE and server.received == [b"abcdefghijkl"]
    assert ("out", 0, b"abcd") in p.calls and ("out", 6, b"ghij") in p.calls  # passed 6, peeked the next 4
    assert ("in", 0, RESPONSE[:5]) in p.calls and ("in", 5, RESPONSE[5:8]) in p.calls


def test_inbound_drop_resets_and_outbound_drop_never_connects() -> None:
    p = Scripted(both(100, 100), [FilterDataVerdict.allow()], [FilterDataVerdict.drop()])

    async def body(host: MemoryProxyHost) -> bytes | None:
        return await exchange(host, HTTP, [b"hi"])

    out, server, fhost = run(p, body)
    assert out is None and server.received == [b"hi"]  # the request went up; the response was dropped
    p2 = Scripted(both(100, 100), [FilterDataVerdict.drop()])
    out, server, fhost = run(p2, body)
    assert out is None and server.received == []  # dropped on the first peek: no upstream connection at all
    assert fhost.statistics().data_dropped == 1


def test_new_flow_drop_need_rules_and_bad_handlers() -> None:
    class Raises(FilterDataProvider):
        def handle_new_flow(self, flow: FilterFlow) -> FilterNewFlowVerdict:
            raise RuntimeError("bug")

    class Wrong(FilterDataProvider):
        def handle_new_flow(self, flow: FilterFlow) -> FilterNewFlowVerdict:
            return True  # type: ignore[return-value]

    async def body(host: MemoryProxyHost) -> bytes | None:
        return await exchange(host, HTTP, [b"hi"])

    for provider, counter in (
        (Scripted(FilterNewFlowVerdict.drop(), []), "dropped"),
        (Scripted(FilterNewFlowVerdict.need_rules(), []), "need_rules"),
        (Raises(), "handler_errors"),
        (Wrong(), "handler_errors"),
    ):
        out, server, fhost = run(provider, body)
        assert out is None and server.received == [], provider
        assert getattr(fhost.statistics(), counter) == 1


def test_stalled_verdict_drops() -> None:
    p = Scripted(both(4, 4), [FilterDataVerdict(pass_bytes=0, peek_bytes=4)])

    async def body(host: MemoryProxyHost) -> bytes | None:
        return await exchange(host, HTTP, [b"abcdefgh"])

    out, server, fhost = run(p, body)
    assert out is None and server.received == [] and fhost.statistics().stalled == 1


def test_pause_and_resume_flow() -> None:
    class Pausing(FilterDataProvider):
        def __init__(self) -> None:
            super().__init__()
            self.flows: list[FilterFlow] = []

        def handle_new_flow(self, flow: FilterFlow) -> FilterNewFlowVerdict:
            self.flows.append(flow)
            return FilterNewFlowVerdict.pause()

    p = Pausing()

    async def body(host: MemoryProxyHost) -> bytes | None:
        async def later() -> None:
            while not p.flows:
                await trio.sleep(0.01)
            p.resume_flow(p.flows[0], FilterDataVerdict.allow())  # wrong kind: ignored, counted
            p.resume_flow(p.flows[0], FilterNewFlowVerdict.allow())

        async with trio.open_nursery() as n:
            n.start_soon(later)
            return await exchange(host, HTTP, [b"hi"])

    out, server, fhost = run(p, body)
    assert out == RESPONSE and server.received == [b"hi"]
    assert (fhost.statistics().paused, fhost.statistics().stale_resumes) == (1, 1)


class Applies(Scripted):
    """Applies a DROP rule for :22 and an ALLOW default in start_filter."""

    async def start_filter(self) -> None:
        await self.apply(
            FilterSettings(
                [FilterRule(NetworkRule.destination_network(HostEndpoint("203.0.113.10", 22), 32), FilterAction.DROP)],
                FilterAction.ALLOW,
            )
        )


def test_filter_settings_rules_decide_first() -> None:
    p = Applies(FilterNewFlowVerdict.drop(), [])

    async def body(host: MemoryProxyHost) -> list[bytes | None]:
        return [await exchange(host, SSH, [b"x"]), await exchange(host, HTTP, [b"y"])]

    out, _, fhost = run(p, body)
    assert out == [None, RESPONSE]  # the rule dropped :22, the default allowed :80 without asking the provider
    assert (fhost.statistics().rule_dropped, fhost.statistics().rule_allowed) == (1, 1)


def test_filter_settings_validation() -> None:
    rule = FilterRule(NetworkRule.destination_network(HostEndpoint("203.0.113.10", 22), 32), FilterAction.DROP)
    with pytest.raises(ConfigError):
        FilterSettings([rule] * (MAX_FILTER_RULES + 1)).validate()
    with pytest.raises(ConfigError):
        FilterSettings([], FilterAction.REMEDIATE).validate()
    FilterSettings([rule] * MAX_FILTER_RULES).validate()


def test_socket_flow_fields_and_mapping_rows() -> None:
    """Apple's Darwin family numbers; every FilterAction and FilterReportEvent member has its raw-value row."""
    import re
    from pathlib import Path

    from netsim.apple.filter import FilterReportEvent, FilterSocketFlow

    v6 = FilterSocketFlow(HostEndpoint("2001:db8::1", 443))
    v4 = FilterSocketFlow(HostEndpoint("203.0.113.10", 80))
    assert (v6.socket_family, v4.socket_family, v4.socket_type, v4.socket_protocol) == (30, 2, 1, 6)
    assert v4.identifier != v6.identifier and v4.url is None and int(v4.direction) == 2
    page = (Path(__file__).parents[1] / "docs" / "apple-mapping.md").read_text()
    for cls in (FilterAction, FilterReportEvent):
        for member in cls:
            assert re.search(rf"\| {member.value} \| `netsim\.apple\.{cls.__name__}\.{member.name}` \|", page), member


class RulesFromControl(FilterDataProvider):
    """NEED_RULES until the control provider updated the rules; then allows (new flow) or passes (data)."""

    def __init__(self, at_data: bool = False) -> None:
        super().__init__()
        self.at_data, self.rules, self.asked = at_data, False, 0
        self.data_calls: list[tuple[int, bytes]] = []

    def handle_new_flow(self, flow: FilterFlow) -> FilterNewFlowVerdict:
        self.asked += 1
        if self.at_data:
            return both(100, 100)
        return FilterNewFlowVerdict.allow() if self.rules else FilterNewFlowVerdict.need_rules()

    def handle_outbound_data(
        self, flow: FilterFlow, read_bytes_start_offset: int, read_bytes: bytes
    ) -> FilterDataVerdict:
        self.data_calls.append((read_bytes_start_offset, read_bytes))
        return FilterDataVerdict.allow() if self.rules else FilterDataVerdict.need_rules()

    def handle_rules_changed(self) -> None:
        self.rules = True


class Control(FilterControlProvider):
    def __init__(self, verdict: FilterControlVerdict) -> None:
        super().__init__()
        self.verdict, self.flows = verdict, 0

    def handle_new_flow(self, flow: FilterFlow) -> FilterControlVerdict:
        self.flows += 1
        return self.verdict


def run_with_control(data: RulesFromControl, control: Control | None) -> tuple[bytes | None, Server, FilterDataHost]:
    server = Server()
    fhost = FilterDataHost(data, control=control)

    async def main() -> bytes | None:
        async with MemoryProxyHost(fhost, tcp_servers={HTTP: server}) as host:
            with trio.fail_after(20):
                return await exchange(host, HTTP, [b"hello"])

    return trio.run(main), server, fhost


@pytest.mark.parametrize("at_data", [False, True])
def test_need_rules_asks_the_control_provider(at_data: bool) -> None:
    """allow/drop decide the flow; updateRules runs handle_rules_changed and asks the data provider again."""
    out, server, fhost = run_with_control(RulesFromControl(at_data), Control(FilterControlVerdict.allow()))
    assert out == RESPONSE and server.received == [b"hello"]
    out, server, fhost = run_with_control(RulesFromControl(at_data), Control(FilterControlVerdict.drop()))
    assert out is None and server.received == []
    data = RulesFromControl(at_data)
    out, server, fhost = run_with_control(data, Control(FilterControlVerdict.update_rules()))
    assert out == RESPONSE and data.rules and fhost.statistics().rules_changed == 1
    if at_data:
        assert data.data_calls == [(0, b"hello"), (0, b"hello")]  # the same bytes presented again
    else:
        assert data.asked == 2  # handle_new_flow asked again after the rules changed
    out, server, fhost = run_with_control(RulesFromControl(at_data), None)
    assert out is None and fhost.statistics().need_rules == 1  # no control provider: dropped


def test_update_rules_that_still_need_rules_drop_and_notify() -> None:
    class Stubborn(RulesFromControl):
        def handle_rules_changed(self) -> None:
            self.changed = True  # but still needs rules

    data = Stubborn()
    out, _, fhost = run_with_control(data, Control(FilterControlVerdict.update_rules()))
    assert out is None and fhost.statistics().dropped == 1
    control = Control(FilterControlVerdict.allow(with_update_rules=True))
    data2 = RulesFromControl()
    run_with_control(data2, control)
    assert data2.rules  # allow(withUpdateRules: true) also runs handle_rules_changed
    control.notify_rules_changed()
    assert control._host.statistics().rules_changed == 2
