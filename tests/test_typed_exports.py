"""Type checkers see the real types of netsim's lazy top-level exports (issue 14).

``netsim/__init__.py`` loads its public names on first use (PEP 562), so mypy and IDEs only know them from the
``if TYPE_CHECKING:`` block: one import per `_EXPORTS` entry. The first test keeps the two in step (a new export
cannot be forgotten there); the second runs mypy on a user's file and reads what ``reveal_type`` shows.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import netsim

INIT = Path(netsim.__file__)


def type_checking_exports(source: str) -> dict[str, tuple[str, str]]:
    """Public name -> (module, attribute) as the module-level ``if TYPE_CHECKING:`` block imports it.

    ``from m import a as a`` exports ``a``; ``from m import a as _b`` then ``b = _b`` exports ``b``.
    """
    (block,) = [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    ]
    imported: dict[str, tuple[str, str]] = {}
    out: dict[str, tuple[str, str]] = {}
    for node in block.body:
        if isinstance(node, ast.ImportFrom):
            assert node.module and node.level == 0, ast.unparse(node)
            for alias in node.names:
                assert alias.name != "*", f"star import in the TYPE_CHECKING block: {ast.unparse(node)}"
                local = alias.asname or alias.name
                imported[local] = (node.module, alias.name)
                if alias.asname == alias.name:
                    out[local] = (node.module, alias.name)
        elif isinstance(node, ast.Assign):
            (target,) = node.targets
            assert isinstance(target, ast.Name) and isinstance(node.value, ast.Name), ast.unparse(node)
            out[target.id] = imported[node.value.id]
    return out


def test_the_type_checking_block_imports_every_export_from_its_module() -> None:
    block = type_checking_exports(INIT.read_text())
    assert block == netsim._EXPORTS, (
        "netsim/__init__.py: the TYPE_CHECKING block and _EXPORTS disagree; "
        f"missing there: {sorted(set(netsim._EXPORTS) - set(block))}, "
        f"not exported: {sorted(set(block) - set(netsim._EXPORTS))}, "
        f"other source: {sorted(n for n in set(block) & set(netsim._EXPORTS) if block[n] != netsim._EXPORTS[n])}"
    )


def test_the_agreement_check_sees_a_forgotten_or_star_import() -> None:
    good = "if TYPE_CHECKING:\n    from m import A as A\n    from m import b as _B\n    B = _B\n"
    assert type_checking_exports(good) == {"A": ("m", "A"), "B": ("m", "b")}
    assert type_checking_exports("if TYPE_CHECKING:\n    from m import A\n") == {}  # not re-exported
    with pytest.raises(AssertionError, match="star import"):
        type_checking_exports("if TYPE_CHECKING:\n    from m import *\n")


USER_FILE = """\
from netsim import Lab, PacketView, PacketTunnelProvider, VPNStatus, WireGuardTimers, parse_wireguard_config
from netsim import ConfigError, MemoryTun, load_policy_file


def use(lab: Lab, view: PacketView, provider: PacketTunnelProvider, timers: WireGuardTimers, tun: MemoryTun) -> None:
    reveal_type(lab)
    reveal_type(view)
    reveal_type(provider)
    reveal_type(timers)
    reveal_type(tun)
    reveal_type(VPNStatus.CONNECTED)
    reveal_type(ConfigError("x"))
    reveal_type(load_policy_file)
    reveal_type(parse_wireguard_config)
    lab.no_such_method()
"""


def test_mypy_reveals_the_real_types_in_a_users_file(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_FILE)
    (tmp_path / "mypy.ini").write_text("[mypy]\nstrict = true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    revealed = re.findall(r'Revealed type is "(.*)"', proc.stdout)
    assert revealed[:7] == [
        "netsim.lab.lab.Lab",
        "netsim.core.packet.PacketView",
        "netsim.runtime.provider.PacketTunnelProvider",
        "netsim.core.wireguard.timers.Timers",
        "netsim.testing.memory_tun.MemoryTun",
        "Literal[netsim.apple.enums.VPNStatus.CONNECTED]?",
        "netsim.errors.ConfigError",
    ], proc.stdout
    assert re.fullmatch(r"def \(path: .*\) -> netsim\.core\.policy\.\w+\.Policy", revealed[7]), revealed
    assert revealed[8].startswith("def ") and "Any" not in revealed[8], revealed
    assert '"Lab" has no attribute "no_such_method"' in proc.stdout, proc.stdout
