"""PacketTunnelProvider (the NEPacketTunnelProvider mirror) and the host that runs one, like nesessionmanager.

Theory of operation. The *system* side (`netsim.runtime.controller`, the app's TunnelProviderSession plus the
role of nesessionmanager) and the *host* (this module, running the user's subclass in its own process inside the
``mac`` namespace) talk over a control channel: JSON objects, one per line, over a Unix stream socketpair whose
host end is passed as an inherited fd (``--control-fd``). The in-memory backend uses the same messages over trio
memory channels, so both backends share one state machine:

    system -> host   {"op": "configure", ...}        first message: protocol configuration, timeouts, netns
                     {"op": "start", "options": {...} | null}
                     {"op": "stop", "reason": <ProviderStopReason>}
                     {"op": "message", "id": n, "data": <base64>}
                     {"op": "sleep"} / {"op": "wake"}
    host -> system   {"ev": "status", "status": <VPNStatus>, "reason": <int|null>, "error": <str|null>}
                     {"ev": "reply", "id": n, "data": <base64|null>, "error": <str|null>}
                     {"ev": "settings", "applied": {...} | null}
                     {"ev": "slept"}

Lifecycle (Apple: R1, R20-R24, F10, F11): ``start`` -> CONNECTING, ``start_tunnel(options)`` runs under the start
timeout (60 s, the iOS 16 "State timer (60 seconds) fired in state Starting"); returning means established
(CONNECTED), raising means failed (DISCONNECTING -> DISCONNECTED, reason PROVIDER_FAILED, ``stop_tunnel`` not
called because the provider itself reported the failure). On timeout the start is cancelled and ``stop_tunnel``
is called with PROVIDER_FAILED, as the system's Stopping state does. ``stop`` (or ``cancel_tunnel_with_error``,
which becomes a system stop with PROVIDER_FAILED, or NONE for a None error) -> DISCONNECTING, ``stop_tunnel``
under the stop timeout (20 s), settings removed, utun closed, DISCONNECTED; then the host exits, as Apple
terminates the extension after the stop completion.
"""

from __future__ import annotations

import argparse
import base64
import copy
import importlib
import importlib.util
import json
import logging
import math
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from netsim.apple.enums import ProviderStopReason, TunnelProviderErrorCode, VPNStatus
from netsim.apple.errors import TunnelProviderError
from netsim.apple.path import NWPath
from netsim.apple.protocol import TunnelProviderProtocol
from netsim.apple.settings import PacketTunnelNetworkSettings
from netsim.errors import LocalProtocolError, RemoteProtocolError, TunnelDown
from netsim.runtime.flow import DEFAULT_BATCH_LIMIT, PacketTunnelFlow
from netsim.runtime.netconfig import NetworkConfigurator
from netsim.runtime.pathmonitor import EventSource, watch_path

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "MAX_CONTROL_LINE",
    "ControlChannel",
    "JsonLinesChannel",
    "PacketTunnelProvider",
    "ProviderHost",
    "load_provider_class",
    "main",
    "memory_control_pair",
]

log = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT = 60.0  # F10: nesessionmanager's start state timer
DEFAULT_STOP_TIMEOUT = 20.0  # F10: then Stopping with a 20 s timeout
MAX_CONTROL_LINE = 1 << 20  # app messages are small; anything larger is a broken peer


# ------------------------------------------------------------------------------------------------ channel
class ControlChannel(Protocol):
    """A bidirectional stream of JSON-able dict messages between the system and a provider host."""

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message."""
        ...

    async def receive(self) -> dict[str, Any]:
        """Receive one message; raises `trio.EndOfChannel` when the peer closed."""
        ...

    async def aclose(self) -> None:
        """Close this end."""
        ...


class JsonLinesChannel:
    """`ControlChannel` over a `trio.abc.Stream`: one JSON object per ``\\n``-terminated line.

    A line longer than `MAX_CONTROL_LINE`, invalid JSON or a non-object is a `RemoteProtocolError` (the caller
    closes the connection).
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with self._send_lock:
            await self._stream.send_all(data)

    async def receive(self) -> dict[str, Any]:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return self._decode_untrusted(line)
            if len(self._buffer) > MAX_CONTROL_LINE:
                raise RemoteProtocolError("line_too_long", f"control line exceeds {MAX_CONTROL_LINE} bytes")
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                if self._buffer:
                    raise RemoteProtocolError("truncated", "control channel closed mid-line")
                raise trio.EndOfChannel
            self._buffer += chunk

    @staticmethod
    def _decode_untrusted(line: bytes) -> dict[str, Any]:
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise RemoteProtocolError("bad_json", str(exc)) from None
        if not isinstance(message, dict):
            raise RemoteProtocolError("not_an_object", f"expected a JSON object, got {type(message).__name__}")
        return message

    async def aclose(self) -> None:
        await self._stream.aclose()


class _MemoryChannel:
    def __init__(self, send: trio.MemorySendChannel[str], receive: trio.MemoryReceiveChannel[str]) -> None:
        self._send = send
        self._receive = receive

    async def send(self, message: dict[str, Any]) -> None:
        try:
            await self._send.send(json.dumps(message))  # JSON round trip: same constraints as the real channel
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise trio.BrokenResourceError("control channel peer closed") from None

    async def receive(self) -> dict[str, Any]:
        try:
            text = await self._receive.receive()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None
        return JsonLinesChannel._decode_untrusted(text.encode())

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_control_pair() -> tuple[ControlChannel, ControlChannel]:
    """Two connected in-memory `ControlChannel` ends (system end, host end)."""
    a_send, b_receive = trio.open_memory_channel[str](math.inf)
    b_send, a_receive = trio.open_memory_channel[str](math.inf)
    return _MemoryChannel(a_send, a_receive), _MemoryChannel(b_send, b_receive)


# ------------------------------------------------------------------------------------------------ provider
class PacketTunnelProvider:
    """Mirrors NEPacketTunnelProvider: subclass it and override the hooks (Apple: NEPacketTunnelProvider.h).

    Hooks: `start_tunnel`, `stop_tunnel`, `handle_app_message`, `sleep`, `wake`, `default_path_did_change`.
    Methods for the subclass: `set_tunnel_network_settings`, `cancel_tunnel_with_error`, `reasserting`,
    `packet_flow`, `protocol_configuration`, `default_path`. The subclass is constructed with no arguments by
    the host, in its own process.

    Differences from Apple:
        * Completion handlers become coroutines: ``start_tunnel`` returning means ``completionHandler(nil)``,
          raising means ``completionHandler(error)``; the same for ``stop_tunnel``, ``sleep`` and
          ``handle_app_message`` (its return value is the reply; Apple's "nil completion" case is a caller that
          ignores the reply).
        * ``set_tunnel_network_settings`` raises `TunnelProviderError` instead of passing it to a completion.
        * ``defaultPath`` is `default_path` (an `netsim.apple.path.NWPath`, with the interface type and name
          added); Apple's providers observe it with KVO, netsim calls the `default_path_did_change` hook
          instead (after the host re-applied the tunnel's settings for the new path).
        * No ``virtualInterface``, ``createTCPConnectionThroughTunnel``/``createUDPSession``: use ordinary
          sockets (they bypass the tunnel only if marked with the bypass fwmark or sent to an excluded
          destination; see docs/apple-mapping.md).
    """

    def __init__(self) -> None:
        self._host: ProviderHost | None = None

    # -- hooks (override) -----------------------------------------------------------------------------------
    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        """Establish the tunnel (Apple: ``startTunnel(options:completionHandler:)``).

        ``options`` is what the app passed to ``start_vpn_tunnel``, or None for an on-demand or Settings start.
        Return when established; raise to fail the start. The host cancels it after the start timeout.
        """

    async def stop_tunnel(self, reason: ProviderStopReason) -> None:
        """Tear the tunnel down (Apple: ``stopTunnel(with:completionHandler:)``); bounded by the stop timeout."""

    async def handle_app_message(self, data: bytes) -> bytes | None:
        """Answer a message from the app (Apple: ``handleAppMessage(_:completionHandler:)``)."""
        return None

    async def sleep(self) -> None:
        """The system is about to sleep (Apple: ``sleep(completionHandler:)``)."""

    def wake(self) -> None:
        """The system woke up (Apple: ``wake()``)."""

    def default_path_did_change(self, path: NWPath) -> None:
        """``default_path`` changed to ``path`` (netsim's stand-in for KVO on ``NEProvider.defaultPath``).

        Called in the host's event loop whenever the path differs from the last one: the link went down
        (UNSATISFIED), came back, or the default route moved to another interface. Return quickly; start
        longer work with `start_soon`. An exception here fails the tunnel like a crashed extension.
        """

    # -- methods (do not override) --------------------------------------------------------------------------
    def _bound(self) -> ProviderHost:
        if self._host is None:
            raise LocalProtocolError(
                f"{type(self).__name__} is not running in a ProviderHost; start it through a "
                "TunnelProviderManager session (or ProviderHost) instead of calling it directly"
            )
        return self._host

    @property
    def packet_flow(self) -> PacketTunnelFlow:
        """The flow of this tunnel's utun (Apple: ``packetFlow``); fresh for every start."""
        return self._bound().flow

    @property
    def protocol_configuration(self) -> TunnelProviderProtocol:
        """The configuration the app saved (Apple: ``protocolConfiguration``)."""
        return self._bound().protocol_configuration

    @property
    def default_path(self) -> NWPath | None:
        """The current default network path (Apple: ``defaultPath``); None before the tunnel starts."""
        return self._bound().default_path

    @property
    def reasserting(self) -> bool:
        """True while the provider re-establishes the tunnel (Apple: ``reasserting``)."""
        return self._bound().reasserting

    @reasserting.setter
    def reasserting(self, value: bool) -> None:
        self._bound().set_reasserting(bool(value))

    async def set_tunnel_network_settings(self, settings: PacketTunnelNetworkSettings | None) -> None:
        """Apply (or with None, clear) the tunnel's network settings (Apple: ``setTunnelNetworkSettings``).

        Raises:
            TunnelProviderError: NETWORK_SETTINGS_INVALID naming the bad field; NETWORK_SETTINGS_FAILED when the
                kernel refused; NETWORK_SETTINGS_CANCELED when the tunnel is stopping.
        """
        await self._bound().set_tunnel_network_settings(settings)

    def cancel_tunnel_with_error(self, error: BaseException | None) -> None:
        """Ask the system to stop this tunnel (Apple: ``cancelTunnelWithError(_:)``); returns at once."""
        self._bound().cancel_with_error(error)

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` in the background for the life of this tunnel (netsim addition).

        The trio stand-in for the dispatch queues an Apple provider uses for its read loop. Tasks are cancelled
        after ``stop_tunnel`` returns, before the utun is closed. An exception escaping a task while the tunnel
        runs is treated like a crashed extension: ``cancel_tunnel_with_error(exc)`` (reason PROVIDER_FAILED).
        """
        self._bound().start_task(fn, *args)


# ------------------------------------------------------------------------------------------------ host
_ACTIVE = (VPNStatus.CONNECTING, VPNStatus.CONNECTED, VPNStatus.REASSERTING)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class ProviderHost:
    """Runs one `PacketTunnelProvider` for one tunnel session, driven by a `ControlChannel`.

    Args:
        provider: the subclass instance.
        configurator: applies settings (kernel or memory backend).
        batch_limit: the flow's read batch limit.
        start_timeout / stop_timeout: defaults for when the ``configure`` message does not override them.
    """

    def __init__(
        self,
        provider: PacketTunnelProvider,
        configurator: NetworkConfigurator,
        *,
        batch_limit: int = DEFAULT_BATCH_LIMIT,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self.provider = provider
        self.configurator = configurator
        self.flow = PacketTunnelFlow(batch_limit=batch_limit)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.protocol_configuration = TunnelProviderProtocol()
        self.status = VPNStatus.DISCONNECTED
        self.reasserting = False
        self.path_reapplied = 0  # settings re-applied after a physical path change (netsim.runtime.pathmonitor)
        self.default_path: NWPath | None = None  # Apple: NEProvider.defaultPath
        self._settings_lock = trio.Lock()
        self._events_send, self._events_receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._stop_requested: tuple[ProviderStopReason, str | None] | None = None
        self._stop_event = trio.Event()
        self._start_scope: trio.CancelScope | None = None
        self._start_event = trio.Event()
        self._start_options: dict[str, Any] | None = None
        self._nursery: trio.Nursery | None = None
        self._tasks: trio.Nursery | None = None
        provider._host = self

    # -- status ---------------------------------------------------------------------------------------------
    def _emit(self, message: dict[str, Any]) -> None:
        try:
            self._events_send.send_nowait(message)
        except trio.ClosedResourceError:
            pass  # the session is over; nobody is listening any more

    def _set_status(
        self, status: VPNStatus, reason: ProviderStopReason | None = None, error: str | None = None
    ) -> None:
        self.status = status
        self._emit(
            {"ev": "status", "status": int(status), "reason": None if reason is None else int(reason), "error": error}
        )

    def set_reasserting(self, value: bool) -> None:
        """Apple: only meaningful while connected (R24); elsewhere the flag is stored without a status change."""
        self.reasserting = value
        if self.status in (VPNStatus.CONNECTED, VPNStatus.REASSERTING):
            wanted = VPNStatus.REASSERTING if value else VPNStatus.CONNECTED
            if wanted is not self.status:
                self._set_status(wanted)

    # -- provider-facing operations -------------------------------------------------------------------------
    async def set_tunnel_network_settings(self, settings: PacketTunnelNetworkSettings | None) -> None:
        if self.status not in _ACTIVE:
            raise TunnelProviderError(
                TunnelProviderErrorCode.NETWORK_SETTINGS_CANCELED,
                f"the tunnel is {self.status.name.lower()}; settings can only be set while starting or running",
            )
        copied = None
        if settings is not None:
            if not isinstance(settings, PacketTunnelNetworkSettings):
                raise TunnelProviderError(
                    TunnelProviderErrorCode.NETWORK_SETTINGS_INVALID,
                    f"settings: {settings!r} must be a PacketTunnelNetworkSettings or None",
                )
            copied = copy.deepcopy(settings)  # Apple copies the settings when they are set
            copied.validate()
        async with self._settings_lock:
            await trio.lowlevel.checkpoint()
            if self.status not in _ACTIVE or self._stop_requested is not None:
                raise TunnelProviderError(
                    TunnelProviderErrorCode.NETWORK_SETTINGS_CANCELED, "the tunnel began stopping; settings not applied"
                )
            device = self.configurator.apply(copied)
            if device is not None and self.flow.device is not device:
                self.flow.attach(device)
        applied = self.configurator.applied
        self._emit({"ev": "settings", "applied": None if applied is None else _applied_to_json(applied)})

    def cancel_with_error(self, error: BaseException | None) -> None:
        reason = ProviderStopReason.NONE if error is None else ProviderStopReason.PROVIDER_FAILED
        self.request_stop(reason, None if error is None else _describe(error))

    def start_task(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._tasks is None or self.status not in _ACTIVE:
            raise LocalProtocolError("start_soon() needs a starting or running tunnel")
        self._tasks.start_soon(self._guard, fn, args)

    async def _guard(self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        try:
            await fn(*args)
        except (Exception, TunnelDown) as exc:
            if self.status in _ACTIVE and self._stop_requested is None:
                traceback.print_exc(file=sys.stderr)
                self.cancel_with_error(exc)

    def request_stop(self, reason: ProviderStopReason, error: str | None = None) -> None:
        """Begin a stop (idempotent: the first request's reason wins)."""
        if self._stop_requested is None:
            self._stop_requested = (reason, error)
            if self._start_scope is not None:
                self._start_scope.cancel()
            self._stop_event.set()

    # -- main loop ------------------------------------------------------------------------------------------
    async def run(self, channel: ControlChannel) -> None:
        """Serve one session on ``channel`` until the tunnel has stopped (or the system went away)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._pump_events, channel)
            nursery.start_soon(self._receive_loop, channel)
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                await self._lifecycle()
                tasks.cancel_scope.cancel()
            self._events_send.close()
            nursery.cancel_scope.deadline = trio.current_time() + 5  # let the last events drain

    async def _pump_events(self, channel: ControlChannel) -> None:
        try:
            async for message in self._events_receive:
                await channel.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.request_stop(ProviderStopReason.NONE, "system went away")
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _receive_loop(self, channel: ControlChannel) -> None:
        try:
            while True:
                self._dispatch(await channel.receive())
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
            self.request_stop(ProviderStopReason.NONE, "system went away")
        except (RemoteProtocolError, ValueError, TypeError, KeyError) as exc:
            self.request_stop(ProviderStopReason.PROVIDER_FAILED, f"control channel: {exc}")
        self._start_event.set()

    def _dispatch(self, message: dict[str, Any]) -> None:
        assert self._nursery is not None
        op = message.get("op")
        if op == "configure":
            self._configure(message)
        elif op == "start":
            self._start_options = message.get("options")
            self._start_event.set()
        elif op == "stop":
            self.request_stop(ProviderStopReason(int(message.get("reason", 1))))
        elif op == "message":
            self._nursery.start_soon(self._app_message, message)
        elif op == "sleep":
            self._nursery.start_soon(self._sleep)
        elif op == "wake":
            try:
                self.provider.wake()
            except Exception as exc:  # as an extension that throws in wake(): it crashed (start_soon's rule)
                traceback.print_exc(file=sys.stderr)
                self.cancel_with_error(exc)
        else:
            raise RemoteProtocolError("unknown_op", f"unknown control op {op!r}")

    def _configure(self, message: dict[str, Any]) -> None:
        if "protocol" in message:
            self.protocol_configuration = TunnelProviderProtocol.from_dict(message["protocol"])
        self.start_timeout = float(message.get("start_timeout", self.start_timeout))
        self.stop_timeout = float(message.get("stop_timeout", self.stop_timeout))

    async def _watch_path(self, events: EventSource) -> None:
        try:
            await watch_path(events, self.configurator.physical_state, self._path_changed)
        finally:
            events.close()

    async def _path_changed(self, old: object, new: object) -> None:
        """The physical path changed (`netsim.runtime.pathmonitor`): re-apply the tunnel's settings, so what the
        kernel removed with a link (the server exclusion, excluded routes, local networks) comes back; then
        update ``default_path`` and tell the provider (`PacketTunnelProvider.default_path_did_change`)."""
        await self._reapply_for_path()
        path = self._read_default_path()
        if path is None or path == self.default_path:
            return
        self.default_path = path
        log.info("default path: %s", path, extra={"event": "default_path", "path": path.to_json()})
        if self.status not in _ACTIVE or self._stop_requested is not None:
            return
        try:
            self.provider.default_path_did_change(path)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.cancel_with_error(exc)

    def _read_default_path(self) -> NWPath | None:
        try:
            return self.configurator.default_path()
        except Exception as exc:  # a netlink error: keep the last path rather than invent one
            log.warning("reading the default path failed: %s", exc)
            return None

    async def _reapply_for_path(self) -> None:
        async with self._settings_lock:
            if self.status not in _ACTIVE or self._stop_requested is not None or self.configurator.applied is None:
                return
            try:
                self.configurator.reapply()
            except TunnelProviderError as exc:
                log.warning("re-applying the settings after a path change failed: %s", exc)
                return
            self.path_reapplied += 1
        applied = self.configurator.applied
        self._emit({"ev": "settings", "applied": None if applied is None else _applied_to_json(applied)})

    async def _lifecycle(self) -> None:
        await self._start_event.wait()
        if self._stop_requested is not None and self.status is VPNStatus.DISCONNECTED:
            return
        self.default_path = self._read_default_path()
        events = self.configurator.path_events()
        if events is not None:
            assert self._tasks is not None
            self._tasks.start_soon(self._watch_path, events)
        self._set_status(VPNStatus.CONNECTING)
        failure: str | None = None
        timed_out = False
        with trio.CancelScope() as scope:
            self._start_scope = scope
            scope.deadline = trio.current_time() + self.start_timeout
            try:
                # Per-app VPN (routingMethod sourceApplication): route only the app rules' traffic into the utun
                # and tag packets with FlowMetaData; a bad app rule fails the start like any provider error.
                proto = self.protocol_configuration
                # NEVPNProtocol.enforceRoutes (R47): included/excluded routes win over the system table;
                # includeAllNetworks overrides enforceRoutes and implies its ordering (apple-reference §3 rule 5).
                self.configurator.set_enforce_routes(proto.enforce_routes or proto.include_all_networks)
                # NEVPNProtocol.excludeLocalNetworks (R43): the connected private networks stay direct, which
                # matters only when routes are enforced (else the system table keeps them direct anyway).
                self.configurator.set_exclude_local_networks(proto.exclude_local_networks)
                self.configurator.set_routing_method(proto.routing_method, proto.app_rules)
                self.flow.set_routing_method(proto.routing_method, proto.app_rules)
                await self.provider.start_tunnel(self._start_options)
            except Exception as exc:
                failure = _describe(exc)
                traceback.print_exc(file=sys.stderr)
        self._start_scope = None
        if scope.cancelled_caught and self._stop_requested is None:
            timed_out = True
            failure = f"start_tunnel did not complete within {self.start_timeout:g} s"
        if failure is not None and not timed_out:
            self._set_status(VPNStatus.DISCONNECTING)
            if self._tasks is not None:
                self._tasks.cancel_scope.cancel()
            await self._teardown()
            self._set_status(VPNStatus.DISCONNECTED, ProviderStopReason.PROVIDER_FAILED, failure)
            return
        if timed_out:
            self.request_stop(ProviderStopReason.PROVIDER_FAILED, failure)
        if self._stop_requested is None:
            self._set_status(VPNStatus.REASSERTING if self.reasserting else VPNStatus.CONNECTED)
            await self._stop_event.wait()
        assert self._stop_requested is not None
        reason, error = self._stop_requested
        self._set_status(VPNStatus.DISCONNECTING)
        with trio.move_on_after(self.stop_timeout) as stop_scope:
            try:
                await self.provider.stop_tunnel(reason)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                error = error or f"stop_tunnel raised {_describe(exc)}"
        if stop_scope.cancelled_caught:
            error = error or f"stop_tunnel did not complete within {self.stop_timeout:g} s"
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()
        await self._teardown()
        self._set_status(VPNStatus.DISCONNECTED, reason, error)

    async def _teardown(self) -> None:
        with trio.CancelScope(shield=True):
            async with self._settings_lock:
                try:
                    self.configurator.close()
                finally:
                    self.flow.detach()

    async def _app_message(self, message: dict[str, Any]) -> None:
        ident = message.get("id")
        try:
            data = base64.b64decode(message.get("data") or "", validate=True)
            reply = await self.provider.handle_app_message(data)
            encoded = None if reply is None else base64.b64encode(bytes(reply)).decode()
            self._emit({"ev": "reply", "id": ident, "data": encoded, "error": None})
        except Exception as exc:
            self._emit({"ev": "reply", "id": ident, "data": None, "error": _describe(exc)})

    async def _sleep(self) -> None:
        if self.protocol_configuration.disconnect_on_sleep and self.status in _ACTIVE:
            self.request_stop(ProviderStopReason.SLEEP)
        else:
            try:
                await self.provider.sleep()
            except Exception:
                traceback.print_exc(file=sys.stderr)
        self._emit({"ev": "slept"})


def _applied_to_json(applied: Any) -> dict[str, Any]:
    resolver = applied.resolver
    return {
        "device": applied.device,
        "mtu": applied.mtu,
        "addresses": list(applied.addresses),
        "routes": [{"network": str(r.network), "kind": r.kind.value} for r in applied.routes],
        "resolver": None
        if resolver is None
        else {
            "nameservers": list(resolver.nameservers),
            "search": list(resolver.search),
            "match_domains": list(resolver.match_domains),
            "split": resolver.split,
        },
        "physical_interface": applied.physical_interface,
        "gateways": {str(k): v for k, v in applied.gateways.items()},
        "enforce_routes": applied.enforce_routes,
        "local_networks": list(applied.local_networks),
    }


# ------------------------------------------------------------------------------------------------ process entry
def load_provider_class(spec: str) -> type[PacketTunnelProvider]:
    """Load ``"package.module:Class"`` or ``"/path/to/file.py:Class"``.

    Raises:
        LocalProtocolError: the spec is malformed or does not name a PacketTunnelProvider subclass.
    """
    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name:
        raise LocalProtocolError(f"provider spec {spec!r} must look like 'package.module:Class' or 'file.py:Class'")
    if module_name.endswith(".py"):
        file_spec = importlib.util.spec_from_file_location(f"netsim_provider_{abs(hash(module_name))}", module_name)
        if file_spec is None or file_spec.loader is None:
            raise LocalProtocolError(f"cannot load provider file {module_name!r}")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[file_spec.name] = module
        file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PacketTunnelProvider)):
        raise LocalProtocolError(f"{spec!r} is not a PacketTunnelProvider subclass")
    return cls


async def _serve_fd(provider_spec: str, fd: int, netns: str, batch_limit: int) -> None:
    from netsim.runtime.netconfig import KernelNetworkConfigurator

    sock = socket.socket(fileno=fd)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    channel = JsonLinesChannel(stream)
    provider = load_provider_class(provider_spec)()
    configurator = KernelNetworkConfigurator(netns, inside=True)
    host = ProviderHost(provider, configurator, batch_limit=batch_limit)
    try:
        await host.run(channel)
    finally:
        configurator.close()
        await channel.aclose()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the provider process: ``python -m netsim.runtime.provider --provider SPEC ...``."""
    parser = argparse.ArgumentParser(prog="python -m netsim.runtime.provider")
    parser.add_argument("--provider", required=True, help="'package.module:Class' or 'file.py:Class'")
    parser.add_argument("--control-fd", type=int, required=True, help="inherited Unix socket (JSON lines)")
    parser.add_argument("--netns", required=True, help="the netsim-* namespace this process runs in")
    parser.add_argument("--batch-limit", type=int, default=DEFAULT_BATCH_LIMIT)
    args = parser.parse_args(argv)
    trio.run(_serve_fd, args.provider, args.control_fd, args.netns, args.batch_limit)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so provider classes subclass the one
    # PacketTunnelProvider that user code imports.
    from netsim.runtime.provider import main as _main

    sys.exit(_main())
