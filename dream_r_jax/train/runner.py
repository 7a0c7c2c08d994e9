"""Runs the configured stages in order: validate, set up mesh and tokenizer, run, report.

    cfg = TrainConfig(workdir="/tmp/run", stages=("target_sft", "draft_sft"))
    summaries = runner.run(cfg)

Everything that can be checked is checked before the first stage starts (settings,
mesh, stage names, which models each stage needs), so bad input fails in seconds.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import jax
from absl import logging

from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.sharding import rules as rules_lib
from dream_r_jax.sharding.mesh import make_mesh
from dream_r_jax.train import config as config_lib
from dream_r_jax.train import loop
from dream_r_jax.train import stages as stages_lib
from dream_r_jax.train.config import TrainConfig


def prepare(cfg: TrainConfig, stage_modules: Sequence[str] = ()) -> TrainConfig:
  """Validates `cfg` against the registry and the devices; returns it with the mesh set.

  Raises:
    config.ConfigError: on any invalid setting.
  """
  registry = stages_lib.load_stage_modules(stage_modules)
  cfg = config_lib.validate(cfg, num_devices=jax.device_count(),
                            process_count=jax.process_count(), known_stages=registry)
  stages_lib.check_plan(cfg)
  return cfg


def _tokenizer(cfg: TrainConfig):
  path = cfg.tokenizer or cfg.target.checkpoint
  if path and os.path.exists(os.path.join(path, "tokenizer_config.json")):
    return tok_lib.load_tokenizer(path)
  if path and cfg.tokenizer:
    raise config_lib.ConfigError(f"--tokenizer={path!r} holds no tokenizer")
  return tok_lib.bundled_tokenizer()


def run(cfg: TrainConfig, stage_modules: Sequence[str] = ()) -> dict[str, Any]:
  """Runs `cfg.stages`; returns {stage: summary}.

  Raises:
    config.ConfigError: invalid settings (before any work).
    checkpoint.CheckpointError: a checkpoint in the workdir is unreadable or foreign.
    loop.NonFiniteLossError: training diverged (the last good checkpoint is kept).
    loop.Preempted: SIGTERM arrived; a checkpoint was saved.
  """
  cfg = prepare(cfg, stage_modules)
  mesh = make_mesh(cfg.mesh_shape, cfg.mesh_axes)
  rules = rules_lib.FSDP_RULES if cfg.fsdp else rules_lib.DEFAULT_RULES
  tokenizer = _tokenizer(cfg)
  if jax.process_index() == 0:
    os.makedirs(cfg.workdir, exist_ok=True)
    with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
      json.dump(_jsonable(cfg), f, indent=2, sort_keys=True)
  logging.info("devices: %d (%d processes), mesh %s", jax.device_count(),
               jax.process_count(), dict(mesh.shape))
  registry = stages_lib.registered()
  with loop.SigtermFlag() as sigterm:
    ctx = stages_lib.StageContext(cfg=cfg, mesh=mesh, rules=rules, tokenizer=tokenizer,
                                  models=stages_lib.initial_models(cfg),
                                  sigterm=sigterm if jax.process_count() == 1 else None)
    for name in cfg.stages:
      t0 = time.time()
      logging.info("=== stage %s ===", name)
      summary = registry[name].fn(ctx) or {}
      summary.setdefault("wall_seconds", time.time() - t0)
      ctx.summaries[name] = summary
      logging.info("[%s] done in %.1fs: %s", name, time.time() - t0,
                   json.dumps(summary, default=str))
  return ctx.summaries


def _jsonable(x):
  if hasattr(x, "__dataclass_fields__"):
    return {k: _jsonable(getattr(x, k)) for k in x.__dataclass_fields__}
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x
