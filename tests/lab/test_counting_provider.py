"""Issue 13 in the lab (root): the example CountingProvider (not a HelperForwardingProvider) through WireGuard.

`examples.counting_provider.CountingProvider` talks to the real helper only through the public `HelperClient`
API. Through `netsim_tunnel(lab, provider=CountingProvider)`: ping, a UDP echo carrying a per-run token and an
HTTP fetch go through the tunnel (answered by the internet hosts behind wireguard-go); the provider's
``b"counts"`` answer matches the traffic per protocol and, packet for packet, the helper's own ledger; and the
``mac-en0`` capture never holds the token in clear while the positive control (the same probe with the tunnel
down) shows that it would.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from examples.counting_provider import CountingProvider
from netsim.apple import VPNStatus
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.tunnel import netsim_tunnel
from netsim.runtime.forwarding import HelperForwardingProvider
from netsim.testing.fixtures import assert_root_unchanged, root_snapshot
from netsim.testing.require import require_binary, require_root, require_tun

pytestmark = [pytest.mark.lab, pytest.mark.tun, pytest.mark.timeout(300)]

WWW4 = "203.0.113.10"
# One UDP datagram carrying a token to the lab's echo service; prints the echo (bounded: 3 s timeout).
TOKEN_ECHO = (
    "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
    f"s.sendto(sys.argv[1].encode(), ('{WWW4}', 7)); print(s.recv(256).decode())"
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    require_tun()
    require_binary("wireguard-go", "wg", "ip", "nft", "tcpdump", "curl", "ping")
    before = root_snapshot()
    with Lab(pcap_dir=tmp_path_factory.mktemp("counting-pcap")) as the_lab:
        yield the_lab
    assert_root_unchanged(before)


async def _token_echo(lab: Lab, token: str) -> tuple[int, str]:
    r = await lab.run("mac", [sys.executable, "-c", TOKEN_ECHO, token], check=False, timeout=20)
    return r.returncode, r.stdout.decode(errors="replace").strip()


def test_counting_provider_through_wireguard_counts_and_leaks_nothing(lab: Lab) -> None:
    token, control = f"NSCOUNT{secrets.token_hex(6)}", f"NSCTRL{secrets.token_hex(6)}"
    rec: dict[str, Any] = {}

    async def main() -> None:
        async with netsim_tunnel(lab, provider=CountingProvider) as t:
            rec["status"] = t.session.status
            ping = await lab.run("mac", ["ping", "-c", "3", "-i", "0.2", "-W", "2", WWW4], check=False, timeout=30)
            rec["ping_rc"] = ping.returncode
            rec["echo"] = await _token_echo(lab, token)
            http = await lab.run(
                "mac",
                ["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", f"http://{WWW4}/"],
                check=False,
                timeout=30,
            )
            rec["http"] = (http.returncode, http.stdout.decode().strip())
            await trio.sleep(1.0)  # quiescence: the TCP close and any answers in flight are done
            rec["counts"] = json.loads(await t.send_provider_message(b"counts") or b"")
            rec["helper"] = await t.helper_stats()
            rec["helper_via_provider"] = json.loads(await t.send_provider_message(b"helper-stats") or b"")
        rec["control"] = await _token_echo(lab, control)  # tunnel down: this one leaves en0 in clear

    trio.run(main)
    assert rec["status"] is VPNStatus.CONNECTED
    assert rec["ping_rc"] == 0 and rec["echo"] == (0, token) and rec["http"] == (0, "200"), rec
    out, inbound = rec["counts"]["out"], rec["counts"]["in"]
    assert out["icmp"] >= 3 and inbound["icmp"] >= 3, rec["counts"]  # 3 echo requests, 3 replies
    assert out["udp"] >= 1 and inbound["udp"] >= 1, rec["counts"]  # the token echo
    assert out["tcp"] >= 5 and inbound["tcp"] >= 4, rec["counts"]  # handshake, GET, response, close
    # packet for packet: what the provider counted is what the helper booked on its side of the IPC
    stages = rec["helper"]["ledger"]["stages"]
    assert sum(out.values()) == stages["ipc_in"]["read"], (rec["counts"], stages["ipc_in"])
    assert sum(inbound.values()) == stages["ipc_out"]["forwarded"], (rec["counts"], stages["ipc_out"])
    assert rec["helper"]["sessions"] == 1 and rec["helper_via_provider"]["sessions"] == 1
    assert lab.pcap_dir is not None
    en0 = b"".join(bytes(p) for p in read_pcap(lab.pcap_dir / "mac-en0.pcap"))
    assert rec["control"] == (0, control) and control.encode() in en0  # positive control: the capture sees it
    assert token.encode() not in en0  # through the tunnel: never in clear on en0


@pytest.mark.parametrize("second", ["counting", "builtin"])
def test_a_second_provider_is_refused_busy_saying_so(lab: Lab, second: str) -> None:
    """While a CountingProvider tunnel runs, a second provider in ``mac`` (another CountingProvider, or the
    built-in one) is refused by the helper: its start fails naming BUSY (the built-in one used to record
    ``'TooSlowError: '``), and the first tunnel keeps working."""
    token = f"NSBUSY{secrets.token_hex(6)}"
    rec: dict[str, Any] = {}

    async def main() -> None:
        async with netsim_tunnel(lab, provider=CountingProvider) as t:
            provider = CountingProvider if second == "counting" else HelperForwardingProvider
            manager = t.another_manager(provider, connect_timeout=5.0, reconnect_for=30.0, backoff_max=0.5)
            async with manager.open_session() as other:
                await other.start_vpn_tunnel()
                with trio.fail_after(60):
                    await other.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
                rec["second"] = (other.status, other.last_disconnect_error)
            rec["first"] = t.session.status
            rec["echo"] = await _token_echo(lab, token)
            rec["helper"] = await t.helper_stats()

    trio.run(main)
    status, error = rec["second"]
    assert status is VPNStatus.DISCONNECTED, rec
    assert "BUSY" in (error or "") and "TooSlowError" not in (error or ""), error
    assert rec["first"] is VPNStatus.CONNECTED and rec["echo"] == (0, token), rec
    assert rec["helper"]["sessions"] == 1
