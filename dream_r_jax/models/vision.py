"""The Qwen2.5-VL vision tower as a Flax NNX module, and its Hugging Face weight rules.

It computes what `Qwen2_5_VisionTransformerPretrainedModel` computes: a patch embedding, a
ViT whose blocks attend within 2-D windows (or, for `fullatt_block_indexes`, within each
frame), a 2-D rotary embedding, and a patch merger that concatenates each 2x2 group of
patches into one token for the language model.

Everything that depends only on `image_grid_thw` (the window permutation, rotary positions,
which tokens may attend to which) is computed in NumPy on the host, so the module jits with
the grid as a static value. Attention is dense with a block-diagonal mask; this is exact and
fine for the image sizes used here, but holds [heads, S, S] logits for S patches.

Parameter letters: p = flattened patch (C * tp * p * p), d = vision hidden (or, on the
merger's output, the language model's hidden), n = heads, h = head dim, f = MLP hidden
(also the merger's hidden), m = merger input (spatial_merge_size**2 * d).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dream_r_jax.models import layers
from dream_r_jax.models.config import VisionConfig

_ROPE_THETA = 10000.0  # Qwen2.5-VL's vision rotary base; `VisionConfig` has no field for it.


# ------------------------------------------------------------------------------------------
# Host-side layout: everything derived from image_grid_thw.
# ------------------------------------------------------------------------------------------
class VisionLayout(NamedTuple):
  """Static index data for one `image_grid_thw` (all NumPy, in the window order)."""
  window_index: np.ndarray  # [S // U] merge units in window order (U = merge**2)
  reverse_index: np.ndarray  # [S // U] its inverse permutation
  rope_positions: np.ndarray  # [S, 2] (row, column) patch coordinates, window order
  full_segments: np.ndarray  # [S] frame id of each token: full-attention blocks
  window_segments: np.ndarray  # [S] window id of each token: window-attention blocks


def _as_grid(grid_thw) -> tuple[tuple[int, int, int], ...]:
  if isinstance(grid_thw, jax.core.Tracer):
    raise TypeError("image_grid_thw must be concrete host data (NumPy, a list, or a static "
                    "jit argument), not a traced array: the vision layout is built on the host")
  grid = np.asarray(grid_thw).reshape(-1, 3)
  return tuple(tuple(int(v) for v in row) for row in grid)


def _segments(cu_seqlens: np.ndarray, total: int) -> np.ndarray:
  """Segment id of each position for cumulative boundaries `cu_seqlens` (`cu[0] == 0`)."""
  return np.searchsorted(cu_seqlens[1:], np.arange(total), side="right").astype(np.int32)


def window_index(grid, merge: int, window_size: int, patch_size: int):
  """NumPy port of `transformers.vision_utils.get_vision_window_index`.

  Returns the merge-unit permutation that groups tokens by window and the cumulative
  window boundaries in tokens (`cu_window_seqlens`, with empty windows dropped).
  """
  vm = window_size // merge // patch_size  # window side, in merge units
  if vm < 1:
    raise ValueError(f"window_size={window_size} is smaller than one merge unit "
                     f"(spatial_merge_size * patch_size = {merge * patch_size})")
  unit = merge * merge
  indices, cu, offset = [], [0], 0
  for t, h, w in grid:
    lh, lw = h // merge, w // merge
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    # Hugging Face pads a full extra window when a side divides evenly; the empty windows
    # vanish in the de-duplication of the boundaries below, as they do there.
    pad_h, pad_w = vm - lh % vm, vm - lw % vm
    nh, nw = (lh + pad_h) // vm, (lw + pad_w) // vm
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
    padded = padded.reshape(t, nh, vm, nw, vm).transpose(0, 1, 3, 2, 4)
    padded = padded.reshape(t, nh * nw, vm, vm)
    seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
    flat = padded.reshape(-1)
    indices.append(flat[flat != -100] + offset)
    cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
    offset += t * lh * lw
  cu = np.asarray(cu, np.int64)
  cu = cu[np.concatenate([[True], cu[1:] != cu[:-1]])]
  return np.concatenate(indices).astype(np.int64), cu


def rope_positions(grid, merge: int) -> np.ndarray:
  """(row, column) of every patch, in the processor's merge-block-major order: [S, 2]."""
  out = []
  for t, h, w in grid:
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
  return np.concatenate(out).astype(np.int32)


@functools.lru_cache(maxsize=128)
def _layout(grid, merge: int, window_size: int, patch_size: int) -> VisionLayout:
  for t, h, w in grid:
    if min(t, h, w) < 1 or h % merge or w % merge:
      raise ValueError(f"image_grid_thw row {[t, h, w]} must be positive with h and w "
                       f"multiples of spatial_merge_size={merge}")
  unit = merge * merge
  total = sum(t * h * w for t, h, w in grid)
  win_idx, cu_window = window_index(grid, merge, window_size, patch_size)
  frames = np.repeat([h * w for _, h, w in grid], [t for t, _, _ in grid])
  cu_full = np.concatenate([[0], np.cumsum(frames)])
  pos = rope_positions(grid, merge).reshape(total // unit, unit, 2)[win_idx].reshape(total, 2)
  # Hugging Face applies both boundary lists to the *permuted* sequence; windows never
  # straddle frames, so the frame boundaries still hold after the permutation.
  layout = VisionLayout(window_index=win_idx, reverse_index=np.argsort(win_idx),
                        rope_positions=pos, full_segments=_segments(cu_full, total),
                        window_segments=_segments(cu_window, total))
  for array in layout:  # Cached and shared between calls, so read-only.
    array.setflags(write=False)
  return layout


def vision_layout(vcfg: VisionConfig, grid_thw) -> VisionLayout:
  """The cached host-side layout for `grid_thw` [num_images, 3]."""
  return _layout(_as_grid(grid_thw), vcfg.spatial_merge_size, vcfg.window_size,
                 vcfg.patch_size)


def num_merged_tokens(vcfg: VisionConfig, grid_thw) -> int:
  """Number of tokens the tower returns (image placeholders in the text) for `grid_thw`."""
  return sum(t * h * w for t, h, w in _as_grid(grid_thw)) // vcfg.spatial_merge_size ** 2


# ------------------------------------------------------------------------------------------
# Modules.
# ------------------------------------------------------------------------------------------
class VisionAttention(nnx.Module):
  """Multi-head attention with a fused q/k/v projection and 2-D rotary embeddings.

  `qkv_weight_dnh` is [D, N, 3H]: the h axis of head n holds that head's [q | k | v], so
  that sharding heads keeps each head's q, k and v on one device.
  """

  def __init__(self, vcfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, h = vcfg.hidden_size, vcfg.num_heads, vcfg.head_dim
    self.dtype = dtype
    self.qkv_weight_dnh = nnx.Param(layers.normal_init(rngs, (d, n, 3 * h), param_dtype))
    self.qkv_bias_nh = nnx.Param(jnp.zeros((n, 3 * h), param_dtype))
    self.o_weight_nhd = nnx.Param(layers.normal_init(rngs, (n, h, d), param_dtype))
    self.o_bias_d = nnx.Param(jnp.zeros((d,), param_dtype))

  def __call__(self, x, cos, sin, mask):
    """x [S, D]; cos/sin [S, H] float32; mask [S, S] bool -> [S, D]."""
    dt = self.dtype
    qkv = jnp.einsum("SD,DNH->SNH", x, self.qkv_weight_dnh[...].astype(dt))
    qkv = qkv + self.qkv_bias_nh[...].astype(dt)
    q, k, v = jnp.split(qkv, 3, axis=-1)  # [S, N, H] each
    q = layers.apply_rope(q[None], cos[None], sin[None])[0]
    k = layers.apply_rope(k[None], cos[None], sin[None])[0]
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("SNH,TNH->NST", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("NST,TNH->SNH", probs, v)
    out = jnp.einsum("SNH,NHD->SD", out, self.o_weight_nhd[...].astype(dt))
    return out + self.o_bias_d[...].astype(dt)


class VisionBlock(nnx.Module):

  def __init__(self, vcfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = vcfg.hidden_size
    self.norm1 = layers.RMSNorm(d, eps=vcfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = VisionAttention(vcfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = layers.RMSNorm(d, eps=vcfg.rms_norm_eps, param_dtype=param_dtype)
    self.mlp = layers.SwiGLU(d, vcfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs, bias=True)

  def __call__(self, x, cos, sin, mask):
    x = x + self.attn(self.norm1(x), cos, sin, mask)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then each merge unit's patches concatenated and mapped by a GELU MLP."""

  def __init__(self, vcfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    m = vcfg.hidden_size * vcfg.spatial_merge_size ** 2
    self.dtype = dtype
    self.ln_q = layers.RMSNorm(vcfg.hidden_size, eps=vcfg.rms_norm_eps,
                               param_dtype=param_dtype)
    self.fc1_weight_mf = nnx.Param(layers.normal_init(rngs, (m, m), param_dtype))
    self.fc1_bias_f = nnx.Param(jnp.zeros((m,), param_dtype))
    self.fc2_weight_fd = nnx.Param(layers.normal_init(rngs, (m, vcfg.out_hidden_size),
                                                      param_dtype))
    self.fc2_bias_d = nnx.Param(jnp.zeros((vcfg.out_hidden_size,), param_dtype))

  def __call__(self, x):  # [S, D] -> [S / U, out_hidden_size]
    dt = self.dtype
    x = self.ln_q(x).reshape(-1, self.fc1_weight_mf.shape[0])
    x = jnp.einsum("SM,MF->SF", x, self.fc1_weight_mf[...].astype(dt))
    # torch.nn.GELU() is the exact (erf) form.
    x = jax.nn.gelu(x + self.fc1_bias_f[...].astype(dt), approximate=False)
    x = jnp.einsum("SF,FD->SD", x, self.fc2_weight_fd[...].astype(dt))
    return x + self.fc2_bias_d[...].astype(dt)


class VisionTower(nnx.Module):
  """Qwen2.5-VL's ViT: `(pixel_values, image_grid_thw) -> [num_merged_tokens, out_hidden]`.

  `pixel_values` [S, C * tp * p * p] is the processor's layout (see `image_processing`);
  `image_grid_thw` [num_images, 3] must be host data. Several images are processed in one
  call, each attending only within itself; the output rows follow the input image order.
  """

  def __init__(self, vcfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = vcfg
    self.dtype = dtype
    p = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    self.patch_weight_pd = nnx.Param(layers.normal_init(rngs, (p, vcfg.hidden_size),
                                                        param_dtype))
    self.blocks = nnx.List([
        VisionBlock(vcfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(vcfg.depth)
    ])
    self.merger = PatchMerger(vcfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def rope(self, positions: np.ndarray):
    """cos/sin [S, head_dim] (float32) for (row, column) `positions` [S, 2]."""
    quarter = self.cfg.head_dim // 2
    inv_freq = 1.0 / (_ROPE_THETA ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [S, 2, H / 4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [S, H / 2]: row bands, then column bands
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)

  def __call__(self,
               pixel_values: jax.Array,  # [S, C * tp * p * p]
               image_grid_thw) -> jax.Array:  # [num_images, 3], host data
    vcfg, dt = self.cfg, self.dtype
    lay = vision_layout(vcfg, image_grid_thw)
    total = lay.rope_positions.shape[0]
    p = self.patch_weight_pd.shape[0]
    if pixel_values.shape != (total, p):
      raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but "
                       f"image_grid_thw {[list(g) for g in _as_grid(image_grid_thw)]} needs "
                       f"({total}, {p})")
    unit = vcfg.spatial_merge_size ** 2
    with jax.named_scope("vision_tower"):
      x = jnp.einsum("SP,PD->SD", pixel_values.astype(dt),
                     self.patch_weight_pd[...].astype(dt))
      x = x.reshape(total // unit, unit, -1)[lay.window_index].reshape(total, -1)
      cos, sin = self.rope(lay.rope_positions)
      full = jnp.asarray(lay.full_segments)
      win = jnp.asarray(lay.window_segments)
      full_mask = full[:, None] == full[None, :]
      window_mask = win[:, None] == win[None, :]
      for i, block in enumerate(self.blocks):
        mask = full_mask if i in vcfg.fullatt_block_indexes else window_mask
        x = block(x, cos, sin, mask)
      return self.merger(x)[lay.reverse_index]


# ------------------------------------------------------------------------------------------
# Hugging Face checkpoints.
# ------------------------------------------------------------------------------------------
Rule = tuple[str, str, Callable[[np.ndarray, tuple], np.ndarray],
             Callable[[np.ndarray, Optional[tuple]], np.ndarray]]


def _same(a: np.ndarray, shape) -> np.ndarray:
  return np.asarray(a).reshape(shape)


def _same_hf(p: np.ndarray, hf_shape) -> np.ndarray:
  return np.asarray(p) if hf_shape is None else np.asarray(p).reshape(hf_shape)


def _linear(a: np.ndarray, shape) -> np.ndarray:
  """torch Linear weight [out, in] -> input-first [in..., out...] of `shape`."""
  return np.asarray(a).T.reshape(shape)


def _linear_hf(p: np.ndarray, hf_shape) -> np.ndarray:
  """Input-first weight whose last axis is the output -> torch [out, in]."""
  return np.asarray(p).reshape(-1, p.shape[-1]).T


def _patch(a: np.ndarray, shape) -> np.ndarray:
  """Conv3d weight [D, C, tp, p, p] (stride == kernel) -> matmul weight [C*tp*p*p, D]."""
  a = np.asarray(a)
  return a.reshape(a.shape[0], -1).T.reshape(shape)


def _patch_hf(p: np.ndarray, hf_shape) -> np.ndarray:
  p = np.asarray(p)
  if hf_shape is None:
    # Qwen2.5-VL always has 3 channels and 2 temporal patches; recover the patch side.
    side = math.isqrt(p.shape[0] // 6)
    if 6 * side * side != p.shape[0]:
      raise ValueError(f"cannot infer the Conv3d kernel of patch weight {p.shape}; pass "
                       "its Hugging Face shape")
    hf_shape = (p.shape[1], 3, 2, side, side)
  return p.T.reshape(hf_shape)


def _qkv(a: np.ndarray, shape) -> np.ndarray:
  """[3 * N * H, D] (rows q, k, v; each head-major) -> [D, N, 3H] (per head [q|k|v])."""
  d, n, h3 = shape
  a = np.asarray(a).T.reshape(d, 3, n, h3 // 3)
  return a.transpose(0, 2, 1, 3).reshape(shape)


def _qkv_hf(p: np.ndarray, hf_shape) -> np.ndarray:
  d, n, h3 = p.shape
  p = np.asarray(p).reshape(d, n, 3, h3 // 3).transpose(0, 2, 1, 3)
  return p.reshape(d, -1).T


def _qkv_bias(a: np.ndarray, shape) -> np.ndarray:
  n, h3 = shape
  return np.asarray(a).reshape(3, n, h3 // 3).transpose(1, 0, 2).reshape(shape)


def _qkv_bias_hf(p: np.ndarray, hf_shape) -> np.ndarray:
  n, h3 = p.shape
  return np.asarray(p).reshape(n, 3, h3 // 3).transpose(1, 0, 2).reshape(-1)


_B = r"blocks\.(\d+)\."
# (HF key after the `visual.` prefix, NNX path under `visual`, to_jax, to_hf).
VISION_RULES: list[Rule] = [
    (r"patch_embed\.proj\.weight", "patch_weight_pd", _patch, _patch_hf),
    (_B + r"norm1\.weight", "blocks.{0}.norm1.scale_d", _same, _same_hf),
    (_B + r"norm2\.weight", "blocks.{0}.norm2.scale_d", _same, _same_hf),
    (_B + r"attn\.qkv\.weight", "blocks.{0}.attn.qkv_weight_dnh", _qkv, _qkv_hf),
    (_B + r"attn\.qkv\.bias", "blocks.{0}.attn.qkv_bias_nh", _qkv_bias, _qkv_bias_hf),
    (_B + r"attn\.proj\.weight", "blocks.{0}.attn.o_weight_nhd", _linear, _linear_hf),
    (_B + r"attn\.proj\.bias", "blocks.{0}.attn.o_bias_d", _same, _same_hf),
    (_B + r"mlp\.gate_proj\.weight", "blocks.{0}.mlp.gate_weight_df", _linear, _linear_hf),
    (_B + r"mlp\.gate_proj\.bias", "blocks.{0}.mlp.gate_bias_f", _same, _same_hf),
    (_B + r"mlp\.up_proj\.weight", "blocks.{0}.mlp.up_weight_df", _linear, _linear_hf),
    (_B + r"mlp\.up_proj\.bias", "blocks.{0}.mlp.up_bias_f", _same, _same_hf),
    (_B + r"mlp\.down_proj\.weight", "blocks.{0}.mlp.down_weight_fd", _linear, _linear_hf),
    (_B + r"mlp\.down_proj\.bias", "blocks.{0}.mlp.down_bias_d", _same, _same_hf),
    (r"merger\.ln_q\.weight", "merger.ln_q.scale_d", _same, _same_hf),
    (r"merger\.mlp\.0\.weight", "merger.fc1_weight_mf", _linear, _linear_hf),
    (r"merger\.mlp\.0\.bias", "merger.fc1_bias_f", _same, _same_hf),
    (r"merger\.mlp\.2\.weight", "merger.fc2_weight_fd", _linear, _linear_hf),
    (r"merger\.mlp\.2\.bias", "merger.fc2_bias_d", _same, _same_hf),
]


def vision_hf_shapes(vcfg: VisionConfig) -> dict[str, tuple[int, ...]]:
  """The Hugging Face shape of every vision tensor (keys without the prefix)."""
  d, f = vcfg.hidden_size, vcfg.intermediate_size
  m = d * vcfg.spatial_merge_size ** 2
  out = {"patch_embed.proj.weight": (d, vcfg.in_channels, vcfg.temporal_patch_size,
                                     vcfg.patch_size, vcfg.patch_size),
         "merger.ln_q.weight": (d,), "merger.mlp.0.weight": (m, m), "merger.mlp.0.bias": (m,),
         "merger.mlp.2.weight": (vcfg.out_hidden_size, m),
         "merger.mlp.2.bias": (vcfg.out_hidden_size,)}
  for i in range(vcfg.depth):
    b = f"blocks.{i}."
    out.update({b + "norm1.weight": (d,), b + "norm2.weight": (d,),
                b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                b + "mlp.gate_proj.weight": (f, d), b + "mlp.gate_proj.bias": (f,),
                b + "mlp.up_proj.weight": (f, d), b + "mlp.up_proj.bias": (f,),
                b + "mlp.down_proj.weight": (d, f), b + "mlp.down_proj.bias": (d,)})
  return out


def _get_param(module: nnx.Module, path: str) -> nnx.Param:
  node: Any = module
  for part in path.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


def _match(key: str):
  for regex, template, to_jax, to_hf in VISION_RULES:
    found = re.fullmatch(regex, key)
    if found:
      return template.format(*found.groups()), to_jax, to_hf
  return None


def load_vision_params(module: VisionTower, tensors: dict[str, np.ndarray],
                       prefix: str = "visual.") -> None:
  """Copies the `prefix`-ed Hugging Face tensors into `module` in place.

  Raises:
    ValueError: naming any unexpected key, mis-shaped tensor or parameter left unset.
  """
  keys = [k for k in tensors if k.startswith(prefix)]
  assigned, errors = set(), []
  for key in sorted(keys):
    found = _match(key[len(prefix):])
    if found is None:
      errors.append(f"unexpected vision weight {key!r}")
      continue
    path, to_jax, _ = found
    try:
      param = _get_param(module, path)
    except (AttributeError, IndexError):
      errors.append(f"vision weight {key!r} maps to {path!r}, which the model lacks")
      continue
    shape = tuple(param.shape)
    hf = np.asarray(tensors[key])
    if hf.size != math.prod(shape):
      errors.append(f"vision weight {key!r} has shape {hf.shape}; {path} needs {shape}")
      continue
    param[...] = jnp.asarray(to_jax(hf, shape), param.dtype)
    assigned.add(path)
  expected = {".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(
      nnx.state(module, nnx.Param))}
  missing = sorted(expected - assigned)
  if missing:
    errors.append(f"vision parameters without a weight under prefix {prefix!r}: {missing}")
  if errors:
    raise ValueError("; ".join(errors))


def vision_params_to_hf(module: VisionTower, prefix: str = "visual.") -> dict[str, np.ndarray]:
  """The module's weights as Hugging Face tensors (NumPy, the parameters' dtype)."""
  shapes = vision_hf_shapes(module.cfg)
  out = {}
  for key, shape in shapes.items():
    path, _, to_hf = _match(key)
    out[prefix + key] = np.asarray(to_hf(np.asarray(_get_param(module, path)[...]), shape))
  return out


# ------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------
def vision_config_from_hf(d: dict) -> VisionConfig:
  """`VisionConfig` from a Hugging Face `vision_config` dict (5.x names; 4.x tolerated).

  Accepts either the vision sub-dict or a whole Qwen2.5-VL `config.json` dict.
  """
  d = d.get("vision_config", d)
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"vision_config.hidden_act={act!r} is not supported; expected 'silu'")
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  theta = rope.get("rope_theta", d.get("rope_theta", _ROPE_THETA))
  if float(theta) != _ROPE_THETA:
    raise ValueError(f"vision rope_theta={theta} is not supported; expected {_ROPE_THETA}")
  default = VisionConfig()
  get = lambda *names: next((d[n] for n in names if n in d), None)

  def pick(field, *names):
    value = get(*names)
    return getattr(default, field) if value is None else value

  patch = pick("patch_size", "patch_size", "spatial_patch_size")
  return VisionConfig(
      depth=int(pick("depth", "depth", "num_hidden_layers")),
      hidden_size=int(pick("hidden_size", "hidden_size", "embed_dim")),
      intermediate_size=int(pick("intermediate_size", "intermediate_size")),
      num_heads=int(pick("num_heads", "num_heads", "num_attention_heads")),
      in_channels=int(pick("in_channels", "in_channels", "in_chans")),
      patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
      temporal_patch_size=int(pick("temporal_patch_size", "temporal_patch_size")),
      spatial_merge_size=int(pick("spatial_merge_size", "spatial_merge_size")),
      window_size=int(pick("window_size", "window_size")),
      fullatt_block_indexes=tuple(int(i) for i in pick("fullatt_block_indexes",
                                                       "fullatt_block_indexes")),
      out_hidden_size=int(pick("out_hidden_size", "out_hidden_size")),
  )


def vision_config_to_hf(vc: VisionConfig) -> dict:
  """The transformers 5.x `vision_config` dict for `vc`."""
  out = {f.name: getattr(vc, f.name) for f in dataclasses.fields(vc)}
  out.pop("rms_norm_eps")  # Hard-coded to 1e-6 in Hugging Face, not a config key.
  out["fullatt_block_indexes"] = list(vc.fullatt_block_indexes)
  out.update(model_type="qwen2_5_vl_vision", hidden_act="silu", initializer_range=0.02,
             # Only video positions use it; 2 is the released Qwen2.5-VL checkpoints' value.
             tokens_per_second=2,
             rope_parameters={"rope_type": "axial", "rope_theta": _ROPE_THETA})
  return out
