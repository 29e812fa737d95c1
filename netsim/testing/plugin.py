"""The netsim pytest plugin: fixtures that run the user's own provider and policy, leak-checked (docs/testing.md).

``pip install netsim`` registers this module as a pytest plugin (entry point group ``pytest11``, name
``netsim``), so a user's test suite gets these fixtures without a conftest line:

* ``netsim_provider``, ``netsim_provider_configuration``, ``netsim_policy``: what the tunnels run (defaults:
  netsim's `HelperForwardingProvider`, no configuration, no policy). Override one in a conftest for a suite-wide
  choice (pytest's override-by-name); the closest ``@pytest.mark.netsim(provider=..., provider_configuration=...,
  policy=...)`` marker wins over the fixtures, per key.
* ``netsim_memory_tunnel`` (async, no root): `netsim.testing.memory_tunnel.memory_tunnel` with those three.
* ``netsim_lab`` (root tier): a fresh `netsim.lab.Lab` recording pcaps per link; its pcap directory is kept and
  named in the report when the test failed, removed when it passed.
* ``netsim_lab_tunnel`` (async, root tier): `netsim.lab.tunnel.netsim_tunnel` in ``netsim_lab``.

Async fixtures and ``async def`` tests run under pytest-trio (``pip install netsim[testing]`` brings pytest and
pytest-trio): mark tests ``@pytest.mark.trio`` or set ``trio_mode = true`` in the pytest configuration. The root
tier is gated by `netsim.testing.require`: skipped with the reason, or failed when ``NETSIM_REQUIRE_PRIVILEGED=1``
(only that variable decides; ``CI=true`` does not).

Every tunnel fixture checks on teardown that the test left nothing running: this process's fds and child
processes (`LeakCheck`), the lab's namespaces, run file and /etc/netns entries, trio system tasks
(``trio.lowlevel.spawn_system_task``, which outlive any nursery), and the root namespace (`RootSnapshot`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from netsim.testing.fixtures import LeakCheck, root_snapshot
from netsim.testing.require import require_binary, require_root

__all__ = [
    "netsim_lab",
    "netsim_lab_tunnel",
    "netsim_memory_tunnel",
    "netsim_policy",
    "netsim_provider",
    "netsim_provider_configuration",
    "netsim_tunnel_gate",
]

#: The marker's keyword arguments (anything else is a usage error: a typo must not silently run the default).
MARKER_KEYS = frozenset({"provider", "provider_configuration", "policy"})
#: Binaries the lab tunnel needs (the lab itself, wireguard-go for the server, tcpdump for the pcaps).
LAB_BINARIES = ("ip", "nft", "iperf3", "tcpdump")
TUNNEL_BINARIES = ("wireguard-go", "wg")

_CALL_REPORT = pytest.StashKey[pytest.TestReport]()
_PCAP_DIR = pytest.StashKey[Path]()
_KEPT = pytest.StashKey[list[tuple[str, Path]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--netsim-pcap-dir``: where lab fixtures record pcaps (default: ``<pytest basetemp>/netsim-pcaps``)."""
    group = parser.getgroup("netsim")
    group.addoption(
        "--netsim-pcap-dir",
        default=None,
        help="directory for the netsim_lab fixture's per-test pcap directories (kept for failed tests)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, so ``--strict-markers`` suites accept it."""
    config.addinivalue_line(
        "markers",
        "netsim(provider=None, provider_configuration=None, policy=None): what the netsim tunnel fixtures run "
        "(provider: class or 'module:Class'; policy: a file path, relative to the test file)",
    )
    config.stash[_KEPT] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Remember the call phase's report (fixture teardown decides on it) and name kept pcaps in a failure.

    An old-style hook wrapper: pytest-trio lets pytest 7 in, whose pluggy may predate ``wrapper=True``.
    """
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_REPORT] = report
        if report.failed and (pcaps := item.stash.get(_PCAP_DIR, None)) is not None:
            report.sections.append(("netsim pcaps", f"pcaps kept in {pcaps}"))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """List the pcap directories kept for failed tests at the end of the run."""
    kept = config.stash.get(_KEPT, [])
    if kept:
        terminalreporter.section("netsim pcaps kept")
        for nodeid, path in kept:
            terminalreporter.write_line(f"{nodeid}: {path}")


def _marker(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The closest ``netsim`` marker's keyword arguments (closest wins per key), validated."""
    out: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers("netsim"))):
        if mark.args or (unknown := set(mark.kwargs) - MARKER_KEYS):
            bad = mark.args or sorted(unknown)
            raise pytest.UsageError(
                f"{request.node.nodeid}: @pytest.mark.netsim takes only {sorted(MARKER_KEYS)}: {bad!r}"
            )
        out.update(mark.kwargs)
    return out


@pytest.fixture
def netsim_provider() -> Any:
    """The provider the tunnel fixtures run: a `PacketTunnelProvider` subclass or its ``"module:Class"`` spec.

    Override in a conftest for a suite-wide default; ``@pytest.mark.netsim(provider=...)`` wins over it.
    """
    from netsim.runtime.forwarding import HelperForwardingProvider

    return HelperForwardingProvider


@pytest.fixture
def netsim_provider_configuration() -> Mapping[str, Any] | None:
    """Apple's ``providerConfiguration`` for the provider (netsim adds its own ``helper_socket``)."""
    return None


@pytest.fixture
def netsim_policy() -> str | os.PathLike[str] | None:
    """The helper's bypass policy: TOML text (a `str`) or a file (`os.PathLike`); None tunnels everything."""
    return None


def _backend_kwargs(
    request: pytest.FixtureRequest, provider: Any, configuration: Mapping[str, Any] | None, policy: Any
) -> dict[str, Any]:
    """The shared backend parameters (docs/lab.md): the fixtures' values, overridden by the closest marker.

    Only parameters that are set are passed, so either backend's own defaults apply. A marker's ``policy`` is a
    file path, relative to the test file (marker arguments are written next to the test, like a fixture file).
    """
    mark = _marker(request)
    provider = mark.get("provider", provider)
    configuration = mark.get("provider_configuration", configuration)
    if "policy" in mark:
        path = Path(mark["policy"])
        policy = path if path.is_absolute() else Path(request.node.path).parent / path
    kwargs: dict[str, Any] = {"provider": provider}
    if configuration is not None:
        kwargs["provider_configuration"] = configuration
    if policy is not None:
        kwargs["policy"] = policy
    return kwargs


def _system_tasks() -> set[trio.lowlevel.Task]:
    """Tasks in trio's system nursery: where ``spawn_system_task`` puts tasks that no nursery of the test owns."""
    root = trio.lowlevel.current_root_task()
    if root is None:
        return set()
    return {task for nursery in root.child_nurseries for task in nursery.child_tasks}


def _trio_leaks(before: set[trio.lowlevel.Task]) -> list[str]:
    leaked = _system_tasks() - before
    return [f"trio system tasks still running: {sorted(t.name for t in leaked)}"] if leaked else []


@pytest.fixture
async def netsim_memory_tunnel(
    request: pytest.FixtureRequest,
    netsim_provider: Any,
    netsim_provider_configuration: Mapping[str, Any] | None,
    netsim_policy: str | os.PathLike[str] | None,
) -> AsyncIterator[Any]:
    """The in-memory tunnel (`MemoryTunnel`) with the user's provider, CONNECTED; no root needed.

    On teardown it fails the test if the provider left fds, child processes or trio system tasks behind.
    """
    from netsim.testing.memory_tunnel import memory_tunnel

    leaks, tasks = LeakCheck(), _system_tasks()
    async with memory_tunnel(
        **_backend_kwargs(request, netsim_provider, netsim_provider_configuration, netsim_policy)
    ) as t:
        yield t
    await trio.testing.wait_all_tasks_blocked()  # let cancelled system tasks finish before counting them
    problems = leaks.problems() + _trio_leaks(tasks)
    assert not problems, "netsim_memory_tunnel left things behind: " + "; ".join(problems)


def _pcap_root(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    option = config.getoption("--netsim-pcap-dir")
    root = Path(option) if option else factory.getbasetemp() / "netsim-pcaps"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _new_dir(root: Path, name: str) -> Path:
    """A new directory ``root/<name>`` (``<name>-2``, ... when taken: a kept one from another module stays)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
    for n in range(1, 1000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free pcap directory for {name!r} under {root}")


@pytest.fixture
def netsim_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fresh `Lab` with services and per-link pcaps (root tier), torn down and leak-checked after the test.

    Its pcap directory (`Lab.pcap_dir`) is removed when the test passed and kept, its path in the failure
    report and the run's summary, when it failed.
    """
    from netsim.lab.lab import Lab

    require_root()
    require_binary(*LAB_BINARIES)
    pcap_dir = _new_dir(Path(os.path.realpath(_pcap_root(request.config, tmp_path_factory))), request.node.name)
    request.node.stash[_PCAP_DIR] = pcap_dir
    before, leaks = root_snapshot(), LeakCheck()
    the_lab = Lab(pcap_dir=pcap_dir)
    with the_lab:
        yield the_lab
    problems = leaks.problems([the_lab.run_id]) + before.diff(root_snapshot())
    report = request.node.stash.get(_CALL_REPORT, None)
    if report is not None and report.passed and not problems:
        shutil.rmtree(pcap_dir, ignore_errors=True)
    else:
        request.config.stash[_KEPT].append((request.node.nodeid, pcap_dir))
    assert not problems, f"netsim_lab left things behind (pcaps kept in {pcap_dir}): " + "; ".join(problems)


@pytest.fixture
def netsim_tunnel_gate() -> None:
    """The lab tunnel's gate (wireguard-go and wg on PATH), in a sync fixture so a skip keeps its reason.

    Under pytest-trio a skip raised in an async fixture is reported without its reason.
    """
    require_binary(*TUNNEL_BINARIES)


@pytest.fixture
async def netsim_lab_tunnel(  # noqa: PLR0917 - pytest passes fixtures by name
    request: pytest.FixtureRequest,
    netsim_tunnel_gate: None,
    netsim_lab: Any,
    netsim_provider: Any,
    netsim_provider_configuration: Mapping[str, Any] | None,
    netsim_policy: str | os.PathLike[str] | None,
) -> AsyncIterator[Any]:
    """`netsim_tunnel` in ``netsim_lab`` with the user's provider, CONNECTED (root tier; needs wireguard-go).

    On teardown (after the tunnel's processes stopped) it fails the test if trio system tasks are left; the
    lab fixture then checks fds, processes, namespaces and the root namespace.
    """
    from netsim.lab.tunnel import netsim_tunnel

    tasks = _system_tasks()
    kwargs = _backend_kwargs(request, netsim_provider, netsim_provider_configuration, netsim_policy)
    async with netsim_tunnel(netsim_lab, **kwargs) as t:
        yield t
    await trio.testing.wait_all_tasks_blocked()
    problems = _trio_leaks(tasks)
    assert not problems, "netsim_lab_tunnel left things behind: " + "; ".join(problems)
