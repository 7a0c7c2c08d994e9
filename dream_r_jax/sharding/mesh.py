"""Device meshes and the role -> mesh split (draft and target on disjoint devices)."""
from __future__ import annotations

import enum
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


class Role(enum.Enum):
  DRAFT = "draft"
  TARGET = "target"


def make_mesh(shape: Sequence[int], axis_names: Sequence[str],
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh with Auto (GSPMD-style) axes over `devices` (default: all devices).

  Raises:
    ValueError: when the mesh shape does not use exactly the given devices.
  """
  shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
  devices = list(jax.devices() if devices is None else devices)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {shape} and axis names {axis_names} differ in length")
  if any(s < 1 for s in shape) or math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh shape {shape} (= {math.prod(shape)} devices) does not match the "
        f"{len(devices)} available devices")
  arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, axis_names, axis_types=(AxisType.Auto,) * len(shape))


def role_meshes(num_draft: int, num_target: Optional[int] = None, *,
                draft_shape: Optional[Sequence[int]] = None,
                target_shape: Optional[Sequence[int]] = None,
                axis_names: Sequence[str] = ("data", "model"),
                devices: Optional[Sequence[jax.Device]] = None) -> dict[Role, Mesh]:
  """Splits the devices into a draft mesh and a target mesh that share no device.

  The first `num_draft` devices form the draft mesh and the next `num_target` (default: all
  the rest) the target mesh; each mesh defaults to shape (1, n): model-parallel only.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_target = len(devices) - num_draft if num_target is None else num_target
  if num_draft < 1 or num_target < 1 or num_draft + num_target > len(devices):
    raise ValueError(
        f"cannot split {len(devices)} devices into draft={num_draft} and "
        f"target={num_target} disjoint meshes")
  draft_devs = devices[:num_draft]
  target_devs = devices[num_draft:num_draft + num_target]
  return {
      Role.DRAFT: make_mesh(draft_shape or (1, num_draft), axis_names, draft_devs),
      Role.TARGET: make_mesh(target_shape or (1, num_target), axis_names, target_devs),
  }


def mesh_devices(mesh: Mesh) -> set:
  return set(mesh.devices.flat)
