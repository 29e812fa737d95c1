"""The kill switch the system (the session) engages for NEVPNProtocol.includeAllNetworks (docs/kill-switch.md).

`KernelKillSwitch` loads `netsim.core.killswitch`'s nftables table into a lab namespace with
``ip netns exec <netns> nft -f -`` and removes it again; `MemoryKillSwitch` records the same calls for the
in-memory backend. Launchers carry one as ``launcher.kill_switch``; `TunnelProviderSession` decides when it is
engaged. The block lives in the kernel and is owned by the test process, not by the provider, so it outlives a
crashed, frozen or killed provider host.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from netsim.core.killswitch import (
    KILLSWITCH_TABLE,
    CounterValue,
    KillSwitchConfig,
    is_physical_interface,
    parse_counters,
    render_killswitch,
    render_release,
    split_local_prefixes,
)
from netsim.errors import LabError
from netsim.transports.netns import require_lab_netns, run_netns_command_async

__all__ = ["KernelKillSwitch", "KillSwitch", "KillSwitchEvent", "MemoryKillSwitch", "connected_prefixes"]

_NFT_TIMEOUT = 10.0


class KillSwitch(Protocol):
    """What a session needs from a kill switch (``launcher.kill_switch``)."""

    @property
    def engaged(self) -> bool:
        """True while the block is in force."""
        ...

    async def engage(self, *, exclude_local_networks: bool = False) -> None:
        """Block everything but the tunnel and the exempt classes; a no-op when already engaged with the same
        flags (with others, the block is replaced without a gap)."""
        ...

    async def release(self) -> None:
        """Remove the block; a no-op when not engaged."""
        ...

    async def counters(self) -> dict[str, CounterValue]:
        """The named counters (live while engaged, the last values read before the release afterwards)."""
        ...


@dataclass(frozen=True)
class KillSwitchEvent:
    """One engage/release the kill switch performed."""

    action: str  # "engage" | "release"
    exclude_local_networks: bool = False


@dataclass
class MemoryKillSwitch:
    """A kill switch for the in-memory backend: records engage/release (`history`), blocks nothing.

    ``local_prefixes`` stands in for the connected prefixes a kernel kill switch reads from the interfaces;
    `config` is the `KillSwitchConfig` the last engage would have loaded (render it to see the rules).
    """

    local_prefixes: tuple[str, ...] = ()
    history: list[KillSwitchEvent] = field(default_factory=list)
    config: KillSwitchConfig | None = None
    _engaged: bool = False

    @property
    def engaged(self) -> bool:
        return self._engaged

    async def engage(self, *, exclude_local_networks: bool = False) -> None:
        if self._engaged and self.config is not None and self.config.exclude_local_networks == exclude_local_networks:
            return
        private, _refused = split_local_prefixes(self.local_prefixes)
        self.config = KillSwitchConfig(
            exclude_local_networks=exclude_local_networks, local_prefixes=private if exclude_local_networks else ()
        )
        self._engaged = True
        self.history.append(KillSwitchEvent("engage", exclude_local_networks))

    async def release(self) -> None:
        if not self._engaged:
            return
        self._engaged = False
        self.history.append(KillSwitchEvent("release"))

    async def counters(self) -> dict[str, CounterValue]:
        return {}


def connected_prefixes(
    ip_addr_json: str | bytes, *, skip: Iterable[str] = ("lo",), tun_prefix: str = "utun"
) -> list[str]:
    """The connected prefixes (``net/len``) in ``ip -j addr show`` output, except ``skip`` and TUN interfaces.

    Malformed entries are skipped (the input comes from a subprocess; bounded, never raises).
    """
    try:
        links = json.loads(ip_addr_json)
    except (ValueError, UnicodeDecodeError):
        return []
    result: list[str] = []
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict):
            continue
        name = link.get("ifname")
        if not isinstance(name, str) or not is_physical_interface(name, tun_prefix=tun_prefix, skip=skip):
            continue
        for info in link.get("addr_info") or []:
            if not isinstance(info, dict):
                continue
            try:
                net = ipaddress.ip_network(f"{info.get('local')}/{int(info.get('prefixlen', -1))}", strict=False)
            except (ValueError, TypeError):
                continue
            result.append(str(net))
    return list(dict.fromkeys(result))


class KernelKillSwitch:
    """The kill switch as an nftables table in a lab namespace (``table inet netsim_killswitch``).

    ``engage`` reads the namespace's connected prefixes (for excludeLocalNetworks: only the private ones are
    exempted, see `netsim.core.killswitch.split_local_prefixes`; `refused_prefixes` lists the public ones that
    were not), renders the table and loads it atomically; ``release`` deletes only that table. Both are
    idempotent. The connected prefixes are read once per engage: an address added later is not exempted.

    Args:
        netns: a ``netsim-*`` namespace (anything else, the root namespace included, is refused).
        tun_prefix: the provider TUN's name prefix (netsim's configurator names it ``utun%d``).
        bypass_fwmark: the tunnel transport's socket mark (``netsim.runtime.netconfig.BYPASS_FWMARK``).
        forward: also block traffic routed through the namespace (the ``forward`` chain).

    Raises:
        LabError: a namespace not starting with ``netsim-``; ``nft`` failed (engage, release).
    """

    def __init__(
        self,
        netns: str,
        *,
        tun_prefix: str = "utun",
        bypass_fwmark: int | None = 0x6E73,
        forward: bool = True,
        table: str = KILLSWITCH_TABLE,
    ) -> None:
        require_lab_netns(netns, "engage a kill switch")
        self.netns = netns
        self.tun_prefix = tun_prefix
        self.bypass_fwmark = bypass_fwmark
        self.forward = forward
        self.table = table
        self.config: KillSwitchConfig | None = None
        self.refused_prefixes: tuple[str, ...] = ()
        self.history: list[KillSwitchEvent] = []
        self._engaged = False
        self._last_counters: dict[str, CounterValue] = {}

    @property
    def engaged(self) -> bool:
        return self._engaged

    async def _run(self, argv: list[str], stdin: bytes | None = None) -> bytes:
        done = await run_netns_command_async(self.netns, argv, stdin=stdin, timeout=_NFT_TIMEOUT)
        return done.stdout.encode()

    async def engage(self, *, exclude_local_networks: bool = False) -> None:
        if self._engaged and self.config is not None and self.config.exclude_local_networks == exclude_local_networks:
            return  # engaged as asked; with other flags the table is replaced atomically below (no gap)
        private: tuple[str, ...] = ()
        if exclude_local_networks:
            raw = await self._run(["ip", "-j", "addr", "show"])
            private, self.refused_prefixes = split_local_prefixes(connected_prefixes(raw, tun_prefix=self.tun_prefix))
        config = KillSwitchConfig(
            tun_prefix=self.tun_prefix,
            bypass_fwmark=self.bypass_fwmark,
            exclude_local_networks=exclude_local_networks,
            local_prefixes=private,
            forward=self.forward,
            table=self.table,
        )
        await self._run(["nft", "-f", "-"], render_killswitch(config).encode())
        self.config = config
        self._engaged = True
        self._last_counters = {}
        self.history.append(KillSwitchEvent("engage", exclude_local_networks))

    async def release(self) -> None:
        if not self._engaged:
            return
        try:
            self._last_counters = await self.counters()
        except LabError:
            pass  # the counters are a report; the release must still happen
        await self._run(["nft", "-f", "-"], render_release(self.table).encode())
        self._engaged = False
        self.history.append(KillSwitchEvent("release"))

    async def counters(self) -> dict[str, CounterValue]:
        if not self._engaged:
            return dict(self._last_counters)
        raw = await self._run(["nft", "-j", "list", "counters", "table", "inet", self.table])
        return parse_counters(raw, self.table)

    def __repr__(self) -> str:
        return f"KernelKillSwitch({self.netns!r}, engaged={self._engaged})"
