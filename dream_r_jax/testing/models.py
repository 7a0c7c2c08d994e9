"""Tiny models and fake devices for tests and notebooks.

The tiny presets (`ModelConfig.tiny`) start with unit norms and zero biases, which hides a
dropped or swapped norm / bias: `tiny_model` randomizes them (seeded) so that every tensor
shows in the logits. A config built with a different dtype but the same seed holds the same
weights rounded to that dtype, which is what a bf16-vs-fp32 comparison needs.
"""
from __future__ import annotations

import functools
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dream_r_jax.models.config import ModelConfig
from dream_r_jax.models.model import Transformer
from dream_r_jax.models.params import path_str

TEXT_MODEL_TYPES = ("qwen2", "qwen3", "llama")


def tiny_config(model_type: str = "qwen2", **kw) -> ModelConfig:
  """`ModelConfig.tiny(model_type)` with overrides."""
  return ModelConfig.tiny(model_type, **kw)


def sharding_config(model_type: str = "qwen2", **kw) -> ModelConfig:
  """A tiny config whose sharded dimensions all divide by 8 (heads, kv heads, mlp, vocab).

  `ModelConfig.tiny` has 2 KV heads, so an 8-way model axis would quietly replicate most of
  it; this one really splits on every mesh shape of 8 devices.
  """
  base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=8,
              num_kv_heads=8, head_dim=8)
  base.update(kw)
  return ModelConfig.tiny(model_type, **base)


def random_state(state, seed: int = 0, std: float = 0.02, small_std: float = 0.1):
  """`state` (an NNX state or any pytree keyed by paths) filled with seeded random values.

  Matrices get N(0, std); norm scales 1 + N(0, small_std) and biases N(0, small_std), so a
  dropped or swapped norm or bias changes the logits. Values are drawn in float32 with
  NumPy from the parameter's path, then cast: two models of the same structure and seed
  agree regardless of their dtype, and nothing is compiled (jitted random initializers take
  seconds to compile even for a tiny model).
  """

  def one(path, x):
    name = path_str(path)
    # crc32, not hash(): str hashes change between processes.
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if "scale_" in name:
      value = 1.0 + small_std * noise
    elif "_bias_" in name:
      value = small_std * noise
    else:
      value = std * noise
    return jnp.asarray(value, dtype=x.dtype)

  return jax.tree_util.tree_map_with_path(one, state)


def tiny_model(model_type: str = "qwen2", seed: int = 0,
               cfg: Optional[ModelConfig] = None, **kw) -> Transformer:
  """A seeded tiny `Transformer` with random weights, norms and biases.

  Args:
    model_type: one of the text families (or "qwen2_5_vl").
    seed: weight seed; equal seeds give equal weights (up to dtype rounding).
    cfg: a full config instead of `ModelConfig.tiny(model_type, **kw)`.
    **kw: overrides for the tiny preset, e.g. `dtype="bfloat16"`.
  """
  cfg = cfg or tiny_config(model_type, **kw)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, random_state(state, seed))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, cache, num_new):
  return nnx.merge(graphdef, state)(ids, cache=cache, num_new=num_new)


class Jitted:
  """`model(ids, cache=..., num_new=...)` compiled once per input shape.

  Eager NNX calls dispatch (and compile) op by op, which dominates test time on CPU; this
  wrapper runs the same module code under one `jax.jit`. Host-side checks that need concrete
  values (`KVCache.check_room`) are skipped inside jit, so call the model itself to test them.
  """

  def __init__(self, model: Transformer):
    self.model = model
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)

  def __call__(self, ids, *, cache=None, num_new=None):
    ids = jnp.asarray(ids, jnp.int32)
    if cache is not None and num_new is None:
      # One traced signature per shape: "all T tokens are new" is passed explicitly.
      num_new = np.full((ids.shape[0],), ids.shape[1], np.int32)
    num_new = None if num_new is None else jnp.asarray(num_new, jnp.int32)
    return _forward(self.graphdef, self.state, ids, cache, num_new)


def random_ids(seed: int, shape, vocab_size: int) -> np.ndarray:
  """Seeded random token ids (int32), avoiding id 0 so padding with 0 is distinguishable."""
  return np.random.default_rng(seed).integers(1, vocab_size, size=shape).astype(np.int32)


def fake_devices(n: int) -> list:
  """The first `n` devices; fails clearly when fewer exist.

  Tests get 8 fake CPU devices from the root conftest.py; a notebook sets
  `XLA_FLAGS=--xla_force_host_platform_device_count=8` before importing JAX.
  """
  devices = jax.devices()
  if len(devices) < n:
    raise RuntimeError(
        f"need {n} devices, found {len(devices)}; set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={n} before JAX starts")
  return devices[:n]
