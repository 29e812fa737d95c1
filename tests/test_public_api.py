"""Every public name resolves, and `import netsim` stays light."""

from __future__ import annotations

import subprocess
import sys

import netsim


def test_every_exported_name_resolves() -> None:
    missing = [name for name in netsim.__all__ if getattr(netsim, name, None) is None]
    assert missing == []


def test_import_netsim_is_lazy() -> None:
    code = "import sys, netsim; print(','.join(m for m in ('trio', 'pyroute2', 'scapy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == ""


def test_unknown_name_raises_attribute_error() -> None:
    try:
        netsim.DoesNotExist
    except AttributeError as exc:
        assert "DoesNotExist" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_the_helper_client_api_is_exported() -> None:
    """Issue 13: a user's provider talks to the helper through top-level names only (docs/helper.md)."""
    from netsim.runtime import helper_client

    for name in ("HelperBusy", "HelperClient", "HelperClientConfig", "open_helper_client", "start_helper_client"):
        assert name in netsim.__all__
        assert getattr(netsim, name) is getattr(helper_client, name)
    assert issubclass(netsim.HelperBusy, netsim.TunnelDown)
