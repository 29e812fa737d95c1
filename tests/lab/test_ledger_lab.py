"""Issue 11 item 5 in the lab: what the helper knows about losses is on its books.

* probes lost while wireguard-go restarts are ``sent_unconfirmed``, not ``forwarded`` (before the fix every one
  was ``forwarded``: 301 in the issue's run). One UDP probe stream, 10 probes/s for 25 s, across a restart.
* an en0 flap: sends while en0 is down are ``udp_no_route``; packets blackholed after it are ``sent_unconfirmed``.

Each test brings up its own lab and tunnel (the pytest plugin's ``netsim_lab_tunnel``, leak-checked on
teardown); under a minute each.
"""

from __future__ import annotations

import json
import secrets
import sys
from typing import Any

import pytest
import trio

from netsim.core.ledger import LedgerSnapshot
from netsim.lab.tunnel import LabTunnel
from netsim.testing.require import require_binary

pytestmark = [pytest.mark.lab]

# numbered UDP echo probes from `mac`, one every `interval` seconds; prints what came back (bounded)
UDP_STREAM = r"""
import json, socket, sys, time
token, host = sys.argv[1], sys.argv[2]
count, interval, linger = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
got = set()
def drain():
    while True:
        try:
            data = s.recv(2048)
        except (BlockingIOError, ConnectionRefusedError):
            return
        if data.startswith(token.encode()):
            got.add(int(data.rsplit(b"-", 1)[1]))
for seq in range(count):
    try:
        s.sendto(f"{token}-{seq}".encode(), (host, 7))
    except OSError:
        pass
    time.sleep(interval)
    drain()
end = time.monotonic() + linger
while time.monotonic() < end and len(got) < count:
    time.sleep(0.01)
    drain()
print(json.dumps({"sent": count, "received": sorted(got)}))
"""


def _enc(stats: dict[str, Any]) -> dict[str, Any]:
    return stats["ledger"]["stages"]["wg_encrypt"]  # type: ignore[no-any-return]


@pytest.mark.reliability("F5")
@pytest.mark.timeout(240)
@pytest.mark.trio
async def test_probes_lost_in_a_wireguard_go_restart_are_sent_unconfirmed(netsim_lab_tunnel: LabTunnel) -> None:
    t, lab = netsim_lab_tunnel, netsim_lab_tunnel.lab
    rec: dict[str, Any] = {}
    target = str(lab.addr.www_v4)
    rc = (await lab.run("mac", ["ping", "-c", "2", "-W", "3", target], check=False)).returncode
    assert rc == 0, "the tunnel works before the restart (positive control)"
    await t.wait_quiet()
    before = await t.helper_stats()
    token = f"NSLEDGER{secrets.token_hex(3)}"
    argv = [sys.executable, "-c", UDP_STREAM, token, target, "250", "0.1", "3"]
    proc = lab.spawn("mac", argv, name="ledger-stream")
    restarted = False
    start = trio.current_time()
    while proc.returncode is None or trio.current_time() < start + 2.5:
        await trio.sleep(0.3)
        if not restarted and trio.current_time() >= start + 2.0:
            await t.restart_server()
            restarted = True
        assert trio.current_time() < start + 60, "the probe stream did not finish"
    assert proc.returncode == 0, proc.stderr()
    rec["stream"] = json.loads(proc.stdout())
    # every probe is decided once KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s) passed after it was sent
    await trio.sleep(16)
    if t.session.status.name != "CONNECTED":
        why = f"{t.session.stop_reason!r} {t.session.last_disconnect_error!r}"
        raise AssertionError(f"tunnel {t.session.status}: {why}\n{t.logs()[-6000:]}")
    rec["before"], rec["after"] = before, await t.helper_stats()
    rec["logs"] = t.logs()

    stream, before, after = rec["stream"], rec["before"], rec["after"]
    lost = stream["sent"] - len(stream["received"])
    assert 0 < lost < stream["sent"], f"the restart should lose some probes, not all: {lost}"
    unconfirmed = _enc(after)["dropped"].get("sent_unconfirmed", 0) - _enc(before)["dropped"].get("sent_unconfirmed", 0)
    forwarded = _enc(after)["forwarded"] - _enc(before)["forwarded"]
    print(f"probes sent {stream['sent']}, answered {len(stream['received'])}, lost {lost}; helper: "
          f"sent_unconfirmed +{unconfirmed}, forwarded +{forwarded}")  # fmt: skip
    # each lost probe was sent on the dead session and never answered: all of them are in the new stage ...
    assert unconfirmed >= lost, rec["logs"][-3000:]
    # ... and forwarded grew by the answered probes plus at most a little other traffic (IPv6 RS, the settle)
    assert len(stream["received"]) <= forwarded <= len(stream["received"]) + 10
    assert after["device"]["handshakes_completed"] > before["device"]["handshakes_completed"]
    assert LedgerSnapshot.from_json_untrusted(after["ledger"]).check() == []


@pytest.mark.timeout(240)
@pytest.mark.trio
async def test_en0_flap_sends_are_udp_no_route_then_blackholed_ones_sent_unconfirmed(
    netsim_lab_tunnel: LabTunnel,
) -> None:
    """en0 down: the kernel refuses the helper's sendto (no route), a named drop. en0 up again without its default
    route (the kernel removed it with the link): sendto succeeds but nothing comes back, and 15 s later those
    packets are ``sent_unconfirmed``; before the fix they were ``forwarded`` / ``udp_error``."""
    require_binary("ping")
    t, lab = netsim_lab_tunnel, netsim_lab_tunnel.lab
    rec: dict[str, Any] = {}
    target = str(lab.addr.www_v4)
    assert (await lab.run("mac", ["ping", "-c", "1", "-W", "3", target], check=False)).returncode == 0
    await t.wait_quiet()
    rec["before"] = await t.helper_stats()
    await lab.run("mac", ["ip", "link", "set", "en0", "down"])  # the lab's own namespace
    await lab.run("mac", ["ping", "-c", "5", "-i", "0.2", "-W", "1", target], check=False)
    rec["down"] = await t.helper_stats()
    await lab.run("mac", ["ip", "link", "set", "en0", "up"])
    r = await lab.run("mac", ["ping", "-c", "3", "-i", "0.2", "-W", "2", target], check=False)
    rec["ping_after_up"] = r.returncode
    await trio.sleep(16)  # every send decided (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, see the test above)
    rec["after"] = await t.helper_stats()

    before, down, after = rec["before"], rec["down"], rec["after"]

    def delta(s: dict[str, Any], stage: str, key: str) -> int:
        a, b = s["ledger"]["stages"][stage], before["ledger"]["stages"][stage]
        if key in ("read", "forwarded", "queued"):
            return int(a[key] - b[key])
        return int(a["dropped"].get(key, 0) - b["dropped"].get(key, 0))

    sent_down = delta(down, "wg_encrypt", "read")
    assert sent_down >= 5  # the five pings (and nothing the kernel would not route into the utun)
    print(
        f"en0 down: {sent_down} packets, udp_no_route +{delta(down, 'udp_out', 'udp_no_route')}; after: "
        f"sent_unconfirmed +{delta(after, 'wg_encrypt', 'sent_unconfirmed')}, "
        f"forwarded +{delta(after, 'wg_encrypt', 'forwarded')}, ping after up rc {rec['ping_after_up']}"
    )
    assert delta(down, "udp_out", "udp_no_route") >= sent_down
    assert delta(down, "udp_out", "udp_error") == 0
    assert rec["ping_after_up"] != 0  # no default route after the flap: blackholed
    total = delta(after, "wg_encrypt", "read")
    assert delta(after, "wg_encrypt", "forwarded") == 0, "nothing was answered, nothing is forwarded"
    assert delta(after, "wg_encrypt", "sent_unconfirmed") == total
    assert LedgerSnapshot.from_json_untrusted(after["ledger"]).check() == []
