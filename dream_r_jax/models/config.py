"""Model configuration: one frozen dataclass for the whole decoder family, with presets.

The same `ModelConfig` describes Qwen2/Qwen2.5, Qwen3, Llama 3.x and the language half of
Qwen2.5-VL; `VisionConfig` describes the Qwen2.5-VL vision tower. Sharding is configured
separately (`dream_r_jax.sharding`), so a config says what the model *is*, not where it runs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

MODEL_TYPES = ("qwen2", "qwen3", "llama", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency scaling (`rope_type == "llama3"`)."""
  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The Qwen2.5-VL vision tower (ViT with window attention and a 2x2 patch merger)."""
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only LM of the Qwen2 / Qwen3 / Llama family (optionally with vision).

  Attributes mirror the Hugging Face names where one exists; `num_layers` is
  `num_hidden_layers`, `num_kv_heads` is `num_key_value_heads`.
  """
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  qkv_bias: bool = False          # Qwen2 / Qwen2.5 / Qwen2.5-VL
  qk_norm: bool = False           # Qwen3
  dtype: str = "float32"          # activations
  param_dtype: str = "float32"    # weights
  # Multimodal (Qwen2.5-VL) fields.
  vision: Optional[VisionConfig] = None
  mrope_section: Optional[tuple[int, ...]] = None
  image_token_id: Optional[int] = None
  video_token_id: Optional[int] = None
  vision_start_token_id: Optional[int] = None
  # Special tokens (informative; decoding takes its stop ids explicitly).
  bos_token_id: Optional[int] = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(
          f"ModelConfig.model_type={self.model_type!r} is not supported; expected one of "
          f"{MODEL_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.model_type == "qwen2_5_vl" and (self.vision is None or self.mrope_section is None):
      raise ValueError("model_type='qwen2_5_vl' needs `vision` and `mrope_section`")
    if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.head_dim:
      raise ValueError(
          f"mrope_section={self.mrope_section} must sum to head_dim/2={self.head_dim // 2}")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count of the language model (embeddings counted once when tied)."""
    d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_heads,
                     self.num_kv_heads, self.head_dim)
    attn = d * n * h + 2 * d * k * h + n * h * d
    if self.qkv_bias:
      attn += n * h + 2 * k * h
    if self.qk_norm:
      attn += 2 * h
    layer = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + emb + d

  # --------------------------------------------------------------------------------------
  # Presets. Tiny ones are for tests and notebooks; the rest match released checkpoints.
  # --------------------------------------------------------------------------------------
  @classmethod
  def tiny(cls, model_type: str = "qwen2", **kw) -> "ModelConfig":
    """A ~50k-parameter model of the given family, for tests."""
    base = dict(model_type=model_type, vocab_size=128, hidden_size=32, intermediate_size=64,
                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                max_position_embeddings=512, rope_theta=10000.0)
    if model_type == "qwen2":
      base.update(qkv_bias=True)
    elif model_type == "qwen3":
      base.update(qk_norm=True, head_dim=16)
    elif model_type == "llama":
      base.update(rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=64))
    elif model_type == "qwen2_5_vl":
      # Hugging Face's Qwen2.5-VL attention takes head_dim = hidden_size / num_heads, so
      # hidden_size is 4 heads x 16 here (the vision tower's output must match it).
      base.update(qkv_bias=True, hidden_size=64, head_dim=16, mrope_section=(2, 3, 3),
                  vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48,
                                      num_heads=2, patch_size=14, temporal_patch_size=2,
                                      spatial_merge_size=2, window_size=56,
                                      fullatt_block_indexes=(1,), out_hidden_size=64),
                  vocab_size=160, image_token_id=151, video_token_id=152,
                  vision_start_token_id=150)
    base.update(kw)
    return cls(**base)

  @classmethod
  def qwen2_100m(cls, **kw) -> "ModelConfig":
    """A ~100M-parameter Qwen2-shaped config (the decode benchmark's model)."""
    base = dict(model_type="qwen2", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                num_layers=8, num_heads=12, num_kv_heads=4, head_dim=64, qkv_bias=True,
                tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                max_position_embeddings=4096)
    base.update(kw)
    return cls(**base)

  @classmethod
  def qwen2p5_vl_3b(cls, **kw) -> "ModelConfig":
    base = dict(model_type="qwen2_5_vl", vocab_size=151936, hidden_size=2048,
                intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
                head_dim=128, qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0,
                max_position_embeddings=128000, mrope_section=(16, 24, 24),
                vision=VisionConfig(out_hidden_size=2048), image_token_id=151655,
                video_token_id=151656, vision_start_token_id=151652, bos_token_id=151643,
                eos_token_id=(151645,), dtype="bfloat16", param_dtype="bfloat16")
    base.update(kw)
    return cls(**base)

  @classmethod
  def qwen2p5_vl_7b(cls, **kw) -> "ModelConfig":
    base = dict(model_type="qwen2_5_vl", vocab_size=152064, hidden_size=3584,
                intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                head_dim=128, qkv_bias=True, tie_word_embeddings=False, rope_theta=1000000.0,
                max_position_embeddings=128000, mrope_section=(16, 24, 24),
                vision=VisionConfig(out_hidden_size=3584), image_token_id=151655,
                video_token_id=151656, vision_start_token_id=151652, bos_token_id=151643,
                eos_token_id=(151645,), dtype="bfloat16", param_dtype="bfloat16")
    base.update(kw)
    return cls(**base)

  @classmethod
  def qwen3_1p7b(cls, **kw) -> "ModelConfig":
    base = dict(model_type="qwen3", vocab_size=151936, hidden_size=2048,
                intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                head_dim=128, qk_norm=True, tie_word_embeddings=True, rope_theta=1000000.0,
                max_position_embeddings=40960, eos_token_id=(151645,), dtype="bfloat16",
                param_dtype="bfloat16")
    base.update(kw)
    return cls(**base)

  @classmethod
  def qwen3_32b(cls, **kw) -> "ModelConfig":
    base = dict(model_type="qwen3", vocab_size=151936, hidden_size=5120,
                intermediate_size=25600, num_layers=64, num_heads=64, num_kv_heads=8,
                head_dim=128, qk_norm=True, tie_word_embeddings=False, rope_theta=1000000.0,
                max_position_embeddings=40960, eos_token_id=(151645,), dtype="bfloat16",
                param_dtype="bfloat16")
    base.update(kw)
    return cls(**base)

  @classmethod
  def llama3p2_1b(cls, **kw) -> "ModelConfig":
    base = dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=8192),
                tie_word_embeddings=True, max_position_embeddings=131072,
                bos_token_id=128000, eos_token_id=(128001, 128008, 128009),
                dtype="bfloat16", param_dtype="bfloat16")
    base.update(kw)
    return cls(**base)
