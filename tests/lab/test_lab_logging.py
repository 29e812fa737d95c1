"""The lab logs its steps through the standard `logging` module (``netsim.lab``), as ``netsim -v`` shows them."""

from __future__ import annotations

import logging

import pytest

from netsim.lab import Lab
from netsim.testing.require import require_binary, require_root

pytestmark = pytest.mark.lab


def test_lab_bring_up_and_teardown_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    require_root()
    require_binary("ip", "nft")
    with caplog.at_level(logging.DEBUG, logger="netsim.lab"), Lab(services=False) as lab:
        run = lab.run_id
    messages = [r.getMessage() for r in caplog.records if r.name == "netsim.lab"]
    info = [r.getMessage() for r in caplog.records if r.name == "netsim.lab" and r.levelno == logging.INFO]
    assert info == [
        f"lab {run}: bringing up namespaces netsim-{run}-{{mac,isp,vpn,inet,lan}}",
        f"lab {run}: up",
        f"lab {run}: tearing down",
        f"lab {run}: down",
    ], messages
    assert f"lab {run}: namespaces created" in messages
