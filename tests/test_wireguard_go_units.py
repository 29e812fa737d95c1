"""netsim.lab.wireguard without root: the ``wg show dump`` parser, config loading and interface naming rules.

(The root-tier tests of a real wireguard-go pair are in tests/lab/test_wireguard_go.py.)
"""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from netsim.core.wireguard.config import Endpoint
from netsim.core.wireguard.keys import PrivateKey, PublicKey
from netsim.errors import ConfigError, LabError
from netsim.lab.wireguard import WireGuardGo, load_config, parse_wg_show_dump, wg_ifname

# Captured from `wg show <if> dump` of wireguard-go v0.0.20220316 (keys are throwaway).
DUMP = (
    "ONNDQCZ+/KgbVhzFRsc7F2TtZp0pNJc8N3XSF+xXoGI=\tKcKLKT6RX0PQgnohyB0xQdoaGlujrmJIHs1O9EBBwVg=\t51820\toff\n"
    "e1Jn3MoyY7+cYVe4uEf7ccF1ShxY7Sm6PCjq0OqCbGw=\t(none)\t198.51.100.2:40123\t10.77.0.2/32\t1795730000\t1052\t964\toff\n"
    "mTs2qTq8jmxS0zswhqIdk5gpHd3XGTLd5PX8K6RXsE8=\tNIYnwwlymcKvxQAsGVSKjcEjHhyKYYnZBNKqTfaXuW4=\t[2001:db8::7]:51820"
    "\t10.9.0.0/16,fd00:9::/64\t0\t0\t0\t25\n"
)


def test_parse_wg_show_dump() -> None:
    st = parse_wg_show_dump(DUMP)
    assert st.public_key == PublicKey.from_base64("KcKLKT6RX0PQgnohyB0xQdoaGlujrmJIHs1O9EBBwVg=")
    assert st.listen_port == 51820 and st.fwmark is None and len(st.peers) == 2
    a = st.peer(PublicKey.from_base64("e1Jn3MoyY7+cYVe4uEf7ccF1ShxY7Sm6PCjq0OqCbGw="))
    assert (a.endpoint, a.latest_handshake, a.rx_bytes, a.tx_bytes) == (
        Endpoint("198.51.100.2", 40123),
        1795730000,
        1052,
        964,
    )
    assert a.allowed_ips == (ip_network("10.77.0.2/32"),) and not a.has_preshared_key
    b = st.peers[1]
    assert b.endpoint == Endpoint("2001:db8::7", 51820) and b.has_preshared_key
    assert b.allowed_ips == (ip_network("10.9.0.0/16"), ip_network("fd00:9::/64"))
    assert b.latest_handshake is None and b.persistent_keepalive == 25
    # the private key in the first column is not kept anywhere
    assert "ONNDQCZ" not in repr(st)


@pytest.mark.parametrize(
    "bad", ["", "a\tb\n", DUMP.replace("\t51820\t", "\tport\t"), DUMP + "x\ty\n", DUMP.replace("1052", "-")]
)
def test_parse_wg_show_dump_rejects_garbage(bad: str) -> None:
    with pytest.raises(LabError, match="wg show dump"):
        parse_wg_show_dump(bad)


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "wg0.conf"
    key = PrivateKey.generate()
    path.write_text(f"[Interface]\nPrivateKey = {key.to_base64()}\nListenPort = 51820\n")
    assert load_config(path).interface.private_key == key
    path.write_text("[Interface]\nListenPort = 51820\n")
    with pytest.raises(ConfigError, match=r"wg0.conf:1: .*no PrivateKey"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.conf")


def test_ifname_rules() -> None:
    assert wg_ifname("ab12", "wg0") == "netsim-ab12-wg0"
    assert wg_ifname("ab12cd", "wg0") == "nsab12cdwg0"
    assert all(len(wg_ifname(r, "s0")) <= 15 for r in ("a", "ab12cd", "t1234"))
    with pytest.raises(LabError, match="suffix"):
        wg_ifname("ab12", "WG 0")
    with pytest.raises(LabError, match="15-character"):
        wg_ifname("a" * 12, "wg0")
    with pytest.raises(LabError, match="1-15 characters"):
        WireGuardGo("ns", "x" * 16, PrivateKey.generate())
    with pytest.raises(ConfigError, match="bad tunnel address"):
        WireGuardGo("ns", "wg0", PrivateKey.generate(), addresses=["10.0.0.300/24"])
