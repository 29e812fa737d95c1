"""Micro-benchmark: policy classify per packet with 10/100/1000 rules, and NAT rewrite per packet.

    python -m netsim.bench.bench_policy [--quick] [--json results.json] [--seed N]

Cases (each in a fresh interpreter, seeded corpora, warm-up, median/min/max of the repetitions):

* ``classify/<n>``: `PolicyEngine.classify` on pre-parsed `PacketView`s (the helper's hot path: the view exists
  already) against ``n`` random rules -- mostly prefixes of random length, a fifth with protocol/port
  conditions, a twentieth domain rules with learned bindings; the corpus mixes addresses inside rule prefixes
  and random ones.
* ``linear/1000``: the same 1000 rules as a plain first-match loop over ``(network, mask)`` ints, for contrast
  (what ``classify`` would cost without the compiled range table).
* ``parse+copy``: refill a reused ``bytearray`` from a template and `load_untrusted` it (the floor under a NAT
  rewrite, which needs a fresh packet each time).
* ``nat_out`` / ``nat_in``: the floor plus `NatTable.translate_outbound` (existing mapping, 1000 UDP flows) /
  `translate_inbound` of the replies. The NAT's own cost is the difference to ``parse+copy``.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from netsim.bench._common import Result, measure, parse_args, report, rng, run_isolated, write_json
from netsim.core.checksum import fill_checksums
from netsim.core.nat import NatConfig, NatTable
from netsim.core.packet import PacketView
from netsim.core.policy import Action, Policy, PolicyEngine, Rule

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def _udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: int = 32) -> bytes:
    total = 28 + payload
    buf = bytearray(_IP4.pack(0x45, 0, total, 0, 0x4000, 64, 17, 0, src, dst))
    buf += _UDP.pack(sport, dport, 8 + payload, 0) + bytes(payload)
    fill_checksums(buf)
    return bytes(buf)


def _rules(n: int, seed: int) -> tuple[list[Rule], list[tuple[int, int]]]:
    r = rng(seed)
    rules: list[Rule] = []
    nets: list[tuple[int, int]] = []
    for i in range(n):
        plen = r.randint(8, 32)
        addr = r.getrandbits(32) & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF
        net = ipaddress.IPv4Network((addr, plen))
        action = r.choice(list(Action))
        kind = r.random()
        if kind < 0.05:
            rules.append(Rule(f"r{i}", action, domains=(f"*.d{i}.test",)))
        elif kind < 0.25:
            lo = r.randint(1, 60000)
            rules.append(
                Rule(f"r{i}", action, (net,), protos=frozenset({6, 17}), ports=((lo, lo + r.randint(0, 500)),))
            )
        else:
            rules.append(Rule(f"r{i}", action, (net,)))
        nets.append((addr, (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF))
    return rules, nets


def _corpus(rules: list[Rule], size: int, seed: int) -> list[PacketView]:
    r = rng(seed + 1)
    views = []
    prefixed = [x for x in rules if x.dst]
    for i in range(size):
        if prefixed and i % 2:
            net = r.choice(prefixed).dst[0]
            dst = (int(net.network_address) + r.randrange(net.num_addresses)).to_bytes(4, "big")
        else:
            dst = r.getrandbits(32).to_bytes(4, "big")
        views.append(PacketView.parse_untrusted(_udp4(bytes([10, 66, 0, 2]), dst, 40000 + i, r.randint(1, 65535))))
    return views


def case_classify(n: int, size: int, reps: int, seed: int) -> dict[str, Any]:
    rules, _ = _rules(n, seed)
    engine = PolicyEngine(Policy(tuple(rules)))
    r = rng(seed + 2)
    for rule in rules:
        if rule.domains:
            engine.learn_binding("www" + rule.domains[0][1:], ipaddress.IPv4Address(r.getrandbits(32)), 3600, 0.0)
    views = _corpus(rules, size, seed)
    classify = engine.classify

    def run() -> None:
        for v in views:
            classify(v, 1.0)

    return measure(f"classify/{n}", run, items=len(views), reps=reps, params={"rules": n}).as_dict()


def case_linear(n: int, size: int, reps: int, seed: int) -> dict[str, Any]:
    rules, nets = _rules(n, seed)
    views = _corpus(rules, size, seed)
    table = [
        (net, mask, rule.protos, rule.ports, rule.action)
        for (net, mask), rule in zip(nets, rules, strict=True)
        if not rule.domains
    ]
    out: list[Action] = []

    def run() -> None:
        out.clear()
        for v in views:
            a = int.from_bytes(v.dst, "big")
            verdict = Action.TUNNEL
            for net, mask, protos, ports, action in table:
                if a & mask != net or (protos is not None and v.protocol not in protos):
                    continue
                if ports and not any(lo <= v.dport <= hi for lo, hi in ports):
                    continue
                verdict = action
                break
            out.append(verdict)

    return measure(f"linear/{n}", run, items=len(views), reps=reps, params={"rules": n}).as_dict()


def _nat_setup(flows: int) -> tuple[NatTable, list[bytes], list[bytes]]:
    nat = NatTable(NatConfig(external_v4="192.0.2.10", port_range=(61000, 61000 + flows - 1), max_mappings=flows))
    outs = [_udp4(bytes([10, 66, 0, 2]), bytes([198, 51, 100, 7]), 20000 + i, 443) for i in range(flows)]
    replies = []
    for t in outs:
        buf = bytearray(t)
        view = PacketView.parse_untrusted(buf)
        assert nat.translate_outbound(view, 0.0) is None
        replies.append(_udp4(view.dst, view.src, view.dport, view.sport))
    return nat, outs, replies


def case_nat(direction: str, flows: int, reps: int) -> dict[str, Any]:
    nat, outs, replies = _nat_setup(flows)
    templates = outs if direction == "out" else replies
    buf = bytearray(len(templates[0]))
    view = PacketView()
    load = view.load_untrusted
    translate = nat.translate_outbound if direction == "out" else nat.translate_inbound

    def run_floor() -> None:
        for t in templates:
            buf[:] = t
            load(buf)

    def run() -> None:
        for t in templates:
            buf[:] = t
            load(buf)
            translate(view, 1.0)

    if direction == "floor":
        return measure("parse+copy", run_floor, items=len(templates), reps=reps).as_dict()
    return measure(f"nat_{direction}", run, items=len(templates), reps=reps, params={"flows": flows}).as_dict()


def main() -> None:
    args = parse_args(__doc__ or "")
    size = 2000 if args.quick else 10000
    reps = 5 if args.quick else 9
    mod = "netsim.bench.bench_policy"
    results: list[Result] = []
    for n in (10, 100, 1000):
        results.append(run_isolated(mod, "case_classify", n=n, size=size, reps=reps, seed=args.seed))
    results.append(run_isolated(mod, "case_linear", n=1000, size=size // 10, reps=reps, seed=args.seed))
    for direction in ("floor", "out", "in"):
        results.append(run_isolated(mod, "case_nat", direction=direction, flows=1000, reps=reps))
    report(results)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
