"""The kernel state a transparent proxy owns in its namespace: an nftables TPROXY table, an NFQUEUE rule, one
policy route.

How a flow reaches the proxy (Linux's TPROXY, ``Documentation/networking/tproxy.rst``, for locally generated
traffic), and how a TCP flow is decided **at its SYN**, before anything answers it:

1. ``output`` (type route, priority ``mangle - 10``, so before iptables' own ``mangle`` OUTPUT chain): skipped
   first are packets of the proxy's own sockets (mark ``O``, set with ``SO_MARK`` on every socket the proxy
   opens) and reply-direction packets (``ct direction reply``), so nothing the proxy sends is captured again.
   A TCP connection already decided keeps its decision, read from its conntrack mark: declined (``ct mark D``)
   returns untouched, claimed (``ct mark I``) gets the intercept mark ``I``. Then a packet matching an
   **excluded** rule returns; one matching an **included** rule is marked: a TCP SYN (``syn`` without ``ack``)
   gets the *conntrack* mark ``Q`` (its packet mark, the app's ``SO_MARK``, is left alone), a UDP datagram the
   packet mark ``I`` (UDP is not queued: see docs/proxy.md).
2. iptables-nft (this kernel has the xtables ``NFQUEUE`` target, not nft's ``queue``): the chain
   ``<table>_syn`` in the ``mangle`` table of both families, jumped to from ``OUTPUT -m connmark --mark Q``,
   queues the SYN to queue ``N`` (``--queue-bypass``: no reader accepts). The host reads it, asks the provider,
   and gives the verdict accept: unchanged (declined: the SYN leaves en0 as the app sent it, routed as the rest
   of its connection will be) or with the packet mark ``I`` (claimed or refused: the kernel re-routes the
   re-marked packet, ``nf_reroute``, to step 4).
3. ``postrouting``: a TCP packet whose conntrack mark is ``Q`` stores ``ct mark I`` if it leaves with ``I``,
   else ``ct mark D`` (declined, or a SYN that bypassed the queue: fail open). The rest of the connection follows
   step 1's first rules.
4. The mark ``I`` changes the route: ``ip rule fwmark I lookup T`` (priority `RULE_PRIORITY`) with ``local
   default dev lo`` in table ``T`` turns the packet back into the host, through ``lo``.
5. ``prerouting`` (priority mangle): a packet with mark ``I`` arriving on ``lo`` is assigned by ``tproxy`` to the
   proxy's transparent listener (``IP_TRANSPARENT``), which sees the original destination as its local address.

Apple's rule semantics are compiled into step 1 (`rule_matches_nft`): excluded rules ``return`` before included
rules mark (exclusions win, R50); a wildcard address skips loopback; port 0 is any port; protocol ANY is
TCP and UDP. Hostname rules cannot be compiled (the kernel sees addresses) and are skipped with a comment.

Ownership: the table name, the mark values, the queue number, the iptables chain, the rule priority and route
table are the proxy's alone; it installs them at start, refuses to start if they already exist (another proxy
owns them), and removes exactly them at stop. The query and decline marks default to the intercept mark with
bit 16 / bit 17 set and the queue number to the intercept mark, so a host given only distinct intercept marks
(a DNS proxy beside a transparent proxy) owns distinct ones too.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from netsim.core.netrules import PROTOCOL_TCP, PROTOCOL_UDP, RuleFields, is_wildcard
from netsim.errors import NetsimError

__all__ = [
    "DECLINE_MARK",
    "INTERCEPT_MARK",
    "OWN_MARK",
    "QUERY_MARK",
    "QUEUE_NUM",
    "ROUTE_TABLE",
    "RULE_PRIORITY",
    "TPROXY_TABLE",
    "ProxyKernelState",
    "queue_rules",
    "rule_matches_nft",
    "tproxy_ruleset",
]

TPROXY_TABLE = "netsim_tproxy"
INTERCEPT_MARK = 0x7470  # "tp"
OWN_MARK = 0x7471
ROUTE_TABLE = 0x7470
RULE_PRIORITY = 6000  # before the packet tunnel's rules (netsim.runtime.netconfig.RULE_PRIORITY, 6100)
QUERY_MARK = INTERCEPT_MARK | 0x10000  # conntrack mark: a TCP connection whose SYN the provider must decide
DECLINE_MARK = INTERCEPT_MARK | 0x20000  # conntrack mark: a declined TCP connection
QUEUE_NUM = INTERCEPT_MARK  # the NFQUEUE queue the SYNs go to
_SYN = "tcp flags & (syn | ack) == syn"


def rule_matches_nft(rule: RuleFields, protocol: int | None = None) -> list[str]:
    """nft match expressions for one rule: one string per address family it covers ([] = cannot compile).

    ``protocol`` (`PROTOCOL_TCP` / `PROTOCOL_UDP`) narrows a rule for any protocol to that one (and gives []
    for a rule of the other one)."""
    if rule.remote_hostname is not None:
        return []
    proto = rule.protocol
    if protocol is not None:
        if proto in (PROTOCOL_TCP, PROTOCOL_UDP) and proto != protocol:
            return []
        proto = protocol
    l4 = {PROTOCOL_TCP: "meta l4proto tcp", PROTOCOL_UDP: "meta l4proto udp"}.get(proto, "meta l4proto { tcp, udp }")
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
    query_mark: int | None = None,
    decline_mark: int | None = None,
) -> str:
    """The ``nft -f`` text of the proxy's table (see the module docstring); pure, so it is tested without root."""
    query = intercept_mark | 0x10000 if query_mark is None else query_mark
    decline = intercept_mark | 0x20000 if decline_mark is None else decline_mark
    out = [
        f"table inet {table} {{",
        "  chain output {",
        "    type route hook output priority mangle - 10; policy accept;",
        f"    meta mark {own_mark:#x} return",
        "    ct direction reply return",
        f"    meta l4proto tcp ct mark {decline:#x} return",
        f"    meta l4proto tcp ct mark {intercept_mark:#x} meta mark set {intercept_mark:#x} return",
    ]
    for i, rule in enumerate(excluded):
        exprs = rule_matches_nft(rule)
        if not exprs:
            out.append(f"    # excluded_network_rules[{i}]: a hostname rule; the kernel sees only addresses")
        out += [f"    {e} return" for e in exprs]
    for i, rule in enumerate(included):
        tcp, udp = rule_matches_nft(rule, PROTOCOL_TCP), rule_matches_nft(rule, PROTOCOL_UDP)
        if not tcp and not udp:
            out.append(f"    # included_network_rules[{i}]: a hostname rule; the kernel sees only addresses")
        out += [f"    {e} {_SYN} ct mark set {query:#x}" for e in tcp]
        out += [f"    {e} meta mark set {intercept_mark:#x}" for e in udp]
    out += [
        "  }",
        "  chain postrouting {",
        "    type filter hook postrouting priority mangle; policy accept;",
        f"    meta l4proto tcp ct mark {query:#x} meta mark {intercept_mark:#x} ct mark set {intercept_mark:#x}",
        f"    meta l4proto tcp ct mark {query:#x} ct mark set {decline:#x}",
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


def queue_rules(chain: str, query_mark: int, queue_num: int) -> tuple[str, str]:
    """The ``iptables-restore --noflush`` scripts (the same for ``iptables`` and ``ip6tables``) that install and
    remove the SYN queue: ``chain`` in ``mangle`` queueing to ``queue_num`` (``--queue-bypass``: with no reader
    bound, the kernel accepts: fail open), jumped to from ``OUTPUT`` for packets whose conntrack mark is
    ``query_mark``."""
    jump = f"OUTPUT -m connmark --mark {query_mark:#x} -j {chain}"
    install = (
        f"*mangle\n:{chain} - [0:0]\n-A {chain} -j NFQUEUE --queue-num {queue_num} --queue-bypass\n-I {jump}\nCOMMIT\n"
    )
    remove = f"*mangle\n-D {jump}\n-F {chain}\n-X {chain}\nCOMMIT\n"
    return install, remove


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
        query_mark: the conntrack mark of a TCP connection whose SYN is queued (default ``intercept_mark |
            0x10000``, `QUERY_MARK`).
        decline_mark: the conntrack mark of a declined TCP connection (default ``intercept_mark | 0x20000``,
            `DECLINE_MARK`).
        queue_num: the NFQUEUE queue of the SYNs (default ``intercept_mark``, `QUEUE_NUM`).
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
        query_mark: int | None = None,
        decline_mark: int | None = None,
        queue_num: int | None = None,
    ) -> None:
        self.port, self.table = port, table
        self.intercept_mark, self.own_mark = intercept_mark, own_mark
        self.route_table, self.priority = route_table, priority
        self.query_mark = intercept_mark | 0x10000 if query_mark is None else query_mark
        self.decline_mark = intercept_mark | 0x20000 if decline_mark is None else decline_mark
        self.queue_num = intercept_mark & 0xFFFF if queue_num is None else queue_num
        self.chain = f"{table}_syn"
        self.installed_table = False
        self.installed_routes: list[str] = []
        self.installed_queue: list[str] = []  # the iptables tools whose chain this object added

    def install_queue(self) -> None:
        """The SYN queue's iptables chain and jump, per family (refused if the chain exists: someone owns it)."""
        install, _ = queue_rules(self.chain, self.query_mark, self.queue_num)
        for tool in ("iptables", "ip6tables"):
            if _run([tool, "-t", "mangle", "-S", self.chain], check=False).returncode == 0:
                raise NetsimError(f"{tool} chain mangle {self.chain} already exists; another proxy owns it")
            _run([f"{tool}-restore", "--noflush"], stdin=install)
            self.installed_queue.append(tool)

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
            included,
            excluded,
            self.port,
            table=self.table,
            intercept_mark=self.intercept_mark,
            own_mark=self.own_mark,
            query_mark=self.query_mark,
            decline_mark=self.decline_mark,
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
        _, uninstall = queue_rules(self.chain, self.query_mark, self.queue_num)
        for tool in self.installed_queue:
            r = _run([f"{tool}-restore", "--noflush"], stdin=uninstall, check=False)
            if r.returncode != 0:
                problems.append(f"{tool}: {r.stderr.strip()}")
        self.installed_queue = []
        return problems
