"""Skip-or-fail gates for tests that need privileges, devices or binaries.

Outside CI a test that cannot run here is skipped with a reason that says what is missing. With
``NETSIM_REQUIRE_PRIVILEGED=1`` (set by ``.ci/run``, also implied by ``CI=true``) the same gate *fails* the test,
so CI never passes by skipping the root tier.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["privileged_required", "require", "require_binary", "require_root", "require_tun"]


def privileged_required() -> bool:
    """True when missing privileges must fail tests instead of skipping them."""
    flag = os.environ.get("NETSIM_REQUIRE_PRIVILEGED")
    if flag is not None:
        return flag not in ("", "0", "false", "no")
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


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
