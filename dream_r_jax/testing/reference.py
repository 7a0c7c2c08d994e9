"""Runs the PyTorch/transformers reference script in its own environment (for tests).

transformers 5.x has no Flax models, so golden logits come from PyTorch. torch only installs
quickly on Python 3.11, so the reference runs in a separate virtual environment
(`.venv-ref`, made by scripts/setup_env.sh) and is called as a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tests", "reference", "hf_reference.py")


def reference_python() -> str:
  return os.environ.get("DREAM_R_JAX_REF_PYTHON", os.path.join(REPO, ".venv-ref", "bin",
                                                               "python"))


def require_reference():
  """Skips (locally) or fails (in CI) when the reference environment is missing."""
  import pytest  # pylint: disable=g-import-not-at-top
  py = reference_python()
  if not os.path.exists(py):
    msg = (f"PyTorch reference interpreter {py} not found; run scripts/setup_env.sh or set "
           "DREAM_R_JAX_REF_PYTHON")
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  return py


def run_reference(jobs: list[dict], workdir: str, script: str = SCRIPT) -> dict:
  """Runs `script SPEC OUT` in the reference environment and returns OUT's arrays."""
  py = require_reference()
  os.makedirs(workdir, exist_ok=True)
  spec = os.path.join(workdir, "spec.json")
  out = os.path.join(workdir, "out.npz")
  with open(spec, "w") as f:
    json.dump(jobs, f)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
  proc = subprocess.run([py, script, spec, out], capture_output=True, text=True, env=env,
                        timeout=600, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"reference script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  with np.load(out) as data:
    return {k: data[k] for k in data.files}
