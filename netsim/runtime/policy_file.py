"""Load bypass policy files (TOML or YAML) and the ``netsim explain`` command.

The text parsing lives in :func:`netsim.core.policy.parse_policy` (sans-IO); this module only reads the file,
picks the format from the extension and attaches the file name to errors. The format is documented in
``docs/policy.md``.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import click

from netsim.core.policy import (
    FlowFields,
    Mechanism,
    Network,
    PathExplanation,
    Policy,
    PolicyEngine,
    explain_path,
    parse_policy,
)
from netsim.errors import ConfigError

__all__ = ["explain_command", "load_policy_file"]

_FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}
log = logging.getLogger("netsim.policy")


def load_policy_file(path: str | Path) -> Policy:
    """Read and parse a policy file; the format comes from the extension (.toml, .yaml, .yml).

    Raises:
        ConfigError: the file cannot be read, has an unknown extension, or does not parse (the message names
            the file, the rule and the field).
    """
    p = Path(path)
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ConfigError(f"unknown policy file extension {p.suffix!r}; use .toml, .yaml or .yml", source=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy file: {exc.strerror or exc}", source=str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError("policy file is not UTF-8 text", source=str(p)) from None
    policy = parse_policy(text, fmt=fmt, source=str(p))
    mechanism = policy.mechanism.value
    log.info("policy %s: %d rules, default %s, mechanism %s", p, len(policy.rules), policy.default.name, mechanism)
    return policy


def _bind(engine: PolicyEngine, item: str) -> None:
    name, sep, addr = item.partition("=")
    if not sep:
        raise click.BadParameter(f"{item!r} must be NAME=ADDR, e.g. www.video.test=198.51.100.7", param_hint="--bind")
    try:
        engine.learn_binding(name, addr, ttl=3600.0, now=0.0)
    except ValueError:
        raise click.BadParameter(f"{item!r}: {addr!r} is not an IP address", param_hint="--bind") from None


def _prefixes(values: tuple[str, ...], option: str) -> list[Network]:
    """Route prefixes from the command line, refused with host bits set as the settings validation does."""
    out: list[Network] = []
    for text in values:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            hint = "host bits set" if "host bits" in str(exc) else "not a prefix"
            raise click.BadParameter(f"{text!r}: {hint} ({exc}), e.g. 10.0.0.0/8", param_hint=option) from None
    return out


def _settings_line(included: list[Network] | None, excluded: list[Network] | None) -> str:
    if included is None and excluded is None:
        return (
            "tunnel settings: not given -- assumed a full tunnel (included routes 0.0.0.0/0, ::/0; no excluded "
            "routes). The provider's own excluded routes can take a host off the policy entirely: pass "
            "--included-route/--excluded-route (repeatable) to take them into account"
        )
    inc = ", ".join(str(n) for n in included) if included is not None else "0.0.0.0/0, ::/0"
    exc = ", ".join(str(n) for n in excluded or ()) or "(none)"
    return f"tunnel settings: included routes {inc}; the provider's excluded routes {exc}"


@click.command("explain")
@click.option(
    "--policy", "policy_path", required=True, type=click.Path(exists=True, dir_okay=False), help="TOML/YAML rules"
)
@click.option("--dst", required=True, help="destination address, e.g. 192.0.2.1 or 2001:db8::1")
@click.option("--proto", default="tcp", show_default=True, help="tcp, udp, icmp, icmpv6 or a number")
@click.option("--dport", type=click.IntRange(0, 65535), default=None, help="destination port (tcp/udp)")
@click.option(
    "--bind",
    "binds",
    multiple=True,
    metavar="NAME=ADDR",
    help="pretend DNS resolved NAME to ADDR (repeatable), to explain domain rules",
)
@click.option(
    "--included-route",
    "included",
    multiple=True,
    metavar="PREFIX",
    help="the provider's included route (repeatable); default: 0.0.0.0/0 and ::/0",
)
@click.option(
    "--excluded-route", "excluded", multiple=True, metavar="PREFIX", help="the provider's excluded route (repeatable)"
)
@click.option("--server", "server", default=None, help="tunnel server address (excluded automatically, as on Apple)")
@click.option("--routes", is_flag=True, help="also show what the route mechanism can exclude")
def explain_command(
    *,
    policy_path: str,
    dst: str,
    proto: str,
    dport: int | None,
    binds: tuple[str, ...],
    included: tuple[str, ...],
    excluded: tuple[str, ...],
    server: str | None,
    routes: bool,
) -> None:
    """Say where a packet goes: the tunnel's routes, then the policy's rule under the bypass mechanism in use.

    The first line is the answer on the wire for the policy's mechanism (route: only destination-prefix rules
    become excluded routes, a port rule's packets are tunnelled; nat: the helper NATs every bypass). Exit
    status: 0 answered, 1 the policy file is invalid, 2 a bad option (e.g. --dst not an address).
    """
    try:
        fields = FlowFields.parse(dst, proto, dport)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    inc = _prefixes(included, "--included-route") if included else None
    exc_routes = _prefixes(excluded, "--excluded-route") if excluded else None
    if server is not None:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise click.BadParameter(f"{server!r} is not an IP address", param_hint="--server") from None
    try:
        policy = load_policy_file(policy_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    engine = PolicyEngine(policy)
    for item in binds:
        _bind(engine, item)

    def path(mechanism: Mechanism | None = None) -> PathExplanation:
        return explain_path(
            engine,
            fields,
            0.0,
            mechanism=mechanism,
            included_routes=inc,
            excluded_routes=exc_routes,
            tunnel_remote_address=server,
        )

    answer = path()
    click.echo(str(answer))
    counter = answer.policy.verdict.reason if answer.reaches_provider else "(none: the helper never sees it)"
    click.echo(f"counter: {counter}  mechanism: {policy.mechanism.value}")
    click.echo(_settings_line(inc, exc_routes))
    other = Mechanism.ROUTE if policy.mechanism is Mechanism.NAT else Mechanism.NAT
    alt = path(other)
    if (alt.outcome, alt.how) != (answer.outcome, answer.how):
        click.echo(f"with mechanism {other.value}: {alt.outcome.name} ({alt.how})")
    if routes:
        exclusion = engine.route_exclusion(0.0)  # as the helper computes it, with the --bind names
        click.echo("excluded routes: " + (", ".join(str(n) for n in exclusion.routes) or "(none)"))
        for index, name, why in exclusion.unsupported:
            click.echo(f"  not expressible as a route: #{index} {name!r}: {why}")
