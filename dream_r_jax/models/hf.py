"""Hugging Face checkpoints from and to a local directory (no hub access).

`load_pretrained(path)` reads `config.json` (transformers 4.x or 5.x keys) and the
`*.safetensors` weights (single file or sharded with an index) into a `Transformer`;
`save_pretrained(model, path)` writes a directory that transformers itself loads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dream_r_jax.models import params as P
from dream_r_jax.models.config import MODEL_TYPES, ModelConfig, RopeScaling
from dream_r_jax.models.model import Transformer

_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "torch.float32": "float32", "torch.bfloat16": "bfloat16"}


# ------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------
def config_from_hf(d: dict[str, Any], *, dtype: Optional[str] = None,
                   param_dtype: Optional[str] = None) -> ModelConfig:
  """A `ModelConfig` from a parsed `config.json` (transformers 4.x or 5.x layout)."""
  model_type = d.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json: model_type={model_type!r} is not supported; expected one "
                     f"of {MODEL_TYPES}")
  t = dict(d.get("text_config") or {}) if model_type == "qwen2_5_vl" else {}
  # 4.x Qwen2.5-VL keeps the text fields at the top level; 5.x nests them in text_config.
  get = lambda k, default=None: t.get(k, d.get(k, default))
  rope = dict(get("rope_parameters") or {})
  scaling = dict(get("rope_scaling") or {})
  theta = rope.get("rope_theta", get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  rs = rope or scaling
  rope_scaling = None
  if rope_type == "llama3":
    rope_scaling = RopeScaling(
        factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
  elif rope_type not in ("default", "mrope", None):
    raise ValueError(f"config.json: rope type {rope_type!r} is not supported")
  mrope = rs.get("mrope_section") or scaling.get("mrope_section")
  if model_type == "llama" and (get("attention_bias") or get("mlp_bias")):
    raise ValueError("config.json: Llama with attention_bias/mlp_bias is not supported")
  hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
  eos = get("eos_token_id")
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
  stored = _DTYPES.get(str(get("dtype", get("torch_dtype", "float32"))), "float32")
  kw = dict(
      model_type=model_type, vocab_size=int(get("vocab_size")), hidden_size=hidden,
      intermediate_size=int(get("intermediate_size")),
      num_layers=int(get("num_hidden_layers")), num_heads=heads,
      num_kv_heads=int(get("num_key_value_heads") or heads),
      head_dim=int(get("head_dim") or hidden // heads),
      rms_norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
      rope_scaling=rope_scaling,
      max_position_embeddings=int(get("max_position_embeddings", 32768)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings",
                                                                  False))),
      qkv_bias=model_type in ("qwen2", "qwen2_5_vl") or bool(get("attention_bias", False)),
      qk_norm=model_type == "qwen3",
      dtype=dtype or stored, param_dtype=param_dtype or dtype or stored,
      bos_token_id=get("bos_token_id"), eos_token_id=eos, pad_token_id=get("pad_token_id"))
  if model_type == "qwen2_5_vl":
    from dream_r_jax.models import vision  # pylint: disable=g-import-not-at-top
    kw.update(vision=vision.vision_config_from_hf(d["vision_config"]),
              mrope_section=tuple(int(x) for x in mrope),
              image_token_id=d.get("image_token_id", t.get("image_token_id")),
              video_token_id=d.get("video_token_id", t.get("video_token_id")),
              vision_start_token_id=d.get("vision_start_token_id"))
  return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A transformers 5.x `config.json` dict for `cfg`."""
  rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling is not None:
    rs = cfg.rope_scaling
    rope.update(rope_type=rs.rope_type, factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings)
  if cfg.mrope_section is not None:
    rope.update(rope_type="default", mrope_section=list(cfg.mrope_section))
  eos = list(cfg.eos_token_id)
  text = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_act="silu",
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
      rope_parameters=rope, tie_word_embeddings=cfg.tie_word_embeddings,
      bos_token_id=cfg.bos_token_id, eos_token_id=(eos[0] if len(eos) == 1 else eos or None),
      pad_token_id=cfg.pad_token_id, dtype=cfg.param_dtype, use_cache=True)
  if cfg.model_type == "llama":
    text.update(attention_bias=False, mlp_bias=False)
  if cfg.model_type == "qwen3":
    text.update(attention_bias=False)
  if cfg.model_type != "qwen2_5_vl":
    return dict(text, model_type=cfg.model_type,
                architectures=[_ARCHITECTURES[cfg.model_type]])
  from dream_r_jax.models import vision  # pylint: disable=g-import-not-at-top
  # transformers validates config fields strictly: an unset token id is left out rather
  # than written as null.
  text_cfg = {k: v for k, v in text.items() if v is not None}
  text_cfg["model_type"] = "qwen2_5_vl_text"
  out = dict(model_type="qwen2_5_vl", architectures=[_ARCHITECTURES["qwen2_5_vl"]],
              text_config=text_cfg, vision_config=vision.vision_config_to_hf(cfg.vision),
              image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
              vision_start_token_id=cfg.vision_start_token_id,
              tie_word_embeddings=cfg.tie_word_embeddings, dtype=cfg.param_dtype)
  return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------
# Weights.
# ------------------------------------------------------------------------------------------
def _rules_for(cfg: ModelConfig):
  rules = {"text": P.TEXT_RULES, "lm_head": (P.LM_HEAD_RULE,), "vision": ()}
  if cfg.vision is not None:
    from dream_r_jax.models import vision  # pylint: disable=g-import-not-at-top
    rules["vision"] = tuple(
        P.Rule(_regex_to_template(rx), "visual." + path, to_jax, to_hf)
        for rx, path, to_jax, to_hf in vision.VISION_RULES)
  return rules


def _regex_to_template(rx: str) -> str:
  return rx.replace(r"(\d+)", "{0}").replace("\\.", ".").strip("^$")


def _match_nnx_path(table, nnx_path: str):
  """(part, rule, prefix-free HF key) of the rule that writes `nnx_path`, or None."""
  for part, rules in table.items():
    for r in rules:
      rx = "^" + r.nnx_template.replace(".", r"\.").replace("{0}", r"(\d+)") + "$"
      m = re.match(rx, nnx_path)
      if m:
        return part, r, r.hf_template.format(*m.groups())
  return None


def _hf_key(cfg: ModelConfig, table, nnx_path: str) -> Optional[str]:
  hit = _match_nnx_path(table, nnx_path)
  return None if hit is None else P.hf_name(hit[0], hit[2], cfg.model_type)


def _safetensor_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, f) for f in files]
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{path}: no *.safetensors weights found")
  return [os.path.join(path, f) for f in files]


def _flat_params(model_state) -> dict[str, Any]:
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(model_state):
    flat[P.path_str(path)] = leaf
  return flat


def read_config(path: str, **kw) -> ModelConfig:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
  with open(cfg_path) as f:
    return config_from_hf(json.load(f), **kw)


def load_pretrained(path: str, *, dtype: Optional[str] = None,
                    param_dtype: Optional[str] = None, mesh=None, rules=None,
                    config: Optional[ModelConfig] = None) -> tuple[Transformer, ModelConfig]:
  """Loads a Hugging Face model directory into a `Transformer`.

  Args:
    path: local directory with `config.json` and `*.safetensors`.
    dtype: activation dtype (default: the checkpoint's dtype).
    param_dtype: weight dtype (default: `dtype`, else the checkpoint's dtype).
    mesh: optional mesh; weights are placed with `dream_r_jax.sharding` rules as they load,
      so a large model never sits whole on one device.
    rules: logical axis rules for `mesh` (default `DEFAULT_RULES`).
    config: use this config instead of reading `config.json`.

  Returns:
    (model, config).

  Raises:
    ValueError: unknown model_type, unexpected / missing / mis-shaped tensors (named).
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from dream_r_jax.sharding import rules as sr  # pylint: disable=g-import-not-at-top

  cfg = config or read_config(path, dtype=dtype, param_dtype=param_dtype)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = _flat_params(state)
  shardings = (_flat_params(sr.state_shardings(state, mesh, rules or sr.DEFAULT_RULES))
               if mesh is not None else {})
  table = _rules_for(cfg)
  loaded: dict[str, jax.Array] = {}
  unexpected, misshaped, bad_shape = [], [], set()
  for file in _safetensor_files(path):
    with safe_open(file, framework="flax") as f:
      for key in f.keys():
        if P.IGNORED_KEYS.match(key):
          continue
        part, short = P.split_prefix(key, cfg.model_type)
        if part == "lm_head" and cfg.tie_word_embeddings:
          continue  # Tied checkpoints sometimes store the (identical) head as well.
        target = next((r for r in table[part] if r.match(short)), None)
        nnx_path = target.match(short) if target else None
        if nnx_path is None or nnx_path not in flat:
          unexpected.append(key)
          continue
        want = flat[nnx_path]
        w = np.asarray(f.get_tensor(key))
        try:
          arr, error = target.to_jax(w, tuple(want.shape)), None
        except ValueError as e:
          arr, error = None, str(e)
        if arr is None or tuple(arr.shape) != tuple(want.shape):
          misshaped.append(f"{key}: " + (error or f"got {tuple(w.shape)} for {nnx_path} "
                                                  f"{tuple(want.shape)}"))
          bad_shape.add(nnx_path)
          continue
        arr = jnp.asarray(arr, dtype=want.dtype)
        loaded[nnx_path] = (jax.device_put(arr, shardings[nnx_path]) if nnx_path in shardings
                            else arr)
  # Named as the checkpoint would name them; a mis-shaped tensor is reported once, above.
  missing = [_hf_key(cfg, table, p) or p for p in sorted(set(flat) - set(loaded) - bad_shape)]
  problems = []
  if unexpected:
    problems.append(f"unexpected tensors: {unexpected[:20]}")
  if misshaped:
    problems.append(f"mis-shaped tensors: {misshaped[:20]}")
  if missing:
    problems.append(f"missing tensors: {missing[:20]}")
  if problems:
    raise ValueError(f"{path}: checkpoint does not match model_type={cfg.model_type!r} "
                     f"config: " + "; ".join(problems))

  state = jax.tree_util.tree_map_with_path(lambda p, _: loaded[P.path_str(p)], state)
  return nnx.merge(graphdef, state), cfg


def save_pretrained(model: Transformer, path: str, *, tokenizer=None,
                    max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes `model` as a Hugging Face directory (config.json + safetensors).

  The directory is written under a temporary name and renamed into place, so an
  interrupted save never leaves a half-written model where a good one was.
  """
  from safetensors.flax import save_file  # pylint: disable=g-import-not-at-top

  cfg = model.cfg
  table = _rules_for(cfg)
  flat = _flat_params(nnx.state(model, nnx.Param))
  tensors: dict[str, jax.Array] = {}
  for nnx_path, value in flat.items():
    hit = _match_nnx_path(table, nnx_path)
    if hit is None:
      raise ValueError(f"save_pretrained: no Hugging Face name for parameter {nnx_path}")
    part, r, short = hit
    arr = np.asarray(jax.device_get(value))
    tensors[P.hf_name(part, short, cfg.model_type)] = jnp.asarray(r.to_hf(arr, None))

  parent = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_save_", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config_to_hf(cfg), f, indent=2)
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
      nbytes = tensors[k].size * tensors[k].dtype.itemsize
      if cur and size + nbytes > max_shard_bytes:
        shards.append(cur)
        cur, size = {}, 0
      cur[k] = tensors[k]
      size += nbytes
    shards.append(cur)
    if len(shards) == 1:
      save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
      total = sum(t.size * t.dtype.itemsize for t in tensors.values())
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f,
                  indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
      old = path.rstrip("/") + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path
