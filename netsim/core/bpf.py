"""Classic-BPF program building for the NAT bypass's capture socket (sans-IO: bytes out, no sockets).

`capture_filter` returns the ``struct sock_filter[]`` bytes that `netsim.transports.raw` attaches with
``SO_ATTACH_FILTER`` (<linux/filter.h>; the instruction set is the one of Documentation/networking/filter.rst).
A small assembler with forward labels keeps the program readable; tests run it through a reference interpreter.
"""

from __future__ import annotations

import struct

from netsim.errors import ConfigError

__all__ = ["SOCK_FILTER", "capture_filter"]

# <linux/filter.h>, <linux/if_ether.h>, <linux/if_packet.h>
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD
_SKF_AD_OFF = -0x1000
_SKF_AD_PROTOCOL = 0
_SKF_AD_PKTTYPE = 4
_PACKET_HOST = 0
#: ``struct sock_filter {u16 code; u8 jt, jf; u32 k}``: one instruction.
SOCK_FILTER = struct.Struct("=HBBI")
_SNAP = 0x40000  # BPF "accept": keep the whole frame

# classic BPF opcodes (<linux/bpf_common.h>)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_H_IND, _LD_B_IND = 0x48, 0x50
_LDX_B_MSH = 0xB1
_JEQ, _JGT, _JGE, _JSET = 0x15, 0x25, 0x35, 0x45
_RET = 0x06


class _Asm:
    """A tiny classic-BPF assembler with forward labels (jumps are forward-only, offsets < 256)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int = 0, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.code):
            offs = []
            for target in (jt, jf):
                off = self.labels[target] - i - 1 if isinstance(target, str) else int(target)  # type: ignore[call-overload]
                if not 0 <= off <= 255:
                    raise ConfigError(f"BPF jump offset {off} out of range (program too long)")
                offs.append(off)
            out += SOCK_FILTER.pack(code, offs[0], offs[1], k)
        return bytes(out)


def _range(asm: _Asm, lo: int, hi: int, *, accept: str = "accept") -> None:
    asm.op(_JGE, lo, 0, "reject")
    asm.op(_JGT, hi, "reject", accept)


def capture_filter(ext_v4: bytes | None, ext_v6: bytes | None, port_range: tuple[int, int]) -> bytes:
    """The capture socket's classic BPF program (``struct sock_filter[]`` bytes) for a ``SOCK_DGRAM`` packet socket.

    Offsets are from the network header (packet(7): ``SOCK_DGRAM`` removes the link-layer header before the
    filter runs). Passes frames for this host (``PACKET_HOST``) to ``ext_v4``/``ext_v6`` that are TCP/UDP to
    ``port_range`` (IPv4 non-first fragments excluded: they carry no port), ICMP/ICMPv6 echo replies with an
    identifier in ``port_range``, or ICMP errors (RFC 792 types 3, 11, 12; RFC 4443 types 1-4). IPv6 packets with
    extension headers are not passed (the NAT would drop them as fragments or unsupported anyway).
    """
    lo, hi = port_range
    asm = _Asm()
    asm.op(_LD_W_ABS, _SKF_AD_OFF + _SKF_AD_PKTTYPE)
    asm.op(_JEQ, _PACKET_HOST, 0, "reject")
    asm.op(_LD_W_ABS, _SKF_AD_OFF + _SKF_AD_PROTOCOL)
    asm.op(_JEQ, _ETH_P_IP, "v4", 0)
    asm.op(_JEQ, _ETH_P_IPV6, "v6", "reject")
    asm.label("v4")
    if ext_v4 is None:
        asm.op(_RET, 0)
    else:
        asm.op(_LD_W_ABS, 16)  # RFC 791: destination address
        asm.op(_JEQ, int.from_bytes(ext_v4, "big"), 0, "reject")
        asm.op(_LD_H_ABS, 6)
        asm.op(_JSET, 0x1FFF, "reject", 0)  # non-first fragment
        asm.op(_LDX_B_MSH, 0)  # X = 4 * IHL
        asm.op(_LD_B_ABS, 9)
        asm.op(_JEQ, 6, "ports4", 0)
        asm.op(_JEQ, 17, "ports4", 0)
        asm.op(_JEQ, 1, "icmp4", "reject")
        asm.label("ports4")
        asm.op(_LD_H_IND, 2)  # destination port
        _range(asm, lo, hi)
        asm.label("icmp4")
        asm.op(_LD_B_IND, 0)
        asm.op(_JEQ, 0, "echo4", 0)
        asm.op(_JEQ, 3, "accept", 0)
        asm.op(_JEQ, 11, "accept", 0)
        asm.op(_JEQ, 12, "accept", "reject")
        asm.label("echo4")
        asm.op(_LD_H_IND, 4)  # echo identifier
        _range(asm, lo, hi)
    asm.label("v6")
    if ext_v6 is None:
        asm.op(_RET, 0)
    else:
        for i in range(4):
            asm.op(_LD_W_ABS, 24 + 4 * i)  # RFC 8200: destination address
            asm.op(_JEQ, int.from_bytes(ext_v6[4 * i : 4 * i + 4], "big"), 0, "reject")
        asm.op(_LD_B_ABS, 6)  # next header
        asm.op(_JEQ, 6, "ports6", 0)
        asm.op(_JEQ, 17, "ports6", 0)
        asm.op(_JEQ, 58, "icmp6", "reject")
        asm.label("ports6")
        asm.op(_LD_H_ABS, 42)
        _range(asm, lo, hi)
        asm.label("icmp6")
        asm.op(_LD_B_ABS, 40)
        asm.op(_JEQ, 129, "echo6", 0)
        asm.op(_JGE, 1, 0, "reject")
        asm.op(_JGT, 4, "reject", "accept")
        asm.label("echo6")
        asm.op(_LD_H_ABS, 44)
        _range(asm, lo, hi)
    asm.label("accept")
    asm.op(_RET, _SNAP)
    asm.label("reject")
    asm.op(_RET, 0)
    return asm.assemble()
