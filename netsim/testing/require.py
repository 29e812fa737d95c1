"""Skip-or-fail gates for tests that need privileges, devices or binaries.

A test that cannot run here is skipped with a reason that says what is missing. With
``NETSIM_REQUIRE_PRIVILEGED=1`` (set by netsim's own ``.ci/run``) the same gate *fails* the test, so netsim's CI
never passes by skipping the root tier. Only that variable decides: ``CI=true`` does not, so a user's CI, which
may not run as root, skips netsim's root-tier fixtures as a laptop does.
"""

from __future__ import annotations

import os
import shutil

try:
    import pytest
except ModuleNotFoundError as exc:  # pytest comes with the testing extra, not with netsim itself
    if exc.name != "pytest":
        raise
    raise ModuleNotFoundError(
        "netsim's pytest helpers (netsim.testing.require, netsim.testing.fixtures) need pytest, which netsim "
        "installs only with its testing extra: pip install 'netsim[testing]'",
        name="pytest",
    ) from exc

__all__ = ["privileged_required", "require", "require_binary", "require_root", "require_tun"]


def privileged_required() -> bool:
    """True when missing privileges must fail tests instead of skipping them."""
    flag = os.environ.get("NETSIM_REQUIRE_PRIVILEGED", "")
    return flag.lower() not in ("", "0", "false", "no")


def require(condition: bool, reason: str) -> None:
    """Skip (or, when privileged tests are required, fail) unless ``condition`` holds."""
    if condition:
        return
    if privileged_required():
        pytest.fail(f"privileged test cannot run but NETSIM_REQUIRE_PRIVILEGED is set: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    """Need uid 0 (network namespaces, TUN, nftables)."""
    require(os.geteuid() == 0, "needs root (network namespaces, veth, nftables); run as root or via sudo")


def require_tun() -> None:
    """Need root and a usable /dev/net/tun."""
    require_root()
    require(os.path.exists("/dev/net/tun"), "needs /dev/net/tun (load the tun module: modprobe tun)")


def require_binary(*names: str) -> None:
    """Need each binary on PATH (install with `make test` as root, or apt-get)."""
    for name in names:
        require(
            shutil.which(name) is not None, f"needs '{name}' on PATH (apt-get install it, or run make test as root)"
        )
