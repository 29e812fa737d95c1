"""Run a data filter provider (`netsim.apple.FilterDataProvider`) in the lab's ``mac`` namespace.

`data_filter` spawns ``python -m netsim.runtime.filter_data`` in ``mac`` (a lab process: tracked, stopped at
teardown), waits for its ``READY`` line and yields a `RunningDataFilter`; on exit it stops the host with SIGTERM,
which removes its own nftables table ``netsim_filterdata``, policy rule (priority 5980) and route table
(`netsim.runtime.filter_data.FILTER_DATA_NAMES`) and prints its statistics. The mechanism and its limits are in
docs/filters.md.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from netsim.apple.protocol import AppRule
from netsim.errors import LabError
from netsim.lab.lab import Lab
from netsim.lab.tproxy import RunningProxy

__all__ = ["RunningDataFilter", "data_filter"]

TABLE = "netsim_filterdata"


class RunningDataFilter(RunningProxy):
    """A data filter host running in ``mac``: `flow_log` (the provider's JSON lines), `stop` (statistics)."""

    async def ruleset(self) -> str:
        """The live nftables table of the filter (``nft list table inet netsim_filterdata``)."""
        r = await self.lab.run(self.process.role, ["nft", "list", "table", "inet", TABLE], check=False)
        return r.stdout.decode()


@asynccontextmanager
async def data_filter(
    lab: Lab,
    provider: str,
    *,
    configuration: dict[str, Any] | None = None,
    app_rules: list[AppRule] | None = None,
    ports: Sequence[int] = (),
    role: str = "mac",
) -> AsyncIterator[RunningDataFilter]:
    """Host ``provider`` (``"pkg.mod:Class"``, a `FilterDataProvider`) in ``role`` for the block; ``ports``
    limits the intercepted TCP ports (default: every TCP flow but loopback)."""
    argv = [sys.executable, "-m", "netsim.runtime.filter_data", "--provider", provider]
    if configuration is not None:
        argv += ["--configuration", json.dumps(configuration)]
    for rule in app_rules or []:
        argv += ["--app", f"{rule.uid}={rule.signing_identifier}"]
    for port in ports:
        argv += ["--port", str(port)]
    path = ":".join(p for p in sys.path if p)
    proc = lab.spawn(role, argv, name="filterdata-" + role, env={"PYTHONPATH": path})
    try:
        match = await trio.to_thread.run_sync(lambda: proc.wait_output_sync(r"^READY (\d+)$", timeout=30.0))
    except LabError:
        await proc.stop()
        raise LabError(f"the data filter did not start: {proc.stderr()[-2000:]}") from None
    running = RunningDataFilter(lab, proc, int(match.group(1)))
    try:
        yield running
    finally:
        await running.stop()
