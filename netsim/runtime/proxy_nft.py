"""The kernel state a transparent proxy owns in its namespace: an nftables TPROXY table and one policy route.

How a flow reaches the proxy (Linux's TPROXY, ``Documentation/networking/tproxy.rst``, for locally generated
traffic):

1. ``output`` (type route, priority mangle): a TCP/UDP packet matching an **included** rule, and no **excluded**
   rule, gets the intercept mark ``I``. Skipped first: packets of the proxy's own sockets (mark ``O``, set with
   ``SO_MARK`` on every socket the proxy opens: its listeners, replies and outbound connections) and reply-direction
   packets (``ct direction reply``), so nothing the proxy sends is captured again.
2. The mark changes the route: ``ip rule fwmark I lookup T`` (priority `RULE_PRIORITY`) with ``local default dev
   lo`` in table ``T`` turns the packet back into the host, through ``lo``.
3. ``prerouting`` (priority mangle): a packet with mark ``I`` arriving on ``lo`` is assigned by ``tproxy`` to the
   proxy's transparent listener (``IP_TRANSPARENT``), which sees the original destination as its local address.

Apple's rule semantics are compiled into step 1 (`rule_matches_nft`): excluded rules ``return`` before included
rules mark (exclusions win, R50); a wildcard address skips loopback; port 0 is any port; protocol ANY is
TCP and UDP. Hostname rules cannot be compiled (the kernel sees addresses) and are skipped with a comment.

Ownership: the table name, the mark values, the rule priority and route table are the proxy's alone; it installs
them at start, refuses to start if they already exist (another proxy owns them), and removes exactly them at stop.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from netsim.core.netrules import PROTOCOL_TCP, PROTOCOL_UDP, RuleFields, is_wildcard
from netsim.errors import NetsimError

__all__ = [
    "INTERCEPT_MARK",
    "OWN_MARK",
    "ROUTE_TABLE",
    "RULE_PRIORITY",
    "TPROXY_TABLE",
    "ProxyKernelState",
    "rule_matches_nft",
    "tproxy_ruleset",
]

TPROXY_TABLE = "netsim_tproxy"
INTERCEPT_MARK = 0x7470  # "tp"
OWN_MARK = 0x7471
ROUTE_TABLE = 0x7470
RULE_PRIORITY = 6000  # before the packet tunnel's rules (netsim.runtime.netconfig.RULE_PRIORITY, 6100)


def rule_matches_nft(rule: RuleFields) -> list[str]:
    """nft match expressions for one rule: one string per address family it covers ([] = cannot compile)."""
    if rule.remote_hostname is not None:
        return []
    l4 = {PROTOCOL_TCP: "meta l4proto tcp", PROTOCOL_UDP: "meta l4proto udp"}.get(
        rule.protocol, "meta l4proto { tcp, udp }"
    )
    port = f" th dport {rule.remote_port}" if rule.remote_port else ""
    out = []
    for version, (fam, loop) in ((4, ("ip", "127.0.0.0/8")), (6, ("ip6", "::1"))):
        parts = []
        net, local = rule.remote_network, rule.local_network
        if (net is not None and net.version != version) or (local is not None and local.version != version):
            continue
        if net is None:
            if local is None:
                parts.append(f"{fam} daddr != {loop}")  # no remote, no local: all but loopback (R13)
            else:
                parts.append(f"meta nfproto ipv{version}")
        elif is_wildcard(net):
            parts.append(f"{fam} daddr != {loop}")  # wildcard: all but loopback (R13)
        else:
            parts.append(f"{fam} daddr {net}")
        if local is not None and not is_wildcard(local):
            parts.append(f"{fam} saddr {local}")
        if rule.local_port:
            parts.append(f"th sport {rule.local_port}")
        out.append(" ".join([*parts, l4]) + port)
    return out


def tproxy_ruleset(
    included: Sequence[RuleFields],
    excluded: Sequence[RuleFields],
    port: int,
    *,
    table: str = TPROXY_TABLE,
    intercept_mark: int = INTERCEPT_MARK,
    own_mark: int = OWN_MARK,
) -> str:
    """The ``nft -f`` text of the proxy's table (see the module docstring); pure, so it is tested without root."""
    out = [
        f"table inet {table} {{",
        "  chain output {",
        "    type route hook output priority mangle; policy accept;",
        f"    meta mark {own_mark:#x} return",
        "    ct direction reply return",
    ]
    for kind, rules, verdict in (
        ("excluded", excluded, "return"),
        ("included", included, f"meta mark set {intercept_mark:#x}"),
    ):
        for i, rule in enumerate(rules):
            exprs = rule_matches_nft(rule)
            if not exprs:
                out.append(f"    # {kind}_network_rules[{i}]: a hostname rule; the kernel sees only addresses")
            out += [f"    {e} {verdict}" for e in exprs]
    out += [
        "  }",
        "  chain prerouting {",
        "    type filter hook prerouting priority mangle; policy accept;",
        f'    iifname "lo" meta mark {intercept_mark:#x} meta nfproto ipv4 meta l4proto {{ tcp, udp }} '
        f"tproxy ip to 127.0.0.1:{port} accept",
        f'    iifname "lo" meta mark {intercept_mark:#x} meta nfproto ipv6 meta l4proto {{ tcp, udp }} '
        f"tproxy ip6 to [::1]:{port} accept",
        "  }",
        "}",
    ]
    return "\n".join(out) + "\n"


def _run(argv: Sequence[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False, timeout=10)
    if check and result.returncode != 0:
        raise NetsimError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


class ProxyKernelState:
    """Install and remove the proxy's table, rule and route in the *current* namespace (the proxy runs in it).

    Args:
        port: the transparent listeners' port.
        table: the nftables table name (default `TPROXY_TABLE`).
        intercept_mark: the mark that sends a packet to the proxy (default `INTERCEPT_MARK`).
        own_mark: the mark of the proxy's own sockets, never captured (default `OWN_MARK`).
        route_table: the policy route table holding ``local default dev lo`` (default `ROUTE_TABLE`).
        priority: the ``ip rule`` priority (default `RULE_PRIORITY`).
    """

    def __init__(
        self,
        port: int,
        *,
        table: str = TPROXY_TABLE,
        intercept_mark: int = INTERCEPT_MARK,
        own_mark: int = OWN_MARK,
        route_table: int = ROUTE_TABLE,
        priority: int = RULE_PRIORITY,
    ) -> None:
        self.port, self.table = port, table
        self.intercept_mark, self.own_mark = intercept_mark, own_mark
        self.route_table, self.priority = route_table, priority
        self.installed_table = False
        self.installed_routes: list[str] = []

    def _rule_argv(self, family: str, verb: str) -> list[str]:
        mark = f"{self.intercept_mark:#x}"
        return [
            "ip",
            family,
            "rule",
            verb,
            "priority",
            str(self.priority),
            "fwmark",
            mark,
            "lookup",
            str(self.route_table),
        ]

    def install_routes(self) -> None:
        """The policy rule and the ``local`` default route, per family (refused if the priority is taken)."""
        for family, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
            taken = _run(["ip", family, "rule", "show", "priority", str(self.priority)]).stdout.strip()
            if taken:
                raise NetsimError(f"ip rule priority {self.priority} is already used ({taken}); another proxy owns it")
            _run(["ip", family, "route", "add", "local", default, "dev", "lo", "table", str(self.route_table)])
            _run(self._rule_argv(family, "add"))
            self.installed_routes.append(family)

    def apply(self, included: Sequence[RuleFields], excluded: Sequence[RuleFields]) -> str:
        """(Re)load the table for these rules; returns the ruleset text. Refuses a table someone else made."""
        text = tproxy_ruleset(
            included, excluded, self.port, table=self.table, intercept_mark=self.intercept_mark, own_mark=self.own_mark
        )
        exists = _run(["nft", "list", "table", "inet", self.table], check=False).returncode == 0
        if exists and not self.installed_table:
            raise NetsimError(f"nftables table inet {self.table} already exists; another proxy owns it")
        prefix = f"delete table inet {self.table}\n" if exists else ""
        _run(["nft", "-f", "-"], stdin=prefix + text)
        self.installed_table = True
        return text

    def remove(self) -> list[str]:
        """Remove what this object installed (and only that); returns the problems, empty when clean."""
        problems = []
        if self.installed_table:
            r = _run(["nft", "delete", "table", "inet", self.table], check=False)
            if r.returncode != 0:
                problems.append(r.stderr.strip())
            self.installed_table = False
        for family in self.installed_routes:
            for argv in (
                self._rule_argv(family, "del"),
                ["ip", family, "route", "flush", "table", str(self.route_table)],
            ):
                r = _run(argv, check=False)
                if r.returncode != 0:
                    problems.append(r.stderr.strip())
        self.installed_routes = []
        return problems
