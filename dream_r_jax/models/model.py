"""The decoder LM family (Qwen2/Qwen2.5, Qwen3, Llama 3.x, Qwen2.5-VL) as Flax NNX modules.

One module serves every family; `ModelConfig` switches the per-family details (q/k/v bias,
q/k RMSNorm, Llama-3 RoPE scaling, tied embeddings, M-RoPE and the vision tower).

Calling conventions:
  * `model(input_ids)` -> logits [B, T, V] (full causal forward, float32 logits).
  * `model(input_ids, cache=cache, num_new=n)` -> (logits, cache): writes the T new tokens of
    row b at positions `cache.lengths[b] + t` and advances that row by `n[b]` (default T),
    so right-padded rows of different lengths move independently.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dream_r_jax.models import layers
from dream_r_jax.models.config import ModelConfig
from dream_r_jax.models.kv_cache import KVCache


class Attention(nnx.Module):
  """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = cfg.jnp_param_dtype
    self.cfg = cfg
    self.q_weight_dnh = nnx.Param(layers.normal_init(rngs, (d, n, h), pdt))
    self.k_weight_dkh = nnx.Param(layers.normal_init(rngs, (d, k, h), pdt))
    self.v_weight_dkh = nnx.Param(layers.normal_init(rngs, (d, k, h), pdt))
    self.o_weight_nhd = nnx.Param(layers.normal_init(rngs, (n, h, d), pdt))
    if cfg.qkv_bias:
      self.q_bias_nh = nnx.Param(jnp.zeros((n, h), pdt))
      self.k_bias_kh = nnx.Param(jnp.zeros((k, h), pdt))
      self.v_bias_kh = nnx.Param(jnp.zeros((k, h), pdt))
    if cfg.qk_norm:
      self.q_norm = layers.RMSNorm(h, eps=cfg.rms_norm_eps, param_dtype=pdt, axis_letter="h")
      self.k_norm = layers.RMSNorm(h, eps=cfg.rms_norm_eps, param_dtype=pdt, axis_letter="h")

  def __call__(self, x, cos, sin, mask, cache_kv=None, write_pos=None):
    """Attends x [B, T, D] to itself (or to the cache). mask is [B, T, S] bool."""
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    q = jnp.einsum("BTD,DNH->BTNH", x, self.q_weight_dnh[...].astype(dt))
    k = jnp.einsum("BTD,DKH->BTKH", x, self.k_weight_dkh[...].astype(dt))
    v = jnp.einsum("BTD,DKH->BTKH", x, self.v_weight_dkh[...].astype(dt))
    if cfg.qkv_bias:
      q = q + self.q_bias_nh[...].astype(dt)
      k = k + self.k_bias_kh[...].astype(dt)
      v = v + self.v_bias_kh[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = layers.apply_rope(q, cos, sin)
    k = layers.apply_rope(k, cos, sin)

    if cache_kv is not None:
      ck, cv = cache_kv
      rows = jnp.arange(x.shape[0])[:, None]
      # mode="drop": a write past capacity is discarded rather than clamped onto valid
      # entries; host-side checks (KVCache.check_room) reject such inputs before compute.
      k = ck.at[rows, write_pos].set(k.astype(ck.dtype), mode="drop")
      v = cv.at[rows, write_pos].set(v.astype(cv.dtype), mode="drop")
      new_kv = (k, v)
    else:
      new_kv = None

    b, t, n, h = q.shape
    d = cfg.hidden_size
    kv = cfg.num_kv_heads
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(dt),
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(dt)).reshape(b, t, n * h)
    # One [N*H, D] matmul on a flat view of the weight (a free reshape). Contracting N and
    # H as two axes let XLA pick another axis order and copy the weight transposed on every
    # decode step (2.4 MB per layer per token for the 100M benchmark model).
    out = jnp.einsum("BTF,FD->BTD", out, self.o_weight_nhd[...].astype(dt).reshape(n * h, d))
    return out, new_kv


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = cfg.jnp_param_dtype
    self.input_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                         param_dtype=pdt)
    self.mlp = layers.SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.jnp_dtype,
                             param_dtype=pdt, rngs=rngs)

  def __call__(self, x, cos, sin, mask, cache_kv=None, write_pos=None):
    h, new_kv = self.attn(self.input_norm(x), cos, sin, mask, cache_kv, write_pos)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    return x, new_kv


class Transformer(nnx.Module):
  """A causal LM of the family; with `cfg.vision`, the Qwen2.5-VL image-text model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = cfg.jnp_param_dtype
    self.embedding_vd = nnx.Param(layers.normal_init(rngs, (cfg.vocab_size, cfg.hidden_size),
                                                     pdt))
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head_dv = nnx.Param(layers.normal_init(rngs, (cfg.hidden_size, cfg.vocab_size),
                                                     pdt))
    if cfg.vision is not None:
      from dream_r_jax.models import vision  # pylint: disable=g-import-not-at-top
      self.visual = vision.VisionTower(cfg.vision, dtype=cfg.jnp_dtype, param_dtype=pdt,
                                       rngs=rngs)

  # ----------------------------------------------------------------------------------------
  def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
    """Token embeddings [B, T, D], with image features in place of the image tokens."""
    cfg = self.cfg
    x = jnp.take(self.embedding_vd[...], input_ids, axis=0).astype(cfg.jnp_dtype)
    if pixel_values is None:
      return x
    if cfg.vision is None:
      raise ValueError("pixel_values given to a text-only model "
                       f"(model_type={cfg.model_type!r})")
    feats = self.visual(pixel_values, image_grid_thw).astype(x.dtype)  # [M, D]
    is_img = (input_ids == cfg.image_token_id).reshape(-1)
    # The i-th image token (in row-major order over the batch) takes the i-th feature, as
    # Hugging Face's masked_scatter does.
    idx = jnp.clip(jnp.cumsum(is_img) - 1, 0, feats.shape[0] - 1)
    flat = x.reshape(-1, x.shape[-1])
    flat = jnp.where(is_img[:, None], feats[idx], flat)
    return flat.reshape(x.shape)

  def logits(self, hidden):
    """Final-norm hidden states [B, T, D] -> float32 logits [B, T, V]."""
    dt = self.cfg.jnp_dtype
    if self.cfg.tie_word_embeddings:
      w = self.embedding_vd[...].astype(dt)
      return jnp.einsum("BTD,VD->BTV", hidden, w, preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", hidden, self.lm_head_dv[...].astype(dt),
                      preferred_element_type=jnp.float32)

  def default_positions(self, input_ids, attention_mask=None, image_grid_thw=None):
    """Positions as Hugging Face computes them without explicit `position_ids`."""
    cfg = self.cfg
    b, t = input_ids.shape
    if cfg.mrope_section is not None:
      from dream_r_jax.models import mrope  # pylint: disable=g-import-not-at-top
      positions, deltas = mrope.get_rope_index(cfg, input_ids, image_grid_thw, attention_mask)
      return positions, deltas
    if attention_mask is None:
      pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
      pos = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    return pos, jnp.zeros((b,), jnp.int32)

  def __call__(self,
               input_ids: jax.Array,  # [B, T] int
               *,
               cache: Optional[KVCache] = None,
               num_new: Optional[jax.Array] = None,  # [B] valid new tokens per row
               positions: Optional[jax.Array] = None,  # [B, T] or [3, B, T] (M-RoPE)
               attention_mask: Optional[jax.Array] = None,  # [B, T], 1 = real token
               pixel_values: Optional[jax.Array] = None,  # [num_patches, C*tp*p*p]
               image_grid_thw=None,  # [num_images, 3], host values (static)
               rope_delta: Optional[jax.Array] = None,  # [B] M-RoPE offset to store
               new_mask: Optional[jax.Array] = None,  # [B, T, T] mask among new tokens
               return_hidden: bool = False):
    cfg = self.cfg
    b, t = input_ids.shape
    if pixel_values is not None:
      _check_image_tokens(cfg, input_ids, image_grid_thw)
    if cache is None and positions is None and cfg.mrope_section is None and (
        t > cfg.max_position_embeddings):
      raise ValueError(f"input_ids length {t} exceeds the model's position limit "
                       f"max_position_embeddings={cfg.max_position_embeddings}")
    if cache is not None:
      # Host-side, before compute (a no-op under jit): writes past capacity would be dropped.
      cache.check_room(t if num_new is None else num_new)
    x = self.embed(input_ids, pixel_values, image_grid_thw)
    if cache is None:
      if positions is None:
        positions, rope_delta = self.default_positions(input_ids, attention_mask,
                                                       image_grid_thw)
      causal = jnp.tril(jnp.ones((t, t), bool))[None]
      if attention_mask is not None:
        causal = causal & attention_mask.astype(bool)[:, None, :]
      mask = jnp.broadcast_to(causal, (b, t, t))
      write_pos = None
    else:
      if cache.batch_size != b:
        raise ValueError(f"input_ids batch {b} != cache batch {cache.batch_size}")
      write_pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
      if positions is None:
        if cfg.mrope_section is not None and pixel_values is not None:
          valid = None if num_new is None else (
              jnp.arange(t)[None, :] < jnp.asarray(num_new)[:, None]).astype(jnp.int32)
          positions, rope_delta = self.default_positions(input_ids, valid, image_grid_thw)
          positions = positions + cache.lengths[None, :, None]
        else:
          positions = write_pos + cache.rope_delta[:, None]
          if cfg.mrope_section is not None:
            positions = jnp.broadcast_to(positions[None], (3, b, t))
      if new_mask is None:
        mask = jnp.arange(cache.max_len)[None, None, :] <= write_pos[:, :, None]  # [B, T, S]
      else:
        # Cached positions are all visible; among the new tokens `new_mask` decides (this
        # is how one pass verifies K drafted steps, each verdict segment seeing the prefix
        # up to its own step and nothing of the other segments).
        rel = jnp.arange(cache.max_len)[None, None, :] - cache.lengths[:, None, None]
        idx = jnp.broadcast_to(jnp.clip(rel, 0, t - 1), (b, t, cache.max_len))
        in_new = jnp.take_along_axis(new_mask.astype(bool), idx, axis=2)
        mask = (rel < 0) | ((rel < t) & in_new)

    inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = layers.rope_cos_sin(positions, inv_freq, cfg.mrope_section)
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      with jax.named_scope(f"layer_{i}"):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, new_kv = layer(x, cos, sin, mask, kv, write_pos)
      if new_kv is not None:
        new_k.append(new_kv[0])
        new_v.append(new_kv[1])
    hidden = self.final_norm(x)
    out = hidden if return_hidden else self.logits(hidden)
    if cache is None:
      return out
    n = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    new_cache = cache.replace(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths + n)
    if rope_delta is not None:
      new_cache = new_cache.replace(rope_delta=rope_delta.astype(jnp.int32))
    return out, new_cache


def _check_image_tokens(cfg: ModelConfig, input_ids, image_grid_thw) -> None:
  """Image placeholders must match the merged patch count of `image_grid_thw` (host check)."""
  if image_grid_thw is None:
    raise ValueError("pixel_values given without image_grid_thw")
  if isinstance(input_ids, jax.core.Tracer):
    return
  grid = np.asarray(image_grid_thw).reshape(-1, 3)
  merge = cfg.vision.spatial_merge_size ** 2
  expected = int(np.sum(np.prod(grid, axis=-1)) // merge)
  found = int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
  if expected != found:
    raise ValueError(
        f"input_ids hold {found} image tokens (id {cfg.image_token_id}) but image_grid_thw "
        f"{grid.tolist()} needs {expected} (t*h*w / {merge} per image)")
