"""`HelperForwardingProvider`: a ready-made PacketTunnelProvider that forwards the utun to the helper over IPC.

Theory of operation
-------------------
Each helper connection is one `netsim.runtime.helper_client.HelperClient` (the public API a user's own provider
uses too: one code path). ``start_tunnel`` connects to the helper's Unix socket
(``provider_configuration["helper_socket"]``), receives the helper's SETTINGS (addresses, DNS, AllowedIPs, MTU
and server address from the WireGuard config: the keys stay in the helper) and applies them, through the
`HelperForwardingProvider.merge_settings` hook, with ``set_tunnel_network_settings``. Two loops then run for the
life of the tunnel:

* **outbound**: ``await packet_flow.read_packets()`` (Apple: ``readPackets``; one trio wakeup returns every queued
  packet as parallel lists of packets and Darwin families) -> one IPC PACKETS frame with those same lists
  (`HelperClient.send_packets`: scatter-gather ``sendmsg``, the payload bytes are never copied into a frame).
  While the helper is away the batch is dropped and counted as ``helper_down``: reading on keeps the utun queue
  from filling with stale packets, and the count says exactly what was lost.
* **inbound**: each IPC PACKETS frame (`HelperClient.receive_packets`, which also answers PING and delivers
  statistics answers) -> ``packet_flow.write_packets(packets, families)`` (Apple:
  ``writePackets(_:withProtocols:)``): memoryview slices of the IPC receive buffer (zero copy until the TUN write)
  and the frame's families as they came.

The optional ``on_outbound_batch`` / ``on_inbound_batch`` hooks see each batch (only when a subclass overrides
them). No `Packet` object is made on either path (they are Apple's per-packet objects, for providers that want them);
the families travel end to end as the parallel lists both APIs already use. When a write is refused, the
provider reads the flow's plain ``packets_written`` counter to book what was taken: no statistics snapshot and
no I/O on the event loop under load.

If the helper dies, the connection breaks: the provider sets ``reasserting`` (Apple: the tunnel is re-establishing,
R24), reconnects with exponential backoff and, when the helper answers again, clears ``reasserting`` and resumes.
The settings are re-applied only when the helper announces different ones.

Path changes (`default_path_did_change`, issue 16). While ``default_path`` is not satisfied (en0 down) the
provider is ``reasserting``; when the path is back it stays so until the helper reports its path ``ready`` (it
re-bound its socket and its forced handshake completed; `netsim.runtime.helper.Helper.path_changed`), polled
over IPC statistics. The recovery needs no user code, as WireGuardKit's path monitor.

Ledger (``Ledger("provider")``): ``tun_read`` (packets read -> handed to IPC, dropped ``helper_down``, and
``malformed`` for what the flow discards before the provider sees it),
``ipc_out`` (the channel's queue: written, ``ipc_queue_full``, ``ipc_closed``), ``ipc_in`` (packets received ->
accepted by the utun, dropped ``tun_refused``).

App messages (``session.send_provider_message``): ``b"stats"`` returns the provider's statistics as JSON,
``b"helper-stats"`` asks the helper over IPC and returns its answer.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import trio

from netsim.apple.enums import ProviderStopReason
from netsim.apple.path import NWPath
from netsim.apple.settings import PacketTunnelNetworkSettings
from netsim.core import ipc
from netsim.core.ledger import Ledger, LedgerSnapshot
from netsim.errors import ConfigError, LabError, LocalProtocolError, RemoteProtocolError, TunnelDown
from netsim.runtime.channel import IpcChannel
from netsim.runtime.helper_client import (
    MEMORY_SCHEME,
    HelperBusy,
    HelperClient,
    HelperClientConfig,
    open_helper_channel,
    register_memory_helper,
    settings_from_payload,
    unregister_memory_helper,
)
from netsim.runtime.provider import PacketTunnelProvider

__all__ = [
    "MEMORY_SCHEME",
    "ForwardingStatistics",
    "HelperForwardingProvider",
    "register_memory_helper",
    "settings_from_payload",
    "unregister_memory_helper",
]

log = logging.getLogger("netsim.forwarding")

_CONNECTION_ERRORS = (
    TunnelDown,
    RemoteProtocolError,
    LabError,
    ConfigError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


@dataclass(frozen=True, slots=True)
class ForwardingStatistics:
    """Counters of a `HelperForwardingProvider`.

    Attributes:
        ledger: ``tun_read``, ``ipc_out``, ``ipc_in`` (see the module docstring).
        connects: successful helper connections (the first one plus every reconnect).
        disconnects: helper connections lost.
        reasserting: True while reconnecting.
        settings_applied: times the helper's settings were applied.
        read_batches / write_batches: flow reads and writes (packets per wakeup = packets / batches).
    """

    ledger: LedgerSnapshot
    connects: int
    disconnects: int
    reasserting: bool
    settings_applied: int
    read_batches: int
    write_batches: int
    path_history: tuple[dict[str, Any], ...] = ()
    """The last `default_path` values seen (`NWPath.to_json`), oldest first (bounded)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "path_history": list(self.path_history),
            "ledger": self.ledger.to_json(),
            "connects": self.connects,
            "disconnects": self.disconnects,
            "reasserting": self.reasserting,
            "settings_applied": self.settings_applied,
            "read_batches": self.read_batches,
            "write_batches": self.write_batches,
        }


class HelperForwardingProvider(PacketTunnelProvider):
    """Forwards every utun packet to the netsim helper and writes its replies back (use as is, or subclass it).

    Built on `netsim.runtime.helper_client.HelperClient` (one connection per session), adding reconnects,
    reasserting and the ledger. ``provider_configuration`` keys: those of `HelperClientConfig` (``helper_socket``,
    ``token_file``, ``connect_timeout`` (seconds to reach the helper at start, default 10), ``backoff_max``
    (default 1.0), ``ping_interval`` / ``ping_timeout`` (liveness, defaults 5 and 10; ``ping_interval = 0``
    turns it off): a helper that does not answer a PING within the deadline is treated as dead and the
    provider reasserts), plus ``reconnect_for`` (seconds of reasserting before the tunnel gives up and stops
    with an error, default 300) and ``server_check_interval`` (seconds between asking the helper whether the
    server still answers, default 1, 0 off: while it does not, the provider reasserts; row F6).

    Hooks for subclasses (docs/helper.md, "Hooks"): `on_outbound_batch` and `on_inbound_batch` see every batch
    (called only when overridden), `merge_settings` adjusts the helper's settings before they are applied, and
    `handle_app_message` answers ``b"stats"`` / ``b"helper-stats"`` and returns None for anything else, so a
    subclass answers its own messages and passes the rest on with ``await super().handle_app_message(data)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger("provider", ("tun_read", "ipc_out", "ipc_in"))
        self._tun_read = self.ledger.stage("tun_read")
        self._ipc_in = self.ledger.stage("ipc_in")
        self._channel: IpcChannel | None = None
        self._client: HelperClient | None = None
        self._applied: PacketTunnelNetworkSettings | None = None  # the helper's settings last applied
        self._ready = trio.Event()
        self.connects = 0
        self.disconnects = 0
        self.settings_applied = 0
        self.read_batches = 0
        self.write_batches = 0
        self._start_error: BaseException | None = None
        self._last_error: BaseException | None = None  # why the latest connection attempt ended
        self._session_ok = False
        self._stopping = False
        self._written_seen = 0  # flow.packets_written as of our last write
        self._path_down = False  # default_path is not satisfied: reasserting until the helper is ready again
        self._server_down = False  # the helper's tunnel stopped hearing the server: reasserting until it does
        self._path_generation = 0
        self.path_history: list[dict[str, Any]] = []

    # -- hooks (override) ----------------------------------------------------------------------------------
    def on_outbound_batch(self, packets: Sequence[bytes], families: Sequence[int]) -> None:
        """Called with each batch read from the utun, before it goes to the helper (only when overridden).

        Runs on the hot path once per batch: count or inspect, do not block or copy. Changing the lists is not
        supported (they are the flow's reused buffers).
        """

    def on_inbound_batch(self, packets: Sequence[memoryview], families: Sequence[int]) -> None:
        """Called with each batch from the helper, before it is written to the utun (only when overridden).

        The packets are views into the IPC receive buffer, valid only during the call.
        """

    def merge_settings(self, settings: PacketTunnelNetworkSettings) -> PacketTunnelNetworkSettings:
        """Return the settings to apply, given the helper's (a fresh copy each time: change it in place or not).

        E.g. add excluded routes or DNS match domains of your own. Called on every change of the helper's
        settings; the result goes to ``set_tunnel_network_settings``.
        """
        return settings

    def default_path_did_change(self, path: NWPath) -> None:
        """Reassert while the path is down; once it is back, wait (in a task) for the helper to report its path
        ready (re-bound, handshake completed), then clear ``reasserting``. Subclasses overriding this call
        ``super().default_path_did_change(path)`` to keep that."""
        self.path_history = [*self.path_history[-(_PATH_HISTORY - 1) :], path.to_json()]
        self._path_generation += 1
        if not path.is_satisfied:
            self._path_down = True
            self.reasserting = True
            return
        self._path_down = False
        self.reasserting = True
        self.start_soon(self._await_path_ready, self._path_generation, path.interface_name)

    async def _await_path_ready(self, generation: int, interface: str | None) -> None:
        """Poll the helper's ``path`` until it is ready on ``interface`` (or a newer path change took over), then
        clear ``reasserting``; a helper without the ``path`` object is taken as ready once connected."""
        conf = self._conf()
        give_up = trio.current_time() + float(conf.get("reconnect_for", 300.0))
        delay = 0.02
        while generation == self._path_generation and trio.current_time() < give_up:
            client = self._client
            if client is not None and client.is_connected:
                try:
                    stats = await client.helper_statistics(2.0)
                except TunnelDown:
                    stats = None
                if generation != self._path_generation:
                    return
                path = stats.get("path", {"ready": True}) if stats is not None else {}
                if path.get("ready") and path.get("interface") in (None, interface):
                    self.reasserting = False
                    return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _watch_server(self) -> None:
        """Reassert while the server does not answer (row F6), as the helper's ``tunnel`` statistics say: data
        went out for WireGuard's ``no_reply_time`` (15 s) with nothing back, e.g. the server blackholed. Cleared
        when it answers again (the helper's new handshake completed). ``server_check_interval`` (seconds,
        default 1; 0 turns it off) is how often the helper is asked."""
        interval = float(self._conf().get("server_check_interval", 1.0))
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            client = self._client
            if client is None or not client.is_connected or self._path_down:
                continue
            try:
                stats = await client.helper_statistics(2.0)
            except TunnelDown:
                continue
            tunnel = stats.get("tunnel")
            if not isinstance(tunnel, dict) or not isinstance(tunnel.get("responding"), bool):
                continue  # a helper without the object (another implementation): nothing to go by
            if not tunnel["responding"] and not self._server_down:
                self._server_down = True
                self.reasserting = True
                log.info("the server stopped answering (%.1f s): reasserting", tunnel.get("unanswered_for", 0.0))
            elif tunnel["responding"] and self._server_down:
                self._server_down = False
                if not self._path_down:
                    self.reasserting = False
                log.info("the server answers again")

    # -- configuration -------------------------------------------------------------------------------------
    def _conf(self) -> dict[str, Any]:
        conf = dict(self.protocol_configuration.provider_configuration or {})
        HelperClientConfig.from_provider_configuration(conf)  # validate (names the bad key)
        return conf

    def _client_config(self) -> HelperClientConfig:
        return HelperClientConfig.from_provider_configuration(self.protocol_configuration.provider_configuration)

    def connect_helper(self, retry_for: float) -> AbstractAsyncContextManager[IpcChannel]:
        """Open an IPC channel to the helper (override to use another transport)."""
        return open_helper_channel(self._client_config(), retry_for=retry_for, ledger=self.ledger)

    def _ipc_connection(self) -> ipc.Connection:
        """The provider end of the IPC: the per-tunnel token (read from ``token_file``) and liveness PINGs."""
        return self._client_config().connection()

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start_tunnel(self, options: dict[str, Any] | None) -> None:
        conf = self._conf()
        timeout = float(conf.get("connect_timeout", 10.0))
        self.start_soon(self._outbound)
        self.start_soon(self._maintain)
        self.start_soon(self._watch_server)
        with trio.move_on_after(timeout):
            await self._ready.wait()
        if not self._ready.is_set():
            raise TunnelDown(f"no helper session within connect_timeout ({timeout:g} s){_why(self._last_error)}")
        if self._start_error is not None:
            raise self._start_error

    async def stop_tunnel(self, reason: ProviderStopReason) -> None:
        self._stopping = True
        client = self._client
        if client is not None:
            await client.aclose()

    async def _maintain(self) -> None:
        """Keep one helper connection up; reassert and reconnect with backoff whenever it breaks."""
        conf = self._conf()
        reconnect_for = float(conf.get("reconnect_for", 300.0))
        backoff_max = float(conf.get("backoff_max", 1.0))
        attempt_for = min(float(conf.get("connect_timeout", 10.0)), 2.0)
        down_since: float | None = None
        delay = 0.05
        while True:
            exc = await self._attempt(attempt_for)
            if self._stopping:
                return
            self._last_error = exc
            if isinstance(exc, ConfigError):
                if self._ready.is_set():
                    raise exc
                self._start_error = exc
                self._ready.set()
                return
            log.info("helper connection ended: %s", exc)
            self._channel = None
            self._client = None
            now = trio.current_time()
            if self._session_ok:
                # a working session just broke: the tunnel is re-establishing (Apple: reasserting, R24)
                self._session_ok = False
                self.disconnects += 1
                self.reasserting = True
                down_since, delay = now, 0.05
            elif down_since is None:
                down_since = now
            if now - down_since > reconnect_for:
                error = TunnelDown(f"the helper stayed unreachable for {reconnect_for:g} s{_why(exc)}")
                if not self._ready.is_set():
                    self._start_error = error
                    self._ready.set()
                else:
                    self.cancel_tunnel_with_error(error)
                return
            await trio.sleep(delay)
            delay = min(delay * 2, backoff_max)

    async def _attempt(self, retry_for: float) -> Exception | None:
        """One connection's lifetime; returns why it ended (connection errors are expected, not raised)."""
        try:
            async with self.connect_helper(retry_for) as ch:
                await self._session(ch)
        except _CONNECTION_ERRORS as exc:
            return exc
        except BaseExceptionGroup as group:  # trio nurseries inside the channel wrap what they raise
            match, rest = group.split(_CONNECTION_ERRORS)
            if rest is not None:
                raise rest from None  # e.g. Cancelled while stopping: the connection errors are moot then
            if match is None:  # pragma: no cover - split of a non-empty group
                raise
            leaf: BaseException = match
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, Exception)
            return leaf
        return None

    async def _session(self, ch: IpcChannel) -> None:
        """One helper connection: wait for its SETTINGS, apply them, then move inbound frames to the utun."""
        client = HelperClient(ch, on_settings=self._apply_settings)
        await client.wait_settings(float(self._conf().get("connect_timeout", 10.0)))
        self.connects += 1
        self._session_ok = True
        self._channel = ch
        self._client = client
        if self.reasserting and not (self._path_down or self._server_down):
            self.reasserting = False
        self._ready.set()
        log.info("connected to the helper (connection %d)", self.connects)
        flow = self.packet_flow
        write = flow.write_packets
        receive = client.receive_packets
        ipc_in = self._ipc_in
        hook = self.on_inbound_batch if _overrides(self, "on_inbound_batch") else None
        try:
            while True:
                packets, families = await receive()
                n = len(packets)
                ipc_in.count_read(n)
                if hook is not None:
                    hook(packets, families)
                if write(packets, families):
                    accepted = n
                    self._written_seen += n
                else:  # rare: the flow's plain counter says how many it took (only this loop writes to it)
                    total = flow.packets_written
                    accepted, self._written_seen = total - self._written_seen, total
                self.write_batches += 1
                ipc_in.count_forwarded(accepted)
                if accepted != n:
                    ipc_in.count_dropped("tun_refused", n - accepted)
        finally:
            client._end(TunnelDown("the helper session ended"))  # wakes statistics waiters (first reason wins)
            if self._channel is ch:
                self._channel = None
                self._client = None

    async def _apply_settings(self, settings: PacketTunnelNetworkSettings) -> None:
        """Apply the helper's settings (through `merge_settings`) unless they equal what is already applied."""
        if settings == self._applied:
            return
        self._applied = copy.deepcopy(settings)
        try:
            await self.set_tunnel_network_settings(self.merge_settings(settings))
        except BaseException:
            self._applied = None
            raise
        self.settings_applied += 1

    async def _outbound(self) -> None:
        """utun -> helper: one flow read, one IPC frame (the performance-critical loop)."""
        flow = self.packet_flow
        read = flow.read_packets
        st = self._tun_read
        flow.count_reads_in(st)  # packets the flow drops as malformed are booked here too
        hook = self.on_outbound_batch if _overrides(self, "on_outbound_batch") else None
        while True:
            packets, families = await read()  # Apple: readPackets; families stay with their packets to the IPC
            n = len(packets)
            st.count_read(n)
            self.read_batches += 1
            if hook is not None:
                hook(packets, families)
            client = self._client
            if client is None or not client.is_connected:
                st.count_dropped("helper_down", n)
                continue
            st.count_forwarded(n)
            try:
                client.send_packets(packets, families)
            except LocalProtocolError:
                pass  # counted by the channel's ipc_out stage (ipc_local_error): the session is closing

    # -- statistics ----------------------------------------------------------------------------------------
    def statistics(self) -> ForwardingStatistics:
        """A frozen snapshot of the provider's counters."""
        return ForwardingStatistics(
            ledger=self.ledger.snapshot(),
            connects=self.connects,
            disconnects=self.disconnects,
            reasserting=self.reasserting,
            settings_applied=self.settings_applied,
            read_batches=self.read_batches,
            write_batches=self.write_batches,
            path_history=tuple(self.path_history),
        )

    async def helper_statistics(self, timeout: float = 5.0) -> dict[str, Any]:
        """Ask the helper for its statistics over IPC (STATS_REQUEST).

        Raises:
            TunnelDown: no helper connection, or it broke or did not answer within ``timeout``.
        """
        client = self._client
        if client is None:
            raise TunnelDown("not connected to the helper")
        return await client.helper_statistics(timeout)

    async def handle_app_message(self, data: bytes) -> bytes | None:
        """``b"stats"``: this provider's statistics and flow counters; ``b"helper-stats"``: the helper's.

        Anything else returns None: override, answer your own messages and ``return await
        super().handle_app_message(data)`` for the rest.
        """
        if data == b"stats":
            out = self.statistics().to_json()
            out["flow"] = _flow_json(self.packet_flow.statistics())
            return json.dumps(out).encode()
        if data == b"helper-stats":
            return json.dumps(await self.helper_statistics()).encode()
        return None


_PATH_HISTORY = 16


def _why(last: BaseException | None) -> str:
    """What the last connection attempt ended with, for a start or give-up message (BUSY said in words)."""
    if last is None:
        return ""
    if isinstance(last, HelperBusy) or (isinstance(last, RemoteProtocolError) and last.reason == "peer_busy"):
        return "; the helper refused it with BUSY: it already serves another provider"
    return f"; the last attempt: {type(last).__name__}: {last}"


def _overrides(obj: object, name: str) -> bool:
    """Whether ``obj``'s class overrides the hook ``name`` (a hook left alone costs nothing per batch)."""
    return getattr(type(obj), name) is not getattr(HelperForwardingProvider, name)


def _flow_json(s: Any) -> dict[str, Any]:
    return {
        k: getattr(s, k)
        for k in (
            "read_batches",
            "packets_read",
            "read_dropped_malformed",
            "write_calls",
            "packets_written",
            "write_dropped_family",
            "write_dropped_malformed",
            "write_dropped_too_big",
            "write_dropped_refused",
            "write_dropped_no_device",
        )
    }
