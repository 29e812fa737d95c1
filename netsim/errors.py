"""The netsim exception tree.

Three kinds of failure, kept apart as in h11 and trio:

* *You misused it* (`LocalProtocolError`, `ConfigError`, `ValueError` subclasses): raised at once with a
  message that says what to change.
* *The peer sent garbage* (`BadPacket` for one packet, `RemoteProtocolError` for a connection): bytes from
  outside the process are untrusted; a bad packet is dropped and counted by the caller, a bad connection is
  closed.
* *The world is not as needed* (`LabError`, `PrivilegeError`, `MissingDependency`): the message names the
  missing privilege, binary or device and how to get it.
"""

from __future__ import annotations

__all__ = [
    "BadPacket",
    "ConfigError",
    "LabError",
    "LocalProtocolError",
    "MissingDependency",
    "NetsimError",
    "PrivilegeError",
    "RemoteProtocolError",
    "TunnelDown",
]


class NetsimError(Exception):
    """Base class of every error netsim raises on purpose."""


class BadPacket(NetsimError):
    """Untrusted bytes did not parse. The only exception an ``*_untrusted`` function may raise.

    Attributes:
        reason: a short machine-readable token (``"truncated"``, ``"bad_ihl"`` ...) used as the name of the drop
            counter the caller increments.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class LocalProtocolError(NetsimError):
    """The caller used an API or a protocol state machine wrongly (a bug on this side)."""


class RemoteProtocolError(NetsimError):
    """The remote side of a connection violated the protocol; the connection must be closed.

    Attributes:
        reason: machine-readable token for counters and logs.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConfigError(NetsimError, ValueError):
    """Bad user input (a config file, a rule, a settings object). The message says what to fix.

    Attributes:
        source: where the input came from (file name or field), if known.
        line: 1-based line number in ``source``, if known.
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        where = ""
        if source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(where + message)
        self.source = source
        self.line = line


class LabError(NetsimError):
    """Building, running or tearing down the lab failed."""


class PrivilegeError(LabError):
    """The operation needs root (CAP_NET_ADMIN) or a device such as /dev/net/tun."""


class MissingDependency(LabError):
    """A system binary or package the operation needs is not installed."""

    def __init__(self, binary: str, package: str | None = None) -> None:
        pkg = package or binary
        super().__init__(
            f"'{binary}' was not found on PATH; install it with `apt-get install {pkg}` "
            f"(or run `make test` / `make demo` as root, which installs it)"
        )
        self.binary = binary
        self.package = pkg


class TunnelDown(NetsimError):
    """The tunnel device or the connection carrying packets went away under a reader or writer."""
