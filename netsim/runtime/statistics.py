"""The helper's statistics snapshot and its JSON, generated from the dataclasses.

`to_jsonable` walks a (nested) dataclass and emits every field, so a counter added to `DeviceStatistics`,
`ServerStatistics` or `HelperStatistics` appears in STATS_RESPONSE without anyone writing it down twice. The
only departures from "field name: value" are the few wire names older readers rely on (`_RENAMES`) and the
device's ``drops``, which lists only the reasons that happened (as it always has).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netsim.core.dnsguard import DnsGuardStatistics
from netsim.core.ledger import LedgerSnapshot
from netsim.core.policy import PolicyStatistics
from netsim.core.wireguard.device import DeviceStatistics
from netsim.transports.uds import ServerStatistics

if TYPE_CHECKING:
    from netsim.runtime.bypass import BypassStatistics

__all__ = ["HelperStatistics", "to_jsonable"]

# (dataclass name, field) -> JSON key, where the wire name predates the field name
_RENAMES: dict[tuple[str, str], str] = {("DnsBindingsStatistics", "responses"): "responses_seen"}
# (dataclass name, field) held as ``((key, count), ...)`` for immutability, sent as a JSON object
_AS_DICT = frozenset((("PolicyStatistics", "by_action"), ("PolicyStatistics", "rule_hits")))


def to_jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses field by field (every field), mappings and sequences walked.

    An object with its own ``to_json`` (the ledger snapshot, the bypass and DNS-guard statistics) keeps it.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        own = getattr(value, "to_json", None)
        if own is not None and not isinstance(value, HelperStatistics):
            return own()
        name = type(value).__name__
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if isinstance(value, DeviceStatistics) and f.name == "drops":
                item = {k: v for k, v in item.items() if v}
            elif (name, f.name) in _AS_DICT:
                item = dict(item)
            out[_RENAMES.get((name, f.name), f.name)] = to_jsonable(item)
        return out
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset, set)):
        return [to_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class HelperStatistics:
    """A snapshot of the helper (all plain counters).

    Attributes:
        ledger: the per-stage packet ledger (see the module docstring).
        device: the WireGuard device's counters.
        server: the IPC server's counters (None when sessions are fed in directly, as in memory).
        sessions: provider sessions served so far; ``connected``: one is connected now.
        verdicts: packets per policy action (``tunnel``, ``bypass``, ``drop``).
        policy_updates / policy_rejected: POLICY_UPDATE frames applied / refused.
        recv_errors: ICMP errors surfaced on the UDP socket (server unreachable), not datagrams.
        wakeups: network-loop wakeups (datagrams per wakeup = wg_decrypt.read / wakeups).
        bypass_tunnelled: BYPASS verdicts tunnelled because the route mechanism cannot carry them out.
        settings_pushed: mid-session SETTINGS sent because a bypassed domain resolved to new addresses (route).
        bypass_sticky: TUNNEL verdicts kept on the NAT bypass because the flow already used it (a domain's DNS
            binding expired mid-flow).
        policy / bypass: the policy engine's and the NAT bypass's counters (None when not in use).
        dns_guard: which DNS answers domain rules may learn from: queries seen, answers matched, refusals by
            reason (`netsim.core.dnsguard`).
    """

    ledger: LedgerSnapshot
    device: DeviceStatistics
    server: ServerStatistics | None
    sessions: int
    connected: bool
    verdicts: dict[str, int]
    policy_updates: int
    policy_rejected: int
    recv_errors: int
    wakeups: int
    bypass_tunnelled: int = 0
    settings_pushed: int = 0
    bypass_sticky: int = 0
    policy: PolicyStatistics | None = None
    bypass: BypassStatistics | None = None
    dns_guard: DnsGuardStatistics | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object carried in STATS_RESPONSE (`Helper.stats_json`): every field, recursively."""
        out: dict[str, Any] = to_jsonable(self)
        return out
