#!/usr/bin/env bash
# The README's main job: installs the project, then trains the bundled target and draft,
# aligns the draft with SAPO and evaluates FPSR against the baselines, all on CPU.
# Extra arguments are passed to experiments.train (e.g. --workdir=/tmp/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# Two host devices: one for the draft mesh, one for the target mesh.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2"
exec .venv/bin/python -m experiments.train \
  --flagfile=experiments/flags/quickstart.flags --workdir=runs/quickstart "$@"
