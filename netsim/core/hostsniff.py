"""Bounded parsers of the host name at the start of a flow: HTTP/1.x ``Host`` and TLS ClientHello SNI.

The bytes are untrusted (an app, or anything on the wire): each parser reads at most `MAX_SNIFF` bytes, checks
every length against what is there, and never raises: it returns ``(complete, name)``, where ``complete`` says
whether more bytes could change the answer (False: ask for more, if the peek allows) and ``name`` is the
lower-cased host name, or None (absent, malformed, or not a valid DNS name).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MAX_SNIFF", "sniff_http_host", "sniff_tls_sni"]

#: the most bytes either parser looks at
MAX_SNIFF: Final = 16384
_LABEL = rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rb"^(?=.{1,253}$)" + _LABEL + rb"(?:\." + _LABEL + rb")*\.?$")


def _valid(name: bytes) -> str | None:
    name = name.strip().lower()
    if not _NAME.match(name):
        return None
    return name.rstrip(b".").decode("ascii")


def sniff_http_host(data: bytes) -> tuple[bool, str | None]:
    """The ``Host`` header of an HTTP/1.x request at the start of ``data`` (RFC 9112 §3.2), port removed."""
    data = data[:MAX_SNIFF]
    end = data.find(b"\r\n\r\n")
    complete = end >= 0 or len(data) >= MAX_SNIFF
    head = data if end < 0 else data[:end]
    lines = head.split(b"\r\n")
    if not lines or b" HTTP/1." not in lines[0]:
        return (complete or b"\r\n" in data), None
    for line in lines[1:] if end >= 0 else lines[1:-1]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == b"host":
            value = value.strip()
            if value.startswith(b"["):
                return True, None  # an IPv6 literal is not a name
            host, _, port = value.partition(b":")
            if port and not port.isdigit():
                return True, None
            return True, _valid(host)
    return complete, None


def sniff_tls_sni(data: bytes) -> tuple[bool, str | None]:
    """The ``server_name`` (RFC 6066 §3) of a TLS ClientHello (RFC 8446 §4.1.2) in the first record of ``data``."""
    data = data[:MAX_SNIFF]
    if len(data) < 5:
        return False, None
    if data[0] != 0x16 or data[1] != 0x03:
        return True, None  # not a TLS handshake record
    record_len = int.from_bytes(data[3:5], "big")
    end = 5 + record_len
    if len(data) < end and len(data) < MAX_SNIFF:
        return False, None
    body = data[5:end]
    try:
        return True, _client_hello_sni(body)
    except IndexError:
        return True, None


def _client_hello_sni(body: bytes) -> str | None:
    """The SNI of a ClientHello handshake message; IndexError (caught) for a truncated one."""
    if len(body) < 4 or body[0] != 0x01:
        return None
    pos = 4 + 2 + 32  # handshake header, legacy_version, random
    pos += 1 + body[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + body[pos]  # legacy_compression_methods
    if pos + 2 > len(body):
        return None
    ext_end = min(len(body), pos + 2 + int.from_bytes(body[pos : pos + 2], "big"))
    pos += 2
    while pos + 4 <= ext_end:
        kind = int.from_bytes(body[pos : pos + 2], "big")
        size = int.from_bytes(body[pos + 2 : pos + 4], "big")
        pos += 4
        if pos + size > ext_end:
            return None
        if kind == 0:  # server_name: ServerNameList
            ext = body[pos : pos + size]
            i, list_end = 2, min(len(ext), 2 + int.from_bytes(ext[0:2], "big"))
            while i + 3 <= list_end:
                name_type, name_len = ext[i], int.from_bytes(ext[i + 1 : i + 3], "big")
                name = ext[i + 3 : i + 3 + name_len]
                if name_type == 0 and len(name) == name_len:
                    return _valid(name)
                i += 3 + name_len
            return None
        pos += size
    return None
