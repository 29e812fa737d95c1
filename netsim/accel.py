"""Chooses netsim's optional native accelerator or the pure-Python path, once, at import (docs/native.md).

The accelerator is a small C extension (``netsim/_native/accel.c``, built by the package build where a compiler
and OpenSSL's headers are present) for the per-packet work batching leaves: ChaCha20-Poly1305 over a batch of
WireGuard transport messages (OpenSSL's EVP, the distribution's libcrypto), the RFC 1071 checksum, batched TUN
reads and writes, and the helper's batched UDP receive (``recvmmsg``). Every user of it keeps its pure-Python
code and takes the native call only when `native` is set, so results are the same either way
(tests/test_native.py and tests/transports/test_udp_native_recv.py compare the two).

``NETSIM_NATIVE`` picks, read once when this module is first imported:

* ``auto`` (default, also when unset or empty): the accelerator when it imports, else pure Python.
* ``0``: pure Python, even when the accelerator is built.
* ``1``: the accelerator is required; importing netsim fails with `netsim.errors.NativeUnavailable` without it
  (CI sets this, so a broken build fails instead of silently falling back).

`ACTIVE` says which is in use and `describe` says why, e.g. for a bench's metadata.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Final, Literal

from netsim.errors import NetsimError

__all__ = ["ACTIVE", "MODE", "NativeUnavailable", "describe", "fold16_python", "native"]

ENV: Final = "NETSIM_NATIVE"
_MODES = {"": "auto", "auto": "auto", "0": "0", "1": "1"}


class NativeUnavailable(NetsimError):
    """``NETSIM_NATIVE=1`` asked for the native accelerator and it cannot be imported (or the value is unknown).

    Attributes:
        reason: why (the import error, or the bad value).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"netsim's native accelerator is required ({ENV}=1) but unavailable: {reason}. Build it (a C compiler "
            f"and OpenSSL headers: apt install gcc libssl-dev, then `make setup`) or set {ENV}=auto or 0"
        )
        self.reason = reason


def _select(value: str) -> tuple[str, ModuleType | None, str]:
    """(mode, the extension module or None, why pure Python) for a ``NETSIM_NATIVE`` value."""
    mode = _MODES.get(value.strip().lower())
    if mode is None:
        raise NativeUnavailable(f"{ENV}={value!r} is not one of auto, 0, 1")
    if mode == "0":
        return mode, None, f"{ENV}=0"
    try:
        from netsim._native import _accel  # type: ignore[attr-defined]
    except ImportError as exc:
        if mode == "1":
            raise NativeUnavailable(str(exc)) from exc
        return mode, None, f"not built or not importable ({exc})"
    module: ModuleType = _accel
    return mode, module, ""


_SELECTED = _select(os.environ.get(ENV, "auto"))
MODE: str = _SELECTED[0]
"""The ``NETSIM_NATIVE`` setting read at import: ``auto``, ``0`` or ``1``."""
native: Any = _SELECTED[1]
"""The extension module (``netsim._native._accel``) on the native path, None on the pure-Python one.

Hot-path modules bind its functions at import; keypairs read it when made (a test sets it to None to build a
pure-Python twin in the same process).
"""
_REASON = _SELECTED[2]
ACTIVE: Literal["native", "python"] = "native" if native is not None else "python"
"""Which path is in use: ``"native"`` or ``"python"``."""


def describe() -> dict[str, str]:
    """What was chosen and why: ``active``, ``mode`` (the ``NETSIM_NATIVE`` value read) and ``detail``.

    ``detail`` is the OpenSSL version the accelerator links on the native path, the reason otherwise.
    """
    detail = str(native.OPENSSL_VERSION) if native is not None else _REASON
    return {"active": ACTIVE, "mode": MODE, "detail": detail}


def fold16_python(data: bytes | bytearray | memoryview, skip: int = -1) -> int:
    """The reference of the accelerator's ``fold16``: the RFC 1071 sum folded to ``0..0xFFFF``.

    ``data`` read as 16-bit big-endian words (odd length zero-padded), the two bytes at ``skip`` (if not -1) read
    as zero; 0 exactly when every byte counted is zero, otherwise a residue of the sum modulo 0xFFFF in
    ``1..0xFFFF``.

    Raises:
        ValueError: ``skip`` is not -1 and does not leave two bytes inside ``data``.
    """
    if skip != -1 and not 0 <= skip <= len(data) - 2:
        raise ValueError("fold16: skip must be -1 or leave two bytes inside the data")
    buf = bytearray(data)
    if skip != -1:
        buf[skip : skip + 2] = b"\0\0"
    if len(buf) & 1:
        buf.append(0)
    n = int.from_bytes(buf, "big")
    return 0 if n == 0 else (n % 0xFFFF or 0xFFFF)
