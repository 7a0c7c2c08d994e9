"""Token sampling: greedy, temperature, top-k and top-p (nucleus), vectorized over rows."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick the next token. temperature == 0 means greedy (argmax)."""
  temperature: float = 0.0
  top_k: int = 0      # 0 = off
  top_p: float = 1.0  # 1.0 = off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filtered_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Temperature-scaled logits [..., V] with top-k / top-p exclusions set to -inf."""
  logits = logits.astype(jnp.float32) / max(cfg.temperature, 1e-6)
  neg = jnp.finfo(jnp.float32).min
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
    cum = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(cum < cfg.top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def sample(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Next token ids [...] from logits [..., V]."""
  if cfg.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filtered_logits(logits, cfg), axis=-1).astype(jnp.int32)


def probs(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """The distribution `sample` draws from (one-hot argmax when greedy)."""
  if cfg.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filtered_logits(logits, cfg), axis=-1)
