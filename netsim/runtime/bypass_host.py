"""Host setup for the NAT bypass: keep the host's own stack away from the NAT's reserved ports.

The kernel would answer the replies the capture socket takes (a TCP RST, an ICMP port unreachable), killing the
bypassed flows: `HostSetup` drops inbound TCP/UDP to the reserved range on ``en0`` at the nftables input hook
(after the packet socket saw them) and reserves the range from the kernel's ephemeral ports with
``net.ipv4.ip_local_reserved_ports`` (per namespace; covers IPv6 too). docs/bypass.md has the whole picture.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from netsim.errors import ConfigError, PrivilegeError

__all__ = ["HostSetup", "host_ruleset"]


def host_ruleset(
    interface: str, port_range: tuple[int, int], ext_v4: str | None, ext_v6: str | None, *, table: str = "netsim_bypass"
) -> str:
    """nftables: drop inbound TCP/UDP to the NAT's reserved ports on ``interface`` before the host stack sees them.

    The packet socket has its copy already (it taps frames before IP input), so this only stops the kernel from
    answering them with a RST or an ICMP port unreachable.
    """
    lo, hi = port_range
    rules = []
    if ext_v4:
        rules.append(f'iifname "{interface}" ip daddr {ext_v4} meta l4proto {{ tcp, udp }} th dport {lo}-{hi} drop')
    if ext_v6:
        rules.append(f'iifname "{interface}" ip6 daddr {ext_v6} meta l4proto {{ tcp, udp }} th dport {lo}-{hi} drop')
    body = "\n".join(f"    {r}" for r in rules)
    return (
        f"table inet {table} {{\n"
        "  chain input {\n"
        "    type filter hook input priority filter - 10; policy accept;\n"
        f"{body}\n"
        "  }\n"
        "}\n"
    )


class HostSetup:
    """Keep the host's own stack away from the NAT's ports, in the current network namespace; undo on `remove`.

    Applies `host_ruleset` with ``nft`` and adds ``port_range`` to ``net.ipv4.ip_local_reserved_ports``
    (ip-sysctl.rst: reserved ports are skipped by automatic port assignment; the setting is per namespace and
    also governs IPv6). Needs CAP_NET_ADMIN (root).
    """

    def __init__(
        self,
        interface: str,
        port_range: tuple[int, int],
        ext_v4: str | None,
        ext_v6: str | None,
        *,
        table: str = "netsim_bypass",
        sysctl_path: Path = Path("/proc/sys/net/ipv4/ip_local_reserved_ports"),
    ) -> None:
        self.interface = interface
        self.port_range = port_range
        self.ext_v4 = ext_v4
        self.ext_v6 = ext_v6
        self.table = table
        self.sysctl_path = sysctl_path
        self._saved: str | None = None
        self._nft = False

    def apply(self) -> None:
        """Install the rule and the port reservation (idempotent: an old table of the same name is replaced).

        Raises:
            PrivilegeError: not allowed to change nftables or the sysctl.
            ConfigError: ``nft`` rejected the ruleset.
        """
        ruleset = host_ruleset(self.interface, self.port_range, self.ext_v4, self.ext_v6, table=self.table)
        self._run_nft(f"table inet {self.table}\ndelete table inet {self.table}\n{ruleset}")
        self._nft = True
        lo, hi = self.port_range
        try:
            old = self.sysctl_path.read_text().strip()
            self._saved = old
            new = f"{old},{lo}-{hi}" if old else f"{lo}-{hi}"
            self.sysctl_path.write_text(new + "\n")
        except PermissionError as exc:
            raise PrivilegeError(f"cannot reserve ports {lo}-{hi} ({self.sysctl_path}): {exc}; run as root") from None

    def remove(self) -> None:
        """Undo `apply` (best effort, idempotent)."""
        if self._nft:
            self._nft = False
            with contextlib.suppress(ConfigError, PrivilegeError, OSError):
                self._run_nft(f"delete table inet {self.table}\n")
        if self._saved is not None:
            saved, self._saved = self._saved, None
            with contextlib.suppress(OSError):
                self.sysctl_path.write_text(saved + "\n")

    @staticmethod
    def _run_nft(script: str) -> None:
        try:
            result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise ConfigError("nft is not installed (apt-get install nftables)") from None
        if result.returncode != 0:
            err = result.stderr.strip()
            if "Operation not permitted" in err:
                raise PrivilegeError(f"nft needs CAP_NET_ADMIN: {err}")
            raise ConfigError(f"nft rejected the bypass ruleset: {err}")
