"""The lab's deterministic addressing plan (the same for every run, documented in docs/lab.md).

Public hosts use the documentation prefixes of RFC 5737 (IPv4) and RFC 3849 (IPv6, 2001:db8::/32); the home LAN
uses RFC 1918 and a ULA (RFC 4193). Names live under ``lab.test`` (``.test`` is reserved by RFC 6761, so it never
resolves on the real internet).

Segments (each a veth pair, or a bridge for the LAN)::

    home LAN  br-lan in isp   192.168.1.0/24   fd00:6e73:1::/64    router .1/::1, mac .10/::10, lan .20/::20
    ISP WAN   isp:wan-inet:isp 198.51.100.0/24 2001:db8:51::/64    inet .1/::1, isp .2/::2
    VPN WAN   vpn:wan-inet:vpn 192.0.2.0/24    2001:db8:2::/64     inet .1/::1, vpn .2/::2
    internet hosts on inet lo 203.0.113.0/24   2001:db8:113::/64   www .10/::10, dns .53/::53

The optional second uplink (``Lab(second_uplink=True)``: Ethernet or a phone hotspot next to the Wi-Fi) is a second
home network behind a second ISP router ``isp2``, with its own WAN link; its public side is in RFC 2544's
benchmarking range 198.18.0.0/15 (never routed on the internet) and 2001:db8::/32::

    second LAN mac:en1 <-> isp2:mac 192.168.2.0/24 fd00:6e73:2::/64   router .1/::1, mac .10/::10
    ISP2 WAN  isp2:wan-inet:isp2  198.18.0.0/24    2001:db8:18::/64    inet .1/::1, isp2 .2/::2

A public address change of a home router (`netsim.lab.faults.change_public_address`) moves its WAN address to
the next one in the same prefix (``.3`` / ``::3``: ``isp_wan_alt_*``, ``isp2_wan_alt_*``), as a new DHCP lease
from the ISP would.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import ClassVar

__all__ = ["ADDR", "ALL_ROLES", "LAB_DOMAIN", "ROLES", "SECOND_UPLINK_ROLES", "Addressing", "HostName"]

ROLES: tuple[str, ...] = ("mac", "isp", "vpn", "inet", "lan")
#: roles only a lab with ``second_uplink=True`` has: the second ISP router
SECOND_UPLINK_ROLES: tuple[str, ...] = ("isp2",)
ALL_ROLES: tuple[str, ...] = ROLES + SECOND_UPLINK_ROLES
LAB_DOMAIN = "lab.test"


@dataclass(frozen=True)
class HostName:
    """A DNS name the lab's resolvers answer, with its A and AAAA records."""

    name: str
    v4: IPv4Address
    v6: IPv6Address


class Addressing:
    """Every address and prefix in the lab (constants). Attribute names read ``<role>_<ifname>_<family>``."""

    # home LAN (bridge br-lan in isp); IPv6 is a ULA NATed to the WAN (NAT66), like IPv4.
    lan_net_v4: ClassVar[IPv4Network] = IPv4Network("192.168.1.0/24")
    lan_net_v6: ClassVar[IPv6Network] = IPv6Network("fd00:6e73:1::/64")
    isp_lan_v4: ClassVar[IPv4Address] = IPv4Address("192.168.1.1")
    isp_lan_v6: ClassVar[IPv6Address] = IPv6Address("fd00:6e73:1::1")
    mac_en0_v4: ClassVar[IPv4Address] = IPv4Address("192.168.1.10")
    mac_en0_v6: ClassVar[IPv6Address] = IPv6Address("fd00:6e73:1::10")
    lan_eth0_v4: ClassVar[IPv4Address] = IPv4Address("192.168.1.20")
    lan_eth0_v6: ClassVar[IPv6Address] = IPv6Address("fd00:6e73:1::20")
    # ISP access link: isp "wan" <-> inet "isp"
    isp_wan_net_v4: ClassVar[IPv4Network] = IPv4Network("198.51.100.0/24")
    isp_wan_net_v6: ClassVar[IPv6Network] = IPv6Network("2001:db8:51::/64")
    inet_isp_v4: ClassVar[IPv4Address] = IPv4Address("198.51.100.1")
    inet_isp_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:51::1")
    isp_wan_v4: ClassVar[IPv4Address] = IPv4Address("198.51.100.2")
    isp_wan_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:51::2")
    # VPN server link: vpn "wan" <-> inet "vpn"
    vpn_wan_net_v4: ClassVar[IPv4Network] = IPv4Network("192.0.2.0/24")
    vpn_wan_net_v6: ClassVar[IPv6Network] = IPv6Network("2001:db8:2::/64")
    inet_vpn_v4: ClassVar[IPv4Address] = IPv4Address("192.0.2.1")
    inet_vpn_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:2::1")
    vpn_wan_v4: ClassVar[IPv4Address] = IPv4Address("192.0.2.2")
    vpn_wan_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:2::2")
    # internet hosts: addresses on inet's loopback, reached through inet's routing
    inet_hosts_net_v4: ClassVar[IPv4Network] = IPv4Network("203.0.113.0/24")
    inet_hosts_net_v6: ClassVar[IPv6Network] = IPv6Network("2001:db8:113::/64")
    www_v4: ClassVar[IPv4Address] = IPv4Address("203.0.113.10")
    www_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:113::10")
    dns_v4: ClassVar[IPv4Address] = IPv4Address("203.0.113.53")
    dns_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:113::53")
    # the home router's next public address (a public address change: a new lease on the same ISP link)
    isp_wan_alt_v4: ClassVar[IPv4Address] = IPv4Address("198.51.100.3")
    isp_wan_alt_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:51::3")
    # second uplink (Lab(second_uplink=True)): mac "en1" <-> isp2 "mac", a second home network and ISP
    lan2_net_v4: ClassVar[IPv4Network] = IPv4Network("192.168.2.0/24")
    lan2_net_v6: ClassVar[IPv6Network] = IPv6Network("fd00:6e73:2::/64")
    isp2_lan_v4: ClassVar[IPv4Address] = IPv4Address("192.168.2.1")
    isp2_lan_v6: ClassVar[IPv6Address] = IPv6Address("fd00:6e73:2::1")
    mac_en1_v4: ClassVar[IPv4Address] = IPv4Address("192.168.2.10")
    mac_en1_v6: ClassVar[IPv6Address] = IPv6Address("fd00:6e73:2::10")
    # second ISP's access link: isp2 "wan" <-> inet "isp2" (RFC 2544 benchmarking range, 2001:db8::/32)
    isp2_wan_net_v4: ClassVar[IPv4Network] = IPv4Network("198.18.0.0/24")
    isp2_wan_net_v6: ClassVar[IPv6Network] = IPv6Network("2001:db8:18::/64")
    inet_isp2_v4: ClassVar[IPv4Address] = IPv4Address("198.18.0.1")
    inet_isp2_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:18::1")
    isp2_wan_v4: ClassVar[IPv4Address] = IPv4Address("198.18.0.2")
    isp2_wan_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:18::2")
    isp2_wan_alt_v4: ClassVar[IPv4Address] = IPv4Address("198.18.0.3")
    isp2_wan_alt_v6: ClassVar[IPv6Address] = IPv6Address("2001:db8:18::3")

    def names(self) -> tuple[HostName, ...]:
        """The ``lab.test`` zone served by the lab's DNS servers."""
        d = LAB_DOMAIN
        return (
            HostName(f"www.{d}", self.www_v4, self.www_v6),
            HostName(f"echo.{d}", self.www_v4, self.www_v6),
            HostName(f"iperf.{d}", self.www_v4, self.www_v6),
            HostName(f"dns.{d}", self.dns_v4, self.dns_v6),
            HostName(f"vpn.{d}", self.vpn_wan_v4, self.vpn_wan_v6),
            HostName(f"isp.{d}", self.isp_wan_v4, self.isp_wan_v6),
            HostName(f"isp2.{d}", self.isp2_wan_v4, self.isp2_wan_v6),
            HostName(f"router.{d}", self.isp_lan_v4, self.isp_lan_v6),
            HostName(f"mac.{d}", self.mac_en0_v4, self.mac_en0_v6),
            HostName(f"printer.{d}", self.lan_eth0_v4, self.lan_eth0_v6),
            HostName(f"lan.{d}", self.lan_eth0_v4, self.lan_eth0_v6),
        )

    def lookup(self, name: str) -> HostName | None:
        """Find a name in the zone (case-insensitive, trailing dot allowed)."""
        key = name.lower().rstrip(".")
        for host in self.names():
            if host.name == key:
                return host
        return None

    def table(self, *, second_uplink: bool = True) -> list[tuple[str, str, str, str]]:
        """Rows ``(role, ifname, ipv4/prefix, ipv6/prefix)`` for docs and ``netsim lab status``; the second
        uplink's rows (mac en1, isp2, inet isp2) come last, left out with ``second_uplink=False``."""

        def cidr(addr: IPv4Address | IPv6Address, net: IPv4Network | IPv6Network) -> str:
            return f"{addr}/{net.prefixlen}"

        a = self
        rows = [
            ("mac", "en0", cidr(a.mac_en0_v4, a.lan_net_v4), cidr(a.mac_en0_v6, a.lan_net_v6)),
            ("lan", "eth0", cidr(a.lan_eth0_v4, a.lan_net_v4), cidr(a.lan_eth0_v6, a.lan_net_v6)),
            ("isp", "br-lan", cidr(a.isp_lan_v4, a.lan_net_v4), cidr(a.isp_lan_v6, a.lan_net_v6)),
            ("isp", "wan", cidr(a.isp_wan_v4, a.isp_wan_net_v4), cidr(a.isp_wan_v6, a.isp_wan_net_v6)),
            ("inet", "isp", cidr(a.inet_isp_v4, a.isp_wan_net_v4), cidr(a.inet_isp_v6, a.isp_wan_net_v6)),
            ("inet", "vpn", cidr(a.inet_vpn_v4, a.vpn_wan_net_v4), cidr(a.inet_vpn_v6, a.vpn_wan_net_v6)),
            ("vpn", "wan", cidr(a.vpn_wan_v4, a.vpn_wan_net_v4), cidr(a.vpn_wan_v6, a.vpn_wan_net_v6)),
            ("inet", "lo (www)", f"{a.www_v4}/32", f"{a.www_v6}/128"),
            ("inet", "lo (dns)", f"{a.dns_v4}/32", f"{a.dns_v6}/128"),
        ]
        if second_uplink:
            rows += [
                ("mac", "en1", cidr(a.mac_en1_v4, a.lan2_net_v4), cidr(a.mac_en1_v6, a.lan2_net_v6)),
                ("isp2", "mac", cidr(a.isp2_lan_v4, a.lan2_net_v4), cidr(a.isp2_lan_v6, a.lan2_net_v6)),
                ("isp2", "wan", cidr(a.isp2_wan_v4, a.isp2_wan_net_v4), cidr(a.isp2_wan_v6, a.isp2_wan_net_v6)),
                ("inet", "isp2", cidr(a.inet_isp2_v4, a.isp2_wan_net_v4), cidr(a.inet_isp2_v6, a.isp2_wan_net_v6)),
            ]
        return rows


ADDR = Addressing()


def is_lab_public(addr: str) -> bool:
    """True if ``addr`` is in one of the lab's public (documentation and benchmarking) prefixes."""
    ip = ip_address(addr)
    nets = (
        ADDR.isp_wan_net_v4,
        ADDR.isp_wan_net_v6,
        ADDR.isp2_wan_net_v4,
        ADDR.isp2_wan_net_v6,
        ADDR.vpn_wan_net_v4,
        ADDR.vpn_wan_net_v6,
        ADDR.inet_hosts_net_v4,
        ADDR.inet_hosts_net_v6,
    )
    return any(ip.version == n.version and ip in n for n in nets)
