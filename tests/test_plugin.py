"""The pytest plugin as a user meets it: docs/testing.md's suite, run in a fresh pytest process outside netsim's tree.

The files are extracted from the doc (so the doc cannot drift from what works), written to a tmp dir with no
netsim conftest above it, and run with ``python -m pytest -p no:cacheprovider``; the plugin comes in through its
``pytest11`` entry point only. Variants add a leaking provider (the leak checks must fail it, naming the leak)
and a failing lab test (its pcaps must be kept and named).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from netsim.testing.require import require_binary, require_root

DOC = Path(__file__).parents[1] / "docs" / "testing.md"
_FILE_BLOCK = re.compile(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", re.S)
_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected)")

LEAKY = '''
import os
import subprocess

import pytest
import trio

from my_provider import CountingProvider


class SystemTaskProvider(CountingProvider):
    """Starts a task no nursery owns: it keeps running after the tunnel stopped."""

    async def start_tunnel(self, options):
        async def poll():
            await trio.sleep_forever()

        trio.lowlevel.spawn_system_task(poll, name="leaky.poll")
        await super().start_tunnel(options)


class ChildProvider(CountingProvider):
    """Starts a child process and never waits for it."""

    async def start_tunnel(self, options):
        child = subprocess.Popen(["sleep", "20"])
        with open(os.environ["LEAKY_PIDS"], "a") as f:
            f.write(f"{child.pid}\\n")
        await super().start_tunnel(options)


OPENED = []


class FdProvider(CountingProvider):
    """Opens a file and never closes it (a module-level cache keeps it open after the provider is gone)."""

    async def start_tunnel(self, options):
        OPENED.append(open(os.devnull, "rb"))
        await super().start_tunnel(options)


@pytest.mark.netsim(provider=SystemTaskProvider)
async def test_system_task(netsim_memory_tunnel):
    pass


@pytest.mark.netsim(provider="test_leaky:ChildProvider")
async def test_child(netsim_memory_tunnel):
    pass


@pytest.mark.netsim(provider=FdProvider)
async def test_fd(netsim_memory_tunnel):
    pass


@pytest.mark.netsim(polcy="block_ping.toml")
async def test_typo_in_marker(netsim_memory_tunnel):
    pass
'''

FAILING_LAB = """
async def test_fails_after_a_ping(netsim_lab_tunnel):
    probe = await netsim_lab_tunnel.run_probe("ping", ("ping", "-c", "1", "-W", "2", "203.0.113.10"))
    assert probe.ok and probe.path == "tunnel"
    assert False, "deliberate failure"
"""


def _suite(tmp_path: Path, **extra: str) -> Path:
    files = dict(_FILE_BLOCK.findall(DOC.read_text()))
    assert {"my_provider.py", "conftest.py", "pytest.ini", "test_my_vpn.py"} <= set(files), files.keys()
    root = tmp_path / "user-suite"
    root.mkdir()
    for name, text in {**files, **extra}.items():
        (root / name).write_text(text)
    return root


def _pytest(root: Path, *args: str, timeout: float, env: dict[str, str] | None = None) -> tuple[dict[str, int], str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args],
        cwd=root,
        check=False,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1]
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in _COUNTS.findall(summary)}
    return counts, out


def test_the_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "netsim"]
    assert ep.value == "netsim.testing.plugin"


def test_the_docs_suite_passes_in_a_fresh_pytest(tmp_path: Path) -> None:
    root = _suite(tmp_path)
    counts, out = _pytest(root, "-k", "not lab", timeout=120)
    assert counts == {"passed": 3, "deselected": 1}, out
    assert "netsim pcaps" not in out


def test_leak_checks_fail_a_provider_that_leaves_a_task_a_child_or_an_fd(tmp_path: Path) -> None:
    root = _suite(tmp_path, **{"test_leaky.py": LEAKY})
    pids = tmp_path / "pids"
    pids.touch()
    try:
        counts, out = _pytest(root, "test_leaky.py", timeout=120, env={"LEAKY_PIDS": str(pids)})
    finally:
        for pid in pids.read_text().split():  # the sleeps we made the provider start: stop them by pid
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert counts.get("failed", 0) + counts.get("error", 0) == 4, out
    assert "netsim_memory_tunnel left things behind: trio system tasks still running: ['leaky.poll']" in out, out
    assert re.search(r"left things behind: leaked child processes: \[\d+\]", out), out
    assert re.search(r"left things behind: leaked fds: \['\d+->/dev/null'\]", out), out
    assert re.search(r"FAILED test_leaky.py::test_child\b", out) and re.search(r"FAILED test_leaky.py::test_fd\b", out)
    assert "@pytest.mark.netsim takes only ['policy', 'provider', 'provider_configuration']: ['polcy']" in out, out


@pytest.mark.lab
@pytest.mark.timeout(400)
def test_the_docs_suite_lab_tier_and_a_failing_lab_test_keeps_its_pcaps(tmp_path: Path) -> None:
    require_root()
    require_binary("ip", "nft", "iperf3", "tcpdump", "wireguard-go", "wg", "curl", "ping")
    root = _suite(tmp_path, **{"test_failing_lab.py": FAILING_LAB})
    pcaps = tmp_path / "pcaps"
    counts, out = _pytest(root, "--netsim-pcap-dir", str(pcaps), timeout=360)
    assert counts == {"passed": 4, "failed": 1}, out
    kept = pcaps / "test_fails_after_a_ping"
    assert f"pcaps kept in {kept}" in out, out
    assert f"test_failing_lab.py::test_fails_after_a_ping: {kept}" in out, out
    names = sorted(p.name for p in kept.glob("*.pcap"))
    assert {"mac-en0.pcap", "isp-wan.pcap", "vpn-wan.pcap", "vpn-wg.pcap"} <= set(names), names
    assert (kept / "mac-en0.pcap").stat().st_size > 24  # more than the pcap file header: packets were recorded
    # the passing lab test's directory is gone
    assert sorted(p.name for p in pcaps.iterdir()) == ["test_fails_after_a_ping"]


def test_leak_check_sees_the_first_fd_opened_after_it() -> None:
    """Regression: the snapshot included the fd ``os.listdir`` used for itself, the lowest free number, which is
    exactly the number the next ``open`` gets, so the first leaked fd was never reported."""
    from netsim.testing.fixtures import LeakCheck

    leaks = LeakCheck()
    with open(os.devnull, "rb") as f:
        assert f"leaked fds: ['{f.fileno()}->/dev/null']" in leaks.problems()
    assert leaks.problems() == []


@pytest.mark.parametrize("required", [False, True])
def test_the_lab_tunnel_gate_skips_with_its_reason_or_fails_when_required(tmp_path: Path, required: bool) -> None:
    """The root tier's gate as a user sees it: wireguard-go missing from PATH (stand-ins for the other binaries,
    which the gate only looks up), so the docs' lab test is skipped saying what is missing, or fails under
    ``NETSIM_REQUIRE_PRIVILEGED=1``. The gate runs before any lab exists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ip", "nft", "iperf3", "tcpdump", "wg"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    root = _suite(tmp_path)
    env = {"PATH": str(bin_dir), "NETSIM_REQUIRE_PRIVILEGED": "1" if required else "0", "CI": ""}
    counts, out = _pytest(root, "-k", "lab", timeout=120, env=env)
    reason = "needs 'wireguard-go' on PATH"
    if required:
        assert counts == {"error": 1, "deselected": 3}, out  # a failing fixture: a setup error
        assert f"NETSIM_REQUIRE_PRIVILEGED is set: {reason}" in out, out
    else:
        assert counts == {"skipped": 1, "deselected": 3}, out
        assert reason in out, out


def test_a_repeated_test_name_gets_its_own_pcap_dir_and_a_kept_one_stays(tmp_path: Path) -> None:
    from netsim.testing.plugin import _new_dir

    kept = _new_dir(tmp_path, "test_x[v4 nat]")
    (kept / "mac-en0.pcap").write_bytes(b"kept")
    again = _new_dir(tmp_path, "test_x[v4 nat]")
    assert (kept.name, again.name) == ("test_x_v4_nat_", "test_x_v4_nat_-2")
    assert (kept / "mac-en0.pcap").read_bytes() == b"kept"
