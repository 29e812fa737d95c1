"""The one runner of short commands in a namespace, and the one check that netsim only touches its own."""

from __future__ import annotations

import sys

import pytest
import trio

from netsim.core.killswitch import is_physical_interface
from netsim.errors import LabError
from netsim.transports.netns import (
    netns_exec_argv,
    require_lab_netns,
    run_netns_command,
    run_netns_command_async,
)


@pytest.mark.parametrize("name", ["", "root", "default", "netsim", "mynetsim-x-mac", "user-netsim-1"])
def test_only_netsim_namespaces_are_accepted(name: str) -> None:
    with pytest.raises(LabError, match=r"refusing to engage a kill switch in namespace .*netsim-\*"):
        require_lab_netns(name, "engage a kill switch")


def test_a_lab_namespace_is_accepted() -> None:
    require_lab_netns("netsim-ab12-mac", "configure a tunnel")


def test_argv_without_a_namespace_runs_here() -> None:
    assert netns_exec_argv(None, ["nft", "-f", "-"]) == ["nft", "-f", "-"]
    assert netns_exec_argv("netsim-a-mac", ["nft"]) == ["ip", "netns", "exec", "netsim-a-mac", "nft"]


def test_stdin_reaches_the_command_and_stdout_comes_back() -> None:
    done = run_netns_command(None, [sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])"], stdin="abc")
    assert (done.returncode, done.stdout.strip()) == (0, "cba")


def test_a_failing_command_names_itself_and_its_stderr() -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('no such table'); sys.exit(3)"]
    with pytest.raises(LabError, match=r"failed with status 3: no such table"):
        run_netns_command(None, argv)
    assert run_netns_command(None, argv, check=False).returncode == 3


def test_a_hung_command_is_bounded() -> None:
    with pytest.raises(LabError, match=r"did not finish within 0\.2 s"):
        run_netns_command(None, [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.2)


def test_a_missing_program_is_a_lab_error() -> None:
    with pytest.raises(LabError, match="could not run"):
        run_netns_command(None, ["/nonexistent/netsim-no-such-tool"])


def test_the_async_runner_behaves_the_same() -> None:
    async def main() -> None:
        done = await run_netns_command_async(None, [sys.executable, "-c", "print('ok')"])
        assert done.stdout.strip() == "ok"
        with pytest.raises(LabError, match="failed with status 2"):
            await run_netns_command_async(None, [sys.executable, "-c", "raise SystemExit(2)"])
        with pytest.raises(LabError, match=r"did not finish within 0\.2 s"):
            await run_netns_command_async(None, [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.2)

    trio.run(main)


@pytest.mark.parametrize(
    ("name", "physical"), [("en0", True), ("eth0", True), ("lo", False), ("utun0", False), ("utun12", False)]
)
def test_physical_interfaces_are_the_same_for_routes_and_the_kill_switch(name: str, physical: bool) -> None:
    assert is_physical_interface(name) is physical
