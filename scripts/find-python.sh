#!/usr/bin/env bash
# Print the path of a CPython interpreter of the given minor version (e.g. 3.13), for `make pytest-pythons`.
# Looks on PATH, then in pyenv's versions, then asks uv to install one (uv downloads a standalone build).
set -euo pipefail
want="$1"
uv="${2:-uv}"
ok() { "$1" -c "import sys; raise SystemExit(sys.version_info[:2] != tuple(map(int, '$want'.split('.'))))" 2>/dev/null; }
if command -v "python$want" >/dev/null && ok "python$want"; then command -v "python$want"; exit 0; fi
root="${PYENV_ROOT:-$HOME/.pyenv}"
for p in $(ls -d "$root"/versions/"$want".*/bin/python 2>/dev/null | sort -V -r); do
  if ok "$p"; then echo "$p"; exit 0; fi
done
"$uv" python install -q "$want" >&2
"$uv" python find "$want"
