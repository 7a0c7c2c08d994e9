#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export DREAM_R_JAX_REF_PYTHON="$PWD/.venv-ref/bin/python"
exec .venv/bin/python -m pytest -n 2 -q "$@" tests
