"""Ready-made additions to a running lab for the bypass scenario (used by `netsim demo`, the bypass example
and the bypass lab tests).

`add_bypass_hosts` adds, with every wait on a READY line:

* ``direct.lab``: 203.0.113.20 / 2001:db8:113::20 on ``inet`` with HTTP (port 80) and UDP echo (port 7) -- the
  host `BYPASS_POLICY_TOML` bypasses by prefix;
* HTTP on port 8080 of the ``www`` host (203.0.113.10) -- the port the policy bypasses;
* HTTP and UDP echo on the ISP router's WAN address, which ``isp.lab.test`` resolves to -- the domain rule.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netsim.lab.lab import Lab

__all__ = [
    "BYPASS_DOMAIN",
    "BYPASS_POLICY_TOML",
    "BYPASS_PORT",
    "DIRECT_V4",
    "DIRECT_V6",
    "DROP_PORT",
    "add_bypass_hosts",
]

DIRECT_V4, DIRECT_V6 = "203.0.113.20", "2001:db8:113::20"
BYPASS_PORT = 8080
BYPASS_DOMAIN = "isp.lab.test"
DROP_PORT = 9

#: The scenario's policy (the same rules as examples/policy.toml; a test keeps the two equal): tunnel
#: everything but one internet host, one TCP port and one domain; drop the UDP discard port.
BYPASS_POLICY_TOML = f"""\
default = "tunnel"
mechanism = "nat"

[[rule]]
name = "direct-host"
action = "bypass"
dst = ["{DIRECT_V4}/32", "{DIRECT_V6}/128"]

[[rule]]
name = "direct-port"
action = "bypass"
proto = "tcp"
ports = ["{BYPASS_PORT}"]

[[rule]]
name = "direct-domain"
action = "bypass"
domain = ["{BYPASS_DOMAIN}"]

[[rule]]
name = "no-discard"
action = "drop"
proto = "udp"
ports = ["{DROP_PORT}"]
"""


def add_bypass_hosts(lab: Lab) -> None:
    """Add the bypass scenario's hosts and services to a running lab (blocking; waits for each READY)."""
    for addr in (f"{DIRECT_V4}/32", f"{DIRECT_V6}/128"):
        lab.add_address("inet", addr, "lo")
    a = lab.addr
    mod = [sys.executable, "-m", "netsim.lab.services"]
    procs = [
        lab.spawn(
            "inet",
            [*mod, "--label", "direct", "--http", f"{DIRECT_V4}:80", "--http", f"[{DIRECT_V6}]:80",
             "--echo", f"{DIRECT_V4}:7", "--echo", f"[{DIRECT_V6}]:7"],
            name="svc-direct",
        ),
        lab.spawn(
            "inet",
            [*mod, "--label", "www8080", "--http", f"{a.www_v4}:{BYPASS_PORT}",
             "--http", f"[{a.www_v6}]:{BYPASS_PORT}"],
            name="svc-8080",
        ),
        lab.spawn(
            "isp",
            [*mod, "--label", "isp", "--http", f"{a.isp_wan_v4}:80", "--echo", f"{a.isp_wan_v4}:7"],
            name="svc-isp",
        ),
    ]  # fmt: skip
    for proc in procs:
        proc.wait_output_sync(r"^READY$", timeout=20.0)
