"""End-to-end path 3 of `netsim.bench.bench_e2e`: utun -> provider -> UDS -> helper -> WireGuard -> wireguard-go.

The pieces are netsim's own, unchanged: the provider is `netsim.runtime.forwarding.HelperForwardingProvider`
hosted by `netsim.runtime.controller.TunnelProviderManager` in a process in ``mac`` (`SubprocessLauncher`); the
helper is `netsim.runtime.helper.Helper` behind a `netsim.runtime.channel.UnixIpcServer` (`helper_main`, a process
in ``mac``), with its UDP socket bound to ``en0``; the server is wireguard-go in ``vpn``, NATing to inet.
The tunnel routes only the path's own destination address (a /32 in inet), so everything else stays direct.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_interface, ip_network
from pathlib import Path
from typing import Any

import trio

__all__ = ["HELPER_PLACEHOLDERS", "connected_session", "helper_argv", "helper_main", "netsim_path"]

#: What a ``--helper`` command may name (``{socket}`` is required); docs/benchmarks.md.
HELPER_PLACEHOLDERS = ("socket", "config", "token_file", "policy")

PORT = 51821  # + the path's slot; its tunnel net is 10.66.(1 + slot).0/24


def helper_argv(command: str, **values: str) -> list[str]:
    """The argv of a user's ``--helper`` command: split like a shell would (no shell runs), then each
    ``{socket}``, ``{config}`` (the helper's wg-quick file), ``{token_file}`` (0600, the per-tunnel IPC secret)
    and ``{policy}`` (the ``--policy`` file) replaced.

    Raises:
        ConfigError: no ``{socket}``, an unknown placeholder, a placeholder with no value, or a malformed command.
    """
    import shlex

    from netsim.errors import ConfigError

    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"cannot split the command {command!r}: {exc}", source="--helper") from None
    if not words:
        raise ConfigError("the helper command is empty", source="--helper")
    if not any("{socket}" in w for w in words):
        raise ConfigError(
            "the helper command must contain {socket} (where the bench's provider connects)", source="--helper"
        )
    out = []
    for word in words:
        try:
            out.append(word.format(**values))
        except KeyError as exc:
            known = ", ".join(f"{{{k}}}" for k in HELPER_PLACEHOLDERS)
            why = "has no value here (--policy not given?)" if exc.args[0] in HELPER_PLACEHOLDERS else "is unknown"
            msg = f"placeholder {{{exc.args[0]}}} {why}; the placeholders are {known}"
            raise ConfigError(msg, source="--helper") from None
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"bad placeholder in {word!r}: {exc}", source="--helper") from None
    return out


async def _wait_listening(proc: Any, path: str, timeout: float) -> None:
    """Until something accepts on ``path`` (a user's helper need not print anything when ready)."""
    import socket

    with trio.fail_after(timeout):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the helper exited with status {proc.returncode}: {proc.stderr()[-2000:]}")
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect(path)
                return
            except OSError:
                await trio.sleep(0.05)
            finally:
                sock.close()


async def helper_main(config_path: str, sock_path: str, policy_path: str | None = None) -> None:
    """The helper process: WireGuard to the server, IPC server for the provider.

    With ``policy_path`` (``netsim bench --policy``) the helper applies that bypass policy as ``netsim helper
    --policy`` does: per-packet verdicts, and with the NAT mechanism BYPASS packets leave ``en0`` NATed.
    """
    from netsim.core.policy import Mechanism, PolicyEngine
    from netsim.lab.wireguard import load_config
    from netsim.runtime.channel import UnixIpcServer
    from netsim.runtime.helper import Helper, UdpTransport
    from netsim.runtime.netconfig import BYPASS_FWMARK
    from netsim.runtime.policy_file import load_policy_file

    config = load_config(config_path)
    policy = load_policy_file(policy_path) if policy_path else None
    nat_host = None
    if policy is not None and policy.mechanism is Mechanism.NAT:
        from netsim.runtime.bypass import NatBypassHost

        nat_host = NatBypassHost.open("en0", fwmark=BYPASS_FWMARK, max_packet=config.interface.mtu or 1420)
    helper = Helper(
        config,
        UdpTransport.open(interface="en0", fwmark=BYPASS_FWMARK),
        policy=PolicyEngine(policy) if policy is not None else None,
        nat_bypass=nat_host.make_bypass if nat_host is not None else None,
    )
    server = UnixIpcServer(sock_path, max_queued_batches=1024, max_queued_bytes=64 << 20)
    helper.server = server
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(helper.run)
            await nursery.start(server.serve, helper.serve_session)
            print(f"READY helper {sock_path}", flush=True)
    finally:
        if nat_host is not None:
            nat_host.close()


@asynccontextmanager
async def connected_session(manager: Any, what: str) -> AsyncIterator[Any]:
    """A session of ``manager`` whose tunnel was started and is CONNECTED (else `RuntimeError` with the
    provider's reason); the tunnel is stopped again after the block."""
    from netsim.apple import VPNStatus

    async with manager.open_session() as session:
        await session.start_vpn_tunnel()
        with trio.fail_after(30):
            await session.wait_status(VPNStatus.CONNECTED, VPNStatus.DISCONNECTED)
        if session.status is not VPNStatus.CONNECTED:
            raise RuntimeError(f"{what} did not connect: {session.last_disconnect_error}")
        yield session
        await session.stop_vpn_tunnel()


@asynccontextmanager
async def netsim_path(
    run: Any,
    dst: str,
    *,
    name: str = "netsim",
    provider: str | None = None,
    policy: str | None = None,
    helper_cmd: str | None = None,
    conformance: bool = False,
    slot: int = 0,
    helper_env: dict[str, str] | None = None,
) -> AsyncIterator[Any]:
    """Bring path 3 up in ``run.lab`` and yield a `netsim.bench.bench_e2e.PathSetup`; tear it down after.

    Only ``dst`` (an inet address with its own echo server) is routed into the tunnel. ``provider``: a
    ``module:Class`` spec hosted instead of `HelperForwardingProvider` (``--provider``; it reaches the helper
    through ``provider_configuration["helper_socket"]``); ``policy``: a policy file for the helper. ``name``
    keeps the path's files apart. ``helper_cmd``: a user's helper command (`helper_argv`) run in ``mac``
    instead of netsim's, with a per-tunnel token; with ``conformance`` the checks of
    `netsim.testing.conformance` run against it before the provider connects (``run.conformance``). ``slot``
    gives the path its own tunnel net, server port, interface and NAT table (paths of one run never share them).
    ``helper_env``: extra environment for netsim's helper and the provider host (a lever turned off, e.g.
    ``NETSIM_UDP_GSO=0``).
    """
    from netsim.apple import TunnelProviderProtocol
    from netsim.bench.bench_e2e import ECHO_PORT, ROOT, PathSetup, _vpn_nat
    from netsim.core.wireguard.config import Endpoint, InterfaceConfig, PeerConfig, TunnelConfig, render_wg_quick
    from netsim.core.wireguard.keys import PrivateKey
    from netsim.lab.wireguard import WireGuardGo
    from netsim.runtime.controller import SubprocessLauncher, TunnelProviderManager

    lab, a = run.lab, run.lab.addr
    echo = await run.start_echo(dst)
    net, port, table = f"10.66.{1 + slot}", PORT + slot, f"netsim_bench_nat{3 + slot}"
    server = WireGuardGo.in_lab(lab, "vpn", stem=f"bns{slot}", listen_port=port, addresses=[f"{net}.1/24"])
    client_key = PrivateKey.generate()
    config = TunnelConfig(
        InterfaceConfig(client_key, addresses=(ip_interface(f"{net}.2/24"),), mtu=1420),
        (
            PeerConfig(
                server.public_key,
                endpoint=Endpoint(str(a.vpn_wan_v4), port),
                allowed_ips=(ip_network(f"{dst}/32"),),
            ),
        ),
    )
    safe = name.replace(":", "-").replace("/", "-")
    cfg_path = run.workdir / f"{safe}-client.conf"
    cfg_path.write_text(render_wg_quick(config))
    cfg_path.chmod(0o600)
    sock = str(run.workdir / safe / "helper.sock")
    lab.nft("vpn", _vpn_nat(net).replace("netsim_bench_nat", table))
    conf: dict[str, Any] = {"helper_socket": sock}
    async with server:
        await server.add_peer(client_key.public_key(), allowed_ips=[f"{net}.2/32"])
        if helper_cmd is None:
            argv = [sys.executable, "-m", "netsim.bench.bench_netsim", "helper", str(cfg_path), sock]
            helper = lab.spawn(
                "mac",
                argv + [policy] * bool(policy),
                name=f"bench-{safe}-helper",
                env={"PYTHONPATH": str(ROOT), **(helper_env or {})},
            )
        else:
            from netsim.bench._common import child_env
            from netsim.transports.uds import new_token, write_token_file

            token = new_token()
            token_path = run.workdir / f"{safe}.token"
            write_token_file(token_path, token)
            Path(sock).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            values = {"socket": sock, "config": str(cfg_path), "token_file": str(token_path)}
            argv = helper_argv(helper_cmd, **values, **({"policy": policy} if policy else {}))
            env = {"PYTHONPATH": child_env()["PYTHONPATH"]}
            helper = lab.spawn("mac", argv, name=f"bench-{safe}", env=env)
            conf["token_file"] = str(token_path)
        try:
            if helper_cmd is None:
                await helper.wait_output(r"^READY", timeout=20)
            else:
                await _wait_listening(helper, sock, 20)
                if conformance:
                    from netsim.testing.conformance import check_helper

                    report = await check_helper(sock, token=token)
                    run.conformance.extend({"path": name, **r.__dict__} for r in report.results)
                    print(report.render(), flush=True)
            launcher = SubprocessLauncher(lab.netns("mac"), log_path=run.workdir / f"{safe}-provider.log")
            manager = TunnelProviderManager(
                provider or "netsim.runtime.forwarding:HelperForwardingProvider",
                launcher,
                TunnelProviderProtocol(server_address=str(a.vpn_wan_v4), provider_configuration=conf),
            )
            saved = _push_environ(helper_env or {})  # the provider host inherits it (a lever turned off)
            try:
                async with connected_session(manager, f"{name} tunnel"):
                    _pop_environ(saved)
                    saved = {}
                    await lab.run("mac", ["ping", "-c", "1", "-W", "3", dst], timeout=15)
                    assert server.pid is not None
                    procs = {
                        "provider": launcher.processes[-1].pid,
                        "helper": helper.pid,
                        "wg-server": server.pid,
                        "echo": echo,
                    }
                    yield PathSetup((dst, ECHO_PORT), procs, tcp_dst=dst)
            finally:
                _pop_environ(saved)
        finally:
            await helper.stop(grace=2.0)
    lab.nft("vpn", f"delete table ip {table}\n")


def _push_environ(extra: dict[str, str]) -> dict[str, str | None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    return saved


def _pop_environ(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


if __name__ == "__main__":
    if sys.argv[1:2] == ["helper"]:
        try:
            trio.run(helper_main, sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
        except KeyboardInterrupt:
            pass
    else:
        raise SystemExit(
            "usage: python -m netsim.bench.bench_netsim helper <wg-quick.conf> <socket path> [policy file]"
        )
