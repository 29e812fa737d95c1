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
from pathlib import Path
from typing import Any

import trio

from netsim.apple.protocol import AppRule
from netsim.errors import LabError
from netsim.lab.lab import Lab
from netsim.lab.process import LabProcess
from netsim.lab.tproxy import RunningProxy

__all__ = ["HTTPS_BODY", "RunningDataFilter", "data_filter", "https_server"]

TABLE = "netsim_filterdata"
#: what `https_server` answers to every GET (then a newline)
HTTPS_BODY = "netsim-https-ok"
_HTTPS_SERVER = """
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = sys.argv[4].encode() + b"\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        print("REQ", self.headers.get("Host"), flush=True)
srv = http.server.ThreadingHTTPServer((sys.argv[1], 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("READY", flush=True)
srv.serve_forever()
"""


@asynccontextmanager
async def https_server(
    lab: Lab, directory: Path, *, role: str = "inet", address: str = "203.0.113.10"
) -> AsyncIterator[LabProcess]:
    """An HTTPS server on ``address``:443 in ``role`` for the block (the lab has none): a self-signed P-256
    certificate made with ``openssl`` in ``directory``; it answers `HTTPS_BODY` and prints ``REQ <Host>`` on
    stdout per request (clients use ``curl -k``)."""
    key, cert = directory / "https-key.pem", directory / "https-cert.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    argv += ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=www.lab.test"]
    await trio.run_process(argv, capture_stdout=True, capture_stderr=True)
    proc = lab.spawn(
        role, [sys.executable, "-c", _HTTPS_SERVER, address, str(cert), str(key), HTTPS_BODY], name="https"
    )
    try:
        await trio.to_thread.run_sync(lambda: proc.wait_output_sync("READY", timeout=20, stream="stdout"))
        yield proc
    finally:
        await proc.stop()


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
    control: str | None = None,
) -> AsyncIterator[RunningDataFilter]:
    """Host ``provider`` (``"pkg.mod:Class"``, a `FilterDataProvider`) in ``role`` for the block; ``ports``
    limits the intercepted TCP ports (default: every TCP flow but loopback); ``control`` names a
    `FilterControlProvider` run in the same process."""
    argv = [sys.executable, "-m", "netsim.runtime.filter_data", "--provider", provider]
    if configuration is not None:
        argv += ["--configuration", json.dumps(configuration)]
    for rule in app_rules or []:
        argv += ["--app", f"{rule.uid}={rule.signing_identifier}"]
    for port in ports:
        argv += ["--port", str(port)]
    if control is not None:
        argv += ["--control", control]
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
