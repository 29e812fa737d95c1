"""``NETSIM_TUN_OFFLOAD``: what the provider process's utun is created with (docs/helper.md, TUN offloads)."""

from __future__ import annotations

import pytest

from netsim.errors import ConfigError
from netsim.transports.tun import TUN_F_ALL, TUN_OFFLOAD_ENV, tun_offload_from_env


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", None),
        ("off", None),
        ("gro", 0),
        ("GRO", 0),
        ("tso", TUN_F_ALL),
        ("1", TUN_F_ALL),
    ],
)
def test_the_modes(value: str | None, expected: int | None) -> None:
    env = {} if value is None else {TUN_OFFLOAD_ENV: value}
    assert tun_offload_from_env(env) == expected


def test_an_unknown_mode_says_which_are_allowed() -> None:
    with pytest.raises(ConfigError, match="gro"):
        tun_offload_from_env({TUN_OFFLOAD_ENV: "yes"})
