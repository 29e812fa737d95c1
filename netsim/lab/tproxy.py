"""Run a transparent (or app) proxy provider in the lab's ``mac`` namespace over nftables TPROXY.

`transparent_proxy` spawns ``python -m netsim.runtime.proxy_tproxy`` in ``mac`` (a lab process: tracked, stopped
at teardown), waits for its ``READY`` line, and yields a `RunningProxy`; on exit it stops the host with SIGTERM,
which removes the host's own nftables table, policy rule and route table (`netsim.runtime.proxy_nft`) and prints
its statistics (a ``STATS {json}`` line). The mechanism and its limits are in docs/proxy.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from netsim.apple.protocol import AppRule
from netsim.errors import LabError
from netsim.lab.lab import Lab
from netsim.lab.process import LabProcess

__all__ = ["RunningProxy", "transparent_proxy"]


class RunningProxy:
    """A proxy host running in ``mac``: its process, listening port, flow log and (after stop) statistics."""

    def __init__(self, lab: Lab, process: LabProcess, port: int) -> None:
        self.lab, self.process, self.port = lab, process, port
        self.result: dict[str, Any] | None = None

    def flow_log(self) -> list[dict[str, Any]]:
        """The JSON objects the provider printed on stderr, one per line (other lines are skipped)."""
        out = []
        for line in self.process.stderr().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    async def ruleset(self) -> str:
        """The live nftables table of the proxy (``nft list table inet netsim_tproxy``, or the DNS proxy's)."""
        table = "netsim_dnsproxy" if "--dns" in self.process.argv else "netsim_tproxy"
        r = await self.lab.run(self.process.role, ["nft", "list", "table", "inet", table], check=False)
        return r.stdout.decode()

    async def stop(self) -> dict[str, Any]:
        """SIGTERM the host; returns ``{"statistics": {...}, "ruleset": "..."}`` it wrote at exit."""
        if self.result is None:
            await self.process.stop(grace=10.0)
            lines = [ln for ln in self.process.stdout().splitlines() if ln.startswith("STATS ")]
            if not lines:
                raise LabError(f"the proxy host wrote no statistics; stderr: {self.process.stderr()[-2000:]}")
            self.result = json.loads(lines[-1][len("STATS ") :])
        return self.result


@asynccontextmanager
async def transparent_proxy(
    lab: Lab,
    provider: str,
    *,
    options: dict[str, Any] | None = None,
    app_rules: list[AppRule] | None = None,
    mark_own: bool = True,
    role: str = "mac",
    dns: bool = False,
    system_dns: list[str] | None = None,
) -> AsyncIterator[RunningProxy]:
    """Host ``provider`` (``"pkg.mod:Class"``, importable with this interpreter's ``sys.path``) in ``role`` for the
    duration of the block.

    ``dns=True`` hosts a `netsim.apple.proxy.DNSProxyProvider`: the host intercepts the flows to the Mac's resolver
    with its own kernel names (`netsim.runtime.proxy_tproxy.DNS_PROXY_NAMES`) and gives the provider
    ``system_dns`` (default: the home router's resolvers, the Mac's system DNS) as ``system_dns_settings``.
    """
    argv = [sys.executable, "-m", "netsim.runtime.proxy_tproxy", "--provider", provider, "--print-stats"]
    if options is not None:
        argv += ["--options", json.dumps(options)]
    for rule in app_rules or []:
        argv += ["--app", f"{rule.uid}={rule.signing_identifier}"]
    if not mark_own:
        argv.append("--no-mark-own")
    if dns:
        servers = system_dns if system_dns is not None else [str(lab.addr.isp_lan_v4), str(lab.addr.isp_lan_v6)]
        argv += ["--dns", *(a for server in servers for a in ("--system-dns", server))]
    path = ":".join(p for p in sys.path if p)
    proc = lab.spawn(role, argv, name=("dnsproxy-" if dns else "tproxy-") + role, env={"PYTHONPATH": path})
    try:
        match = await trio.to_thread.run_sync(lambda: proc.wait_output_sync(r"^READY (\d+)$", timeout=30.0))
    except LabError:
        await proc.stop()
        raise LabError(f"the proxy host did not start: {proc.stderr()[-2000:]}") from None
    running = RunningProxy(lab, proc, int(match.group(1)))
    try:
        yield running
    finally:
        await running.stop()
