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
import re
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
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
    "corrupt_runs",
    "find_runs",
    "helper_dir",
    "invoking_uid",
    "owner_alive",
    "remove_run",
    "tunnel_dir_prefix",
    "valid_run_id",
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
    return {n for n in names if valid_run_id(n)}


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
        """Read a run file; any content that is not exactly what `save` writes is a `ValueError`.

        The file is untrusted (docs/reliability.md F14): bounded (`MAX_RUN_FILE`), every field type-checked, and
        its ``run_id`` must be a run id and the file's own name, so a garbled file can never send `clean` after
        another run's objects.
        """
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_RUN_FILE + 1)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
        if len(raw) > MAX_RUN_FILE:
            raise ValueError(f"{path}: more than {MAX_RUN_FILE} bytes")
        try:
            data = json.loads(raw)  # ValueError (UnicodeDecodeError included) for garbage
        except RecursionError:  # "[[[[..." nested past the parser's depth
            raise ValueError(f"{path}: nested too deep") from None
        return cls(**_record_fields_untrusted(data, path.stem))


#: A run file is a few hundred bytes per process; anything past this is not one of ours.
MAX_RUN_FILE = 1 << 20


_RUN_ID = re.compile(r"[a-z0-9]{1,6}")


def valid_run_id(run_id: object) -> bool:
    """The shape of a lab's run id (`netsim.lab.lab.Lab`): 1-6 lower-case ASCII letters and digits.

    Digits alone are a run id too: a random id is 4 hex digits, all decimal one time in seven ("8666").
    ``str.islower`` is False for those (no cased character), which made such a lab's run file "corrupt" and the
    lab invisible to ``netsim lab fault/exec/down --run`` and to `netsim clean`'s directory sweep."""
    return isinstance(run_id, str) and _RUN_ID.fullmatch(run_id) is not None


def _typed(value: object, kinds: tuple[type, ...], what: str) -> Any:
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ValueError(f"run file field {what}: {type(value).__name__} is not {'/'.join(k.__name__ for k in kinds)}")
    return value


def _record_fields_untrusted(data: object, stem: str) -> dict[str, Any]:
    """The `RunRecord` keyword arguments in ``data`` (a run file's JSON), checked; `ValueError` otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"a run file holds a JSON object, not {type(data).__name__}")  # noqa: TRY004 (bad content)
    unknown = set(data) - {f.name for f in fields(RunRecord)}
    if unknown:
        raise ValueError(f"run file fields {sorted(unknown)} are unknown")
    none = type(None)
    run_id = data.get("run_id")
    if not valid_run_id(run_id) or run_id != stem:
        raise ValueError(f"run file {stem}.json names run {run_id!r}")
    processes = []
    for p in _typed(data.get("processes", []), (list,), "processes"):
        p = _typed(p, (dict,), "processes[]")
        if set(p) != {f.name for f in fields(ProcessInfo)}:
            raise ValueError(f"run file process entry has fields {sorted(p)}")
        argv = tuple(_typed(a, (str,), "argv[]") for a in _typed(p["argv"], (list,), "argv"))
        processes.append(
            ProcessInfo(
                name=_typed(p["name"], (str,), "name"),
                role=_typed(p["role"], (str,), "role"),
                pid=_positive(p["pid"], "pid"),
                start_time=_typed(p["start_time"], (int, none), "start_time"),
                argv=argv,
            )
        )
    return {
        "run_id": run_id,
        "owner_pid": _positive(data.get("owner_pid"), "owner_pid"),
        "owner_start": _typed(data.get("owner_start"), (int, none), "owner_start"),
        "created": float(_typed(data.get("created"), (int, float), "created")),
        "namespaces": [_typed(n, (str,), "namespaces[]") for n in _typed(data.get("namespaces"), (list,), "netns")],
        "processes": processes,
        "pcap_dir": _typed(data.get("pcap_dir"), (str, none), "pcap_dir"),
        "cli": _typed(data.get("cli", False), (bool,), "cli"),
        "owner_uid": _typed(data.get("owner_uid"), (int, none), "owner_uid"),
    }


def _positive(value: object, what: str) -> int:
    number = _typed(value, (int,), what)
    if not 0 < number < 1 << 31:
        raise ValueError(f"run file field {what}: {number} is not a pid")
    return int(number)


def corrupt_runs() -> list[str]:
    """Run ids whose run file exists but cannot be read as one (`RunRecord.load`): garbage, truncated or hostile
    content. Such a run is neither live nor dead to `clean`: its owner cannot be checked."""
    return _scan_runs()[1]


def _scan_runs() -> tuple[list[RunRecord], list[str]]:
    """The run files that load, and the run ids (file names of a run id's shape) of those that do not."""
    runs: list[RunRecord] = []
    corrupt: list[str] = []
    try:
        paths = sorted(RUN_DIR.glob("*.json"))
    except OSError:
        return runs, corrupt
    for path in paths:
        try:
            runs.append(RunRecord.load(path))
        except (ValueError, TypeError):
            if valid_run_id(path.stem):
                corrupt.append(path.stem)
    return runs, corrupt


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
    """Every readable run file (`save` renames whole files into place, so an unreadable one is corrupt: skipped
    here, listed by `corrupt_runs`)."""
    return _scan_runs()[0]


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
    #: runs whose run file is corrupt (`corrupt_runs`), left alone: their owner may be alive (``force`` removes them)
    corrupt: list[str] = field(default_factory=list)


def clean(run_id: str | None = None, *, force: bool = False, orphans: bool = False) -> CleanReport:
    """Remove stale labs: runs whose owner pid is gone (or ``run_id`` with ``force=True`` even if alive).

    Namespaces named ``netsim-*`` without any run file are only reported, unless ``orphans=True``, because another
    tool may own them. A run whose run file is corrupt is reported in ``corrupt`` and left alone (its owner cannot
    be checked: fail closed); ``force=True`` removes its ``netsim-<run>-*`` objects by name, trusting nothing the
    file says.
    """
    report = CleanReport()
    runs, corrupt = _scan_runs()
    # A corrupt run file still claims its run id: its dirs and namespaces are never stale dirs or orphans.
    known = {r.run_id for r in runs} | set(corrupt)
    for bad in corrupt:
        if run_id is not None and bad != run_id:
            continue
        if force:  # by name only: what the file says (pids, namespaces) is not trusted
            report.removed += remove_run(bad, [], [])
        else:
            report.corrupt.append(bad)
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
