"""The lab's small servers: HTTP with known content, an authoritative DNS for ``lab.test``, and UDP echo.

Run as one child process per namespace (``python -m netsim.lab.services --http 203.0.113.10:80 ...``) so a
namespace's services cost one interpreter. Each service binds explicit addresses (never a wildcard) so replies
leave from the address the request was sent to, which NAT and captures rely on. When every socket is bound the
process prints ``READY`` on stdout; the lab waits for that line, not for a fixed delay.

Everything here handles untrusted datagrams: a malformed DNS query is counted and dropped, never fatal.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from typing import Any, ClassVar

__all__ = ["HTTP_BODY", "HTTP_SHA256", "http_body", "main", "parse_endpoint"]


def http_body(size: int) -> bytes:
    """Deterministic pseudo-random bytes: SHA-256 in counter mode, so any client can verify a download."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"netsim-lab-%d" % counter).digest()
        counter += 1
    return bytes(out[:size])


#: The page at ``http://www.lab.test/`` (and every lab HTTP server's ``/``): 64 KiB, more than one TCP window.
HTTP_BODY = http_body(65536)
HTTP_SHA256 = hashlib.sha256(HTTP_BODY).hexdigest()
_MAX_SIZE = 64 * 1024 * 1024


def parse_endpoint(text: str) -> tuple[str, int]:
    """Parse ``1.2.3.4:80`` or ``[2001:db8::1]:80``."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    ip_address(host)  # validates
    return host, int(port)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Handler(BaseHTTPRequestHandler):
    server_version = "netsim-lab"
    label: ClassVar[str] = "lab"

    def do_GET(self) -> None:
        if self.path == "/":
            body = HTTP_BODY
        elif self.path.startswith("/bytes/") and self.path[7:].isdigit() and int(self.path[7:]) <= _MAX_SIZE:
            body = http_body(int(self.path[7:]))
        elif self.path == "/whoami":
            body = f"{self.label} {self.client_address[0]}\n".encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # keep logs quiet; captures are the record


def _http_server(host: str, port: int) -> ThreadingHTTPServer:
    cls = type("Srv", (ThreadingHTTPServer,), {"address_family": _family(host)})
    server: ThreadingHTTPServer = cls((host, port), _Handler)
    return server


def _udp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.bind((host, port))
    return sock


def _serve_echo(sock: socket.socket) -> None:
    while True:
        try:
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)
        except OSError:
            continue  # e.g. ICMP-induced ECONNREFUSED from an earlier send: keep serving


def _serve_dns(sock: socket.socket, drops: list[int]) -> None:
    from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

    from netsim.lab.addressing import ADDR, LAB_DOMAIN

    while True:
        try:
            data, peer = sock.recvfrom(4096)
        except OSError:
            continue
        try:
            query = DNSRecord.parse(data)
            qname = str(query.q.qname)
        except Exception:  # dnslib raises several types on garbage: count and drop
            drops[0] += 1
            continue
        reply = query.reply()
        host = ADDR.lookup(qname)
        if host is None:
            if qname.lower().rstrip(".").endswith(LAB_DOMAIN):
                reply.header.rcode = RCODE.NXDOMAIN
            else:
                reply.header.rcode = RCODE.REFUSED  # authoritative only; no recursion in the lab
        else:
            if query.q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(str(host.v4)), ttl=60))
            if query.q.qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(str(host.v6)), ttl=60))
        try:
            sock.sendto(reply.pack(), peer)
        except OSError:
            continue


def main(argv: Sequence[str] | None = None) -> int:
    """Bind every requested service, print READY, serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m netsim.lab.services")
    parser.add_argument("--label", default="lab")
    parser.add_argument("--http", action="append", default=[], metavar="ADDR:PORT")
    parser.add_argument("--dns", action="append", default=[], metavar="ADDR:PORT")
    parser.add_argument("--echo", action="append", default=[], metavar="ADDR:PORT")
    args = parser.parse_args(argv)
    _Handler.label = args.label
    drops = [0]
    threads: list[threading.Thread] = []
    # DNS first: binding an HTTP server looks its address up (http.server's server_bind calls getfqdn, a PTR
    # query to the namespace's resolv.conf, the lab's own resolver), and in inet that resolver is this process.
    for spec in args.dns:
        sock = _udp_socket(*parse_endpoint(spec))
        threads.append(threading.Thread(target=_serve_dns, args=(sock, drops), daemon=True))
        threads[-1].start()
    for spec in args.http:
        server = _http_server(*parse_endpoint(spec))
        threads.append(threading.Thread(target=server.serve_forever, daemon=True))
        threads[-1].start()
    for spec in args.echo:
        threads.append(threading.Thread(target=_serve_echo, args=(_udp_socket(*parse_endpoint(spec)),), daemon=True))
        threads[-1].start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait()
    print(f"STOPPED dns_malformed={drops[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
