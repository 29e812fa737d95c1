"""The inputs both tunnel backends share, validated before anything starts: provider, its configuration, policy.

`netsim.lab.tunnel.netsim_tunnel` and `netsim.testing.memory_tunnel.memory_tunnel` take the same ``provider``,
``provider_configuration``, ``policy`` and ``protocol`` arguments (docs/lab.md, "Your own provider"); both call
`resolve_inputs` and `resolve_protocol_fields` first, so a typo in a spec, a non-JSON configuration, a bad policy
file or an unknown protocol field is a `ConfigError` that says what to fix, and nothing has been started yet.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsim.apple.protocol import TunnelProviderProtocol
from netsim.core.policy import Policy, parse_policy
from netsim.errors import ConfigError, NetsimError
from netsim.runtime.provider import PacketTunnelProvider, load_provider_class

__all__ = [
    "BACKEND_PROTOCOL_FIELDS",
    "NETSIM_CONFIGURATION_KEYS",
    "TunnelInputs",
    "resolve_inputs",
    "resolve_policy",
    "resolve_protocol_fields",
    "resolve_provider",
]

#: Keys of ``providerConfiguration`` that netsim sets for its backends (the helper socket and how the built-in
#: provider reaches it); a user key with one of these names is an error, never silently overwritten.
NETSIM_CONFIGURATION_KEYS = frozenset(
    {"helper_socket", "token_file", "connect_timeout", "reconnect_for", "backoff_max"}
)
_POLICY_SUFFIXES = (".toml", ".yaml", ".yml")


@dataclass(frozen=True)
class TunnelInputs:
    """What `resolve_inputs` checked.

    Attributes:
        provider: the provider class (a spec is imported here, in this process, to check it).
        spec: what to hand a launcher: the original ``"module:Class"`` string, or the class.
        configuration: the user's ``provider_configuration`` (a JSON-able copy).
        policy: the parsed policy, or None.
        policy_path: the policy file, when the policy came from one.
        policy_text: the policy text, when it was given inline.
    """

    provider: type[PacketTunnelProvider]
    spec: type[PacketTunnelProvider] | str
    configuration: dict[str, Any]
    policy: Policy | None
    policy_path: Path | None
    policy_text: str | None

    def provider_configuration(self, netsim_keys: Mapping[str, Any]) -> dict[str, Any]:
        """Apple's ``providerConfiguration`` for the provider: the user's keys plus netsim's ``netsim_keys``."""
        clash = sorted(set(self.configuration) & set(netsim_keys))
        if clash:  # resolve_inputs already refuses NETSIM_CONFIGURATION_KEYS; a backend's extra key lands here
            raise ConfigError(
                f"provider_configuration keys {clash} are set by netsim; rename them", source="provider_configuration"
            )
        return {**self.configuration, **netsim_keys}


def resolve_provider(provider: type[PacketTunnelProvider] | str) -> type[PacketTunnelProvider]:
    """The provider class for a class or a ``"package.module:Class"`` / ``"/path/file.py:Class"`` spec.

    Raises:
        ConfigError: the spec is malformed, does not import (the import error is in the message), or does not
            name a `PacketTunnelProvider` subclass.
    """
    if isinstance(provider, str):
        try:
            return load_provider_class(provider)
        except NetsimError as exc:
            raise ConfigError(str(exc), source="provider") from None
        except Exception as exc:  # the user's module failed to import: say how, not where netsim was
            raise ConfigError(
                f"provider spec {provider!r} does not import: {type(exc).__name__}: {exc}", source="provider"
            ) from None
    if isinstance(provider, type) and issubclass(provider, PacketTunnelProvider):
        return provider
    raise ConfigError(
        f"provider must be a PacketTunnelProvider subclass or a 'module:Class' spec, not {provider!r}",
        source="provider",
    )


def _configuration(conf: Mapping[str, Any] | None) -> dict[str, Any]:
    if conf is None:
        return {}
    if not isinstance(conf, Mapping):
        raise ConfigError(
            f"must be a mapping (Apple's providerConfiguration), not {type(conf).__name__}",
            source="provider_configuration",
        )
    clash = sorted(k for k in conf if k in NETSIM_CONFIGURATION_KEYS)
    if clash:
        raise ConfigError(
            f"keys {clash} are netsim's own (the helper socket and its reconnect knobs); remove them or use the "
            "backend's arguments (e.g. reconnect_for=)",
            source="provider_configuration",
        )
    try:
        # Apple's providerConfiguration is a property-list dictionary: it crosses a process boundary as JSON here.
        text = json.dumps(dict(conf), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"must be JSON-able (str keys; str, number, bool, None, list, dict values): {exc}",
            source="provider_configuration",
        ) from None
    return json.loads(text)  # type: ignore[no-any-return]


def _is_path(text: str) -> bool:
    """A policy `str` is a path when it names an existing file or ends in a policy suffix (one line only)."""
    if "\n" in text:
        return False
    if text.lower().endswith(_POLICY_SUFFIXES):
        return True
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for a path: it is text
        return False


def resolve_policy(policy: str | os.PathLike[str] | None) -> tuple[Policy | None, Path | None, str | None]:
    """``(policy, path, text)`` for a policy argument: a path (`os.PathLike`, or a `str` naming an existing file
    or ending in .toml/.yaml/.yml) or TOML/YAML text.

    Raises:
        ConfigError: ``no such policy file: ...``, or the parse error (file, line/field and what to fix).
    """
    if policy is None:
        return None, None, None
    from netsim.runtime.policy_file import load_policy_file

    if isinstance(policy, os.PathLike) or (isinstance(policy, str) and _is_path(policy)):
        path = Path(policy).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"no such policy file: {path}", source="policy")
        return load_policy_file(path), path, None
    if not isinstance(policy, str):
        raise ConfigError(f"must be TOML/YAML text or a path, not {type(policy).__name__}", source="policy")
    try:
        return parse_policy(policy, fmt="toml", source="policy text"), None, policy
    except ConfigError as toml_error:
        try:
            return parse_policy(policy, fmt="yaml", source="policy text"), None, policy
        except ConfigError as yaml_error:
            # Text that looks like TOML ('=' or '[') gets the TOML error, else the YAML one.
            raise (toml_error if "=" in policy or policy.lstrip().startswith("[") else yaml_error) from None


def resolve_inputs(
    provider: type[PacketTunnelProvider] | str,
    provider_configuration: Mapping[str, Any] | None,
    policy: str | os.PathLike[str] | None,
) -> TunnelInputs:
    """Check the backends' shared arguments; see the module docstring. Raises `ConfigError`."""
    cls = resolve_provider(provider)
    conf = _configuration(provider_configuration)
    parsed, path, text = resolve_policy(policy)
    return TunnelInputs(cls, provider, conf, parsed, path, text)


#: `TunnelProviderProtocol` fields both tunnel backends set themselves.
BACKEND_PROTOCOL_FIELDS = frozenset({"server_address", "provider_configuration"})


def resolve_protocol_fields(protocol: Mapping[str, Any] | None) -> dict[str, Any]:
    """``protocol`` (NEVPNProtocol fields by their Python names) checked against `TunnelProviderProtocol`.

    Raises:
        ConfigError: an unknown name, one the backend sets (`BACKEND_PROTOCOL_FIELDS`), or a value the
            protocol refuses; the message lists the names you may set.
    """
    fields = dict(protocol or {})
    known = {f.name for f in dataclasses.fields(TunnelProviderProtocol)} - BACKEND_PROTOCOL_FIELDS
    bad = sorted(set(fields) - known)
    if bad:
        raise ConfigError(
            f"protocol fields {bad} are not NEVPNProtocol fields you may set here; known: {sorted(known)}",
            source="protocol",
        )
    try:
        TunnelProviderProtocol(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"protocol: {exc}", source="protocol") from None
    return fields
