"""DNS learning and route push: what the helper does when a DNS answer changes the route exclusions.

With domain rules the policy learns name -> address bindings from the DNS answers the client receives
(`learn_dns_answers`), only for queries the client sent (`netsim.core.dnsguard.DnsGuard`). With the route
mechanism a newly learned address of a bypassed name needs its host route before the app sees the answer, so the
helper sends the changed SETTINGS first (`push_settings`) and the answer after (docs/helper.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from netsim.core import ipc
from netsim.core.dnsguard import DnsGuard
from netsim.core.packet import PacketView
from netsim.core.policy import PolicyEngine
from netsim.errors import BadPacket, TunnelDown
from netsim.runtime.channel import IpcChannel

__all__ = ["learn_dns_answers", "push_settings"]

log = logging.getLogger("netsim.helper")


def learn_dns_answers(
    engine: PolicyEngine, guard: DnsGuard, view: PacketView, packets: Sequence[ipc.Buffer], now: float
) -> int:
    """Teach ``engine`` the name -> address answers in DNS responses (UDP from port 53) among ``packets``.

    Only answers to a query the client sent count: `DnsGuard` matches id, question, client port and the address
    asked, caps the TTL, refuses the tunnel's own addresses, and counts what it refuses. ``view`` is reused.
    Returns how many bindings were (re)learned.
    """
    learn = engine.learn_dns_response_untrusted
    learned = 0
    for pkt in packets:
        try:
            view.load_untrusted(pkt)
            if view.protocol == 17 and view.sport == 53 and not view.is_fragment:
                payload = memoryview(pkt)[view.l4_offset + 8 : view.total_length]
                learned += learn(payload, now, guard=guard, resolver=view.src, client=view.dst, client_port=view.dport)
        except BadPacket:
            continue  # not ours to judge: the app gets the packet; the bad answer is counted by the policy
    return learned


async def push_settings(ch: IpcChannel | None, settings: dict[str, Any]) -> bool:
    """Send ``settings`` as a mid-session SETTINGS frame; True when it went out (False: no live provider)."""
    if ch is None or ch.is_broken:
        return False
    try:
        await ch.send(ipc.Settings(json.dumps(settings).encode()))
    except TunnelDown:
        return False
    log.info(
        "route exclusions updated",
        extra={"event": "settings_pushed", "excluded_routes": settings.get("excluded_routes")},
    )
    return True
