"""Logical axis rules: parameter and activation axes -> mesh axes.

Parameters name their axes in their last name component (`q_weight_dnh` is
[embed, q_heads, head_dim]); `param_logical_axes` reads those letters, and a rule table maps
each logical axis to a mesh axis (or None = replicated). A dimension that the mesh axis does
not divide is replicated instead, so tiny test models and GQA models with few KV heads shard
without special cases.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dream_r_jax.models.params import path_keys

AXIS_LETTERS = {
    "d": "embed", "n": "q_heads", "k": "kv_heads", "h": "head_dim", "f": "mlp",
    "v": "vocab", "p": "patch", "m": "merger",
}

# Tensor parallel over "model", batch over "data"; embed replicated (pure TP).
DEFAULT_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("merger", None),
    ("embed", None),
    ("head_dim", None),
    ("patch", None),
)
# Fully sharded data parallel: weights also split along embed over "data".
FSDP_RULES = tuple((a, "data") if a == "embed" else (a, m) for a, m in DEFAULT_RULES)


def param_logical_axes(path: Sequence, ndim: int) -> tuple[Optional[str], ...]:
  """Logical axes of a parameter from its name suffix (`..._dnh`), else replicated."""
  name = str(path[-1]) if path else ""
  suffix = name.rsplit("_", 1)[-1] if "_" in name else ""
  if len(suffix) == ndim and all(c in AXIS_LETTERS for c in suffix):
    return tuple(AXIS_LETTERS[c] for c in suffix)
  return (None,) * ndim


def logical_to_spec(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
  table = dict(rules)
  spec, used = [], set()
  for axis, dim in zip(axes, shape):
    mesh_axis = table.get(axis) if axis else None
    if (mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape
        or dim % mesh.shape[mesh_axis]):
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  return P(*spec)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every array in an NNX state (or any pytree keyed by paths)."""

  def one(path, x):
    axes = param_logical_axes(path_keys(path), x.ndim)
    return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules))

  return jax.tree_util.tree_map_with_path(one, state)


def activation_sharding(mesh: Mesh, *axes: Optional[str], rules=DEFAULT_RULES):
  """NamedSharding for an activation given logical axes, e.g. ("batch", None)."""
  table = dict(rules)
  return NamedSharding(mesh, P(*[table.get(a) if a else None for a in axes]))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Places every parameter of `model` on `mesh` according to `rules` (in place)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model
