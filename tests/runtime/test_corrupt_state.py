"""Corrupted persisted state (row F14): garbage, truncated or hostile content in every file netsim reads back must
not crash anything and must fail closed.

What netsim persists and reads back (docs/reliability.md F14 lists the same):

* lab run files ``/run/netsim/<run>.json`` (`netsim.lab.cleanup.RunRecord`): read by `netsim clean`, ``lab down``,
  ``lab status``. Corrupt: skipped, reported, never acted on unless forced, and then by run-id prefix only;
* the Mac resolver's state ``/run/netsim/dns/<netns>/{system,tunnel,stats}.json`` (`netsim.runtime.resolver`).
  A corrupt ``tunnel.json`` fails closed: SERVFAIL, never the system resolver (it used to fall back to it);
* the tunnel claim ``/run/netsim/tunnels/<netns>.lock`` (`netsim.runtime.netconfig.tunnel_owner`);
* the helper's clock file (tests/runtime/test_sleep_wake.py), IPC token file and WireGuard config.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import dnslib
import pytest
import trio
from click.testing import CliRunner

from netsim.core.resolver import SystemDns, TunnelDns
from netsim.core.wireguard.config import parse_config_bytes
from netsim.errors import ConfigError
from netsim.lab import cleanup
from netsim.lab.cleanup import RunRecord, clean, corrupt_runs, find_runs, helper_dir
from netsim.lab.lab import Lab
from netsim.lab.process import ProcessInfo, process_start_time
from netsim.runtime.netconfig import tunnel_owner
from netsim.runtime.resolver import (
    STATS_FILE,
    SYSTEM_FILE,
    TUNNEL_FILE,
    MacResolver,
    ResolverLimits,
    read_stats,
    write_state_file,
)
from netsim.transports.uds import read_token_file

GARBAGE = {
    "empty": b"",
    "truncated": b'{"version": 1, "kind": "tunnel", "servers": ["10.0',
    "not utf-8": b"\xff\xfe\x00garbage",
    "a list": b"[]",
    "a number": b"1e999999",
    "nul bytes": b"\x00" * 64,
    "deep": b"[" * 100_000,
    "huge": b'{"x": "' + b"a" * (2 << 20) + b'"}',
}


# ------------------------------------------------------------------------------------------------ resolver
async def _record_asked(sock: trio.socket.SocketType, asked: list[str]) -> None:
    """The system resolver's socket: record each name it is asked (it answers nothing; the daemon times out)."""
    while True:
        asked.append(str(dnslib.DNSRecord.parse(await sock.recv(4096)).q.qname).rstrip("."))


def _ask(state: Path, names: list[str], between: dict[int, bytes | None] | None = None) -> tuple[list[str], list[str]]:
    """Resolve ``names`` in turn with the system resolver on 127.0.0.2; before name ``i``, write ``between[i]`` to
    tunnel.json (None: remove it). Returns each answer's rcode name and what the system resolver was asked."""

    async def main() -> tuple[list[str], list[str]]:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.2", 0))
        write_state_file(state / SYSTEM_FILE, SystemDns(("127.0.0.2",)).to_json())
        limits = ResolverLimits(upstream_timeout=0.2)
        resolver = MacResolver(state, [], limits, upstream_port=sock.getsockname()[1])
        codes: list[str] = []
        asked: list[str] = []
        with trio.fail_after(20), sock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_record_asked, sock, asked)
                for i, name in enumerate(names):
                    if between and i in between:
                        content = between[i]
                        if content is None:
                            (state / TUNNEL_FILE).unlink(missing_ok=True)
                        else:
                            (state / TUNNEL_FILE).write_bytes(content)
                    reply = await resolver.resolve(bytes(dnslib.DNSRecord.question(name, "A").pack()))
                    assert reply is not None
                    codes.append(str(dnslib.RCODE.get(dnslib.DNSRecord.parse(reply).header.rcode)))
                await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
        return codes, asked

    return trio.run(main)


@pytest.mark.reliability("F14")
@pytest.mark.parametrize("content", list(GARBAGE.values()), ids=list(GARBAGE))
def test_a_corrupt_tunnel_json_fails_closed_instead_of_leaking_to_the_system_resolver(
    tmp_path: Path, content: bytes
) -> None:
    """Before the fix the daemon ignored the file and sent every name to the system resolver (the ISP) in the
    clear: ``asked`` began with "secret.corp.example"."""
    codes, asked = _ask(tmp_path, ["secret.corp.example", "www.lab.test"], {0: content, 1: None})
    assert codes[0] == "SERVFAIL" and "secret.corp.example" not in asked
    # the positive control: with the file gone, the same daemon sends names to the system resolver
    assert asked == ["www.lab.test"]


@pytest.mark.reliability("F14")
def test_a_hostile_but_parseable_tunnel_json_is_refused_too(tmp_path: Path) -> None:
    good = TunnelDns(servers=("10.0.0.53",), interface="lo", owner_pid=os.getpid()).to_json().encode()
    hostile = good.replace(b'"lo"', b'"lo/../../etc"').replace(b"10.0.0.53", b"not-an-ip")
    codes, asked = _ask(tmp_path, ["a.lab.test"], {0: hostile})
    assert codes == ["SERVFAIL"] and asked == []


@pytest.mark.reliability("F14")
@pytest.mark.parametrize("content", list(GARBAGE.values()), ids=list(GARBAGE))
def test_a_corrupt_system_json_answers_servfail_and_a_corrupt_stats_json_reads_as_empty(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / SYSTEM_FILE).write_bytes(content)
    resolver = MacResolver(tmp_path, [])
    q = dnslib.DNSRecord.question("www.lab.test", "A")
    reply = trio.run(resolver.resolve, bytes(q.pack()))
    assert reply is not None and dnslib.DNSRecord.parse(reply).header.rcode == dnslib.RCODE.SERVFAIL
    (tmp_path / STATS_FILE).write_bytes(content)
    assert read_stats(tmp_path) == {}


# ------------------------------------------------------------------------------------------------ run files
@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setattr(cleanup, "RUN_DIR", d)
    monkeypatch.setattr(cleanup, "DNS_STATE_DIR", tmp_path / "dns")
    monkeypatch.setattr(cleanup, "TUNNEL_LOCK_DIR", tmp_path / "locks")
    return d


def _rid() -> str:
    return "c" + secrets.token_hex(2)


def _hostile(victim: str) -> dict[str, bytes]:
    """Run files that parse as JSON but must not be trusted: another run's id, foreign namespaces, bad types."""
    base = '"owner_pid": 4000000, "owner_start": null, "created": 0'
    return {
        "other run's id": f'{{"run_id": "{victim}", {base}, "namespaces": ["netsim-{victim}-mac"]}}'.encode(),
        "namespaces not strings": f'{{"run_id": "RID", {base}, "namespaces": [1, null]}}'.encode(),
        "pid a string": b'{"run_id": "RID", "owner_pid": "1", "owner_start": null, "created": 0, "namespaces": []}',
        "process pid 0": f'{{"run_id": "RID", {base}, "namespaces": [], "processes": '
        '[{"name": "x", "role": "mac", "pid": 0, "start_time": null, "argv": []}]}'.encode(),
        "unknown field": f'{{"run_id": "RID", {base}, "namespaces": [], "rm": "-rf /"}}'.encode(),
    }


@pytest.mark.reliability("F14")
def test_corrupt_run_files_crash_nothing_and_clean_leaves_them_and_other_runs_alone(run_dir: Path) -> None:
    """Before the fix a run file holding ``[]`` or a number crashed find_runs (AttributeError: no ``pop``), so
    ``netsim clean``, ``lab down`` and ``lab status`` died with a traceback."""
    victim = _rid()  # a live lab whose directory must survive everything below
    RunRecord(victim, os.getpid(), process_start_time(os.getpid()), time.time(), []).save()
    helper_dir(victim).mkdir()
    bad: dict[str, str] = {}
    for label, content in [*GARBAGE.items(), *_hostile(victim).items()]:
        rid = _rid()
        (run_dir / f"{rid}.json").write_bytes(content.replace(b"RID", rid.encode()))
        bad[rid] = label
    assert [r.run_id for r in find_runs()] == [victim]  # the positive control: a good file still loads
    assert set(corrupt_runs()) == set(bad), bad
    report = clean()
    assert set(report.corrupt) == set(bad)
    assert report.active == [victim] and report.removed == []
    assert helper_dir(victim).exists() and all((run_dir / f"{rid}.json").exists() for rid in bad)


@pytest.mark.reliability("F14")
def test_forced_clean_of_a_corrupt_run_removes_its_own_prefix_only(run_dir: Path) -> None:
    rid, other = _rid(), _rid()
    (run_dir / f"{rid}.json").write_bytes(_hostile(other)["other run's id"])
    helper_dir(rid).mkdir()
    helper_dir(other).mkdir()
    report = clean(rid, force=True)
    assert not (run_dir / f"{rid}.json").exists() and not helper_dir(rid).exists()
    assert helper_dir(other).exists()  # named in the file, and never touched
    assert f"dir {helper_dir(rid)}" in report.removed


@pytest.mark.parametrize("rid", ["8666", "0", "123456", "a1b2"])
def test_a_run_id_of_digits_is_a_run_id(run_dir: Path, rid: str) -> None:
    """Regression (found by CI): a random run id is 4 hex digits, all decimal one time in seven. ``"8666".islower()``
    is False, so such a lab's run file read as corrupt: ``netsim lab fault --run 8666`` said "no running lab" and
    the F3 lab test crashed nothing."""
    RunRecord(rid, os.getpid(), process_start_time(os.getpid()), time.time(), [f"netsim-{rid}-mac"]).save()
    assert [r.run_id for r in find_runs()] == [rid] and corrupt_runs() == []
    helper_dir(rid).mkdir()
    assert cleanup._dir_run_ids() == {rid}
    Lab(run_id=rid)  # accepted as a run id (only checked; nothing is brought up)
    for bad in ("", "ABC", "a-b", "1234567", "é"):
        assert not cleanup.valid_run_id(bad)


@pytest.mark.reliability("F14")
def test_a_saved_run_file_round_trips(run_dir: Path) -> None:
    rid = _rid()
    proc = ProcessInfo("helper", "mac", os.getpid(), process_start_time(os.getpid()), ("python", "-m", "x"))
    record = RunRecord(rid, os.getpid(), None, time.time(), [f"netsim-{rid}-mac"], [proc], None, True, 0)
    record.save()
    assert RunRecord.load(record.path) == record


@pytest.mark.reliability("F14")
@pytest.mark.skipif(os.geteuid() != 0, reason="netsim lab commands need root")
def test_lab_down_and_status_with_a_corrupt_run_file_fail_cleanly(run_dir: Path) -> None:
    from netsim.cli import main

    rid = _rid()
    (run_dir / f"{rid}.json").write_bytes(b"[]")
    down = CliRunner().invoke(main, ["lab", "down", "--run", rid])
    assert down.exit_code != 0 and isinstance(down.exception, SystemExit), (down.exception, down.output)
    assert f"no running lab {rid!r}" in down.output
    assert (run_dir / f"{rid}.json").exists()  # down acted on nothing


# ------------------------------------------------------------------------------------------------ other files
@pytest.mark.reliability("F14")
@pytest.mark.parametrize("content", [b"\xff\xfe", b"\xc2\xb2", b"9" * 5000, b"-1", b"12 34", b""])
def test_a_garbled_tunnel_claim_names_no_owner(tmp_path: Path, content: bytes) -> None:
    """Before the fix ``\\xff\\xfe`` raised UnicodeDecodeError and "²" (a digit to isdigit) ValueError from int():
    ``netsim_tunnel`` died on them instead of starting."""
    (tmp_path / "netsim-x-mac.lock").write_bytes(content)
    assert tunnel_owner("netsim-x-mac", lock_dir=tmp_path) is None
    (tmp_path / "netsim-x-mac.lock").write_text(f"{os.getpid()}\n")  # the positive control
    assert tunnel_owner("netsim-x-mac", lock_dir=tmp_path) == os.getpid()


@pytest.mark.reliability("F14")
@pytest.mark.parametrize("content", [b"", b"\n\n", b"x" * 5000])
def test_a_garbled_token_file_or_wireguard_config_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ipc.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(ConfigError):
        read_token_file(path)
    for config in (content, b"\xff\xfe[Interface]", b"[Interface]\nPrivateKey = " + b"A" * 5000):
        with pytest.raises(ConfigError):
            parse_config_bytes(config, source="client.conf")


@pytest.mark.reliability("F14")
@pytest.mark.skipif(os.geteuid() != 0, reason="netsim clean needs root")
def test_netsim_clean_names_a_corrupt_run_and_keeps_it(run_dir: Path) -> None:
    from netsim.cli import main

    rid = _rid()
    (run_dir / f"{rid}.json").write_bytes(b"\x00garbage")
    out = CliRunner().invoke(main, ["clean", "--run", rid])
    assert out.exit_code == 0 and f"kept run {rid}: its run file is corrupt" in out.output, out.output
    assert (run_dir / f"{rid}.json").exists()
    out = CliRunner().invoke(main, ["clean", "--run", rid, "--force"])
    assert out.exit_code == 0 and f"removed run file {run_dir / rid}.json" in out.output, out.output
