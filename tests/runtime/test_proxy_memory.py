"""Proxy providers on the in-memory backend: claim rules, handle_new_flow verdicts, relays, flow state, isolation.

Each server connection is logged with who opened it (the app itself, or the provider), so "declined goes direct",
"unclaimed never reaches the provider" and "claimed is forwarded by the provider" are observable, with controls.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from examples.transparent_proxy import LoggingTransparentProxy, parse_rule
from netsim.apple import AppRule
from netsim.apple.proxy import (
    AppProxyError,
    AppProxyFlow,
    AppProxyFlowError,
    AppProxyProvider,
    AppProxyTCPFlow,
    AppProxyUDPFlow,
    HostEndpoint,
    TransparentProxyNetworkSettings,
)
from netsim.runtime.proxy_memory import MemoryProxyHost, ServerContact, echo_tcp_server

WWW = HostEndpoint("203.0.113.10", 80)
LAN = HostEndpoint("192.168.1.20", 80)
ECHO = HostEndpoint("203.0.113.10", 7)
OPTIONS = {"include": ["0.0.0.0/0:80/tcp", "203.0.113.0/24:7/udp"], "decline": ["192.168.1.0/24"]}


async def _roundtrip(stream: Any, data: bytes) -> bytes:
    """Send, half-close, read to the end; b"" when the other side closed (the app's "refused"/"reset")."""
    out = b""
    try:
        await stream.send_all(data)
        await stream.send_eof()
        while chunk := await stream.receive_some(65536):
            out += chunk
    except trio.BrokenResourceError:
        return b""
    return out


class _Configured(LoggingTransparentProxy):
    async def start_proxy(self, options: dict[str, Any] | None) -> None:
        await super().start_proxy(OPTIONS)


def _servers() -> dict[str, Any]:
    return {
        "tcp_servers": {WWW: echo_tcp_server, LAN: echo_tcp_server, HostEndpoint("198.51.100.9", 22): echo_tcp_server},
        "udp_servers": {ECHO: lambda d: d, HostEndpoint("192.168.1.20", 7): lambda d: d},
    }


def test_claimed_declined_and_unclaimed_tcp() -> None:
    async def main() -> tuple[MemoryProxyHost, list[bytes]]:
        provider = _Configured()
        async with MemoryProxyHost(provider, **_servers(), app_rules=[AppRule("dev.app", uid=1000)]) as host:
            out = [
                await _roundtrip(await host.connect_tcp(WWW, uid=1000), b"proxied"),
                await _roundtrip(await host.connect_tcp(LAN, uid=1000), b"declined"),
                await _roundtrip(await host.connect_tcp(HostEndpoint("198.51.100.9", 22)), b"unclaimed"),
            ]
            return host, out

    host, out = trio.run(main)
    assert out == [b"proxied", b"declined", b"unclaimed"]
    assert host.contacts == [
        ServerContact("tcp", WWW, "provider"),  # claimed: forwarded by the provider's own connection
        ServerContact("tcp", LAN, "provider"),  # declined: relayed directly by the host (the lab does the same)
        ServerContact("tcp", HostEndpoint("198.51.100.9", 22), "app"),  # no rule: never intercepted (control)
    ]
    stats = host.statistics()
    assert (stats.flows, stats.claimed, stats.declined, stats.refused) == (2, 1, 1, 0)
    assert stats.direct_bytes == 2 * len(b"declined")
    log = host.provider.log  # type: ignore[attr-defined]
    assert [(e["event"], e.get("verdict")) for e in log[:2]] == [("flow", "proxy"), ("flow", "direct")]
    assert log[0]["app"] == "dev.app"  # FlowMetaData from the socket owner's uid
    assert any(e["event"] == "closed" and e["bytes"] == 2 * len(b"proxied") for e in log)


def test_udp_flow_proxied_with_local_endpoint_and_replies() -> None:
    async def main() -> tuple[MemoryProxyHost, list[Any]]:
        async with MemoryProxyHost(_Configured(), **_servers()) as host:
            sock = host.udp_socket(HostEndpoint("192.168.1.10", 5353))
            await sock.sendto(b"one", ECHO)
            await sock.sendto(b"two", ECHO)
            got: list[Any] = [await sock.recvfrom(), await sock.recvfrom()]
            lan = host.udp_socket(HostEndpoint("192.168.1.10", 5354))
            await lan.sendto(b"lan", HostEndpoint("192.168.1.20", 7))  # not claimed: straight to the server
            got.append(await lan.recvfrom())
            flow = sock.flow
            assert isinstance(flow, AppProxyUDPFlow)
            got.append((flow.local_endpoint, flow.initial_remote_endpoint))
            return host, got

    host, got = trio.run(main)
    assert got[:3] == [(b"one", ECHO), (b"two", ECHO), (b"lan", HostEndpoint("192.168.1.20", 7))]
    assert got[3] == (HostEndpoint("192.168.1.10", 5353), ECHO)
    assert [c.sender for c in host.contacts] == ["provider", "provider", "app"]
    assert host.statistics().claimed == 1


def test_tcp_flow_has_no_local_endpoint_udp_has() -> None:
    """Forum: "Why is localEndpoint not available for NEAppProxyTCPFlow?" -- it is not, here either."""
    assert not hasattr(AppProxyTCPFlow, "local_endpoint")
    flow = AppProxyTCPFlow(None, WWW, _meta())  # type: ignore[arg-type]
    assert not hasattr(flow, "local_endpoint") and flow.remote_endpoint == WWW
    udp = AppProxyUDPFlow(None, HostEndpoint("192.168.1.10", 5353), _meta())  # type: ignore[arg-type]
    assert udp.local_endpoint.port == 5353


def _meta() -> Any:
    from netsim.apple import FlowMetaData

    return FlowMetaData()


def test_flow_misuse_raises_apple_codes() -> None:
    async def main() -> list[int]:
        flow = AppProxyTCPFlow(trio.testing.memory_stream_pair()[0], WWW, _meta())
        codes = []
        for op in (flow.read_data(), flow.write_data(b"x")):
            try:
                await op
            except AppProxyError as exc:
                codes.append(int(exc.code))
        await flow.open()
        try:
            await flow.open()
        except AppProxyError as exc:
            codes.append(int(exc.code))
        await flow.close_read()
        try:
            await flow.read_data()
        except AppProxyError as exc:
            codes.append(int(exc.code))
        return codes

    import trio.testing

    assert trio.run(main) == [1, 1, 4, 1]  # NOT_CONNECTED, NOT_CONNECTED, INVALID_ARGUMENT, NOT_CONNECTED


class _Refuser(AppProxyProvider):
    """An app proxy (not transparent): declining means refused, not direct."""

    async def start_proxy(self, options: dict[str, Any] | None) -> None:
        await self.set_tunnel_network_settings(
            TransparentProxyNetworkSettings(included_network_rules=[parse_rule("0.0.0.0/0:80/tcp")])
        )


def test_app_proxy_decline_refuses() -> None:
    async def main() -> tuple[MemoryProxyHost, bytes]:
        async with MemoryProxyHost(_Refuser(), **_servers()) as host:
            stream = await host.connect_tcp(WWW)
            return host, await _roundtrip(stream, b"x")

    host, out = trio.run(main)
    assert out == b"" and host.contacts == []  # closed, never reached the server
    assert host.statistics().refused == 1


class _Faulty(LoggingTransparentProxy):
    """Raises in handle_new_flow for port 80 flows to .66 and in the flow handler for .77; serves the rest."""

    async def start_proxy(self, options: dict[str, Any] | None) -> None:
        await super().start_proxy({"include": ["203.0.113.0/24:80/tcp"]})

    def handle_new_flow(self, flow: AppProxyFlow) -> bool:
        assert isinstance(flow, AppProxyTCPFlow)
        if flow.remote_endpoint.hostname == "203.0.113.66":
            raise RuntimeError("bad provider code")
        if flow.remote_endpoint.hostname == "203.0.113.77":

            async def boom(f: AppProxyFlow) -> None:
                await f.open()
                raise ValueError("handler failed")

            self.run_flow(flow, boom)
            return True
        return super().handle_new_flow(flow)


def test_a_bad_flow_closes_only_that_flow() -> None:
    bad1, bad2 = HostEndpoint("203.0.113.66", 80), HostEndpoint("203.0.113.77", 80)

    async def main() -> tuple[MemoryProxyHost, list[bytes]]:
        async with MemoryProxyHost(_Faulty(), tcp_servers={WWW: echo_tcp_server}) as host:
            good = await host.connect_tcp(WWW)
            await good.send_all(b"before ")
            out = [
                await _roundtrip(await host.connect_tcp(bad1), b"x"),
                await _roundtrip(await host.connect_tcp(bad2), b"y"),
            ]
            out.append(await _roundtrip(good, b"after"))  # the good flow, open across both failures, still works
            return host, out

    host, out = trio.run(main)
    assert out == [b"", b"", b"before after"]
    assert host.statistics().flow_errors == 2
    assert host.statistics().claimed == 2


def test_flow_limit_refuses_beyond_max() -> None:
    async def main() -> MemoryProxyHost:
        async with MemoryProxyHost(_Configured(), **_servers(), max_flows=1) as host:
            first = await host.connect_tcp(WWW)
            await first.send_all(b"x")
            await trio.testing.wait_all_tasks_blocked()
            assert await _roundtrip(await host.connect_tcp(WWW), b"y") == b""
            assert await _roundtrip(first, b"z") == b"xz"
            return host

    import trio.testing

    assert trio.run(main).statistics().flow_limit == 1


@pytest.mark.parametrize("text", ["0.0.0.0/0:80/tcp", "::/0:443/udp", "203.0.113.10/32:0/any"])
def test_parse_rule_round_trip(text: str) -> None:
    rule = parse_rule(text)
    assert rule.match_remote_endpoint is not None
    assert str(rule.match_remote_prefix) == text.split("/", 1)[1].rsplit(":", 1)[0]


def test_error_code_enum() -> None:
    assert AppProxyFlowError(6).name == "REFUSED"
