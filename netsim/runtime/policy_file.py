"""Load bypass policy files (TOML or YAML) and the ``netsim explain`` command.

The text parsing lives in :func:`netsim.core.policy.parse_policy` (sans-IO); this module only reads the file,
picks the format from the extension and attaches the file name to errors. The format is documented in
``docs/policy.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from netsim.core.policy import FlowFields, Policy, PolicyEngine, excluded_routes_for, parse_policy
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
        raise ConfigError(f"--bind {item!r} must be NAME=ADDR, e.g. www.video.test=198.51.100.7")
    try:
        engine.learn_binding(name, addr, ttl=3600.0, now=0.0)
    except ValueError:
        raise ConfigError(f"--bind {item!r}: {addr!r} is not an IP address") from None


@click.command("explain")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False), help="TOML/YAML rules")
@click.option("--dst", required=True, help="destination address, e.g. 192.0.2.1 or 2001:db8::1")
@click.option("--proto", default="tcp", show_default=True, help="tcp, udp, icmp, icmpv6 or a number")
@click.option("--dport", type=int, default=None, help="destination port (tcp/udp)")
@click.option(
    "--bind",
    "binds",
    multiple=True,
    metavar="NAME=ADDR",
    help="pretend DNS resolved NAME to ADDR (repeatable), to explain domain rules",
)
@click.option("--routes", is_flag=True, help="also show what the route mechanism can exclude")
def explain_command(
    *, policy_path: str, dst: str, proto: str, dport: int | None, binds: tuple[str, ...], routes: bool
) -> None:
    """Say which rule of a policy file decides a packet, and why each earlier rule did not."""
    try:
        policy = load_policy_file(policy_path)
        fields = FlowFields.parse(dst, proto, dport)
        engine = PolicyEngine(policy)
        for item in binds:
            _bind(engine, item)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    explanation = engine.explain(fields, now=0.0)
    click.echo(str(explanation))
    click.echo(f"counter: {explanation.verdict.reason}  mechanism: {policy.mechanism.value}")
    if routes:
        exclusion = excluded_routes_for(policy)
        click.echo("excluded routes: " + (", ".join(str(n) for n in exclusion.routes) or "(none)"))
        for index, name, why in exclusion.unsupported:
            click.echo(f"  not expressible as a route: #{index} {name!r}: {why}")
