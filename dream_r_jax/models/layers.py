"""Building blocks shared by the decoder and the vision tower: norms, rotary embeddings, MLP.

Parameter names end in their axes (`gate_weight_df` is [embed, mlp]); the sharding rules in
`dream_r_jax.sharding.rules` read those suffixes, so a new parameter is sharded correctly by
naming it well.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dream_r_jax.models.config import RopeScaling


def normal_init(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, scaled after casting back (the Hugging Face order)."""

  def __init__(self, dim: int, *, eps: float, param_dtype, axis_letter: str = "d"):
    self.eps = eps
    setattr(self, f"scale_{axis_letter}", nnx.Param(jnp.ones((dim,), param_dtype)))
    self._scale_name = f"scale_{axis_letter}"

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = getattr(self, self._scale_name)[...]
    return scale.astype(dtype) * xf.astype(dtype)


class SwiGLU(nnx.Module):
  """`down(silu(gate(x)) * up(x))`, optionally with biases (the vision tower has them)."""

  def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs,
               bias: bool = False):
    self.dtype = dtype
    self.gate_weight_df = nnx.Param(normal_init(rngs, (dim, hidden), param_dtype))
    self.up_weight_df = nnx.Param(normal_init(rngs, (dim, hidden), param_dtype))
    self.down_weight_fd = nnx.Param(normal_init(rngs, (hidden, dim), param_dtype))
    self.bias = bias
    if bias:
      self.gate_bias_f = nnx.Param(jnp.zeros((hidden,), param_dtype))
      self.up_bias_f = nnx.Param(jnp.zeros((hidden,), param_dtype))
      self.down_bias_d = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
    dt = self.dtype
    gate = jnp.einsum("...D,DF->...F", x, self.gate_weight_df[...].astype(dt))
    up = jnp.einsum("...D,DF->...F", x, self.up_weight_df[...].astype(dt))
    if self.bias:
      gate = gate + self.gate_bias_f[...].astype(dt)
      up = up + self.up_bias_f[...].astype(dt)
    out = jnp.einsum("...F,FD->...D", jax.nn.silu(gate) * up,
                     self.down_weight_fd[...].astype(dt))
    if self.bias:
      out = out + self.down_bias_d[...].astype(dt)
    return out


# ------------------------------------------------------------------------------------------
# Rotary position embeddings.
# ------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float,
                  scaling: Optional[RopeScaling] = None) -> jax.Array:
  """Inverse frequencies [head_dim // 2], with Llama-3 scaling when configured."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  if scaling.rope_type != "llama3":
    raise ValueError(f"rope_scaling.rope_type={scaling.rope_type!r} is not supported; "
                     "expected 'llama3'")
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array,
                 mrope_section: Optional[tuple[int, ...]] = None):
  """cos/sin tables for `positions` [B, T] (or [3, B, T] for M-RoPE) -> [B, T, head_dim].

  M-RoPE (Qwen2.5-VL) rotates the temporal, height and width position components in
  separate frequency bands: band i of `mrope_section` (repeated for both halves) takes its
  angle from component i % 3.
  """
  positions = positions.astype(jnp.float32)
  freqs = positions[..., None] * inv_freq  # [..., B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [..., B, T, H]
  if mrope_section is not None:
    if positions.ndim != 3:
      raise ValueError(f"M-RoPE needs positions [3, B, T], got shape {positions.shape}")
    sections = list(mrope_section) * 2
    bounds = [0]
    for s in sections:
      bounds.append(bounds[-1] + s)
    emb = jnp.concatenate(
        [emb[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(len(sections))], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE. x [B, T, N, H]; cos/sin [B, T, H]."""
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  half = xf.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(dtype)
