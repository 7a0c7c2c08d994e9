"""Name-mapping tables between Hugging Face checkpoints and this package's NNX modules.

Each rule maps one HF tensor name pattern to an NNX parameter path and back:
`(hf_template, nnx_template, to_jax, to_hf)`. Templates use `{0}` for the layer index.
`to_jax(w_hf, param_shape)` and `to_hf(p, hf_shape)` are NumPy functions. Keys are matched
after removing the family's prefix (`model.`, `model.language_model.`, `visual.`, ...), so
one table serves transformers 4.x and 5.x checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional

import numpy as np


def _expect(w, hf_shape) -> None:
  if tuple(w.shape) != tuple(hf_shape):
    raise ValueError(f"expected shape {tuple(hf_shape)}, got {tuple(w.shape)}")


def linear(num_in_axes: int):
  """HF nn.Linear weight [out, in] <-> our [in axes..., out axes...] (x @ W layout)."""

  def to_jax(w, shape):
    # Check the HF shape itself: a transposed [in, out] tensor has the right element
    # count and would otherwise reshape silently into scrambled weights.
    _expect(w, (math.prod(shape[num_in_axes:]), math.prod(shape[:num_in_axes])))
    return np.ascontiguousarray(w.T).reshape(shape)

  def to_hf(p, _):
    n_in = math.prod(p.shape[:num_in_axes])
    return np.ascontiguousarray(p.reshape(n_in, -1).T)

  return to_jax, to_hf


def reshape():
  """Same elements, different shape (biases [N*H] <-> [N, H], norms)."""

  def to_jax(w, shape):
    _expect(w, (math.prod(shape),))
    return w.reshape(shape)

  def to_hf(p, _):
    return p.reshape(-1)

  return to_jax, to_hf


def same():

  def to_jax(w, shape):
    _expect(w, shape)
    return w

  return to_jax, lambda p, _: p


def transpose():

  def to_jax(w, shape):
    _expect(w, tuple(shape)[::-1])
    return np.ascontiguousarray(w.T)

  return to_jax, lambda p, _: np.ascontiguousarray(p.T)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_template: str
  nnx_template: str
  to_jax: Callable
  to_hf: Callable

  @property
  def regex(self) -> re.Pattern:
    return re.compile("^" + re.escape(self.hf_template).replace(r"\{0\}", r"(\d+)") + "$")

  def match(self, hf_key: str) -> Optional[str]:
    m = self.regex.match(hf_key)
    return self.nnx_template.format(*m.groups()) if m else None


def path_keys(path) -> list[str]:
  """Pytree key path -> plain names (`("layers", "0", "attn", "q_weight_dnh")`)."""
  keys = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        keys.append(str(getattr(k, attr)))
        break
    else:
      keys.append(str(k))
  if keys and keys[-1] == "value":
    keys = keys[:-1]
  return keys


def path_str(path) -> str:
  return ".".join(path_keys(path))


def _rule(hf, nnx_path, fns) -> Rule:
  return Rule(hf, nnx_path, *fns)


TEXT_RULES: tuple[Rule, ...] = (
    _rule("embed_tokens.weight", "embedding_vd", same()),
    _rule("layers.{0}.self_attn.q_proj.weight", "layers.{0}.attn.q_weight_dnh", linear(1)),
    _rule("layers.{0}.self_attn.k_proj.weight", "layers.{0}.attn.k_weight_dkh", linear(1)),
    _rule("layers.{0}.self_attn.v_proj.weight", "layers.{0}.attn.v_weight_dkh", linear(1)),
    _rule("layers.{0}.self_attn.o_proj.weight", "layers.{0}.attn.o_weight_nhd", linear(2)),
    _rule("layers.{0}.self_attn.q_proj.bias", "layers.{0}.attn.q_bias_nh", reshape()),
    _rule("layers.{0}.self_attn.k_proj.bias", "layers.{0}.attn.k_bias_kh", reshape()),
    _rule("layers.{0}.self_attn.v_proj.bias", "layers.{0}.attn.v_bias_kh", reshape()),
    _rule("layers.{0}.self_attn.q_norm.weight", "layers.{0}.attn.q_norm.scale_h", reshape()),
    _rule("layers.{0}.self_attn.k_norm.weight", "layers.{0}.attn.k_norm.scale_h", reshape()),
    _rule("layers.{0}.mlp.gate_proj.weight", "layers.{0}.mlp.gate_weight_df", linear(1)),
    _rule("layers.{0}.mlp.up_proj.weight", "layers.{0}.mlp.up_weight_df", linear(1)),
    _rule("layers.{0}.mlp.down_proj.weight", "layers.{0}.mlp.down_weight_fd", linear(1)),
    _rule("layers.{0}.input_layernorm.weight", "layers.{0}.input_norm.scale_d", reshape()),
    _rule("layers.{0}.post_attention_layernorm.weight", "layers.{0}.post_attn_norm.scale_d",
          reshape()),
    _rule("norm.weight", "final_norm.scale_d", reshape()),
)
LM_HEAD_RULE = _rule("lm_head.weight", "lm_head_dv", transpose())

# Tensors that carry no learned state and are safe to skip when loading.
IGNORED_KEYS = re.compile(r".*(rotary_emb\.inv_freq|\.rotary_pos_emb\.inv_freq)$")


def split_prefix(hf_key: str, model_type: str) -> tuple[str, str]:
  """Returns (part, key_without_prefix) with part in {"text", "vision", "lm_head"}.

  transformers 4.x writes Qwen2.5-VL as `model.layers.*` + `visual.*`; 5.x writes
  `model.language_model.*` + `model.visual.*`. Text families use `model.*`.
  """
  if hf_key == "lm_head.weight":
    return "lm_head", hf_key
  for prefix in ("model.visual.", "visual."):
    if hf_key.startswith(prefix):
      return "vision", hf_key[len(prefix):]
  for prefix in ("model.language_model.", "language_model.model.", "model."):
    if hf_key.startswith(prefix):
      return "text", hf_key[len(prefix):]
  return "text", hf_key


def hf_name(part: str, key: str, model_type: str) -> str:
  """The transformers 5.x tensor name for a prefix-free key."""
  if part == "lm_head":
    return key
  if model_type == "qwen2_5_vl":
    return ("model.visual." if part == "vision" else "model.language_model.") + key
  return "model." + key
