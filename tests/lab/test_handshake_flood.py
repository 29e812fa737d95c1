"""S10: a handshake flood at the helper does not stop the tunnel (root tier).

The helper is the WireGuard client in ``mac``. From ``isp`` (the home router, on the same LAN as ``mac``) a
bounded flood of forged initiations with a valid mac1 (computed from the helper's public key, as anyone who
knows it can) goes to the helper's UDP port while ping runs through the tunnel. Then a second, slower phase
answers a cookie: the attacker owns its address, so it can put a valid mac2 on more forged initiations, which
the per-source rate limiter must hold to ``PACKETS_PER_SECOND``. The assertions are correctness, not speed:
ping keeps its replies (the tunnel did not stop), the DH work the flood caused is bounded by the under-load
mode and the rate limiter (from the helper's counters), and the helper's ledger balances.

On the code before the fix (no under-load mode by default, no rate limiter, no handshake budget) the helper read
about 17k of the 100k, ran a DH for each (``handshake_failed``), and ping lost 8.5-11 % with RTTs over a second:
the loss and DH assertions fail. With the budget but without the kernel filter (before the CI failure at
879f81f) the helper read nearly all of the flood, one syscall each, and when the host was slow the socket
overflowed and took ping replies with it (0.5-5 % lost): the filter assertions fail there. Figures before/after
are in docs/helper.md (faults).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

import pytest
import trio

from netsim.core.ledger import LedgerSnapshot
from netsim.core.wireguard.device import DEFAULT_LOAD_THRESHOLD
from netsim.core.wireguard.ratelimiter import PACKETS_BURSTABLE, PACKETS_PER_SECOND
from netsim.lab.lab import Lab
from netsim.lab.tunnel import netsim_tunnel
from netsim.testing.fixtures import run_lab_scenario

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(300)]

FLOOD = 100_000  # forged initiations without mac2, sent as fast as one Python loop can
MAC2_FLOOD = 2_000  # then forged initiations with a valid mac2, at about 1000/s
MAX_SECONDS = 30.0  # the flood script stops at this deadline whatever it has sent
PINGS = 400  # 20 ms apart: about 8 s, spanning both phases

# Runs in `isp`: builds forged initiations with netsim's own core code (messages + noise), sends them to the
# helper, then uses one cookie reply to send initiations with a valid mac2. Bounded in count and time; sends only
# to the helper's address on the lab LAN. Prints a JSON summary.
FLOOD_SCRIPT = r"""
import json, random, select, socket, sys, time
from netsim.core.wireguard import messages as m, noise
host, port, pub = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
count, mac2_count, max_seconds = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
deadline = time.monotonic() + max_seconds
rng = random.Random(11)
mac1_key = noise.hash_(noise.LABEL_MAC1, pub)
POOL = 4096
pool = []
for i in range(POOL):  # sender index i: a cookie reply's receiver field says which one it answers
    body = m.INITIATION.pack(m.MSG_INITIATION, i, rng.randbytes(32), rng.randbytes(48), rng.randbytes(28), b"", b"")
    body = body[: m.INITIATION_SIZE - 32]
    pool.append(body + noise.mac(mac1_key, body) + bytes(16))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind(("0.0.0.0", 0))
s.setblocking(False)
dst = (host, port)
sent = errors = 0
t0 = time.monotonic()
while sent < count and time.monotonic() < deadline:
    try:
        s.sendto(pool[sent % POOL], dst)
    except BlockingIOError:
        select.select([], [s], [], 0.01)
        errors += 1
        continue
    sent += 1
flood_seconds = time.monotonic() - t0
cookie = None
replies = 0
wait_until = min(deadline, time.monotonic() + 5.0)
while time.monotonic() < wait_until:
    r, _, _ = select.select([s], [], [], 0.2)
    if not r:
        if cookie is not None:
            break
        continue
    while True:
        try:
            data = s.recv(2048)
        except BlockingIOError:
            break
        if len(data) == m.COOKIE_REPLY_SIZE and data[0] == m.MSG_COOKIE_REPLY:
            replies += 1
            if cookie is None:
                _, receiver, nonce, enc = m.COOKIE_REPLY.unpack(data)
                mac1 = pool[receiver % POOL][-32:-16]
                cookie = noise.xaead_decrypt(noise.hash_(noise.LABEL_COOKIE, pub), nonce, enc, mac1)
mac2_sent = 0
t1 = time.monotonic()
if cookie is not None:
    while mac2_sent < mac2_count and time.monotonic() < deadline:
        msg = pool[mac2_sent % POOL]
        s.sendto(msg[:-16] + noise.mac(cookie, msg[:-16]), dst)
        mac2_sent += 1
        time.sleep(0.001)
print(json.dumps({"sent": sent, "eagain": errors, "flood_seconds": flood_seconds, "cookie_replies_seen": replies,
                  "got_cookie": cookie is not None, "mac2_sent": mac2_sent, "mac2_seconds": time.monotonic() - t1}))
"""

_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
_PING_RTT = re.compile(r"= [\d.]+/[\d.]+/([\d.]+)/")


def _device(stats: dict[str, Any]) -> dict[str, Any]:
    dev = dict(stats["device"])
    dev["drops"] = dict(dev.get("drops", {}))
    return dev


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (proc(5): fields 14 and 15 of /proc/<pid>/stat, in ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _settled_stats(t: Any) -> dict[str, Any]:
    """The helper's statistics once its ledger stopped moving (the flood's backlog is drained)."""
    last = None
    with trio.move_on_after(20):
        while True:
            h = await t.helper_stats()
            if last is not None and h["ledger"] == last["ledger"]:
                return h  # type: ignore[no-any-return]
            last = h
            await trio.sleep(0.5)
    return last  # type: ignore[return-value]


@pytest.fixture(scope="module")
def flood() -> dict[str, Any]:
    async def main(lab: Lab, rec: dict[str, Any]) -> None:
        async with netsim_tunnel(lab) as t:
            ready = re.search(r"READY \S+ (\d+)", t.helper.stdout())
            assert ready is not None, t.helper.stdout()
            port = int(ready.group(1))
            www = str(lab.addr.www_v4)
            rc = (await lab.run("mac", ["ping", "-c", "3", "-i", "0.2", "-W", "2", www], check=False)).returncode
            assert rc == 0, "the tunnel works before the flood"
            before = await _settled_stats(t)
            cpu_before = _cpu_seconds(t.helper.pid)
            ping = lab.spawn("mac", ["ping", "-c", str(PINGS), "-i", "0.02", "-W", "2", www], name="ping")
            await trio.sleep(0.5)
            argv = [
                sys.executable, "-c", FLOOD_SCRIPT, str(lab.addr.mac_en0_v4), str(port),
                t.client_key.public_key().raw.hex(), str(FLOOD), str(MAC2_FLOOD), str(MAX_SECONDS),
            ]  # fmt: skip
            attacker = lab.spawn("isp", argv, name="flood", env={"PYTHONPATH": ":".join(p for p in sys.path if p)})
            rc = await attacker.wait(MAX_SECONDS + 15)
            assert rc == 0, attacker.stderr()[-2000:]
            rec["attacker"] = json.loads(attacker.stdout())
            await ping.wait(60)
            rec["ping"] = ping.stdout()
            provider_log = t.helper.stderr_path.parent / "provider.log"
            rec["logs"] = (
                f"{t.logs()}\n--- provider ---\n{provider_log.read_text(errors='replace')[-4000:]}\n"
                f"--- attacker ---\n{rec['attacker']}\n--- ping ---\n{rec['ping'][-600:]}"
            )
            rec["after"] = await _settled_stats(t)
            rec["helper_cpu_seconds"] = round(_cpu_seconds(t.helper.pid) - cpu_before, 2)
            rec["before"] = before
            rc = (await lab.run("mac", ["ping", "-c", "3", "-i", "0.2", "-W", "2", www], check=False)).returncode
            rec["ping_after_rc"] = rc

    rec = run_lab_scenario(main, "wireguard-go", "wg", "ip", "nft", "ping")
    if "error" in rec:  # the cause and the logs go in the failure
        pytest.fail(f"the flood scenario failed: {rec['error']}")
    b, a = _device(rec["before"]), _device(rec["after"])
    transmitted, received = map(int, _PING_SUMMARY.search(rec["ping"]).groups())  # type: ignore[union-attr]
    rtt = _PING_RTT.search(rec["ping"])
    rec["figures"] = {
        **rec["attacker"],
        "dh": a["handshakes_processed"] - b["handshakes_processed"],
        "handshake_failed": a["drops"].get("handshake_failed", 0) - b["drops"].get("handshake_failed", 0),
        "cookie_replies_sent": a["cookie_replies_sent"] - b["cookie_replies_sent"],
        "rate_limited": a["handshakes_rate_limited"] - b["handshakes_rate_limited"],
        "bad_mac2": a["drops"].get("bad_mac2", 0) - b["drops"].get("bad_mac2", 0),
        "helper_rx_datagrams": a["rx_datagrams"] - b["rx_datagrams"],
        # what the kernel dropped at the helper's socket (buffer full) before the helper could read it
        "socket_drops": rec["after"]["udp"]["socket_drops"] - rec["before"]["udp"]["socket_drops"],
        # initiations the helper's socket filter dropped in the kernel while the device shed them anyway
        "kernel_filtered": rec["after"]["udp"]["initiations_filtered"] - rec["before"]["udp"]["initiations_filtered"],
        "filter_spans": rec["after"]["udp"]["filter_spans"] - rec["before"]["udp"]["filter_spans"],
        "ping_transmitted": transmitted,
        "ping_received": received,
        "ping_loss_pct": 100.0 * (transmitted - received) / transmitted,
        "ping_max_rtt_ms": float(rtt.group(1)) if rtt else None,
        "helper_cpu_seconds": rec["helper_cpu_seconds"],
    }
    print("S10 figures:", json.dumps(rec["figures"]))
    return rec


@pytest.mark.reliability("S10")
def test_tunnel_keeps_working_under_a_handshake_flood(flood: dict[str, Any]) -> None:
    f = flood["figures"]
    assert f["sent"] == FLOOD, "the whole flood went out (else the test proves nothing)"
    assert f["helper_rx_datagrams"] > 1000, "a real part of the flood reached the helper"
    assert f["ping_loss_pct"] <= 1.0, f
    # most of the flood never cost the helper a read: its socket filter shed it in the kernel, where the device
    # would have shed it unread (before the filter, at a 4 MiB buffer, the helper read 76-99k of the 100k and a
    # slow moment of the host overflowed the socket: ping lost 1-5 %)
    assert f["filter_spans"] >= 1 and f["kernel_filtered"] >= FLOOD // 2, f
    assert f["socket_drops"] == f["kernel_filtered"], "nothing but initiations was dropped at the socket"
    assert flood["ping_after_rc"] == 0


@pytest.mark.reliability("S10")
def test_flood_dh_work_bounded_by_cookies_and_rate_limiter(flood: dict[str, Any]) -> None:
    f = flood["figures"]
    # The flood's datagrams the helper read were answered with a cookie reply (under load, no mac2) ...
    assert f["cookie_replies_sent"] > 1000 and f["cookie_replies_sent"] == f["bad_mac2"]
    # ... and the attacker answered one, so its mac2 phase met the rate limiter
    assert f["got_cookie"] and f["mac2_sent"] > 0
    assert f["rate_limited"] > 0
    # DH: the load threshold once per load episode -- the flood, and the mac2 phase again if the pause between
    # them let the load lapse -- then the rate limiter's burst and rate for the one source that holds a cookie,
    # plus the tunnel's own handshakes (at most one per REKEY_TIMEOUT). Without the fix every forged initiation
    # the helper reads costs a DH (thousands).
    bound = 2 * DEFAULT_LOAD_THRESHOLD + PACKETS_BURSTABLE + PACKETS_PER_SECOND * math.ceil(f["mac2_seconds"] + 1) + 4
    assert f["dh"] <= bound, f
    assert f["handshake_failed"] <= bound, f  # every forged initiation that got a DH failed to decrypt


@pytest.mark.reliability("S10")
def test_helper_ledger_balances_after_the_flood(flood: dict[str, Any]) -> None:
    ledger = LedgerSnapshot.from_json_untrusted(flood["after"]["ledger"])
    assert [str(i) for i in ledger.check()] == []


def test_lab_left_nothing_behind(flood: dict[str, Any]) -> None:
    assert flood["leaks"] == []
    assert flood["root_changed"] is None
