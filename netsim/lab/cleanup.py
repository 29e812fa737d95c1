"""Run files and `netsim clean`: find labs whose owner died and remove exactly what they created.

Lessons followed (docs/reliability.md, lesson B10): cleanup that matches too broadly deletes other people's objects
(Mininet #877/#1174), so everything is found through a run file written *before* the first object is created, and only
names carrying ``netsim-<run>-`` are touched; pids are checked against their recorded start time so a reused pid is
never signalled; processes in a namespace are killed before the namespace is deleted (WireGuard netns.sh).

What a run may leave on disk, all named after the run so it is found without broad matching: the run file
``/run/netsim/<run>.json`` and log dir ``/run/netsim/<run>/``; a tunnel's helper socket dir
``/run/netsim/helper-<run>/`` and config dir ``/run/netsim/tunnel-<run>-*/`` (``client.conf``: the WireGuard
private key, docs/reliability.md R3); ``/etc/netns/netsim-<run>-*``; wireguard-go sockets ``ns<run>*.sock``; a SIGKILLed
provider's tunnel claim ``/run/netsim/tunnels/netsim-<run>-*.lock`` (`netsim.runtime.netconfig`); the Mac
resolver's state ``/run/netsim/dns/netsim-<run>-*/`` (`netsim.runtime.resolver`: system.json, a crashed
provider's tunnel.json, stats.json); and, from
versions that kept the tunnel config in the temp dir, ``$TMPDIR/netsim-<run>-tunnel-*``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netsim.errors import LabError
from netsim.lab.netns import delete_netns, list_netns, pids_in_netns
from netsim.lab.process import ProcessInfo, process_start_time
from netsim.runtime.netconfig import TUNNEL_LOCK_DIR
from netsim.runtime.resolver import DNS_STATE_DIR

__all__ = [
    "DNS_STATE_DIR",
    "RUN_DIR",
    "CleanReport",
    "RunRecord",
    "clean",
    "find_runs",
    "helper_dir",
    "invoking_uid",
    "owner_alive",
    "remove_run",
    "tunnel_dir_prefix",
]

RUN_DIR = Path("/run/netsim")
ETC_NETNS = Path("/etc/netns")
WG_SOCK_DIR = Path("/var/run/wireguard")
NS_PREFIX = "netsim-"


def helper_dir(run_id: str) -> Path:
    """The helper's socket directory for a lab tunnel of ``run_id`` (created by `netsim.lab.tunnel`)."""
    return RUN_DIR / f"helper-{run_id}"


def tunnel_dir_prefix(run_id: str) -> str:
    """Name prefix, inside `RUN_DIR`, of a lab tunnel's config directory (``client.conf``, policy file)."""
    return f"tunnel-{run_id}-"


def _dir_run_ids() -> set[str]:
    """Run ids named by helper/tunnel directories (`_run_dirs`), whatever their run file says."""
    names = [p.name.removeprefix("helper-") for p in RUN_DIR.glob("helper-*")]
    names += [p.name.split("-")[1] for p in RUN_DIR.glob("tunnel-*-*")]
    names += [p.name.split("-")[1] for p in Path(tempfile.gettempdir()).glob(f"{NS_PREFIX}*-tunnel-*")]
    names += [p.name.split("-")[1] for p in DNS_STATE_DIR.glob(f"{NS_PREFIX}*-*")]
    return {n for n in names if n.isascii() and n.isalnum() and n.islower() and len(n) <= 6}


def _run_dirs(run_id: str) -> list[Path]:
    """Directories of ``run_id`` besides its log dir: helper socket dir, tunnel config dirs (and legacy ones), the
    Mac resolver's state dirs."""
    dirs = [helper_dir(run_id), *RUN_DIR.glob(f"{tunnel_dir_prefix(run_id)}*")]
    dirs += DNS_STATE_DIR.glob(f"{NS_PREFIX}{run_id}-*")
    dirs += Path(tempfile.gettempdir()).glob(f"{NS_PREFIX}{run_id}-tunnel-*")  # before the config moved to RUN_DIR
    return [d for d in dirs if d.is_dir() and not d.is_symlink()]


@dataclass
class RunRecord:
    """The run file ``/run/netsim/<run>.json``: who owns the lab and what it created."""

    run_id: str
    owner_pid: int
    owner_start: int | None
    created: float
    namespaces: list[str]
    processes: list[ProcessInfo] = field(default_factory=list)
    pcap_dir: str | None = None
    cli: bool = False
    owner_uid: int | None = None  # `invoking_uid` of the owner; None in run files of older versions

    @property
    def path(self) -> Path:
        return RUN_DIR / f"{self.run_id}.json"

    @property
    def log_dir(self) -> Path:
        return RUN_DIR / self.run_id

    def save(self) -> None:
        """Write atomically (rename), so a reader never sees half a file."""
        RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        data: dict[str, Any] = json.loads(path.read_text())
        procs = [ProcessInfo(**{**p, "argv": tuple(p["argv"])}) for p in data.pop("processes", [])]
        return cls(**data, processes=procs)


def invoking_uid() -> int:
    """The user a lab belongs to: the user behind ``sudo`` (``SUDO_UID``) when set, else the real uid.

    Only used to pick "your" lab when ``netsim lab exec/down`` get no ``--run``; not an access control (every
    lab command runs as root).
    """
    sudo = os.environ.get("SUDO_UID", "")
    return int(sudo) if sudo.isdigit() else os.getuid()


def owner_alive(record: RunRecord) -> bool:
    """True if the process that created the run still exists (same pid *and* start time)."""
    start = process_start_time(record.owner_pid)
    return start is not None and (record.owner_start is None or start == record.owner_start)


def find_runs() -> list[RunRecord]:
    """Every readable run file (unreadable ones are skipped: they may be mid-write by another lab)."""
    runs = []
    try:
        paths = sorted(RUN_DIR.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            runs.append(RunRecord.load(path))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return runs


def _kill(pid: int, start_time: int | None) -> bool:
    now = process_start_time(pid)
    if now is None or (start_time is not None and now != start_time):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while any(process_start_time(p) is not None for p in pids):
        if time.monotonic() > deadline:
            raise LabError(f"processes {pids} did not exit after SIGKILL")
        time.sleep(0.005)


def remove_run(run_id: str, namespaces: list[str], processes: list[ProcessInfo]) -> list[str]:
    """Remove everything a run created; returns what was removed (for the report).

    Used by `Lab` teardown as the last resort and by `clean`. Only names with ``netsim-<run_id>-`` are touched.
    """
    prefix = f"{NS_PREFIX}{run_id}-"
    removed: list[str] = []
    killed = [p.pid for p in processes if _kill(p.pid, p.start_time)]
    own_ns = [ns for ns in namespaces if ns.startswith(prefix)] + [
        ns for ns in list_netns(prefix) if ns not in namespaces
    ]
    for ns in own_ns:
        for pid in pids_in_netns(ns):
            if pid != os.getpid() and _kill(pid, None):
                killed.append(pid)
    _wait_gone(killed)
    removed += [f"process {pid}" for pid in killed]
    for ns in own_ns:
        if delete_netns(ns):
            removed.append(f"netns {ns}")
    for etc in ETC_NETNS.glob(f"{prefix}*") if ETC_NETNS.exists() else []:
        shutil.rmtree(etc, ignore_errors=True)
        removed.append(f"dir {etc}")
    if WG_SOCK_DIR.exists():
        for sock in [*WG_SOCK_DIR.glob(f"{prefix}*.sock"), *WG_SOCK_DIR.glob(f"ns{run_id}*.sock")]:
            sock.unlink(missing_ok=True)
            removed.append(f"socket {sock}")
    # tunnel ownership claims (netsim.runtime.netconfig) a SIGKILLed provider could not unlink
    for lock in TUNNEL_LOCK_DIR.glob(f"{prefix}*.lock") if TUNNEL_LOCK_DIR.exists() else []:
        lock.unlink(missing_ok=True)
        removed.append(f"lock {lock}")
    for directory in _run_dirs(run_id):
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"dir {directory}")
    shutil.rmtree(RUN_DIR / run_id, ignore_errors=True)
    path = RUN_DIR / f"{run_id}.json"
    if path.exists():
        path.unlink()
        removed.append(f"run file {path}")
    return removed


@dataclass
class CleanReport:
    """What `clean` did and what it left alone (and why)."""

    removed: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


def clean(run_id: str | None = None, *, force: bool = False, orphans: bool = False) -> CleanReport:
    """Remove stale labs: runs whose owner pid is gone (or ``run_id`` with ``force=True`` even if alive).

    Namespaces named ``netsim-*`` without any run file are only reported, unless ``orphans=True``, because another
    tool may own them.
    """
    report = CleanReport()
    runs = find_runs()
    known = {r.run_id for r in runs}
    for run in runs:
        if run_id is not None and run.run_id != run_id:
            continue
        if owner_alive(run) and not force:
            report.active.append(run.run_id)
            continue
        report.removed += remove_run(run.run_id, run.namespaces, run.processes)
    for stale_id in sorted(_dir_run_ids() - known):
        # A live lab claims its run file before it creates anything, and removes it last: a helper or tunnel
        # dir whose run has no run file is a dead run's (e.g. SIGKILLed during teardown). Ours by name: removed.
        if run_id is None or stale_id == run_id:
            for directory in _run_dirs(stale_id):
                shutil.rmtree(directory, ignore_errors=True)
                report.removed.append(f"dir {directory}")
    for ns in list_netns(NS_PREFIX):
        parts = ns.split("-")
        if len(parts) < 3 or parts[1] in known:
            continue
        if run_id is not None and parts[1] != run_id:
            continue
        if orphans:
            report.removed += remove_run(parts[1], [], [])
        else:
            report.orphans.append(ns)
    return report
