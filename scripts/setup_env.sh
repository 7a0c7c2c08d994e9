#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environments from a fresh clone.
#   .venv      the project: Python 3.12 if present (JAX 0.12 line), else Python 3.11.
#   .venv-ref  the PyTorch reference used by the golden-logit tests (Python 3.11, CPU torch).
# Idempotent: a venv is rebuilt only when its requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {  # $1 = major.minor
  local v=$1 c
  for c in "python$v" "$(command -v pyenv >/dev/null 2>&1 && pyenv root)/versions/$v"*/bin/"python$v"; do
    if [ -n "$c" ] && "$c" -c 'import sys' >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  return 1
}

make_venv() {  # $1 = dir, $2 = requirements, $3.. = pythons to try
  local dir=$1 req=$2; shift 2
  local stamp="$dir/.requirements.sha" want
  want=$(sha256sum "$req" pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  local py=""
  for v in "$@"; do py=$(find_python "$v") && break; done
  if [ -z "$py" ]; then echo "setup_env: no Python among: $*" >&2; return 1; fi
  echo "setup_env: building $dir with $py" >&2
  rm -rf "$dir"
  "$py" -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check --upgrade pip
  "$dir/bin/pip" install -q --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
}

make_venv .venv requirements.txt 3.12 3.11
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e . >/dev/null
if ! make_venv .venv-ref requirements-ref.txt 3.11; then
  echo "setup_env: WARNING: no PyTorch reference environment; HF parity tests will fail" >&2
fi
