"""SYN-time decisions of the TPROXY host, without root: queued SYN bytes in, a verdict mark out, asked once.

`TproxyHost.syn_verdict` is what the NFQUEUE reader calls per queued SYN; here it is fed built packets (no
kernel state is installed: the `ProxyKernelState` only names the marks), and the accept path's match is the
`DecisionTable` entry it leaves behind. The lab test (tests/lab/test_transparent_proxy_lab.py) shows the same on
the wire.
"""

from __future__ import annotations

import socket
import struct

import trio
import trio.testing

from examples.transparent_proxy import parse_rule
from netsim.apple.proxy import AppProxyFlow, AppProxyTCPFlow, TransparentProxyNetworkSettings, TransparentProxyProvider
from netsim.runtime.proxy import CLAIMED, DIRECT, FAILED, ProxyHost
from netsim.runtime.proxy_nft import ProxyKernelState
from netsim.runtime.proxy_tproxy import TproxyHost

APP, WWW = "192.168.1.10", "203.0.113.10"


def _syn(sport: int, dport: int, src: str = APP, dst: str = WWW) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


class _ByPort(TransparentProxyProvider):
    """Claims port 80, declines 81, raises on 82; counts the questions."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[AppProxyFlow] = []

    def handle_new_flow(self, flow: AppProxyFlow) -> bool:
        self.asked.append(flow)
        assert isinstance(flow, AppProxyTCPFlow)
        if flow.remote_endpoint.port == 82:
            raise RuntimeError("provider bug")
        return flow.remote_endpoint.port == 80


async def _host() -> tuple[TproxyHost, _ByPort, ProxyKernelState]:
    provider = _ByPort()
    host = TproxyHost(provider)
    host.kernel = kernel = ProxyKernelState(3129)  # names only: nothing is installed
    rules = [parse_rule("0.0.0.0/0:80/tcp"), parse_rule("0.0.0.0/0:81/tcp"), parse_rule("0.0.0.0/0:82/tcp")]
    await ProxyHost.apply_settings(host, TransparentProxyNetworkSettings(included_network_rules=rules))  # no nft
    return host, provider, kernel


def test_claimed_declined_failed_and_asked_once() -> None:
    async def main() -> None:
        host, provider, kernel = await _host()
        async with trio.open_nursery() as nursery:
            host.nursery = nursery
            assert host.syn_verdict(_syn(40001, 80)) == kernel.intercept_mark  # claimed: to TPROXY
            assert host.syn_verdict(_syn(40001, 80)) == kernel.intercept_mark  # retransmit: same answer...
            assert host.syn_verdict(_syn(40002, 81)) is None  # declined: leaves as the app's
            assert host.syn_verdict(_syn(40002, 81)) is None
            assert host.syn_verdict(_syn(40003, 82)) == kernel.intercept_mark  # raised: refused via the listener
            assert len(provider.asked) == 3  # ...and the provider was asked once per connection
            five = (4, 6, socket.inet_aton(APP), socket.inet_aton(WWW), 40001, 80)
            claimed = host.decisions.take(five, trio.current_time())
            assert claimed is not None and claimed.verdict == CLAIMED and claimed.pending is not None
            declined = host.decisions.get((*five[:4], 40002, 81), trio.current_time())
            assert declined is not None and declined.verdict == DIRECT  # kept for retransmits until it expires
            failed = host.decisions.get((*five[:4], 40003, 82), trio.current_time())
            assert failed is not None and failed.verdict == FAILED
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        s = host.statistics()
        assert (s.flows, s.claimed, s.declined, s.flow_errors, s.decided_at_syn) == (3, 1, 1, 1, 3)
        assert host.active == 1  # the claimed flow holds its slot; the others gave theirs back
        assert provider.asked[2].close_errors  # the failed flow was closed with an error (INTERNAL)

    trio.run(main)


def test_unclaimed_by_rules_goes_direct_without_asking() -> None:
    async def main() -> None:
        host, provider, _kernel = await _host()
        assert host.syn_verdict(_syn(40004, 443)) is None
        assert provider.asked == [] and host.statistics().not_claimed_by_rules == 1

    trio.run(main)


def test_garbage_and_own_ports_are_not_decided() -> None:
    async def main() -> None:
        host, provider, kernel = await _host()
        assert host.syn_verdict(b"\x45\x00") is None  # malformed: fail open, counted
        assert host.statistics().flow_errors == 1
        host.own_ports.add(40005)
        assert host.syn_verdict(_syn(40005, 80)) == kernel.intercept_mark  # a capture loop: the accept path refuses it
        assert provider.asked == [] and len(host.decisions) == 0

    trio.run(main)


def test_over_the_flow_limit_is_refused_at_the_syn() -> None:
    async def main() -> None:
        host, provider, kernel = await _host()
        host.max_flows = 0
        assert host.syn_verdict(_syn(40006, 80)) == kernel.intercept_mark
        assert provider.asked == [] and host.statistics().flow_limit == 1
        five = (4, 6, socket.inet_aton(APP), socket.inet_aton(WWW), 40006, 80)
        entry = host.decisions.take(five, trio.current_time())
        assert entry is not None and entry.verdict == FAILED  # the accepted socket will be closed

    trio.run(main)
