"""The app side: TunnelProviderManager / TunnelProviderSession mirrors, and the launchers that run a provider.

The session plays both the app's ``NETunnelProviderSession`` and the system's nesessionmanager: each
``start_vpn_tunnel`` launches a fresh provider host (a new process in the ``mac`` namespace for
`SubprocessLauncher`, a task for `InProcessLauncher`), speaks the control protocol of
`netsim.runtime.provider`, tracks `VPNStatus` and publishes every change. A host that dies or goes silent is
handled like a crashed extension: status DISCONNECTED, stop reason PROVIDER_FAILED, and the process is killed if
it outlives the start + stop timeouts.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from netsim.apple.enums import ProviderStopReason, VPNStatus
from netsim.apple.errors import TunnelProviderError
from netsim.apple.protocol import TunnelProviderProtocol
from netsim.core.killswitch import CounterValue
from netsim.errors import LabError, LocalProtocolError, RemoteProtocolError
from netsim.runtime.killswitch import KernelKillSwitch, KillSwitch, MemoryKillSwitch
from netsim.runtime.netconfig import KernelNetworkConfigurator, MemoryNetworkConfigurator, NetworkConfigurator
from netsim.runtime.provider import (
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    ControlChannel,
    JsonLinesChannel,
    PacketTunnelProvider,
    ProviderHost,
    memory_control_pair,
)
from netsim.runtime.spawn import Child, SpawnError, spawn_async
from netsim.transports.netns import require_lab_netns

log = logging.getLogger("netsim.controller")

__all__ = [
    "HOST_EXIT_GRACE",
    "InProcessLauncher",
    "Launcher",
    "ProviderMessageError",
    "StatusChange",
    "SubprocessLauncher",
    "TunnelProviderManager",
    "TunnelProviderSession",
    "memory_launcher",
]


class ProviderMessageError(LocalProtocolError):
    """``send_provider_message`` failed: the provider raised, or no tunnel is running."""


@dataclass(frozen=True)
class StatusChange:
    """One NEVPNStatusDidChange notification: the new status, and for DISCONNECTED why."""

    status: VPNStatus
    reason: ProviderStopReason | None = None
    error: str | None = None


class LaunchedHost(Protocol):
    """What a launcher returns: the system's end of the channel and a way to reap the host."""

    channel: ControlChannel

    async def wait(self) -> int | None:
        """Wait until the host is gone; its exit code when it is a process."""
        ...

    def kill(self) -> None:
        """Stop the host now (SIGKILL for a process, cancel for a task)."""
        ...


class Launcher(Protocol):
    """Starts a provider host for one tunnel session.

    A launcher may also carry a ``kill_switch`` attribute (`netsim.runtime.killswitch.KillSwitch`): the block
    the session engages for ``include_all_networks`` (both netsim launchers do; a launcher without one cannot
    start an includeAllNetworks tunnel).
    """

    async def launch(self, nursery: trio.Nursery, provider: type[PacketTunnelProvider] | str) -> LaunchedHost:
        """Start the host; it then waits for the ``configure`` and ``start`` messages."""
        ...


# ------------------------------------------------------------------------------------------------ in-process
class _TaskHost:
    def __init__(self, channel: ControlChannel, scope: trio.CancelScope, done: trio.Event) -> None:
        self.channel = channel
        self._scope = scope
        self._done = done

    async def wait(self) -> int | None:
        await self._done.wait()
        return None

    def kill(self) -> None:
        self._scope.cancel()


class InProcessLauncher:
    """Runs the provider as a trio task in this process (the in-memory backend; no root needed).

    Args:
        configurator_factory: builds a fresh `NetworkConfigurator` per start, e.g.
            ``lambda: MemoryNetworkConfigurator(lambda name, mtu: MemoryTun(name=name, mtu=mtu))``.
    """

    def __init__(
        self, configurator_factory: Callable[[], NetworkConfigurator], *, kill_switch: KillSwitch | None = None
    ) -> None:
        self.configurator_factory = configurator_factory
        self.hosts: list[ProviderHost] = []
        #: the includeAllNetworks block (a `MemoryKillSwitch` that records engage/release unless given)
        self.kill_switch: KillSwitch = kill_switch if kill_switch is not None else MemoryKillSwitch()

    async def launch(self, nursery: trio.Nursery, provider: type[PacketTunnelProvider] | str) -> LaunchedHost:
        if isinstance(provider, str):
            from netsim.runtime.provider import load_provider_class

            provider = load_provider_class(provider)
        system_end, host_end = memory_control_pair()
        host = ProviderHost(provider(), self.configurator_factory())
        self.hosts.append(host)
        scope = trio.CancelScope()
        done = trio.Event()

        async def run() -> None:
            try:
                with scope:
                    await host.run(host_end)
            finally:
                host.configurator.close()
                with trio.CancelScope(shield=True):  # done must be set even when the nursery is cancelled
                    await host_end.aclose()
                done.set()

        nursery.start_soon(run)
        return _TaskHost(system_end, scope, done)


def memory_launcher(device_factory: Callable[[str, int], Any], **kwargs: Any) -> InProcessLauncher:
    """An `InProcessLauncher` whose configurator creates devices with ``device_factory(name, mtu)``."""
    return InProcessLauncher(lambda: MemoryNetworkConfigurator(device_factory, **kwargs))


# ------------------------------------------------------------------------------------------------ subprocess
class _ProcessHost:
    def __init__(self, channel: ControlChannel, process: Child, netns: str) -> None:
        self.channel = channel
        self.process = process
        self.netns = netns

    async def wait(self) -> int | None:
        return await self.process.wait()

    def kill(self) -> None:
        self.process.kill()  # by the pidfd of the process we started, never by name

    async def reclaim(self) -> None:
        """After the host died without reporting its stop: remove the kernel state it left (row F3)."""
        configurator = KernelNetworkConfigurator(self.netns)
        if await trio.to_thread.run_sync(configurator.reclaim_abandoned):
            log.info("removed the tunnel state the dead provider host left in %s", self.netns)


class SubprocessLauncher:
    """Runs the provider in its own process inside ``netns`` via ``ip netns exec`` (the real backend).

    The control socket's host end is inherited as ``--control-fd``; stdout/stderr go to ``log_path`` (or are
    inherited). The process is started through `netsim.runtime.spawn`, so it dies with this process (even on
    SIGKILL) and never with the thread that asked for it: an idle tunnel keeps its provider
    (docs/reliability.md F15). `processes` lists every host started, as `netsim.runtime.spawn.Child` objects.
    `kill_switch` is the includeAllNetworks block for ``netns`` (a `KernelKillSwitch` unless given).
    The provider spec must be importable in the child: ``"package.module:Class"`` or
    ``"/abs/path/file.py:Class"`` (a class object is converted to ``module:qualname``).
    """

    def __init__(
        self,
        netns: str,
        *,
        python: str = sys.executable,
        log_path: str | os.PathLike[str] | None = None,
        batch_limit: int | None = None,
        kill_switch: KillSwitch | None = None,
    ) -> None:
        require_lab_netns(netns, "run a provider")
        self.netns = netns
        self.kill_switch: KillSwitch = kill_switch if kill_switch is not None else KernelKillSwitch(netns)
        self.python = python
        self.log_path = log_path
        self.batch_limit = batch_limit
        self.processes: list[Child] = []

    async def launch(self, nursery: trio.Nursery, provider: type[PacketTunnelProvider] | str) -> LaunchedHost:
        spec = provider if isinstance(provider, str) else f"{provider.__module__}:{provider.__qualname__}"
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            "ip", "netns", "exec", self.netns,
            self.python, "-m", "netsim.runtime.provider",
            "--provider", spec, "--control-fd", str(child.fileno()), "--netns", self.netns,
        ]  # fmt: skip
        if self.batch_limit is not None:
            argv += ["--batch-limit", str(self.batch_limit)]
        # Same import path as this interpreter, so a provider importable here is importable there.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        log = open(self.log_path, "ab") if self.log_path is not None else None  # noqa: SIM115, ASYNC230 (a local log file)
        try:
            process = await spawn_async(
                argv, pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        except SpawnError as exc:
            parent.close()
            raise LabError(f"cannot start the provider host: {exc}") from exc
        finally:
            child.close()
            if log is not None:
                log.close()
        self.processes.append(process)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))
        return _ProcessHost(JsonLinesChannel(stream), process, self.netns)


# ------------------------------------------------------------------------------------------------ session
#: Default `TunnelProviderManager` ``exit_grace``: how long a host may take to exit on its own once its tunnel
#: is over (it drains its last events, then its process ends) before the system kills it, as Apple terminates
#: an extension after its stop completion.
HOST_EXIT_GRACE = 10.0


class _Tunnel:
    """One ``start_vpn_tunnel``: its host and everything the system learned from that host.

    Why a separate object: a host outlives its tunnel for a moment (after reporting DISCONNECTED it drains its
    last events, closes the control channel and exits), and the app may start the next tunnel at once (Apple:
    ``startVPNTunnel`` after ``disconnected``). Every event, exit code, reply and watchdog decision is therefore
    attributed to the tunnel whose host produced it; only the session's current tunnel may change the
    session's status. Without that the old host's exit was read as the new tunnel's host dying.
    """

    def __init__(self, host: LaunchedHost) -> None:
        self.host = host
        self.status = VPNStatus.CONNECTING
        self.replies: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self.slept: trio.Event | None = None
        self.gone = trio.Event()  # the host has exited and been reaped
        self._changed = trio.Event()

    def set_status(self, status: VPNStatus) -> None:
        self.status = status
        self._changed.set()
        self._changed = trio.Event()

    async def wait_status(self, *statuses: VPNStatus) -> None:
        while self.status not in statuses:
            await self._changed.wait()

    def release_waiters(self) -> None:
        """Wake every caller waiting on this host (message replies, sleep acks): it will answer no more."""
        for done, _ in self.replies.values():
            done.set()
        if self.slept is not None:
            self.slept.set()


class TunnelProviderSession:
    """Mirrors NETunnelProviderSession (with NEVPNConnection): start/stop a tunnel, message it, watch status.

    Obtain one from `TunnelProviderManager.open_session` (``async with``). Every status change is recorded in
    `history` and sent to each `status_changes` subscriber. Once the status is DISCONNECTED a new
    ``start_vpn_tunnel`` may follow at once: it launches a fresh host while the previous one, if still exiting,
    is reaped in the background (killed after the manager's ``exit_grace``) without touching the new tunnel's status.

    Differences from Apple: ``start_vpn_tunnel`` is ``async`` (it launches the host and returns once the start
    request is delivered; status is CONNECTING); ``stop_vpn_tunnel`` is ``async`` too and returns once the stop
    request is sent; use `wait_status` for either to finish (with ``include_all_networks`` it returns once the
    tunnel is down and the kill switch released). ``stop_reason`` and ``last_disconnect_error``
    together stand in for ``fetchLastDisconnectError``. ``send_provider_message`` returns the reply instead of
    calling a response handler. `simulate_sleep` / `simulate_wake` are netsim's: they play the system's side of a
    sleep (Apple has no API for an app to cause one); docs/faults.md, Sleep and wake.

    Kill switch (``protocol_configuration.include_all_networks``, docs/kill-switch.md): the session, playing
    the system, engages the launcher's ``kill_switch`` before it launches the host and keeps it through
    CONNECTING, CONNECTED, REASSERTING, a crashed or killed host, a provider that cancels itself and a failed
    start; only the user lifts it: `stop_vpn_tunnel` (also when the tunnel is already DISCONNECTED),
    ``manager.set_enabled(False)``, or closing the session. `kill_switch_engaged` and `kill_switch_counters`
    report it.
    """

    #: the current `VPNStatus` (Apple: ``NEVPNConnection.status``)
    status: VPNStatus = VPNStatus.DISCONNECTED
    #: why the last tunnel stopped (None until one has)
    stop_reason: ProviderStopReason | None = None
    #: the last stop's error text, None for a clean stop (Apple: ``fetchLastDisconnectError``)
    last_disconnect_error: str | None = None
    #: what the provider's last ``set_tunnel_network_settings`` applied (JSON form), None when cleared
    applied_settings: dict[str, Any] | None = None
    #: True between `simulate_sleep` and `simulate_wake`
    asleep: bool = False

    def __init__(self, manager: TunnelProviderManager, nursery: trio.Nursery) -> None:
        self.manager = manager
        self._nursery = nursery
        self.status = VPNStatus.DISCONNECTED
        self.stop_reason: ProviderStopReason | None = None
        self.last_disconnect_error: str | None = None
        self.applied_settings: dict[str, Any] | None = None
        self.asleep = False
        self.history: list[StatusChange] = []
        self._subscribers: list[trio.MemorySendChannel[StatusChange]] = []
        self._changed = trio.Event()
        self._tunnel: _Tunnel | None = None  # the current tunnel: set from start until its DISCONNECTED
        self._live: set[_Tunnel] = set()  # tunnels whose host has not been reaped yet (current one included)
        self._next_id = 0
        self._launching = False
        self._kill_switch: KillSwitch | None = None  # the kill switch this session engaged (until it releases it)

    @property
    def _host(self) -> LaunchedHost | None:
        """The current tunnel's host (None once the tunnel is DISCONNECTED, even if the process still exits)."""
        return None if self._tunnel is None else self._tunnel.host

    # -- notifications --------------------------------------------------------------------------------------
    def status_changes(self) -> trio.MemoryReceiveChannel[StatusChange]:
        """Subscribe to status changes from now on (the NEVPNStatusDidChange notification)."""
        send, receive = trio.open_memory_channel[StatusChange](math.inf)
        self._subscribers.append(send)
        return receive

    def _publish(self, tunnel: _Tunnel, change: StatusChange) -> None:
        """Record ``change`` reported for ``tunnel``; a tunnel that is no longer current changes nothing."""
        tunnel.set_status(change.status)
        if change.status is VPNStatus.DISCONNECTED:
            tunnel.release_waiters()
        if tunnel is not self._tunnel:
            return  # a stale report from a host whose tunnel is over: it must not touch the current one
        if change.status is VPNStatus.DISCONNECTED:
            self._tunnel = None  # the next start gets a new tunnel; this host is only reaped from now on
        if change.status is self.status and change.status is not VPNStatus.DISCONNECTED:
            return  # the host confirms CONNECTING, which the session already announced
        self.status = change.status
        if change.status is VPNStatus.DISCONNECTED:
            self.stop_reason = change.reason
            self.last_disconnect_error = change.error
        self.history.append(change)
        for subscriber in list(self._subscribers):
            try:
                subscriber.send_nowait(change)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(subscriber)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_status(self, *statuses: VPNStatus) -> VPNStatus:
        """Wait until the status is one of ``statuses`` (returns at once if it already is)."""
        while self.status not in statuses:
            await self._changed.wait()
        return self.status

    # -- kill switch (includeAllNetworks) ---------------------------------------------------------------------
    @property
    def kill_switch_engaged(self) -> bool:
        """True while this session's includeAllNetworks block is in force (all traffic but the tunnel dropped)."""
        return self._kill_switch is not None and self._kill_switch.engaged

    async def kill_switch_counters(self) -> dict[str, CounterValue]:
        """The kill switch's named counters (``out_drop``, ``out_tunnel``, ... see `netsim.core.killswitch`).

        Live while engaged; after a release, the values read just before it; empty if never engaged here
        (and always for `MemoryKillSwitch`, which blocks nothing).
        """
        switch = self._kill_switch or getattr(self.manager.launcher, "kill_switch", None)
        return {} if switch is None else await switch.counters()

    async def _engage_kill_switch(self) -> None:
        proto = self.manager.protocol_configuration
        switch: KillSwitch | None = getattr(self.manager.launcher, "kill_switch", None)
        if switch is None:
            raise LocalProtocolError(
                "cannot start: include_all_networks needs a launcher with a kill_switch "
                "(SubprocessLauncher or InProcessLauncher)"
            )
        # excludeLocalNetworks only counts together with includeAllNetworks / enforceRoutes (apple-reference §4).
        await switch.engage(exclude_local_networks=proto.exclude_local_networks)
        self._kill_switch = switch

    async def _release_kill_switch(self) -> None:
        switch = self._kill_switch
        if switch is not None:
            await switch.release()  # on failure it stays ours (and engaged): a later stop or close retries
            self._kill_switch = None

    async def _stop_and_release(self) -> None:
        """The user's Disconnect: stop the tunnel, wait for it to be down, then lift the kill switch."""
        tunnel = self._tunnel
        await self._send_stop(ProviderStopReason.USER_INITIATED)
        if tunnel is not None:
            with trio.move_on_after(self.manager.stop_timeout + 5.0):
                await tunnel.wait_status(VPNStatus.DISCONNECTED)
            if tunnel.status is not VPNStatus.DISCONNECTED:
                tunnel.host.kill()  # the reader reports DISCONNECTED once the host is reaped
        await self._release_kill_switch()

    # -- NETunnelProviderSession ----------------------------------------------------------------------------
    async def start_vpn_tunnel(self, options: dict[str, Any] | None = None) -> None:
        """Start the tunnel (Apple: ``startVPNTunnel(options:)``); ``options`` must be JSON-serialisable.

        A host that dies before it takes the request is reported like any crashed extension (DISCONNECTED,
        PROVIDER_FAILED, exit code), not raised.

        With ``include_all_networks`` the kill switch is engaged first, before the host exists, so the tunnel's
        whole bring-up is fail-closed; if it cannot be engaged nothing is launched. Without it, a kill switch
        this session still holds (kept after a crash) is released: the saved configuration no longer asks for it.

        Raises:
            LocalProtocolError: a tunnel is already running in this session; the configuration is disabled
                (``manager.is_enabled`` is False: Apple's NEVPNError.configurationDisabled); or
                include_all_networks with a launcher that has no kill switch.
            LabError: the kernel kill switch could not be engaged (nothing was launched).
        """
        if self._launching or self._tunnel is not None:
            state = "starting" if self._launching else self.status.name.lower()
            raise LocalProtocolError(f"cannot start: the tunnel is {state}; stop it first")
        manager = self.manager
        if not manager.is_enabled:
            raise LocalProtocolError("cannot start: the configuration is disabled; await manager.set_enabled(True)")
        self._launching = True
        try:
            if manager.protocol_configuration.include_all_networks:
                await self._engage_kill_switch()
            else:
                await self._release_kill_switch()
            host = await manager.launcher.launch(self._nursery, manager.provider)
        finally:
            self._launching = False
        tunnel = _Tunnel(host)
        self._tunnel = tunnel
        self._live.add(tunnel)
        self.applied_settings = None
        self._publish(tunnel, StatusChange(VPNStatus.CONNECTING))
        self._nursery.start_soon(self._read_events, tunnel)
        self._nursery.start_soon(self._watchdog, tunnel)
        try:
            await host.channel.send(
                {
                    "op": "configure",
                    "protocol": manager.protocol_configuration.to_dict(),
                    "start_timeout": manager.start_timeout,
                    "stop_timeout": manager.stop_timeout,
                }
            )
            await host.channel.send({"op": "start", "options": options})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            host.kill()  # _read_events reports the failure with the exit code

    async def stop_vpn_tunnel(self) -> None:
        """Stop the tunnel (Apple: ``stopVPNTunnel()``, reason USER_INITIATED); no-op when not running.

        With the kill switch engaged (include_all_networks) this is the user's Disconnect: it waits until the
        tunnel is DISCONNECTED (killing a host that outlives stop_timeout + 5 s), then releases the block; after
        a crash (already DISCONNECTED, block kept) it just releases it.
        """
        if self._kill_switch is not None:
            await self._stop_and_release()
            return
        await self._send_stop(ProviderStopReason.USER_INITIATED)

    async def _send_stop(self, reason: ProviderStopReason) -> None:
        tunnel = self._tunnel
        if tunnel is None:
            return
        try:
            await tunnel.host.channel.send({"op": "stop", "reason": int(reason)})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            tunnel.host.kill()

    async def send_provider_message(self, data: bytes) -> bytes | None:
        """Send ``data`` to the provider's ``handle_app_message`` and return its reply (Apple: sendProviderMessage).

        Raises:
            ProviderMessageError: no tunnel is running, the provider raised, or it went away before replying.
        """
        tunnel = self._tunnel
        if tunnel is None:
            raise ProviderMessageError("no tunnel is running; start_vpn_tunnel() first")
        self._next_id += 1
        ident = self._next_id
        done = trio.Event()
        box: list[dict[str, Any]] = []
        tunnel.replies[ident] = (done, box)
        try:
            await tunnel.host.channel.send({"op": "message", "id": ident, "data": base64.b64encode(data).decode()})
            await done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the host is going away: reported as "stopped before replying"
        finally:
            tunnel.replies.pop(ident, None)
        if not box:
            raise ProviderMessageError("the provider stopped before replying")
        reply = box[0]
        if reply.get("error"):
            raise ProviderMessageError(f"handle_app_message raised {reply['error']}")
        encoded = reply.get("data")
        return None if encoded is None else base64.b64decode(encoded)

    async def simulate_sleep(self) -> None:
        """Put the simulated Mac to sleep (Apple: the system calls ``sleep(completionHandler:)`` first).

        Without ``disconnect_on_sleep`` the provider's ``sleep`` runs; this returns once it completed (or after
        the manager's ``stop_timeout``: the system does not wait for ever before it sleeps). With
        ``disconnect_on_sleep`` the system stops the tunnel instead (reason SLEEP, ``sleep`` is not called) and
        this returns once it is DISCONNECTED; it is not started again on wake (Apple DTS, forums thread 95988:
        "the tunnel won't automatically start again on wake", unless an on-demand rule, which netsim does not
        model, triggers it). `asleep` is True until `simulate_wake`.
        """
        self.asleep = True
        tunnel = self._tunnel
        if tunnel is None:
            return
        slept = tunnel.slept = trio.Event()
        try:
            await tunnel.host.channel.send({"op": "sleep"})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # the host is going away; the reader reports it
        with trio.move_on_after(self.manager.stop_timeout):
            await slept.wait()
        if self.manager.protocol_configuration.disconnect_on_sleep:
            with trio.move_on_after(self.manager.stop_timeout + 5.0):
                await tunnel.wait_status(VPNStatus.DISCONNECTED)

    async def simulate_wake(self) -> None:
        """Wake the simulated Mac: the running provider's ``wake()`` runs (a tunnel that sleep stopped stays
        stopped)."""
        self.asleep = False
        tunnel = self._tunnel
        if tunnel is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await tunnel.host.channel.send({"op": "wake"})  # a host going away is reported by the reader

    # -- event handling -------------------------------------------------------------------------------------
    async def _read_events(self, tunnel: _Tunnel) -> None:
        """Serve one tunnel's host until it reported DISCONNECTED or went away, then reap it."""
        host = tunnel.host
        error: str | None = None
        try:
            while tunnel.status is not VPNStatus.DISCONNECTED:
                event = await host.channel.receive()
                kind = event.get("ev")
                if kind == "status":
                    reason = event.get("reason")
                    self._publish(
                        tunnel,
                        StatusChange(
                            VPNStatus(int(event["status"])),
                            None if reason is None else ProviderStopReason(int(reason)),
                            event.get("error"),
                        ),
                    )
                elif kind == "reply":
                    waiter = tunnel.replies.get(int(event.get("id") or 0))
                    if waiter is not None:
                        waiter[1].append(event)
                        waiter[0].set()
                elif kind == "settings" and tunnel is self._tunnel:
                    self.applied_settings = event.get("applied")
                elif kind == "slept" and tunnel.slept is not None:
                    tunnel.slept.set()
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            error = "the provider host went away without reporting a stop"
        except (RemoteProtocolError, KeyError, ValueError) as exc:
            error = f"the provider host broke the control protocol: {exc}"
            host.kill()
        tunnel.release_waiters()
        code: int | None = None
        exited = False
        try:
            with trio.move_on_after(self.manager.exit_grace):
                code = await host.wait()
                exited = True
        finally:
            if not exited:  # reported its stop (or went silent) but does not exit, or the session is closing
                host.kill()
                with trio.CancelScope(shield=True):
                    code = await host.wait()
            tunnel.gone.set()
            self._live.discard(tunnel)
        if tunnel.status is not VPNStatus.DISCONNECTED:
            reclaim = getattr(host, "reclaim", None)  # a crashed extension's routes go with it (row F3)
            if reclaim is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await reclaim()
                    except (LabError, OSError, TunnelProviderError) as exc:
                        log.warning("could not remove the state the dead provider host left: %s", exc)
            detail = error or "the provider host exited"
            if code is not None:
                detail += f" (exit code {code})"
            self._publish(tunnel, StatusChange(VPNStatus.DISCONNECTED, ProviderStopReason.PROVIDER_FAILED, detail))
        await host.channel.aclose()

    async def _watchdog(self, tunnel: _Tunnel) -> None:
        """Backstop for a host that ignores its own timeouts (hung in C code, SIGSTOPped): kill it.

        It follows ``tunnel``'s own status, never the session's, so it cannot act on a later tunnel's host.
        """
        manager = self.manager
        with trio.move_on_after(manager.start_timeout + manager.stop_timeout + 5.0):
            await tunnel.wait_status(VPNStatus.CONNECTED, VPNStatus.REASSERTING, VPNStatus.DISCONNECTED)
        if tunnel.status is VPNStatus.CONNECTING:
            tunnel.host.kill()
            return
        await tunnel.wait_status(VPNStatus.DISCONNECTING, VPNStatus.DISCONNECTED)
        with trio.move_on_after(manager.stop_timeout + 5.0):
            await tunnel.wait_status(VPNStatus.DISCONNECTED)
            return
        tunnel.host.kill()

    async def _close(self) -> None:
        try:
            await self._stop_and_release()  # the kill switch goes with the session (docs/kill-switch.md)
        except LabError as exc:  # nft failed: the lab's teardown deletes the namespace, and the table with it
            log.warning("the kill switch could not be released at session close: %s", exc)
        finally:
            # Let stopped hosts exit by themselves (as after any stop), then kill what is left.
            with trio.move_on_after(self.manager.exit_grace):
                for live in list(self._live):
                    await live.gone.wait()
            for live in list(self._live):
                live.host.kill()
            for subscriber in self._subscribers:
                subscriber.close()


class TunnelProviderManager:
    """Mirrors NETunnelProviderManager: a saved tunnel configuration and its connection.

    Args:
        provider: the `PacketTunnelProvider` subclass, or its spec ``"package.module:Class"`` /
            ``"/path/file.py:Class"`` (what Apple's ``providerBundleIdentifier`` selects).
        protocol_configuration: the `TunnelProviderProtocol` handed to the provider.
        launcher: where the provider runs: `SubprocessLauncher` (a process in the lab's ``mac``) or
            `InProcessLauncher` (in-memory backend).
        start_timeout: the system's limit on starting (60 s as on Apple).
        stop_timeout: the system's limit on stopping (20 s as on Apple).
        exit_grace: how long a host may take to exit once its tunnel is DISCONNECTED before it is killed
            (`HOST_EXIT_GRACE`); a new start does not wait for it.

    Differences from Apple: no preferences store (``loadAllFromPreferences``/``saveToPreferences``); the
    configuration lives in this object. ``connection`` exists only inside `open_session`.
    """

    def __init__(
        self,
        provider: type[PacketTunnelProvider] | str,
        launcher: Launcher,
        protocol_configuration: TunnelProviderProtocol | None = None,
        *,
        localized_description: str = "netsim",
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        exit_grace: float = HOST_EXIT_GRACE,
    ) -> None:
        self.provider = provider
        self.launcher = launcher
        self.protocol_configuration = protocol_configuration or TunnelProviderProtocol()
        self.localized_description = localized_description
        #: NEVPNManager.isEnabled: a disabled configuration cannot start (`set_enabled`)
        self.is_enabled = True
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.exit_grace = exit_grace
        self.connection: TunnelProviderSession | None = None

    async def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the configuration (Apple: ``isEnabled`` + ``saveToPreferences``).

        Disabling stops a running tunnel (as the user's Disconnect: waits until it is down) and releases the
        kill switch; a disabled configuration cannot start until enabled again.
        """
        self.is_enabled = bool(enabled)
        if not self.is_enabled and self.connection is not None:
            await self.connection._stop_and_release()

    @asynccontextmanager
    async def open_session(self) -> AsyncIterator[TunnelProviderSession]:
        """Open the connection; on exit a running tunnel is stopped (USER_INITIATED) and its host reaped.

        The session's own tasks (event readers, watchdogs, in-process hosts) are shielded from the caller's
        cancellation until the session has closed: a cancelled caller (a stop signal, a timeout) still gets
        a prompt orderly stop. Without the shield they were cancelled with the caller, nobody read the host's
        DISCONNECTED, and closing waited out stop_timeout + exit_grace (25 s with the lab tunnel).
        """
        async with trio.open_nursery() as outer:
            tasks, shield = await outer.start(_shielded_nursery)
            session = TunnelProviderSession(self, tasks)
            self.connection = session
            try:
                yield session
            finally:
                try:
                    with trio.CancelScope(shield=True):
                        await session._close()
                finally:
                    self.connection = None
                    shield.cancel()  # the session is closed: end whatever of its tasks is left


async def _shielded_nursery(
    task_status: trio.TaskStatus[tuple[trio.Nursery, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A nursery that outer cancellation does not reach; it ends when its scope is cancelled."""
    with trio.CancelScope(shield=True) as scope:
        async with trio.open_nursery() as nursery:
            task_status.started((nursery, scope))
            await trio.sleep_forever()
