"""An idle lab tunnel stays up (docs/reliability.md F15, found by attack: PR_SET_PDEATHSIG and trio's thread cache).

The defect: the provider host was forked from a trio worker thread with ``PR_SET_PDEATHSIG``; the kernel sends
that signal when the *forking thread* exits, and trio retires a worker thread after 10 s without work. So a
tunnel with no traffic for 10 s lost its provider (SIGKILL), went DISCONNECTED, lost its routes, and the next
packet left en0 in the clear. This test idles 30 s, then proves the tunnel still carries traffic: provider pid
alive, no status change, a ping through the tunnel, its payload absent in clear on ``mac/en0`` and present
decrypted on the server's tunnel interface (the positive control that makes the absence meaningful).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
import trio

from netsim.apple.enums import VPNStatus
from netsim.lab.lab import Lab
from netsim.lab.pcap import read_pcap
from netsim.lab.process import process_start_time
from netsim.lab.tunnel import netsim_tunnel
from netsim.testing.fixtures import LeakCheck
from netsim.testing.require import require_binary, require_root, require_tun

pytestmark = [pytest.mark.lab, pytest.mark.tun, pytest.mark.slow, pytest.mark.timeout(240)]

IDLE = 30.0  # seconds: three times trio's worker-thread idle timeout (10 s)


@pytest.mark.reliability("F15")
def test_tunnel_idle_for_30_s_still_carries_traffic(tmp_path: Path) -> None:
    require_root()
    require_tun()
    require_binary("wireguard-go", "wg", "ip", "nft", "tcpdump", "ping")
    token = secrets.token_hex(8)  # 16 hex digits: ping -p repeats these 8 bytes through the ICMP payload
    rec: dict[str, Any] = {}
    leaks = LeakCheck()

    async def main() -> None:
        async with Lab(pcap_dir=tmp_path, services=False) as lab:
            rec["run_id"] = lab.run_id
            async with netsim_tunnel(lab) as t:
                launcher = t.session.manager.launcher
                provider = launcher.processes[-1]  # type: ignore[attr-defined]
                rec["provider_pid"] = provider.pid
                start_time = process_start_time(provider.pid)
                history_before = list(t.session.history)
                changes = t.session.status_changes()
                changed: list[tuple[float, VPNStatus, str | None]] = []
                began = trio.current_time()

                async def watch() -> None:  # when each change happened, so a failure says "died after ~10 s"
                    async for change in changes:
                        changed.append((round(trio.current_time() - began, 1), change.status, change.error))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    await trio.sleep(IDLE)  # no probe, no stats request: nothing wakes a worker thread
                    nursery.cancel_scope.cancel()
                rec["changes"] = changed
                rec["provider_alive"] = provider.returncode is None and process_start_time(provider.pid) == start_time
                rec["provider_rc"] = provider.returncode
                rec["status"] = t.session.status
                rec["history_unchanged"] = t.session.history == history_before
                ping = await lab.run(
                    "mac", ["ping", "-c", "3", "-i", "0.2", "-W", "2", "-q", "-p", token, "203.0.113.10"], check=False
                )
                rec["ping"] = (ping.returncode, ping.stdout.decode(errors="replace")[-300:])
                if t.session.status is VPNStatus.CONNECTED:  # the ledgers are only readable from a live provider
                    probe = await t.run_probe(
                        "ping v4 after idle", ("ping", "-c", "2", "-W", "2", "-q", "203.0.113.10")
                    )
                    rec["probe"] = (probe.ok, probe.path, probe.tunnelled)

    trio.run(main)
    en0 = b"".join(bytes(p) for p in read_pcap(tmp_path / "mac-en0.pcap"))
    wg = b"".join(bytes(p) for p in read_pcap(tmp_path / "vpn-wg.pcap"))
    needle = bytes.fromhex(token)
    assert en0.count(needle) == 0, f"the ping payload left mac/en0 in the clear; status changes: {rec['changes']}"
    assert rec["changes"] == [], f"status changed while idle (seconds after idling began): {rec['changes']}"
    assert rec["provider_alive"], f"provider pid {rec['provider_pid']} died while idle (status {rec['provider_rc']})"
    assert rec["status"] is VPNStatus.CONNECTED
    assert rec["history_unchanged"]
    assert rec["ping"][0] == 0, rec["ping"]
    assert rec.get("probe", (False, None))[:2] == (True, "tunnel"), rec["probe"]
    assert wg.count(needle) >= 3, "positive control: the ping payload must be seen decrypted on the server's wg"
    assert leaks.problems([rec["run_id"]]) == []
