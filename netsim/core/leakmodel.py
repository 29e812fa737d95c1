"""The leak matrix model (sans-IO): tunnel states, probes, and the verdict of each (state, probe) cell.

Theory of operation. `netsim check leaks` (`netsim.testing.leaks.check_leaks`) drives a provider through the
`State` values, runs every `Probe` in each, and reads the captures of the physical links (``mac-en0``, ``isp-wan``)
and of the tunnel (``mac-utun*``, ``vpn-wg``). What it saw for one cell is an `Evidence`; `classify` turns it into a
`Cell` with a `Verdict`, comparing the evidence with what Apple's semantics allow for the configuration
(`apple_allows`, apple-reference.md §3-4) and with what the user declared (`Expectation`, ``--expect FILE``):

* ``tunnelled``: the probe's packets reached the tunnel and none left a physical link in the clear;
* ``allowed``: they left a physical link in the clear and that is allowed: by Apple's semantics for this
  configuration (e.g. LAN traffic without include-all-networks, everything while the VPN is off) or by the user's
  expect file (a bypass policy);
* ``blocked``: nothing was seen anywhere (dropped: what include-all-networks does while the tunnel is down);
* ``leaked``: a packet on a physical link that the configuration does not allow.

A probe that the ``before_start`` state (no tunnel at all) does not see on en0 is **blind** (`blind_probes`):
it could not have seen a leak either, so the run fails (reliability row K2).

No I/O here: the expect file arrives as text (`parse_expectation`), evidence as counts.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from netsim.errors import ConfigError

__all__ = [
    "PROBES",
    "STATES",
    "Cell",
    "Evidence",
    "Expectation",
    "LeakConfig",
    "Probe",
    "State",
    "Verdict",
    "apple_allows",
    "blind_probes",
    "classify",
    "parse_expectation",
    "parse_states",
]

MAX_EXPECT_BYTES = 64 * 1024
MAX_EXPECT_PATTERNS = 512


class State(enum.Enum):
    """The tunnel states of the matrix, in the order `check_leaks` visits them."""

    BEFORE_START = "before_start"  # no tunnel: the positive control (K2)
    CONNECTING = "connecting"  # settings applied, transport not up (server blackholed)
    CONNECTED = "connected"
    REASSERTING_HELPER = "reasserting_helper"  # the helper process killed
    REASSERTING_SERVER = "reasserting_server"  # the VPN server unreachable
    REASSERTING_LINK = "reasserting_link"  # en0 went down and up
    AFTER_CRASH = "after_crash"  # the provider process SIGKILLed
    AFTER_STOP = "after_stop"  # stop_vpn_tunnel (the user disconnected)
    DISABLED = "disabled"  # the configuration disabled (set_enabled(False))


STATES: tuple[State, ...] = tuple(State)

#: States in which Apple's include-all-networks fails closed: the configuration is enabled, the tunnel is not up,
#: and the user has not disconnected (apple-reference.md §4, R11/R49: "drops all traffic if the tunnel is down").
_DOWN_ENABLED = frozenset(
    {State.CONNECTING, State.REASSERTING_HELPER, State.REASSERTING_SERVER, State.REASSERTING_LINK, State.AFTER_CRASH}
)
#: States in which the VPN is off by the user's action (or never started): Apple sends everything direct.
_OFF = frozenset({State.BEFORE_START, State.AFTER_STOP, State.DISABLED})


@dataclass(frozen=True)
class Probe:
    """One probe: what is sent from ``mac`` and how its packets are recognised in a capture.

    Attributes:
        name: the column name (``tcp4_inet``).
        kind: ``tcp``, ``udp``, ``icmp``, ``dns``, ``kept`` (a TCP connection opened before the tunnel), ``cve``
            (CVE-2019-14899: a SYN/ACK to the tunnel address sent from the LAN), ``uid`` (TCP from a second uid).
        family: 4 or 6.
        target: ``inet`` (an internet host), ``lan`` (the LAN host), ``tunnel_dns`` (the tunnel's resolver),
            ``isp_dns`` (the home router's resolver), ``public_dns`` (a fixed public resolver address in inet),
            ``system_dns`` (whatever resolver the Mac's resolv.conf names now).
    """

    name: str
    kind: str
    family: int
    target: str

    @property
    def local(self) -> bool:
        """Addressed to the home LAN (a locally connected network)."""
        return self.target in ("lan", "isp_dns")


PROBES: tuple[Probe, ...] = (
    Probe("tcp4_inet", "tcp", 4, "inet"),
    Probe("udp4_inet", "udp", 4, "inet"),
    Probe("icmp4_inet", "icmp", 4, "inet"),
    Probe("tcp6_inet", "tcp", 6, "inet"),
    Probe("udp6_inet", "udp", 6, "inet"),
    Probe("icmp6_inet", "icmp", 6, "inet"),
    Probe("tcp4_lan", "tcp", 4, "lan"),
    Probe("udp4_lan", "udp", 4, "lan"),
    Probe("icmp4_lan", "icmp", 4, "lan"),
    Probe("tcp6_lan", "tcp", 6, "lan"),
    Probe("udp6_lan", "udp", 6, "lan"),
    Probe("icmp6_lan", "icmp", 6, "lan"),
    Probe("dns_tunnel", "dns", 4, "tunnel_dns"),
    Probe("dns_isp", "dns", 4, "isp_dns"),
    Probe("dns_public", "dns", 4, "public_dns"),
    Probe("dns_system", "dns", 4, "system_dns"),
    Probe("tcp_kept", "kept", 4, "inet"),
    Probe("cve_2019_14899", "cve", 4, "lan"),
    Probe("uid2_tcp4", "uid", 4, "inet"),
)
_PROBES_BY_NAME = {p.name: p for p in PROBES}


class Verdict(enum.Enum):
    """The verdict of one cell (see the module docstring)."""

    TUNNELLED = "tunnelled"
    ALLOWED = "allowed"
    BLOCKED = "blocked"
    LEAKED = "leaked"


@dataclass(frozen=True)
class LeakConfig:
    """The configuration under test, as far as the model needs it.

    Attributes:
        include_all_networks: NEVPNProtocol.includeAllNetworks.
        exclude_local_networks: NEVPNProtocol.excludeLocalNetworks (only meaningful with include_all_networks or
            enforce_routes, R43).
        enforce_routes: NEVPNProtocol.enforceRoutes (ignored by Apple when include_all_networks is set, R47).
        tunnel_ipv6: the tunnel's settings have IPv6 (a v6 address and route); False: an IPv4-only tunnel.
    """

    include_all_networks: bool = False
    exclude_local_networks: bool = False
    enforce_routes: bool = False
    tunnel_ipv6: bool = True


@dataclass(frozen=True)
class Evidence:
    """What the captures showed for one cell.

    Attributes:
        physical: the probe's packets seen in the clear on a physical link (for ``cve``: packets the Mac sent back
            out of en0 towards the attacker).
        tunnel: the probe's packets seen inside the tunnel (the provider's utun or the server's TUN).
        physical_dsts: destination addresses of the ``physical`` packets (DNS: which resolver it went to).
        pcap_refs: ``(capture name, frame index)`` of the physical packets, for cutting per-cell pcaps.
    """

    physical: int = 0
    tunnel: int = 0
    physical_dsts: frozenset[str] = frozenset()
    pcap_refs: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: a verdict with the Apple behaviour it was judged against."""

    state: State
    probe: Probe
    verdict: Verdict
    apple_allows: bool
    reason: str
    evidence: Evidence = field(default_factory=Evidence)
    expected: Verdict | None = None  # the user's declared verdict (expect file ``verdicts``), if any

    @property
    def key(self) -> str:
        return f"{self.state.value}:{self.probe.name}"

    @property
    def unexpected(self) -> bool:
        """Leaked, or different from the verdict the expect file declared for it."""
        if self.expected is not None:
            return self.verdict is not self.expected
        return self.verdict is Verdict.LEAKED

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "probe": self.probe.name,
            "verdict": self.verdict.value,
            "apple_allows": self.apple_allows,
            "reason": self.reason,
            "expected": self.expected.value if self.expected else None,
            "unexpected": self.unexpected,
            "physical_packets": self.evidence.physical,
            "tunnel_packets": self.evidence.tunnel,
            "physical_destinations": sorted(self.evidence.physical_dsts),
        }


# Apple behaviour, cited (apple-reference.md; R/F numbers are its reference list).
_R_OFF = "the VPN is not active: everything goes direct (nothing to protect)"
_R_IAN_DOWN = (
    "includeAllNetworks drops all traffic while the tunnel is down (connecting, reasserting, failed) until the "
    "user disconnects (NEVPNProtocol.includeAllNetworks, R11/R49)"
)
_R_IAN_LOCAL = "excludeLocalNetworks with includeAllNetworks or enforceRoutes: LAN hosts stay reachable directly (R43)"
_R_IAN_UP = "includeAllNetworks: all traffic goes through the tunnel; nothing leaves en0 in the clear (R11)"
_R_V6_IAN = "an IPv4-only tunnel with includeAllNetworks: IPv6 has no route in the tunnel and is dropped (R11)"
_R_V6_DIRECT = "an IPv4-only tunnel without includeAllNetworks: no IPv6 route via utun, IPv6 goes direct (R8)"
_R_LOCAL = "without includeAllNetworks the system's routes to locally connected networks win (R49, F7)"
_R_ENFORCE = (
    "enforceRoutes: the tunnel's routes take precedence over locally-defined routes, so the LAN goes through the "
    "utun unless excludeLocalNetworks (R47, R43)"
)
_R_ROUTED = "the tunnel's included routes cover it: it must go through the utun (R7, R36)"
_R_DOWN = "without includeAllNetworks all traffic goes direct while the tunnel is down (R11: only IAN blocks)"
_R_KEPT = "without includeAllNetworks an existing connection keeps the interface it was scoped to (R49 rule 4)"
_R_KEPT_IAN = "includeAllNetworks: existing TCP connections are not closed, but their packets are dropped (R42)"
_R_DNS_RESTORED = (
    "the system restores its own resolver once the tunnel is gone: a query to the tunnel's resolver in the clear "
    "is stale DNS state (NEDNSSettings, R9/R39)"
)
_R_DNS_TUNNEL = "the tunnel's DNS servers are the default resolver while it is the default route (R39)"
_R_CVE = "CVE-2019-14899: the Mac must not answer packets to the tunnel address arriving on en0; always a leak"
_R_CVE_CONTROL = "positive control: the tunnel address on an unprotected Mac draws replies out of en0"


def apple_allows(state: State, probe: Probe, config: LeakConfig) -> tuple[bool, str]:
    """Whether Apple's semantics let ``probe``'s packets leave a physical link in the clear in ``state``.

    Returns ``(allows, reason)``; the reason cites the Apple behaviour (apple-reference.md §3-4). For
    ``system_dns`` in a state after the tunnel, the answer is per destination: see `classify`.
    """
    ian = config.include_all_networks
    if probe.kind == "cve":
        return (True, _R_CVE_CONTROL) if state is State.BEFORE_START else (False, _R_CVE)
    if state in _OFF:
        if probe.target == "system_dns" and state is not State.BEFORE_START:
            return True, _R_DNS_RESTORED
        return True, _R_OFF
    local_ok = probe.local and (not ian or config.exclude_local_networks)
    if state in _DOWN_ENABLED:
        if ian:
            return (True, _R_IAN_LOCAL) if local_ok else (False, _R_IAN_DOWN)
        if probe.target == "system_dns" and state is State.AFTER_CRASH:
            return True, _R_DNS_RESTORED
        return True, _R_DOWN
    # CONNECTED
    if ian:
        if local_ok:
            return True, _R_IAN_LOCAL
        if probe.kind == "kept":
            return False, _R_KEPT_IAN
        if probe.family == 6 and not config.tunnel_ipv6:
            return False, _R_V6_IAN
        return False, _R_IAN_UP
    if probe.local:
        if config.enforce_routes and not config.exclude_local_networks:
            return False, _R_ENFORCE
        return (True, _R_IAN_LOCAL if config.enforce_routes else _R_LOCAL)
    if probe.kind == "kept":
        return True, _R_KEPT
    if probe.family == 6 and not config.tunnel_ipv6:
        return True, _R_V6_DIRECT
    if probe.kind == "dns":
        return False, _R_DNS_TUNNEL
    return False, _R_ROUTED


@dataclass(frozen=True)
class Expectation:
    """What the user declares for their configuration (``--expect FILE``).

    Attributes:
        allow: ``state:probe`` glob patterns whose traffic in the clear is allowed (e.g. a bypass policy):
            such a cell is ``allowed``, not ``leaked``.
        verdicts: ``(pattern, verdict)`` pairs: the cells the pattern matches must have that verdict (first
            matching pattern wins); a different verdict is an unexpected cell.
        source: the file name, for messages.
    """

    allow: tuple[str, ...] = ()
    verdicts: tuple[tuple[str, Verdict], ...] = ()
    source: str = "<expect>"

    def allows(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.allow)

    def expected(self, key: str) -> Verdict | None:
        for pattern, verdict in self.verdicts:
            if fnmatch.fnmatchcase(key, pattern):
                return verdict
        return None


def _check_pattern(pattern: object, where: str) -> str:
    if not isinstance(pattern, str) or not pattern or len(pattern) > 128:
        raise ConfigError(f"{where}: a pattern is a non-empty string of at most 128 characters, got {pattern!r}")
    state_part, sep, probe_part = pattern.partition(":")
    if not sep:
        raise ConfigError(f"{where}: {pattern!r} must read 'STATE:PROBE' (globs allowed, e.g. '*:tcp4_lan')")
    if not any(fnmatch.fnmatchcase(s.value, state_part) for s in STATES):
        raise ConfigError(f"{where}: {pattern!r} matches no state; states are {', '.join(s.value for s in STATES)}")
    if not any(fnmatch.fnmatchcase(p.name, probe_part) for p in PROBES):
        raise ConfigError(f"{where}: {pattern!r} matches no probe; probes are {', '.join(_PROBES_BY_NAME)}")
    return pattern


def parse_expectation(text: str | bytes, *, source: str = "<expect>", fmt: str | None = None) -> Expectation:
    """Parse an expect file (JSON or TOML; ``fmt`` ``"json"``/``"toml"``, or guessed from ``source``'s suffix
    and then the content).

    Format (TOML shown; JSON is the same object)::

        allow = ["*:tcp4_lan", "connected:dns_isp"]   # clear-text traffic these cells may send
        [verdicts]
        "connected:tcp4_inet" = "tunnelled"           # and the verdicts these cells must have

    Raises:
        ConfigError: too big, not JSON/TOML, unknown keys, a pattern matching no state or probe, an unknown
            verdict; the message names ``source`` and the field.
    """
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_EXPECT_BYTES:
        raise ConfigError(f"{source}: expect file is {len(raw)} bytes; the limit is {MAX_EXPECT_BYTES}")
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc})") from None
    if fmt is None:
        fmt = "json" if source.endswith(".json") else "toml" if source.endswith(".toml") else None
    if fmt is None:
        fmt = "json" if body.lstrip().startswith("{") else "toml"
    try:
        data: Any = json.loads(body) if fmt == "json" else tomllib.loads(body)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: not valid {fmt.upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be an object/table with 'allow' and/or 'verdicts'")
    unknown = set(data) - {"allow", "verdicts"}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; known: allow, verdicts")
    allow = data.get("allow", [])
    if not isinstance(allow, list):
        raise ConfigError(f"{source}: field 'allow' must be a list of 'STATE:PROBE' patterns")
    verdicts = data.get("verdicts", {})
    if not isinstance(verdicts, dict):
        raise ConfigError(f"{source}: field 'verdicts' must be a table/object of 'STATE:PROBE' = verdict")
    if len(allow) + len(verdicts) > MAX_EXPECT_PATTERNS:
        raise ConfigError(f"{source}: more than {MAX_EXPECT_PATTERNS} patterns")
    names = ", ".join(v.value for v in Verdict)
    pairs: list[tuple[str, Verdict]] = []
    for pattern, value in verdicts.items():
        _check_pattern(pattern, f"{source}: verdicts")
        try:
            pairs.append((pattern, Verdict(value)))
        except ValueError:
            raise ConfigError(f"{source}: verdicts.{pattern}: {value!r} is not one of {names}") from None
    return Expectation(
        allow=tuple(_check_pattern(p, f"{source}: allow") for p in allow), verdicts=tuple(pairs), source=source
    )


def parse_states(names: str | Sequence[str] | None) -> tuple[State, ...]:
    """``"connected,after_crash"`` (or a sequence, or None for all) as states in matrix order; ``before_start``
    (the positive control) is always included.

    Raises:
        ConfigError: an unknown state name.
    """
    if names is None:
        return STATES
    items = names.split(",") if isinstance(names, str) else list(names)
    wanted = {State.BEFORE_START}
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            wanted.add(State(item))
        except ValueError:
            raise ConfigError(f"unknown state {item!r}; states are {', '.join(s.value for s in STATES)}") from None
    return tuple(s for s in STATES if s in wanted)


def classify(
    state: State,
    probe: Probe,
    config: LeakConfig,
    evidence: Evidence,
    *,
    expect: Expectation | None = None,
    system_resolvers: Iterable[str] = (),
) -> Cell:
    """The verdict of one cell from its evidence (see the module docstring)."""
    allows, reason = apple_allows(state, probe, config)
    if probe.target == "system_dns" and reason == _R_DNS_RESTORED:
        # After the tunnel: only the system's own resolvers may be asked in the clear.
        stale = evidence.physical_dsts - set(system_resolvers)
        allows = not stale
    key = f"{state.value}:{probe.name}"
    expected = expect.expected(key) if expect is not None else None
    if evidence.physical > 0:
        if allows:
            verdict = Verdict.ALLOWED
        elif expect is not None and expect.allows(key):
            verdict, reason = Verdict.ALLOWED, f"allowed by {expect.source}; Apple: {reason}"
        else:
            verdict = Verdict.LEAKED
    elif evidence.tunnel > 0:
        verdict = Verdict.TUNNELLED
    else:
        verdict = Verdict.BLOCKED
    return Cell(state, probe, verdict, allows, reason, evidence, expected)


def blind_probes(control: Mapping[str, Evidence]) -> tuple[str, ...]:
    """Probes whose positive control (``before_start``, no tunnel) saw nothing on a physical link (K2)."""
    return tuple(p.name for p in PROBES if p.name in control and control[p.name].physical == 0)
