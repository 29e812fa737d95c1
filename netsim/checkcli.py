"""``netsim check leaks``: the leak matrix for any provider (docs/leaks.md).

This module parses and validates options (no root needed for that, so a typo fails fast) and hands over to
`netsim.testing.leaks.check_leaks`, which builds a lab and needs root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from netsim.errors import ConfigError, LabError

__all__ = ["check_group", "parse_protocol_options"]


class _Failed(click.ClickException):
    exit_code = 2  # bad options, or the lab could not run: not a verdict


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_protocol_options(flags: dict[str, bool], pairs: tuple[str, ...]) -> dict[str, Any]:
    """NEVPNProtocol fields from the flag options and ``--protocol key=value`` pairs (validated by the tunnel).

    Raises:
        ConfigError: a pair without ``=``, or one that contradicts a flag.
    """
    fields: dict[str, Any] = {k: True for k, v in flags.items() if v}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--protocol {pair!r}: write KEY=VALUE, e.g. --protocol include_all_networks=true")
        parsed = _value(value.strip())
        if key in fields and fields[key] != parsed:
            raise ConfigError(f"--protocol {pair!r} contradicts --{key.replace('_', '-')}")
        fields[key] = parsed
    from netsim.runtime.tunnelspec import resolve_protocol_fields

    return dict(resolve_protocol_fields(fields))


@click.group("check")
def check_group() -> None:
    """Checks of a provider in the lab (needs root)."""


@check_group.command("leaks")
@click.option(
    "--provider", "provider", metavar="MODULE:CLASS", help="your PacketTunnelProvider (default: netsim's own)"
)
@click.option(
    "--provider-configuration", "provider_configuration", metavar="JSON", help="providerConfiguration, a JSON object"
)
@click.option(
    "--policy", "policy", type=click.Path(exists=True, dir_okay=False), help="bypass policy file (docs/policy.md)"
)
@click.option("--include-all-networks", is_flag=True, help="NEVPNProtocol.includeAllNetworks")
@click.option("--exclude-local-networks", is_flag=True, help="NEVPNProtocol.excludeLocalNetworks")
@click.option("--enforce-routes", is_flag=True, help="NEVPNProtocol.enforceRoutes")
@click.option(
    "--protocol", "protocol_pairs", multiple=True, metavar="KEY=VALUE", help="any NEVPNProtocol field (repeatable)"
)
@click.option("--ipv4-only", is_flag=True, help="an IPv4-only tunnel (no IPv6 in its settings)")
@click.option(
    "--expect",
    "expect_path",
    type=click.Path(exists=True, dir_okay=False),
    help="what your configuration allows (JSON or TOML)",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--pcap-dir", "pcap_dir", type=click.Path(file_okay=False), help="captures and leaks/*.pcap go here")
@click.option(
    "--states", "states", metavar="LIST", help="comma-separated states (default all; before_start always runs)"
)
def leaks_command(  # noqa: PLR0917 -- click passes every option as an argument
    provider: str | None,
    provider_configuration: str | None,
    policy: str | None,
    include_all_networks: bool,
    exclude_local_networks: bool,
    enforce_routes: bool,
    protocol_pairs: tuple[str, ...],
    ipv4_only: bool,
    expect_path: str | None,
    json_path: str | None,
    pcap_dir: str | None,
    states: str | None,
) -> None:
    """Run a provider through the tunnel states, probe for leaks, print the matrix.

    Exit status 0: no unexpected cell and no blind probe; 1: a leak (or a cell differing from --expect) or a
    blind probe; 2: bad options or the lab could not run.
    """
    from netsim.core.leakmodel import parse_expectation, parse_states

    try:
        flags = {
            "include_all_networks": include_all_networks,
            "exclude_local_networks": exclude_local_networks,
            "enforce_routes": enforce_routes,
        }
        protocol = parse_protocol_options(flags, protocol_pairs)
        conf: Any = None
        if provider_configuration is not None:
            try:
                conf = json.loads(provider_configuration)
            except ValueError as exc:
                raise ConfigError(f"--provider-configuration is not JSON: {exc}") from None
            if not isinstance(conf, dict):
                raise ConfigError("--provider-configuration must be a JSON object")  # noqa: TRY301
        expect = None
        if expect_path is not None:
            expect = parse_expectation(Path(expect_path).read_bytes(), source=expect_path)
        chosen = parse_states(states)
        from netsim.testing.leaks import check_leaks_sync

        report = check_leaks_sync(
            provider=provider,
            provider_configuration=conf,
            policy=policy,
            protocol=protocol,
            expect=expect,
            states=chosen,
            pcap_dir=pcap_dir,
            ipv6=not ipv4_only,
        )
    except (ConfigError, LabError) as exc:
        raise _Failed(str(exc)) from None
    click.echo(report.table())
    for key, path in report.leaked_pcaps.items():
        click.echo(f"pcap {key}: {path}")
    click.echo(f"captures in {report.pcap_dir}; {report.seconds:.1f} s")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    raise SystemExit(report.exit_status)
