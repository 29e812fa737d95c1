"""Hatchling build hook: compiles netsim's optional native accelerator (netsim/_native/accel.c, docs/native.md).

The C extension is built with the system compiler (``$CC``, else ``cc``) against the building interpreter's
headers and the distribution's libcrypto (OpenSSL's ChaCha20-Poly1305). When either is missing, or the compile
fails, the build goes on without it and netsim runs pure Python (``netsim.accel`` falls back); the reason is printed.
``NETSIM_NATIVE_BUILD=0`` skips the attempt.

* wheel: the shared object is compiled into a scratch directory and added to the wheel as
  ``netsim/_native/_accel<EXT_SUFFIX>``, and the wheel is tagged for this platform and interpreter.
* editable (``pip install -e``, what ``make setup`` does): compiled in place next to accel.c (gitignored), where
  the editable install imports it from. A changed accel.c is picked up by the next ``make setup`` or
  ``pip install -e .``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("netsim") / "_native" / "accel.c"
MODULE = "_accel"


def _compiler() -> list[str] | None:
    cc = shlex.split(os.environ.get("CC", "")) or ["cc"]
    return cc if shutil.which(cc[0]) else None


def compile_accelerator(root: Path, out_dir: Path) -> tuple[Path | None, str]:
    """Compile accel.c into ``out_dir``; returns (the shared object, "") or (None, why not)."""
    src = root / SOURCE
    if not src.is_file():
        return None, f"{SOURCE} not found"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc or $CC)"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return None, f"no Python headers in {include}"
    target = out_dir / (MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    argv = [*cc, "-O2", "-fPIC", "-shared", "-Wall", f"-I{include}", str(src), "-o", str(target), "-lcrypto"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        return None, f"{cc[0]} failed to start: {exc}"
    if proc.returncode != 0:
        return (
            None,
            f"{shlex.join(argv)} failed (OpenSSL headers missing? apt install libssl-dev):\n{proc.stderr[-2000:]}",
        )
    return target, ""


class NativeBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Adds the compiled accelerator to wheels and editable installs when it builds (see the module docstring)."""

    PLUGIN_NAME = "custom"
    _scratch: Path | None = None

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("NETSIM_NATIVE_BUILD") == "0":
            return
        root = Path(self.root)
        if version == "editable":
            built, why = compile_accelerator(root, root / SOURCE.parent)
        else:
            scratch = self._scratch = Path(tempfile.mkdtemp(prefix="netsim-native-"))
            built, why = compile_accelerator(root, scratch)
            if built is not None:
                build_data["force_include"][str(built)] = f"netsim/_native/{built.name}"
                build_data["pure_python"] = False
                build_data["infer_tag"] = True
        if built is None:
            print(f"netsim: building without the native accelerator (pure Python): {why}", file=sys.stderr)

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
