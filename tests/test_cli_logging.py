"""``-v``/``-q``/``--log-format`` on every ``netsim`` command, through the standard `logging` module (issue 14)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from netsim.cli import main
from netsim.runtime.logs import configure_logging, verbosity_level

POLICY = Path(__file__).resolve().parents[1] / "examples" / "policy.toml"
EXPLAIN = ("explain", "--policy", str(POLICY), "--dst", "203.0.113.20", "--dport", "80")


def _netsim(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "netsim", *argv],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "COLUMNS"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize(
    "argv",
    [
        ("-v", "--log-format", "json", *EXPLAIN),
        (*EXPLAIN, "-v", "--log-format", "json"),
        ("-v", *EXPLAIN, "--log-format=json"),
    ],
    ids=["group", "subcommand", "mixed"],
)
def test_verbose_json_logs_one_object_per_line_on_stderr(argv: tuple[str, ...]) -> None:
    proc = _netsim(*argv)
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON
    policy = [r for r in records if r["logger"] == "netsim.policy"]
    assert len(policy) == 1 and policy[0]["level"] == "info", proc.stderr
    assert policy[0]["msg"].endswith("4 rules, default TUNNEL, mechanism nat"), policy
    assert {"ts", "level", "logger", "msg"} <= set(policy[0])
    assert "BYPASS: rule #0 'direct-host'" in proc.stdout and "{" not in proc.stdout  # output stays on stdout


def test_text_is_the_default_format_and_vv_adds_debug() -> None:
    proc = _netsim("-vv", *EXPLAIN)
    lines = proc.stderr.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) netsim[.\w]*: ", x) for x in lines)
    policy = r"\S+ INFO netsim\.policy: policy .*policy\.toml: 4 rules, default TUNNEL, mechanism nat"
    assert [x for x in lines if re.fullmatch(policy, x)], proc.stderr


@pytest.mark.parametrize(
    "argv", [EXPLAIN, ("-q", *EXPLAIN), ("-v", *EXPLAIN, "-q"), ("-q", "-v", "--log-format", "json", *EXPLAIN)]
)
def test_quiet_and_the_default_leave_info_out(argv: tuple[str, ...]) -> None:
    proc = _netsim(*argv)
    assert proc.stderr == "", proc.stderr
    assert "counter: policy_bypass:direct-host" in proc.stdout


def test_the_demo_logs_its_steps() -> None:
    proc = _netsim("-v", "--log-format", "json", "demo", "--memory")
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    demo = [r["msg"] for r in records if r["logger"] == "netsim.demo"]
    assert demo[0].startswith("the in-memory backend"), demo
    assert "4 of 4 probes succeeded" in demo, demo
    assert "all 4 probes succeeded" in proc.stdout


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in group.commands.items():
        out.append(((*path, name), command))
        if isinstance(command, click.Group):
            out += _commands(command, (*path, name))
    return out


def test_every_command_takes_the_logging_options_except_pass_through_and_helper() -> None:
    def opts(command: click.Command) -> set[str]:
        return {o for p in command.params for o in p.opts}

    logging_opts = {"-v", "--verbose", "-q", "--quiet", "--log-format"}
    assert logging_opts <= opts(main)
    commands = _commands(main)
    assert {("explain",), ("lab", "up"), ("lab", "status"), ("demo",), ("helper",), ("bench",), ("examples",)} <= {
        p for p, _ in commands
    }
    for path, command in commands:
        if path == ("lab", "exec"):  # `netsim lab exec mac ping -q host`: -q is ping's (group options still work)
            assert not logging_opts & opts(command)
        elif path == ("helper",):  # JSON lines at its own --log-level (the lab reads them)
            assert "--log-level" in opts(command) and not logging_opts & opts(command)
        else:
            assert logging_opts <= opts(command), path


def test_lab_exec_passes_dash_v_through_to_its_command() -> None:
    lab = main.commands["lab"]
    assert isinstance(lab, click.Group)
    ctx = lab.commands["exec"].make_context("exec", ["mac", "ping", "-v", "-q", "host"])
    assert ctx.params["command"] == ("ping", "-v", "-q", "host")


def test_verbosity_levels() -> None:
    assert verbosity_level() == logging.WARNING
    assert [verbosity_level(v) for v in (1, 2, 5)] == [logging.INFO, logging.DEBUG, logging.DEBUG]
    assert [verbosity_level(0, q) for q in (1, 2, 5)] == [logging.ERROR, logging.CRITICAL, logging.CRITICAL]
    assert verbosity_level(2, 1) == logging.INFO


def test_configure_logging_replaces_its_handler_and_writes_to_the_current_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger = logging.getLogger("netsim")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        configure_logging(logging.INFO, "json")
        configure_logging(logging.INFO, "json")
        assert len(logger.handlers) == 1
        logging.getLogger("netsim.test").info("hello %s", "there", extra={"run": "ab12"})
        record = json.loads(capsys.readouterr().err)
        assert (record["msg"], record["run"], record["logger"]) == ("hello there", "ab12", "netsim.test")
        with pytest.raises(ValueError, match="log format"):
            configure_logging(logging.INFO, "xml")  # type: ignore[arg-type]
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
