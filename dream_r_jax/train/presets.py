"""Model presets by name: the bundled target/draft pairs and the released architectures.

A bundled preset is sized for the bundled task and takes its vocabulary and special ids
from the tokenizer, so the same preset works with any tokenizer that has the image
tokens. Any `ModelConfig` classmethod (`qwen2p5_vl_7b`, `tiny`, ...) is also a preset;
those keep their own vocabulary.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from dream_r_jax.models import ModelConfig, VisionConfig

# Per preset: (model_type, language-model fields, vision fields or None).
_BUNDLED: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    # Test-suite sizes: compile and train in seconds.
    "smoke_vl_target": ("qwen2_5_vl",
                        dict(hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=2, num_kv_heads=1, head_dim=16,
                             mrope_section=(2, 3, 3)),
                        dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1)),
    "smoke_vl_draft": ("qwen2_5_vl",
                       dict(hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=1, num_kv_heads=1, head_dim=16,
                            mrope_section=(2, 3, 3)),
                       dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=1)),
    "smoke_target": ("qwen2", dict(hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=2, num_kv_heads=1, head_dim=16), None),
    "smoke_draft": ("qwen2", dict(hidden_size=16, intermediate_size=32, num_layers=1,
                                  num_heads=1, num_kv_heads=1, head_dim=16), None),
    # Quickstart sizes: the target learns the default task on 2 CPU cores in minutes; the
    # draft is >= 10x cheaper per token and visibly weaker.
    "tiny_vl_target": ("qwen2_5_vl",
                       dict(hidden_size=128, intermediate_size=384, num_layers=4,
                            num_heads=4, num_kv_heads=2, head_dim=32,
                            mrope_section=(4, 6, 6)),
                       dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2)),
    "tiny_vl_draft": ("qwen2_5_vl",
                      dict(hidden_size=48, intermediate_size=128, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=24,
                           mrope_section=(4, 4, 4)),
                      dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2)),
    "tiny_target": ("qwen2", dict(hidden_size=128, intermediate_size=384, num_layers=4,
                                  num_heads=4, num_kv_heads=2, head_dim=32), None),
    "tiny_draft": ("qwen2", dict(hidden_size=48, intermediate_size=128, num_layers=2,
                                 num_heads=2, num_kv_heads=1, head_dim=24), None),
}
_FIELDS = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
_CLASSMETHODS = ("tiny", "qwen2_100m", "qwen2p5_vl_3b", "qwen2p5_vl_7b", "qwen3_1p7b",
                 "qwen3_32b", "llama3p2_1b")
PRESETS = tuple(_BUNDLED) + _CLASSMETHODS


def is_known(name: str) -> bool:
  return name in PRESETS


def known_names() -> list[str]:
  return list(PRESETS)


def check_overrides(overrides: Mapping[str, Any]) -> None:
  bad = sorted(set(overrides) - set(_FIELDS))
  if bad:
    raise ValueError(f"not ModelConfig fields: {bad}")


def _token_id(tokenizer, token: str) -> int:
  tid = tokenizer.convert_tokens_to_ids(token)
  if tid is None or tid == tokenizer.unk_token_id:
    raise ValueError(f"the tokenizer has no {token!r} token, needed by the bundled "
                     "multimodal presets")
  return int(tid)


def _bundled(name: str, tokenizer, overrides: Mapping[str, Any]) -> ModelConfig:
  from dream_r_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  model_type, lm, vision = _BUNDLED[name]
  kw = dict(model_type=model_type, vocab_size=len(tokenizer), qkv_bias=True,
            tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=(tokenizer.eos_token_id,),
            pad_token_id=tokenizer.pad_token_id)
  kw.update(lm)
  # Overrides go in before the vision tower is sized, so that its output width follows
  # an overridden hidden_size.
  kw.update(overrides)
  if vision is not None and "vision" not in overrides:
    # One merged token per 28x28 tile; windows of 2x2 merged tokens, one full-attention
    # block last, as in Qwen2.5-VL (scaled down).
    depth = vision["depth"]
    kw.update(vision=VisionConfig(patch_size=14, temporal_patch_size=2,
                                  spatial_merge_size=2, window_size=56,
                                  fullatt_block_indexes=(depth - 1,),
                                  out_hidden_size=kw["hidden_size"], **vision),
              image_token_id=_token_id(tokenizer, tok_lib.IMAGE_PAD),
              vision_start_token_id=_token_id(tokenizer, tok_lib.VISION_START),
              video_token_id=None)
  elif vision is None:
    kw.pop("mrope_section", None)
  return ModelConfig(**kw)


def model_config(name: str, tokenizer=None,
                 overrides: Mapping[str, Any] | None = None) -> ModelConfig:
  """The `ModelConfig` of preset `name` with `overrides` applied.

  Args:
    name: a bundled preset or a `ModelConfig` classmethod name (see `PRESETS`).
    tokenizer: needed by bundled presets (vocabulary size and special token ids).
    overrides: field -> value; `mrope_section` may be given as a tuple.

  Raises:
    ValueError: unknown preset or field.
  """
  overrides = dict(overrides or {})
  check_overrides(overrides)
  if name in _BUNDLED:
    if tokenizer is None:
      raise ValueError(f"preset {name!r} needs the tokenizer")
    return _bundled(name, tokenizer, overrides)
  if name in _CLASSMETHODS:
    factory: Callable[..., ModelConfig] = getattr(ModelConfig, name)
    return factory(**overrides)
  raise ValueError(f"unknown model preset {name!r}; choose one of {list(PRESETS)}")


def parse_value(text: str) -> Any:
  """Override values from flags: int, float, bool, a tuple "(2,3,3)" or a string."""
  text = text.strip()
  if text.startswith("(") and text.endswith(")"):
    return tuple(parse_value(t) for t in text[1:-1].split(";") if t.strip())
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text
