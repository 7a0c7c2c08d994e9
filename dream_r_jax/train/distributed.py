"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

On TPU pods and SLURM/Kubernetes GPU clusters JAX detects the coordinator itself, so
nothing need be given; on a bare set of machines (or several processes on one machine,
as in the tests) pass `--coordinator_address`, `--num_processes` and `--process_id`, or
set `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. CPU processes
talk through gloo collectives (JAX's default `jax_cpu_collectives_implementation`).
This must run before anything touches a JAX device.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
from absl import logging

from dream_r_jax.train.config import ConfigError


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, num_cpu_devices: int = 0,
               auto_detect: bool = False) -> None:
  """Starts JAX's multi-process runtime when asked to; a no-op for one process.

  Args:
    coordinator_address: "host:port" of process 0 ("" = JAX_COORDINATOR_ADDRESS).
    num_processes: total processes (0 = JAX_NUM_PROCESSES).
    process_id: this process's index (-1 = JAX_PROCESS_ID).
    num_cpu_devices: CPU devices this process exposes (0 = JAX's default); for
      simulating hosts on one machine.
    auto_detect: call `jax.distributed.initialize()` with cluster auto-detection (TPU
      pods, SLURM, ...) even when no address is given.

  Raises:
    ConfigError: inconsistent settings.
  """
  if num_cpu_devices < 0:
    raise ConfigError(f"--num_cpu_devices={num_cpu_devices} must be >= 0")
  if num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  n = num_processes or _env_int("JAX_NUM_PROCESSES") or 0
  pid = process_id if process_id >= 0 else _env_int("JAX_PROCESS_ID")
  if not address and not auto_detect:
    if n > 1:
      raise ConfigError(f"--num_processes={n} needs --coordinator_address")
    return
  if address:
    if n < 1 or pid is None or not 0 <= pid < n:
      raise ConfigError(
          f"multi-process run: --coordinator_address={address} needs --num_processes >= 1 "
          f"and 0 <= --process_id < num_processes (got {n}, {pid})")
    jax.distributed.initialize(coordinator_address=address, num_processes=n,
                               process_id=pid)
  else:
    jax.distributed.initialize()
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
