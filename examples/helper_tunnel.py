"""Runnable example: provider + helper + wireguard-go in the lab, with probes through the tunnel.

    sudo .venv/bin/python -m examples.helper_tunnel            # the real lab (root)
    .venv/bin/python -m examples.helper_tunnel --memory        # the in-memory backend (no root)
    sudo .venv/bin/python -m examples.helper_tunnel --pcap /tmp/netsim-pcaps

What it shows: `netsim.lab.tunnel.netsim_tunnel` brings up wireguard-go in ``vpn``, the helper process in
``mac`` and `HelperForwardingProvider` through the app-side manager; then ``curl``, ``dig`` and ``ping`` run in
``mac`` as ordinary programs and their packets take utun -> provider -> helper -> wireguard-go -> inet. The
ledgers of both processes are printed at the end: every packet read is forwarded or a named drop.

To write your own provider that uses the helper, subclass `HelperForwardingProvider` (or copy its two loops) and
pass your class as ``provider=`` to `netsim_tunnel`; see docs/helper.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio


def _ledger_lines(name: str, stats: dict[str, Any]) -> list[str]:
    lines = [f"{name} ledger (read = forwarded + dropped + queued):"]
    for stage, s in stats["ledger"]["stages"].items():
        dropped = ", ".join(f"{k}={v}" for k, v in s["dropped"].items()) or "-"
        lines.append(f"  {stage:<11} read={s['read']:<7} fwd={s['forwarded']:<7} queued={s['queued']:<3} {dropped}")
    return lines


async def lab_example(pcap: str | None) -> None:
    from netsim.lab.lab import Lab
    from netsim.lab.tunnel import STANDARD_PROBES, netsim_tunnel

    async with Lab(pcap_dir=pcap) as lab, netsim_tunnel(lab) as t:
        print(f"tunnel up: lab {lab.run_id}, helper pid {t.helper.pid}, wireguard-go pid {t.server.pid}")
        print(f"  {'probe':<28} {'result':<6} {'path':<7} {'time':>9}  output")
        for label, argv in STANDARD_PROBES:
            r = await t.run_probe(label, argv)
            result = "ok" if r.ok else f"rc={r.returncode}"
            print(f"  {label:<28} {result:<6} {r.path:<7} {r.seconds * 1000:7.1f} ms  {r.output[:60]}")
        for line in _ledger_lines("provider", await t.provider_stats()):
            print(line)
        for line in _ledger_lines("helper", await t.helper_stats()):
            print(line)
        if pcap:
            print("pcaps:", json.dumps({k: str(v) for k, v in t.pcaps.items()}, indent=2))


async def memory_example() -> None:
    from netsim.testing.memory_tunnel import icmp_echo, memory_tunnel, udp_packet

    async with memory_tunnel() as t:
        probes = [icmp_echo(t.client_v4, "203.0.113.10", i) for i in range(3)]
        probes += [icmp_echo(t.client_v6, "2001:db8:113::10", i) for i in range(3)]
        probes.append(udp_packet(t.client_v4, "203.0.113.10", 40000, 7, b"hello through the tunnel"))
        replies = await t.exchange(probes)
        print(f"in-memory tunnel: {len(probes)} probes, {len(replies)} replies")
        for line in _ledger_lines("provider", await t.provider_stats()):
            print(line)
        for line in _ledger_lines("helper", await t.helper_stats()):
            print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--memory", action="store_true", help="run the in-memory backend (no root needed)")
    parser.add_argument("--pcap", metavar="DIR", help="write per-link captures to DIR")
    args = parser.parse_args(argv)
    if args.memory:
        trio.run(memory_example)
    else:
        trio.run(lab_example, args.pcap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
