"""The probes of `netsim check leaks`, as bounded self-contained scripts run in the lab's namespaces.

Every probe of one state runs in one short Python process in ``mac`` (threads, one per probe, each with a
deadline), so a whole state costs one process start. The scripts import nothing from netsim (``python -I -c``):
the second-uid probe runs them as ``nobody`` through ``setpriv``, which cannot read a root-only checkout.

Each probe's packets are recognisable in a capture (`ProbeSpec`): TCP and UDP by a unique source port, ICMP,
UDP and DNS by a unique marker in the payload (the DNS marker is the first label of the query name), the kept
connection by the state's marker in the bytes it sends, the CVE-2019-14899 probe by the Mac's answers to the
forged SYN/ACK's unique destination port.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from netsim.core.leakmodel import PROBES, Probe, State

__all__ = [
    "CVE_SCRIPT",
    "KEPT_PORT",
    "KEPT_SCRIPT",
    "PROBE_SCRIPT",
    "PUBLIC_RESOLVER_V4",
    "ProbeSpec",
    "Targets",
    "marker",
    "probe_argv",
    "probe_specs",
    "source_port",
]

#: The fixed "public" resolver address in inet (nothing answers there: only the query leaving en0 matters).
PUBLIC_RESOLVER_V4 = "203.0.113.99"
#: Source port of the TCP connection opened before the tunnel and kept open across the states.
KEPT_PORT = 29999
_BASE_PORT = 30000
_PORTS_PER_STATE = 40


@dataclass(frozen=True)
class Targets:
    """Where the probes go (the lab's addresses by default; see `netsim.lab.addressing`)."""

    inet_v4: str = "203.0.113.10"
    inet_v6: str = "2001:db8:113::10"
    lan_v4: str = "192.168.1.20"
    lan_v6: str = "fd00:6e73:1::20"
    tunnel_dns_v4: str = "203.0.113.53"
    isp_dns_v4: str = "192.168.1.1"
    public_dns_v4: str = PUBLIC_RESOLVER_V4
    tunnel_address_v4: str = "10.66.0.2"

    def address(self, probe: Probe) -> str:
        """The destination of ``probe`` (``""`` for ``system_dns``: the script reads resolv.conf)."""
        if probe.target == "system_dns":
            return ""
        if probe.kind == "cve":
            return self.tunnel_address_v4
        return str(getattr(self, f"{probe.target}_v{probe.family}"))  # e.g. inet_v6, tunnel_dns_v4


@dataclass(frozen=True)
class ProbeSpec:
    """One probe in one state, as the script gets it (JSON) and as the analysis matches it."""

    name: str
    kind: str
    family: int
    dst: str
    port: int  # destination port (TCP 80, UDP 7 echo, DNS 53)
    sport: int  # unique source port (CVE: the forged SYN/ACK's destination port)
    marker: str


def marker(token: str, state: State, probe: Probe) -> str:
    """A DNS-label-safe marker unique to (run, state, probe)."""
    return f"nsl{token}s{list(State).index(state):02d}p{PROBES.index(probe):02d}"


def source_port(state: State, probe: Probe) -> int:
    """The unique source port of ``probe`` in ``state`` (30000-30359)."""
    return _BASE_PORT + list(State).index(state) * _PORTS_PER_STATE + PROBES.index(probe)


def probe_specs(token: str, state: State, targets: Targets | None = None) -> tuple[ProbeSpec, ...]:
    """The specs of every probe in ``state``."""
    t = targets or Targets()
    specs = []
    for probe in PROBES:
        port = {"tcp": 80, "uid": 80, "kept": 80, "udp": 7, "dns": 53, "icmp": 0, "cve": 80}[probe.kind]
        specs.append(
            ProbeSpec(
                probe.name,
                probe.kind,
                probe.family,
                t.address(probe),
                port,
                KEPT_PORT if probe.kind == "kept" else source_port(state, probe),
                marker(token, state, probe),
            )
        )
    return tuple(specs)


# The probe runner: argv[1] is a JSON list of ProbeSpec dicts (kinds tcp/udp/icmp/dns/uid), argv[2] the per-probe
# timeout. Prints one JSON object {name: "reply"|"noreply"|"error: ..."}. Bounded: one or two packets per probe.
PROBE_SCRIPT = r"""
import json, os, socket, struct, sys, threading
specs = json.loads(sys.argv[1]); timeout = float(sys.argv[2]); out = {}
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
def resolver():
    try:
        for line in open("/etc/resolv.conf"):
            f = line.split()
            if len(f) >= 2 and f[0] == "nameserver" and ":" not in f[1]: return f[1]
    except OSError: pass
    return "127.0.0.53"
def fam(s): return socket.AF_INET6 if s["family"] == 6 else socket.AF_INET
def one(s):
    m = s["marker"].encode(); k = s["kind"]; dst = s["dst"]
    if k in ("tcp", "uid"):
        c = socket.socket(fam(s), socket.SOCK_STREAM); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind(("::" if s["family"] == 6 else "0.0.0.0", s["sport"])); c.settimeout(timeout)
        try: c.connect((dst, s["port"])); c.sendall(m + b"\r\n"); return "reply"
        finally: c.close()
    if k == "udp" or k == "dns":
        c = socket.socket(fam(s), socket.SOCK_DGRAM); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind(("::" if s["family"] == 6 else "0.0.0.0", s["sport"])); c.settimeout(timeout)
        if k == "dns":
            dst = dst or resolver()
            q = b"".join(bytes([len(x)]) + x for x in (m, b"lab", b"test")) + b"\0"
            data = struct.pack("!HHHHHH", s["sport"], 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)
        else:
            data = m
        try: c.sendto(data, (dst, s["port"])); c.recv(512); return "reply"
        finally: c.close()
    if k == "icmp":
        v6 = s["family"] == 6
        c = socket.socket(fam(s), socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        c.settimeout(timeout); ident = s["sport"] & 0xFFFF
        hdr = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1)
        pkt = hdr + m if v6 else hdr[:2] + struct.pack("!H", csum(hdr + m)) + hdr[4:] + m
        try:
            c.sendto(pkt, (dst, 0))
            while True:
                r = c.recv(2048)
                if m in r and (r[0] == 129 if v6 else r[(r[0] & 15) * 4] == 0): return "reply"
        finally: c.close()
    return "error: unknown kind"
def run(s):
    try: out[s["name"]] = one(s)
    except (socket.timeout, ConnectionError): out[s["name"]] = "noreply"
    except Exception as e: out[s["name"]] = "error: %s" % e
ts = [threading.Thread(target=run, args=(s,), daemon=True) for s in specs]
for t in ts: t.start()
for t in ts: t.join(timeout + 1)
print(json.dumps(out))
"""

# The kept connection: argv[1] dst, argv[2] port, argv[3] sport, argv[4] marker file. Connects once, then sends the
# file's marker every 100 ms (a connection opened before the tunnel, kept open). Prints "connected" first.
KEPT_SCRIPT = r"""
import socket, sys, time
c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); c.bind(("0.0.0.0", int(sys.argv[3])))
c.settimeout(5); c.connect((sys.argv[1], int(sys.argv[2]))); print("connected", flush=True); c.settimeout(0.2)
end = time.monotonic() + 600
while time.monotonic() < end:
    try: m = open(sys.argv[4], "rb").read().strip()
    except OSError: m = b""
    if m:
        try: c.send(m + b" ")
        except (BlockingIOError, socket.timeout): pass
        except OSError: time.sleep(0.1)
    time.sleep(0.1)
"""

# The CVE-2019-14899 attacker on the LAN: argv[1] ifname, argv[2] dst MAC (the Mac's en0), argv[3] src IP (the
# attacker), argv[4] dst IP (the tunnel address), argv[5] dst port. Sends 3 forged SYN/ACKs (from port 80) as
# Ethernet frames straight to the Mac's en0; the Mac answering them (RST) out of en0 is the leak.
CVE_SCRIPT = r"""
import os, socket, struct, sys, time
ifname, src, dst, dport = sys.argv[1], sys.argv[3], sys.argv[4], int(sys.argv[5])
dmac = bytes.fromhex(sys.argv[2].replace(":", ""))
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((ifname, 0)); smac = s.getsockname()[4]
sa, da = socket.inet_aton(src), socket.inet_aton(dst)
for i in range(3):
    tcp = struct.pack("!HHIIBBHHH", 80, dport, 1000 + i, 2000 + i, 5 << 4, 0x12, 64240, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", csum(sa + da + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i + 1, 0, 64, 6, 0, sa, da)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s.send(dmac + smac + b"\x08\x00" + ip + tcp); time.sleep(0.05)
print("sent 3")
"""


def probe_argv(specs: Sequence[ProbeSpec], timeout: float, *, uid: int | None = None) -> list[str]:
    """The command that runs ``specs`` (kinds tcp/udp/icmp/dns/uid) in one process; as ``uid`` via setpriv."""
    python = os.path.realpath(sys.executable) if uid is not None else sys.executable  # nobody may not enter .venv
    argv = [python, "-I", "-c", PROBE_SCRIPT, json.dumps([asdict(s) for s in specs]), f"{timeout:g}"]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    return argv
