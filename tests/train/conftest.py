"""Shared fixtures of the training tests: smoke flags, data directory, child processes.

The repository runs pytest with `--import-mode=importlib`, so test modules cannot import
a sibling helper module; the helpers are handed out as fixtures instead.
"""
import os
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE_FLAGS = os.path.join(REPO, "experiments", "flags", "smoke.flags")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS directory shared by the tests of one session (the smoke splits build once)."""
  return str(tmp_path_factory.mktemp("train_data"))


def smoke_args(workdir, data_dir, *extra):
  return [f"--flagfile={SMOKE_FLAGS}", f"--workdir={workdir}", f"--data_dir={data_dir}",
          *extra]


def subprocess_env(num_devices: int = 1) -> dict:
  """Environment for a child JAX process: CPU, the repo's compilation cache."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(REPO, ".jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def train_command(*args):
  return [sys.executable, "-m", "experiments.train", *args]


def run_train(*args, num_devices: int = 1, timeout: float = 300):
  return subprocess.run(train_command(*args), cwd=REPO, env=subprocess_env(num_devices),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def helpers():
  """`helpers.smoke_args`, `helpers.run_train`, ... (see the functions above)."""
  return types.SimpleNamespace(smoke_args=smoke_args, subprocess_env=subprocess_env,
                               train_command=train_command, run_train=run_train, repo=REPO)
