"""wg-quick configuration: parsing, errors that name the line, rendering round trips, `wg-quick strip` oracle."""

from __future__ import annotations

import random
import shutil
import subprocess
from ipaddress import IPv4Interface, IPv6Interface, ip_address, ip_interface, ip_network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsim.core.wireguard.config import (
    Endpoint,
    InterfaceConfig,
    PeerConfig,
    TunnelConfig,
    parse_config,
    parse_endpoint,
    render_wg_quick,
    to_wg_setconf,
)
from netsim.core.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from netsim.errors import ConfigError
from netsim.testing.require import require_binary

RNG = random.Random(0x5EED)
SK = PrivateKey.generate(RNG.randbytes)
PEER1 = PrivateKey.generate(RNG.randbytes).public_key()
PEER2 = PrivateKey.generate(RNG.randbytes).public_key()
PSK = PresharedKey.generate(RNG.randbytes)

EXAMPLE = f"""\
# a client config as wg-quick users write it
[Interface]
PrivateKey = {SK.to_base64()}
Address = 10.66.0.2/32, fd00:66::2/128
Address = 10.66.1.2/24
DNS = 10.66.0.1, 2001:db8::53, corp.example, lab.test
MTU = 1380
ListenPort = 51820
PostUp = logger up # hooks are kept, never run

[Peer]  # the server
PublicKey = {PEER1.to_base64()}
PresharedKey = {PSK.to_base64()}
Endpoint = vpn.example.com:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25

[Peer]
PublicKey = {PEER2.to_base64()}
Endpoint = [2001:db8::1]:443
AllowedIPs = 192.168.7.1/24
"""


def test_example_parses_to_expected_dataclasses() -> None:
    cfg = parse_config(EXAMPLE)
    assert cfg.interface == InterfaceConfig(
        private_key=SK,
        addresses=(ip_interface("10.66.0.2/32"), ip_interface("fd00:66::2/128"), ip_interface("10.66.1.2/24")),
        dns_servers=(ip_address("10.66.0.1"), ip_address("2001:db8::53")),
        dns_search=("corp.example", "lab.test"),
        mtu=1380,
        listen_port=51820,
        wg_quick_options=(("PostUp", "logger up"),),
    )
    assert cfg.peers == (
        PeerConfig(
            public_key=PEER1,
            preshared_key=PSK,
            endpoint=Endpoint("vpn.example.com", 51820),
            allowed_ips=(ip_network("0.0.0.0/0"), ip_network("::/0")),
            persistent_keepalive=25,
        ),
        # host bits masked, as wg does
        PeerConfig(
            public_key=PEER2, endpoint=Endpoint("2001:db8::1", 443), allowed_ips=(ip_network("192.168.7.0/24"),)
        ),
    )
    assert cfg.peer(PEER2).endpoint is not None and str(cfg.peer(PEER2).endpoint) == "[2001:db8::1]:443"
    assert cfg.interface.public_key == SK.public_key()


def test_keys_and_sections_are_case_insensitive_and_crlf_bom_tolerated() -> None:
    text = "\ufeff" + EXAMPLE.replace("[Interface]", "[interface]").replace("PrivateKey", "PRIVATEKEY")
    text = text.replace("AllowedIPs", "allowedips").replace("[Peer]", "[PEER]").replace("\n", "\r\n")
    assert parse_config(text) == parse_config(EXAMPLE)


def test_list_keys_accumulate_and_keepalive_off() -> None:
    text = f"[Interface]\nPrivateKey={SK.to_base64()}\n[Peer]\nPublicKey={PEER1.to_base64()}\n"
    text += "AllowedIPs = 10.0.0.0/8\nAllowedIPs = 10.0.0.0/8, 172.16.0.0/12,\nPersistentKeepalive = off\n"
    (peer,) = parse_config(text).peers
    assert peer.allowed_ips == (ip_network("10.0.0.0/8"), ip_network("172.16.0.0/12"))
    assert peer.persistent_keepalive is None


def _iface(extra: str = "") -> str:
    return f"[Interface]\nPrivateKey = {SK.to_base64()}\n{extra}"


def _peer(extra: str = "", key: PublicKey = PEER1) -> str:
    return f"[Peer]\nPublicKey = {key.to_base64()}\n{extra}"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (_iface("Foo = 1\n"), 3, "unknown key 'Foo' in [Interface]"),
        (_iface() + _peer("ListenPort = 1\n"), 5, "unknown key 'ListenPort' in [Peer]"),
        ("PrivateKey = x\n", 1, "outside any section"),
        ("[Interfaces]\n", 1, "unknown section"),
        (_iface("just words\n"), 3, "expected 'Key = Value'"),
        ("# only a comment\n[Interface]\nAddress = 10.0.0.1/24\n", 2, "has no PrivateKey"),
        (_iface() + "[Peer]\nAllowedIPs = 10.0.0.0/8\n", 3, "[Peer] has no PublicKey"),
        ("[Interface]\nPrivateKey = abc\n", 2, "PrivateKey must be 32 bytes of base64"),
        (_iface() + "[Peer]\nPublicKey = nope\n", 4, "PublicKey must be 32 bytes of base64"),
        (_iface() + _peer("PresharedKey = zz\n"), 5, "PresharedKey must be 32 bytes of base64"),
        (_iface("Address = 10.0.0.300/24\n"), 3, "Address entry '10.0.0.300/24'"),
        (_iface("Address = 10.0.0.1/33\n"), 3, "Address entry"),
        (_iface() + _peer("AllowedIPs = 10.0.0.0/24, 10.1.0.0/40\n"), 5, "AllowedIPs entry '10.1.0.0/40'"),
        (_iface("ListenPort = 70000\n"), 3, "ListenPort must be between 0 and 65535"),
        (_iface("ListenPort = -1\n"), 3, "ListenPort must be an integer"),
        (_iface("MTU = 1000\nAddress = fd00::1/64\n"), 3, "IPv6 needs at least 1280"),
        (_iface("MTU = 60\n"), 3, "MTU must be between 68 and 65535"),
        (_iface("DNS = 1.2.3\n"), 3, "DNS entry '1.2.3'"),
        (_iface("DNS = bad_host!\n"), 3, "neither an IP address nor a search domain"),
        (_iface() + _peer("Endpoint = 192.0.2.1\n"), 5, "must be host:port"),
        (_iface() + _peer("Endpoint = 192.0.2.1:0\n"), 5, "Endpoint port must be between 1 and 65535"),
        (_iface() + _peer("Endpoint = 192.0.2.1:65536\n"), 5, "Endpoint port must be between 1 and 65535"),
        (_iface() + _peer("Endpoint = 2001:db8::1:51820\n"), 5, "in brackets"),
        (_iface() + _peer("Endpoint = [192.0.2.1]:51820\n"), 5, "brackets are for IPv6"),
        (_iface() + _peer("PersistentKeepalive = 70000\n"), 5, "PersistentKeepalive must be between"),
        (_iface("ListenPort = 1\nlistenport = 2\n"), 4, "ListenPort given twice"),
        (_iface() + _peer() + _peer(), 6, "duplicate peer"),
        (_iface() + _peer(key=SK.public_key()), 4, "interface's own public key"),
        (_iface() + _iface(), 3, "second [Interface]"),
    ],
)
def test_errors_name_the_line_and_the_fix(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="wg0.conf")
    assert info.value.line == line and info.value.source == "wg0.conf"
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"wg0.conf:{line}: ")


def test_missing_interface_section() -> None:
    with pytest.raises(ConfigError, match=r"no \[Interface\] section"):
        parse_config(_peer())


def test_private_key_is_not_echoed_in_errors() -> None:
    near_miss = SK.to_base64()[:-1]
    with pytest.raises(ConfigError) as info:
        parse_config(f"[Interface]\nPrivateKey = {near_miss}\n")
    assert near_miss not in str(info.value)


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("192.0.2.1:51820", Endpoint("192.0.2.1", 51820)),
        ("[fe80::1%eth0]:1", Endpoint("fe80::1%eth0", 1)),
        ("vpn.lab.test:65535", Endpoint("vpn.lab.test", 65535)),
    ],
)
def test_parse_endpoint(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint
    assert str(endpoint) == text
    assert (endpoint.address is None) == (endpoint.host == "vpn.lab.test")


# --- round trips --------------------------------------------------------------------------------------------

keys32 = st.binary(min_size=32, max_size=32)
v4_iface = st.builds(lambda a, p: IPv4Interface((a, p)), st.integers(0, 2**32 - 1), st.integers(0, 32))
v6_iface = st.builds(lambda a, p: IPv6Interface((a, p)), st.integers(0, 2**128 - 1), st.integers(0, 128))
networks = st.one_of(v4_iface, v6_iface).map(lambda i: i.network)
endpoints = st.builds(
    Endpoint,
    st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](\.[a-z]{2,6}){0,2}", fullmatch=True),
    ),
    st.integers(1, 65535),
)
peers = st.builds(
    PeerConfig,
    public_key=keys32.map(PublicKey),
    preshared_key=st.none() | keys32.map(PresharedKey),
    endpoint=st.none() | endpoints,
    allowed_ips=st.lists(networks, max_size=4, unique=True).map(tuple),
    persistent_keepalive=st.none() | st.integers(1, 65535),
)
hook = st.tuples(
    st.sampled_from(["PreUp", "PostUp", "PreDown", "PostDown"]),
    st.from_regex(r"[a-z][a-z0-9 %/.-]{0,30}[a-z0-9]", fullmatch=True),
)


@st.composite
def tunnel_configs(draw: st.DrawFn) -> TunnelConfig:
    addresses = tuple(draw(st.lists(st.one_of(v4_iface, v6_iface), max_size=3)))
    lo = 1280 if any(a.version == 6 for a in addresses) else 68
    iface = InterfaceConfig(
        private_key=PrivateKey(draw(keys32)),
        addresses=addresses,
        dns_servers=tuple(draw(st.lists(st.ip_addresses(), max_size=2))),
        dns_search=tuple(draw(st.lists(st.sampled_from(["lab.test", "corp.example", "x_y.example."]), max_size=2))),
        mtu=draw(st.none() | st.integers(lo, 65535)),
        listen_port=draw(st.none() | st.integers(1, 65535)),
        fwmark=draw(st.none() | st.integers(1, 2**32 - 1)),
        wg_quick_options=tuple(sorted(draw(st.lists(hook, max_size=2)), key=lambda kv: kv[0] != "PreUp")),
    )
    ps = draw(st.lists(peers, max_size=3, unique_by=lambda p: p.public_key))
    ps = [p for p in ps if p.public_key != iface.public_key]
    return TunnelConfig(iface, tuple(ps))


def _hooks_in_parse_order(cfg: TunnelConfig) -> TunnelConfig:
    """The parser groups hook keys by name (PreUp, PostUp, PreDown, PostDown); normalise for comparison."""
    order = ["Table", "SaveConfig", "PreUp", "PostUp", "PreDown", "PostDown"]
    opts = tuple(sorted(cfg.interface.wg_quick_options, key=lambda kv: order.index(kv[0])))
    i = cfg.interface
    return TunnelConfig(
        InterfaceConfig(i.private_key, i.addresses, i.dns_servers, i.dns_search, i.mtu, i.listen_port, i.fwmark, opts),
        cfg.peers,
    )


@settings(max_examples=300)
@given(tunnel_configs())
def test_render_wg_quick_round_trips(cfg: TunnelConfig) -> None:
    assert parse_config(render_wg_quick(cfg)) == _hooks_in_parse_order(cfg)


@settings(max_examples=200)
@given(tunnel_configs())
def test_setconf_is_the_wg_subset(cfg: TunnelConfig) -> None:
    text = to_wg_setconf(cfg)
    for key in ("Address", "DNS", "MTU", "PreUp", "PostUp", "PreDown", "PostDown"):
        assert f"\n{key} =" not in text
    back = parse_config(text)
    assert back.peers == cfg.peers
    i = cfg.interface
    assert (back.interface.private_key, back.interface.listen_port, back.interface.fwmark) == (
        i.private_key,
        i.listen_port,
        i.fwmark,
    )


# --- robustness: nothing but ConfigError escapes -----------------------------------------------------------

LINES = [line for line in EXAMPLE.splitlines() if line]


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError as exc:
        assert exc.line is None or exc.line >= 1


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(LINES), max_size=20),
    st.lists(st.tuples(st.integers(0, 2000), st.sampled_from(list("=[],:/#\n x0\x00é"))), max_size=4),
)
def test_mutated_configs_raise_only_config_error(lines: list[str], edits: list[tuple[int, str]]) -> None:
    text = "\n".join(lines)
    for pos, ch in edits:
        pos %= len(text) + 1
        text = text[:pos] + ch + text[pos + 1 :]
    try:
        cfg = parse_config(text)
    except ConfigError:
        return
    assert parse_config(render_wg_quick(cfg)).peers == cfg.peers


# --- oracle: wg-quick strip ---------------------------------------------------------------------------------


def _wg_sections(text: str) -> list[dict[str, str]]:
    """A tiny, independent reading of wg's format for comparing two renderings (keys lowercased)."""
    sections: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            sections.append({"section": line.lower()})
        elif "=" in line:
            k, v = line.split("=", 1)
            sections[-1][k.strip().lower()] = v.replace(" ", "")
    return sections


def test_to_wg_setconf_matches_wg_quick_strip(tmp_path: Path) -> None:
    require_binary("wg-quick")
    wg_quick = shutil.which("wg-quick")
    assert wg_quick is not None
    cfg = parse_config(EXAMPLE)
    path = tmp_path / "nsim0.conf"
    path.write_text(render_wg_quick(cfg))
    path.chmod(0o600)
    stripped = subprocess.run([wg_quick, "strip", str(path)], check=True, capture_output=True, text=True).stdout
    ours = _wg_sections(to_wg_setconf(cfg))
    theirs = _wg_sections(stripped)
    # wg-quick strip keeps what wg understands verbatim; FwMark/ListenPort formatting is ours on both sides.
    assert ours == theirs
    assert parse_config(stripped) == TunnelConfig(
        InterfaceConfig(cfg.interface.private_key, listen_port=cfg.interface.listen_port), cfg.peers
    )
