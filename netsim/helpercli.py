"""``netsim helper``: run the privileged helper process (the provider's WireGuard and physical-socket side).

Registered by ``netsim/cli.py`` as ``netsim helper``; also runnable as ``python -m netsim.helpercli``. Run it inside
the namespace of the simulated Mac (``ip netns exec netsim-<run>-mac ...``), where ``en0`` is the physical
interface. It prints ``READY <socket path> <udp port>`` on stdout once it accepts providers, logs JSON lines to
stderr, and exits cleanly on SIGTERM or SIGINT (its socket is removed).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import click
import trio

from netsim.core import ipc
from netsim.core.policy import Mechanism, Policy, PolicyEngine
from netsim.core.wireguard.config import TunnelConfig, parse_config_bytes
from netsim.core.wireguard.peer import Endpoint
from netsim.errors import ConfigError, NetsimError
from netsim.runtime.helper import DEFAULT_BATCH, Helper
from netsim.runtime.logs import configure_json_logging
from netsim.transports.udp import UdpTransport

__all__ = ["DEFAULT_SOCKET", "helper", "resolve_endpoints", "run_helper"]

log = logging.getLogger("netsim.helper")

DEFAULT_SOCKET = "/run/netsim/helper/helper.sock"
_BYPASS_FWMARK = 0x6E73  # netsim.runtime.netconfig.BYPASS_FWMARK (not imported: that module pulls in pyroute2)


def resolve_endpoints(config: TunnelConfig) -> tuple[dict[str, Endpoint], int]:
    """Resolve peer endpoints given as names; return ``({peer public key: (addr, port)}, socket family)``.

    Raises:
        ConfigError: a name does not resolve, or no peer has an endpoint (the helper must initiate).
    """
    out: dict[str, Endpoint] = {}
    family: int | None = None
    for peer in config.peers:
        ep = peer.endpoint
        if ep is None:
            continue
        if ep.address is not None:
            addr: Endpoint = (str(ep.address), ep.port)
            fam = socket.AF_INET6 if ep.address.version == 6 else socket.AF_INET
        else:
            try:
                info = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_DGRAM)[0]
            except OSError as exc:
                raise ConfigError(f"cannot resolve peer endpoint {ep}: {exc}") from None
            fam, addr = info[0], info[4][:2]
        out[peer.public_key.to_base64()] = addr
        family = family or fam
    if family is None:
        raise ConfigError("no [Peer] has an Endpoint; the helper needs the VPN server's address to connect")
    return out, family


async def run_helper(
    config: TunnelConfig,
    socket_path: str,
    *,
    allowed_uids: frozenset[int],
    interface: str | None = "en0",
    fwmark: int | None = _BYPASS_FWMARK,
    group_access: bool = False,
    batch: int = DEFAULT_BATCH,
    policy: Policy | None = None,
    token: bytes | None = None,
    ping_interval: float | None = ipc.DEFAULT_PING_INTERVAL,
    ping_timeout: float = ipc.DEFAULT_PING_TIMEOUT,
    stats_socket: str | None = None,
    clock_file: str | None = None,
    watch_path: bool = True,
    path_handshake: bool = True,
) -> None:
    """Run a helper until SIGTERM/SIGINT (or cancellation).

    With a ``policy`` whose mechanism is NAT, BYPASS verdicts go out of ``interface`` through
    `netsim.runtime.bypass.NatBypassHost` (raw socket + capture, root); with the route mechanism the helper
    sends the policy's excluded routes to the provider in its SETTINGS.

    With a ``token``, a client whose HELLO does not carry it is refused (ERROR AUTH) before it takes the session
    slot. ``ping_interval``/``ping_timeout``: the helper PINGs the provider and drops a session that does not
    answer in time (None: no liveness checking). ``stats_socket``: a second socket, admitted like the provider's
    (SO_PEERCRED, token), whose clients may only ask for statistics (`Helper.serve_observer`; docs/ipc.md).
    ``clock_file``: the simulated Mac's sleep (`netsim.runtime.clock`): on SIGCONT the helper re-reads the total
    seconds slept from it and its WireGuard clock jumps forward by what is new (docs/faults.md, Sleep and wake).

    ``watch_path`` (with an ``interface``): follow this namespace's default route (`Helper.watch_path`): re-bind
    the UDP socket to the interface it moves to and, with ``path_handshake``, force a handshake when the path is
    back (docs/faults.md, "What the provider sees").
    """
    from netsim.runtime.channel import UnixIpcServer

    endpoints, family = resolve_endpoints(config)
    transport = UdpTransport.open(family, interface=interface, fwmark=fwmark, port=config.interface.listen_port or 0)
    engine = PolicyEngine(policy) if policy is not None else None
    nat_host = None
    if policy is not None and policy.mechanism is Mechanism.NAT and interface:
        from netsim.runtime.bypass import NatBypassHost

        nat_host = NatBypassHost.open(interface, fwmark=fwmark, max_packet=config.interface.mtu or 1420)
    from netsim.runtime.clock import SleepClock, read_slept_untrusted, watch_slept_file

    clock = SleepClock()
    try:
        helper = Helper(
            config,
            transport,
            endpoints=endpoints,
            batch=batch,
            policy=engine,
            nat_bypass=nat_host.make_bypass if nat_host is not None else None,  # the helper runs its loop
            clock=clock,
        )
    except BaseException:
        if nat_host is not None:
            nat_host.close()
        raise
    helper.interface = interface
    helper.path_handshake = path_handshake
    if token is None:
        log.warning("no IPC token: any process of an allowed uid may become the provider", extra={"event": "no_token"})

    def connection() -> ipc.Connection:
        return ipc.Connection(
            ipc.Role.HELPER,
            capabilities=ipc.ALL_CAPABILITIES,
            expected_token=token,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )

    def ipc_server(path: str, max_clients: int, **channel_options: Any) -> UnixIpcServer:
        return UnixIpcServer(
            path,
            allowed_uids=allowed_uids,
            max_clients=max_clients,
            connection_factory=connection,
            dir_mode=0o750 if group_access else 0o700,
            **channel_options,
        )

    if clock_file is not None:
        # A helper started after a sleep (a restart) keeps the Mac's slept time, applied after the Helper took its
        # wall offset and before its first handshake: its TAI64N timestamps stay later than those the server saw.
        clock.set_slept(read_slept_untrusted(Path(clock_file)) or 0.0)
    # the channel's ipc_out stage joins the helper's ledger; observers' frames stay out of it
    server = ipc_server(socket_path, 1, ledger=helper.ledger)
    helper.server = server
    observers = ipc_server(stats_socket, 4) if stats_socket is not None else None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(helper.run)
            await nursery.start(server.serve, helper.serve_session)
            if observers is not None:
                await nursery.start(observers.serve, helper.serve_observer)
            if clock_file is not None:
                await nursery.start(watch_slept_file, Path(clock_file), clock, helper.clock_jumped)
            if watch_path and interface:
                from netsim.runtime.pathmonitor import default_route_interface
                from netsim.transports.rtevents import RouteEvents

                nursery.start_soon(helper.watch_path, RouteEvents(), lambda: default_route_interface(family))
            log.info(
                "helper ready",
                extra={
                    "event": "ready",
                    "socket": socket_path,
                    "udp_port": transport.local_port,
                    "interface": interface,
                    "server": helper.settings["server"],
                    "allowed_uids": sorted(allowed_uids),
                },
            )
            print(f"READY {socket_path} {transport.local_port}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("stopping", extra={"event": "stop", "signal": signal.Signals(signum).name})
                    nursery.cancel_scope.cancel()
                    break
    finally:
        log.info("final statistics", extra={"event": "final_stats", "stats": helper.stats_json()})
        helper.close()
        if nat_host is not None:
            nat_host.close()


@click.command("helper")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="wg-quick style WireGuard config (keys, Address, DNS, MTU, [Peer] with Endpoint and AllowedIPs).",
)
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True, help="IPC socket path.")
@click.option(
    "--allowed-uid",
    "allowed_uids",
    multiple=True,
    type=int,
    help="uid allowed to connect (SO_PEERCRED); repeat for several. Default: our own uid.",
)
@click.option("--interface", default="en0", show_default=True, help="Physical interface for the UDP socket.")
@click.option(
    "--fwmark",
    default=_BYPASS_FWMARK,
    show_default=True,
    type=int,
    help="SO_MARK on the UDP socket (0 for none).",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Bypass policy file (.toml/.yaml, docs/policy.md); default: tunnel everything.",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="0600 file with the per-tunnel IPC secret; HELLO must carry it (netsim_tunnel writes one).",
)
@click.option(
    "--ping-interval",
    default=ipc.DEFAULT_PING_INTERVAL,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between liveness PINGs to the provider (0: off).",
)
@click.option(
    "--ping-timeout",
    default=ipc.DEFAULT_PING_TIMEOUT,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds the provider has to answer a PING before its session is dropped.",
)
@click.option(
    "--stats-socket",
    default=None,
    help="Also serve read-only statistics on this socket (same uid/token checks; docs/ipc.md, Observers).",
)
@click.option(
    "--clock-file",
    default=None,
    help="Simulated sleep: on SIGCONT, jump the WireGuard clock to the total seconds slept this file holds.",
)
@click.option(
    "--watch-path/--no-watch-path",
    default=True,
    show_default=True,
    help="Follow the default route: re-bind the UDP socket to its interface when it moves.",
)
@click.option(
    "--path-handshake/--no-path-handshake",
    default=True,
    show_default=True,
    envvar="NETSIM_HELPER_PATH_HANDSHAKE",
    help="Force a WireGuard handshake when the path comes back or moves (off: wait for WireGuard's timers).",
)
@click.option("--group-access", is_flag=True, help="Socket directory 0750 instead of 0700 (group may connect).")
@click.option("--batch", default=DEFAULT_BATCH, show_default=True, type=click.IntRange(1, 1024))
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def helper(
    *,
    config_path: Path,
    socket_path: str,
    allowed_uids: tuple[int, ...],
    interface: str,
    fwmark: int,
    group_access: bool,
    batch: int,
    log_level: str,
    policy_path: Path | None,
    token_file: Path | None,
    ping_interval: float,
    ping_timeout: float,
    stats_socket: str | None,
    clock_file: str | None,
    watch_path: bool,
    path_handshake: bool,
) -> None:
    """Run the helper: accept the provider over IPC and carry its packets through WireGuard."""
    configure_json_logging(getattr(logging, log_level.upper()))
    try:
        try:
            data = Path(config_path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the WireGuard config: {exc}", source=str(config_path)) from None
        config = parse_config_bytes(data, source=str(config_path))
        policy = None
        if policy_path is not None:
            from netsim.runtime.policy_file import load_policy_file

            policy = load_policy_file(policy_path)
        uids = frozenset(allowed_uids) if allowed_uids else frozenset({os.geteuid()})
        from netsim.transports.uds import read_token_file

        token = read_token_file(token_file) if token_file is not None else None
        trio.run(
            lambda: run_helper(
                config,
                socket_path,
                allowed_uids=uids,
                interface=interface or None,
                fwmark=fwmark or None,
                group_access=group_access,
                batch=batch,
                policy=policy,
                token=token,
                ping_interval=ping_interval or None,
                ping_timeout=ping_timeout,
                stats_socket=stats_socket,
                clock_file=clock_file,
                watch_path=watch_path,
                path_handshake=path_handshake,
            )
        )
    except NetsimError as exc:
        log.error("helper failed", extra={"event": "fatal", "error": str(exc)})
        click.echo(f"netsim helper: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    helper()
