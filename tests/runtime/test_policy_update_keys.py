"""The helper refuses a POLICY_UPDATE with `[[rules]]` (issue 13): it used to apply the rules as `[[rule]]`."""

from __future__ import annotations

import trio
import trio.testing

from netsim.core import ipc
from netsim.core.packet import PacketView
from netsim.testing.memory_tunnel import icmp_echo, memory_tunnel

WWW4, BLOCKED = "203.0.113.10", "203.0.113.99"


def test_policy_update_with_rules_plural_is_refused_and_the_old_policy_stays() -> None:
    async def main() -> None:
        async with memory_tunnel() as t:
            ch = t.provider._channel
            assert ch is not None
            plural = f'[[rules]]\nname = "block"\naction = "drop"\ndst = ["{BLOCKED}/32"]\n'.encode()
            await ch.send(ipc.PolicyUpdate(1, plural))
            probes = [icmp_echo(t.client_v4, WWW4, 1), icmp_echo(t.client_v4, BLOCKED, 2)]
            got = await t.exchange(probes, expect=2, timeout=2.0)
            assert sorted(str(PacketView.parse_untrusted(p).src_address) for p in got) == [WWW4, BLOCKED]
            h = await t.helper_stats()
            assert (h["policy_updates"], h["policy_rejected"]) == (0, 1)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
