"""Root-tier tests of the lab world: reachability, NAT on the wire, LAN locality, processes, lifecycle, cleanup.

Each test proves something on the wire or in the kernel, not just an exit code: captures show the NAT rewrite,
TTLs show the LAN host is reached without the router.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from netsim.errors import LabError
from netsim.lab import ADDR, HTTP_SHA256, Lab, clean, read_pcap
from netsim.lab.cleanup import RUN_DIR
from netsim.lab.netns import list_netns, pids_in_netns
from netsim.testing.fixtures import LeakCheck, assert_root_unchanged, lab, root_snapshot
from netsim.testing.require import require_binary, require_root

__all__ = ["lab"]

pytestmark = pytest.mark.lab


def _gate() -> None:
    require_root()
    require_binary("ip", "nft", "iperf3", "tcpdump", "curl", "dig", "ping")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab with captures shared by the read-only reachability tests (bring-up is the expensive part)."""
    _gate()
    with Lab(pcap_dir=tmp_path_factory.mktemp("pcap")) as the_lab:
        yield the_lab


def sh(lab: Lab, role: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return lab.run_sync(role, list(argv), timeout=20, check=check)


# ---------------------------------------------------------------- reachability
@pytest.mark.parametrize(
    ("role", "target"),
    [
        ("mac", ADDR.www_v4),
        ("mac", ADDR.www_v6),
        ("mac", ADDR.vpn_wan_v4),
        ("mac", ADDR.vpn_wan_v6),
        ("mac", ADDR.lan_eth0_v4),
        ("mac", ADDR.lan_eth0_v6),
        ("lan", ADDR.www_v6),
        ("vpn", ADDR.www_v4),
        ("vpn", ADDR.isp_wan_v6),
        ("inet", ADDR.vpn_wan_v6),
    ],
)
def test_ping(world: Lab, role: str, target: object) -> None:
    sh(world, role, "ping", "-c1", "-W2", str(target))


@pytest.mark.parametrize(("role", "target"), [("inet", ADDR.mac_en0_v4), ("vpn", ADDR.mac_en0_v6)])
def test_private_lan_unreachable_from_internet(world: Lab, role: str, target: object) -> None:
    assert sh(world, role, "ping", "-c1", "-W1", str(target), check=False).returncode != 0


@pytest.mark.parametrize("family", ["-4", "-6"])
@pytest.mark.parametrize("role", ["mac", "lan", "vpn"])
def test_http_by_name_known_content(world: Lab, role: str, family: str) -> None:
    # vpn has no resolv.conf of its own: it uses --resolve like a server would use an address
    extra = (
        []
        if role != "vpn"
        else ["--resolve", f"www.lab.test:80:{ADDR.www_v4 if family == '-4' else f'[{ADDR.www_v6}]'}"]
    )
    body = sh(world, role, "curl", family, "-sSf", "--max-time", "10", *extra, "http://www.lab.test/").stdout
    assert hashlib.sha256(body).hexdigest() == HTTP_SHA256


def test_lan_http(world: Lab) -> None:
    out = sh(world, "mac", "curl", "-sSf", "http://printer.lab.test/whoami").stdout.decode().split()
    assert out == ["lan", str(ADDR.mac_en0_v6)]  # IPv6 preferred, no NAT inside the LAN
    out = sh(world, "mac", "curl", "-4", "-sSf", "http://printer.lab.test/whoami").stdout.decode().split()
    assert out == ["lan", str(ADDR.mac_en0_v4)]


@pytest.mark.parametrize(
    ("name", "rtype", "want"),
    [("www", "A", ADDR.www_v4), ("vpn", "AAAA", ADDR.vpn_wan_v6), ("printer", "A", ADDR.lan_eth0_v4)],
)
def test_dns(world: Lab, name: str, rtype: str, want: object) -> None:
    # through mac's resolv.conf (the router's resolver) and directly against the internet resolver
    assert sh(world, "mac", "dig", "+short", "+time=2", f"{name}.lab.test", rtype).stdout.decode().split() == [
        str(want)
    ]
    got = sh(world, "mac", "dig", "+short", "+time=2", f"@{ADDR.dns_v6}", f"{name}.lab.test", rtype).stdout
    assert got.decode().split() == [str(want)]
    nx = sh(world, "mac", "dig", "+time=2", "nosuch.lab.test", "A").stdout
    assert b"NXDOMAIN" in nx


@pytest.mark.parametrize("target", [ADDR.www_v4, ADDR.www_v6, ADDR.lan_eth0_v4, ADDR.lan_eth0_v6])
def test_udp_echo_from_mac_socket(world: Lab, target: object) -> None:
    fam = socket.AF_INET6 if ":" in str(target) else socket.AF_INET
    with world.socket("mac", fam) as s:
        s.settimeout(5)
        s.sendto(b"netsim-echo", (str(target), 7))
        data, peer = s.recvfrom(100)
    assert data == b"netsim-echo"
    assert peer[0] == str(target)


def test_iperf3(world: Lab) -> None:
    """iperf3 moves data each way (a run and a reverse run) at a real rate, and what was sent arrives.

    Timed runs at a capped rate: with ``-n`` the receiver's total is read before it has counted the tail, and an
    uncapped run would spend the CI machine's CPU on a speed nobody asserts.
    """
    for reverse in ((), ("-R",)):
        argv = (
            "iperf3",
            "-c",
            str(ADDR.www_v4),
            "-t",
            "1",
            "-b",
            "200M",
            *reverse,
            "--json",
            "--connect-timeout",
            "3000",
        )
        end = json.loads(sh(world, "mac", *argv).stdout)["end"]
        sent, received = end["sum_sent"], end["sum_received"]
        assert sent["bytes"] > 1_000_000, (reverse, sent)  # ~25 MB at 200 Mbit/s for 1 s
        assert received["bytes"] >= sent["bytes"] // 2, (reverse, sent, received)  # the stream arrived
        assert received["bits_per_second"] > 1e6, (reverse, received)  # a working link, not a speed target


@pytest.mark.parametrize("target", [ADDR.www_v4, ADDR.www_v6])
def test_iperf3_udp_completes_with_reports_on_both_sides(world: Lab, target: object) -> None:
    """``iperf3 -u`` finishes and both ends report (issue 13: it hung, even without a tunnel).

    The server's UDP socket is unbound, so its replies took the source address of inet's link towards the
    client (198.51.100.1) instead of www's: the home NAT had no conntrack entry for that source and dropped
    them. inet's links now prefer www's address as the source of what inet originates.
    """
    argv = ["iperf3", "-u", "-c", str(target), "-t", "1", "-b", "1M", "--json", "--get-server-output"]
    res = world.run_sync("mac", [*argv, "--connect-timeout", "3000"], timeout=15, check=False)
    assert res.returncode == 0, (res.stdout[-500:], res.stderr[-500:])
    report = json.loads(res.stdout)
    sent, received = report["end"]["sum_sent"], report["end"]["sum_received"]  # received: the server's results
    assert sent["packets"] > 10 and sent["bytes"] > 50_000, sent  # ~125 kB at 1 Mbit/s for 1 s
    assert received["packets"] > 0 and received["lost_percent"] < 50, received
    server_text = report["server_output_text"]  # the server's own report, fetched over the control connection
    assert f"local {target} port 5201" in server_text and "receiver" in server_text, server_text


# ---------------------------------------------------------------- on-the-wire proofs
def test_nat_rewrites_source_on_isp_wan(tmp_path: Path) -> None:
    _gate()
    with Lab(pcap_dir=tmp_path, services=True) as the_lab:
        for fam in ("-4", "-6"):
            sh(the_lab, "mac", "curl", fam, "-sSf", "-o", "/dev/null", "http://www.lab.test/")
    # after teardown the captures are flushed and closed
    wan = read_pcap(tmp_path / "isp-wan.pcap")
    en0 = read_pcap(tmp_path / "mac-en0.pcap")
    to_www4 = [p[IP] for p in wan if IP in p and TCP in p and p[IP].dst == str(ADDR.www_v4)]
    to_www6 = [p[IPv6] for p in wan if IPv6 in p and TCP in p and p[IPv6].dst == str(ADDR.www_v6)]
    assert to_www4 and {p.src for p in to_www4} == {str(ADDR.isp_wan_v4)}
    assert to_www6 and {p.src for p in to_www6} == {str(ADDR.isp_wan_v6)}
    inside4 = {p[IP].src for p in en0 if IP in p and TCP in p and p[IP].dst == str(ADDR.www_v4)}
    inside6 = {p[IPv6].src for p in en0 if IPv6 in p and TCP in p and p[IPv6].dst == str(ADDR.www_v6)}
    assert inside4 == {str(ADDR.mac_en0_v4)}
    assert inside6 == {str(ADDR.mac_en0_v6)}
    # the private addresses never appear on the WAN
    private = {str(ADDR.mac_en0_v4), str(ADDR.mac_en0_v6)}
    assert not [p for p in wan if (IP in p and p[IP].src in private) or (IPv6 in p and p[IPv6].src in private)]


def test_lan_host_reached_without_router(world: Lab) -> None:
    cap = world.captures["isp-wan"]
    before = len(cap.packets())
    out = sh(world, "mac", "ping", "-c1", "-W2", str(ADDR.lan_eth0_v4)).stdout.decode()
    assert "ttl=64" in out  # not decremented: no router hop
    out = sh(world, "mac", "ping", "-c1", "-W2", str(ADDR.www_v4)).stdout.decode()
    assert "ttl=63" in out  # control: the reply crosses one router (isp), which decrements it
    lan_on_wan = [p for p in cap.packets()[before:] if IP in p and str(ADDR.lan_eth0_v4) in (p[IP].src, p[IP].dst)]
    assert not lan_on_wan
    en0 = world.captures["mac-en0"].packets()
    assert [p for p in en0 if IP in p and ICMP in p and p[IP].src == str(ADDR.lan_eth0_v4) and p[IP].ttl == 64]


def test_cone_vs_symmetric_nat(tmp_path: Path) -> None:
    """Cone NAT keeps one outside port per inside socket for every destination; symmetric picks new ones."""
    _gate()
    for mode in ("cone", "symmetric"):
        pcap = tmp_path / mode
        with Lab(pcap_dir=pcap, services=True, nat=mode) as the_lab:
            with the_lab.socket("mac") as s:
                s.bind(("0.0.0.0", 40000))
                s.settimeout(5)
                for dst in (ADDR.www_v4, ADDR.dns_v4):
                    s.sendto(b"probe", (str(dst), 7 if dst == ADDR.www_v4 else 53))
                s.recvfrom(100)
        ports = {
            p[UDP].sport for p in read_pcap(pcap / "isp-wan.pcap") if UDP in p and p[IP].src == str(ADDR.isp_wan_v4)
        }
        if mode == "cone":
            assert ports == {40000}
        else:
            assert len(ports) == 2  # a new mapping per destination


# ---------------------------------------------------------------- the second uplink (issue 16)
def _whoami(lab: Lab, fam: str) -> str:
    return sh(lab, "mac", "curl", fam, "-sS", "-m", "5", "http://www.lab.test/whoami").stdout.decode().strip()


def _fault_cli(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from netsim.cli import main

    r = CliRunner().invoke(main, ["lab", "fault", *args])
    return r.exit_code, r.output


def test_second_uplink_path_changes_and_public_address_from_the_cli(tmp_path: Path) -> None:
    """`Lab(second_uplink=True)`: mac's en1 behind isp2 (its own NAT and WAN link); `netsim lab fault path`,
    `uplink-down`, `uplink-up` and `public-address` change where the Mac's traffic leaves, as the internet sees it
    (www's /whoami) and on the wire (isp2's WAN capture)."""
    _gate()
    from netsim.lab import faults, netlink

    with Lab(pcap_dir=tmp_path, services=True, second_uplink=True) as the_lab:
        run = the_lab.run_id
        assert the_lab.roles[-1] == "isp2" and list_netns(f"netsim-{run}-isp2")
        for role, ifname in (("mac", "en1"), ("isp2", "mac"), ("isp2", "wan"), ("inet", "isp2")):
            plan = faults.link_plan(role, ifname)
            assert plan.addresses and set(plan.addresses) <= set(netlink.addresses(the_lab.netns(role), ifname))
        assert netlink.default_routes(the_lab.netns("isp2")) == [
            (dst, gw, "wan") for dst, gw in faults.link_plan("isp2", "wan").routes
        ]
        # en0 is the primary path; en1 only reaches its own network (the control for the move below)
        assert (_whoami(the_lab, "-4"), _whoami(the_lab, "-6")) == ("inet 198.51.100.2", "inet 2001:db8:51::2")
        assert sh(the_lab, "mac", "ping", "-c1", "-W2", str(ADDR.isp2_lan_v4)).returncode == 0
        code, out = _fault_cli("path", "--run", run, "--to", "en1")
        assert code == 0 and "from en0 to en1" in out, out
        assert (_whoami(the_lab, "-4"), _whoami(the_lab, "-6")) == ("inet 198.18.0.2", "inet 2001:db8:18::2")
        assert _fault_cli("path", "--run", run, "--to", "en0")[0] == 0
        assert _whoami(the_lab, "-4") == "inet 198.51.100.2"
        code, out = _fault_cli("uplink-down", "--run", run, "en0")
        assert code == 0 and "primary uplink en1" in out, out
        assert _whoami(the_lab, "-4") == "inet 198.18.0.2"  # names resolve: the DNS follows the primary
        code, out = _fault_cli("uplink-up", "--run", run, "en0", "--primary")
        assert code == 0 and "primary uplink en0" in out, out
        assert (_whoami(the_lab, "-4"), _whoami(the_lab, "-6")) == ("inet 198.51.100.2", "inet 2001:db8:51::2")
        code, out = _fault_cli("public-address", "--run", run)
        assert code == 0 and "198.51.100.2/24, 2001:db8:51::2/64 -> 198.51.100.3/24" in out, out
        assert (_whoami(the_lab, "-4"), _whoami(the_lab, "-6")) == ("inet 198.51.100.3", "inet 2001:db8:51::3")
        assert _fault_cli("public-address", "--run", run)[0] == 0  # and back
        assert _whoami(the_lab, "-4") == "inet 198.51.100.2"
        status = the_lab.status()
        assert f"netsim-{run}-isp2" in status["namespaces"] and ("mac", "en1") in [r[:2] for r in status["addresses"]]
    wan2 = read_pcap(tmp_path / "isp2-wan.pcap")
    srcs = {p[IP].src for p in wan2 if IP in p and TCP in p and p[IP].dst == str(ADDR.www_v4)}
    assert srcs == {str(ADDR.isp2_wan_v4)}  # NAT44 on isp2, the private 192.168.2.10 never on its WAN


def test_lab_up_second_uplink_from_the_command_line() -> None:
    """`netsim lab up --detach --second-uplink` (separate processes, as a user runs it): six namespaces, isp2
    reachable with `lab exec`, a path change from another process, `lab down` removes everything."""
    _gate()

    def netsim(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "netsim", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    up = netsim("lab", "up", "--detach", "--no-services", "--second-uplink")
    assert up.returncode == 0, up.stderr
    run_id = up.stdout.strip()
    try:
        (run,) = json.loads(netsim("lab", "status", "--json", "--run", run_id).stdout)["runs"]
        names = {ns["name"] for ns in run["namespaces"] if ns["present"]}
        assert names == {f"netsim-{run_id}-{r}" for r in ("mac", "isp", "vpn", "inet", "lan", "isp2")}
        ping = ("ping", "-c1", "-W2", str(ADDR.inet_isp2_v4))
        assert netsim("lab", "exec", "--run", run_id, "isp2", "--", *ping).returncode == 0
        moved = netsim("lab", "fault", "path", "--run", run_id, "--to", "en1")
        assert moved.returncode == 0 and "to en1" in moved.stdout, moved.stderr
        route = netsim("lab", "exec", "--run", run_id, "mac", "--", "ip", "route", "show", "default").stdout
        assert f"via {ADDR.isp2_lan_v4} dev en1" in route
        assert netsim("lab", "down", "--run", run_id).returncode == 0
        assert not list_netns(f"netsim-{run_id}-")
    finally:
        if (RUN_DIR / f"{run_id}.json").exists():
            netsim("lab", "down", "--run", run_id)
            clean(run_id, force=True)


def test_a_lab_without_the_second_uplink_has_no_isp2() -> None:
    lab = Lab()
    assert "isp2" not in lab.roles and lab.addr.table(second_uplink=False) == lab.addr.table()[:9]
    with pytest.raises(LabError, match="second_uplink=True"):
        lab.netns("isp2")


# ---------------------------------------------------------------- processes and in-namespace code
def netns_inode() -> str:
    return str(os.stat("/proc/self/ns/net").st_ino)


def test_process_api(world: Lab) -> None:
    async def body() -> None:
        res = await world.run("vpn", ["ip", "-br", "addr", "show", "wan"])
        assert str(ADDR.vpn_wan_v4) in res.stdout.decode()
        with pytest.raises(LabError, match="exited with"):
            await world.run("mac", ["false"])
        with pytest.raises(LabError, match="timed out"):
            await world.run("mac", ["sleep", "5"], timeout=0.2)
        proc = world.spawn("mac", ["sleep", "30"])
        with pytest.raises(LabError, match="still running"):
            await proc.wait(timeout=0.1)
        assert await proc.stop() == -signal.SIGTERM
        py = world.spawn_python("mac", netns_inode)
        assert await py.wait(timeout=20) == 0
        assert py.stdout().strip() == str(os.stat(f"/run/netns/{world.netns('mac')}").st_ino)
        ino = await world.in_netns_async("isp", netns_inode)
        assert ino == netns_inode()  # the function ran in this process...
        here = world.in_netns("isp", lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        assert here == os.stat(f"/run/netns/{world.netns('isp')}").st_ino  # ...but in isp's namespace

    trio.run(body)


def test_async_lab_tears_down_on_exception() -> None:
    _gate()
    leaks = LeakCheck()
    run_ids: list[str] = []

    async def body() -> None:
        async with Lab(services=False) as the_lab:
            run_ids.append(the_lab.run_id)
            assert list_netns(the_lab.prefix)
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        trio.run(body)
    leaks.check(run_ids)


# ---------------------------------------------------------------- lifecycle and cleanup
@pytest.mark.reliability("R2")
@pytest.mark.slow
def test_twenty_up_down_cycles_leave_nothing(tmp_path: Path) -> None:
    _gate()
    before = root_snapshot()
    leaks = LeakCheck()
    run_ids = []
    for i in range(20):
        with Lab(services=i % 5 == 0, pcap_dir=tmp_path / str(i) if i % 10 == 0 else None) as the_lab:
            run_ids.append(the_lab.run_id)
            sh(the_lab, "mac", "ping", "-c1", "-W2", str(ADDR.www_v4))
            tun = the_lab.open_tun("mac")
            assert tun.name == "utun0"
    leaks.check(run_ids)
    assert_root_unchanged(before)


_OWNER = """
import sys, time
from netsim.lab import Lab
with Lab(services=True, second_uplink=sys.argv[1] == "1") as lab:
    lab.open_tun("mac")
    print(lab.run_id, flush=True)
    time.sleep(120)
"""


def _start_owner(second_uplink: bool = False) -> tuple[subprocess.Popen[str], str]:
    argv = [sys.executable, "-c", _OWNER, "1" if second_uplink else "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    proc.stdout.close()
    assert run_id, "owner failed to bring the lab up"
    return proc, run_id


@pytest.mark.reliability("R1")
def test_sigkilled_owner_is_cleaned_and_new_lab_comes_up() -> None:
    _gate()
    proc, run_id = _start_owner()
    try:
        assert clean(run_id).active == [run_id]  # a live owner is never touched
        proc.kill()
        proc.wait()
        assert len(list_netns(f"netsim-{run_id}-")) == 5  # left behind
        # ...but no running services (PR_SET_PDEATHSIG) and no utun0 (never persistent)
        deadline = time.monotonic() + 10
        while any(pids_in_netns(ns) for ns in list_netns(f"netsim-{run_id}-")):
            assert time.monotonic() < deadline, "lab processes survived their owner"
            time.sleep(0.01)
        links = subprocess.run(
            ["ip", "-n", f"netsim-{run_id}-mac", "-br", "link"], capture_output=True, text=True, check=True
        )
        assert "utun0" not in links.stdout and "en0" in links.stdout
        report = clean(run_id)  # scoped: other labs on this machine belong to other people
        assert f"netns netsim-{run_id}-mac" in report.removed
        assert not list_netns(f"netsim-{run_id}-")
        assert not (RUN_DIR / f"{run_id}.json").exists()
        assert not Path(f"/etc/netns/netsim-{run_id}-mac").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        clean(run_id, force=True)
    with Lab(services=False) as again:
        sh(again, "mac", "ping", "-c1", "-W2", str(ADDR.www_v4))


def test_sigkilled_owner_of_a_second_uplink_lab_leaves_nothing_after_clean() -> None:
    """The run file lists isp2's namespace too, and `netsim clean` removes all six."""
    _gate()
    proc, run_id = _start_owner(second_uplink=True)
    try:
        proc.kill()
        proc.wait()
        assert len(list_netns(f"netsim-{run_id}-")) == 6
        record = json.loads((RUN_DIR / f"{run_id}.json").read_text())
        assert f"netsim-{run_id}-isp2" in record["namespaces"]
        report = clean(run_id)
        assert f"netns netsim-{run_id}-isp2" in report.removed
        assert not list_netns(f"netsim-{run_id}-") and not Path(f"/etc/netns/netsim-{run_id}-isp2").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        clean(run_id, force=True)


def test_sigterm_tears_down() -> None:
    _gate()
    proc, run_id = _start_owner()
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list_netns(f"netsim-{run_id}-")
    assert not (RUN_DIR / f"{run_id}.json").exists()


def test_utun_in_mac_carries_real_traffic(lab: Lab) -> None:
    """The `lab` fixture (leak-checked) + a TUN in mac: a routed ping lands in the device, a reply goes back."""
    tun = lab.open_tun("mac")
    sh(lab, "mac", "ip", "addr", "add", "10.99.0.2/32", "dev", tun.name)
    sh(lab, "mac", "ip", "route", "add", "10.99.0.0/24", "dev", tun.name)

    async def body() -> None:
        ping = lab.spawn("mac", ["ping", "-c1", "-W5", "10.99.0.1"])
        with trio.fail_after(5):
            while True:
                await tun.wait_readable()
                pkts = [p for p in tun.read_packets(8) if p[0] >> 4 == 4]
                if pkts:
                    break
        req = IP(pkts[0])
        assert req.src == "10.99.0.2" and req.dst == "10.99.0.1" and ICMP in req
        reply = IP(src=req.dst, dst=req.src) / ICMP(type=0, id=req[ICMP].id, seq=req[ICMP].seq) / req[ICMP].payload
        assert tun.write_packets([bytes(reply)]) == 1
        assert await ping.wait(timeout=5) == 0

    trio.run(body)
    stats = tun.kernel_statistics()
    assert stats.packets_written == 1 and stats.kernel_tx_dropped == 0


def test_demo_lab(capsys: pytest.CaptureFixture[str]) -> None:
    _gate()
    from netsim.lab.cli import demo_lab

    trio.run(demo_lab)
    out = capsys.readouterr().out
    assert "sha256 matches" in out
    assert str(ADDR.isp_wan_v4) in out  # whoami saw the NATed address


def test_dns_survives_garbage(world: Lab) -> None:
    with world.socket("mac") as s:
        for junk in (b"", b"\x00", b"\xff" * 40, bytes(range(256)) * 2):
            s.sendto(junk, (str(ADDR.isp_lan_v4), 53))
    assert sh(world, "mac", "dig", "+short", "+time=2", "www.lab.test", "A").stdout.decode().split() == [
        str(ADDR.www_v4)
    ]
