"""An explicit KV cache with per-row lengths.

Speculative reasoning accepts a different number of drafted steps in every batch row, so each
row keeps its own length: a forward pass writes row b's new keys at `lengths[b] + t`, and
rolling back is moving `lengths` back. Entries past a row's length are stale and are simply
overwritten by the next write; attention never looks past `lengths[b] + t`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dream_r_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Per-layer keys/values and per-row lengths.

  Attributes:
    k: one array per layer, [B, S, K, H] (S = capacity, K = kv heads, H = head dim).
    v: like `k`.
    lengths: [B] int32, the number of valid positions in each row.
    rope_delta: [B] int32, M-RoPE offset (text position = cache position + delta); zeros for
      text-only models.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array
  rope_delta: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> "KVCache":
    if batch_size < 1 or max_len < 1:
      raise ValueError(f"KVCache.init: batch_size={batch_size} and max_len={max_len} "
                       "must be positive")
    if max_len > cfg.max_position_embeddings:
      raise ValueError(
          f"KVCache.init: max_len={max_len} exceeds the model's position limit "
          f"max_position_embeddings={cfg.max_position_embeddings}")
    dtype = dtype or cfg.jnp_dtype
    shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
               lengths=jnp.zeros((batch_size,), jnp.int32),
               rope_delta=jnp.zeros((batch_size,), jnp.int32))

  @property
  def batch_size(self) -> int:
    return self.k[0].shape[0]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  def replace(self, **kw) -> "KVCache":
    return dataclasses.replace(self, **kw)

  def rollback(self, lengths: jax.Array) -> "KVCache":
    """Moves each row back to `lengths[b]` (which must not exceed its current length)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    return self.replace(lengths=jnp.minimum(lengths, self.lengths))

  def check_room(self, num_new) -> None:
    """Raises if writing `num_new` tokens would overflow a row (host-side check).

    Inside `jit` the lengths are abstract and writes past capacity are dropped instead, so
    callers check on the host, before compute, whenever the lengths are concrete.
    """
    lengths = self.lengths
    if isinstance(lengths, jax.core.Tracer) or isinstance(num_new, jax.core.Tracer):
      return
    need = np.asarray(lengths) + np.asarray(num_new)
    if np.any(need > self.max_len):
      row = int(np.argmax(need))
      raise ValueError(
          f"sequence too long for the KV cache: row {row} would reach {int(need[row])} "
          f"positions, capacity is {self.max_len}")
