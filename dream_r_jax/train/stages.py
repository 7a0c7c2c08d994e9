"""The stage registry and the context every stage runs in.

A stage is a function `fn(ctx: StageContext) -> dict` (a JSON-able summary) registered
by name:

    @stages.register_stage("sapo", produces="draft", requires=("target", "draft"))
    def sapo(ctx):
      target = ctx.load_model("target")
      ...
      ctx.export("sapo", "draft", model)
      return {"reward": ...}

`requires` names the models (roles) the stage reads, `produces` the role whose model it
exports; the pipeline checks before any work that every required model will exist (from
a `--*_checkpoint`, an earlier stage of this run, or an export already in the workdir),
and afterwards `ctx.model_dir(role)` is the newest model of that role. Modules that
register stages are listed in `STAGE_MODULES` (or passed with `--stage_modules`).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dream_r_jax.train.config import ConfigError, TrainConfig

STAGE_MODULES = ("dream_r_jax.train.sft", "dream_r_jax.rl.stage", "dream_r_jax.evaluation.stage")
ROLES = ("target", "draft")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  name: str
  fn: Callable[["StageContext"], dict[str, Any]]
  produces: Optional[str] = None
  requires: tuple[str, ...] = ()


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(name: str, *, produces: Optional[str] = None,
                   requires: Sequence[str] = ()):
  """Decorator: registers `fn(ctx) -> summary dict` as pipeline stage `name`."""
  bad = [r for r in (*requires, *([produces] if produces else [])) if r not in ROLES]
  if bad:
    raise ValueError(f"stage {name!r}: unknown roles {bad}; roles are {ROLES}")

  def deco(fn):
    # A reloaded module registers a new function object under the same qualified name;
    # only a different function taking an existing name is an error.
    where = lambda f: f"{f.__module__}.{f.__qualname__}"
    if name in _REGISTRY and where(_REGISTRY[name].fn) != where(fn):
      raise ValueError(f"stage {name!r} is already registered by "
                       f"{where(_REGISTRY[name].fn)}")
    _REGISTRY[name] = StageSpec(name, fn, produces, tuple(requires))
    return fn

  return deco


def load_stage_modules(extra: Sequence[str] = ()) -> dict[str, StageSpec]:
  """Imports the modules that register stages; returns the registry."""
  for module in (*STAGE_MODULES, *extra):
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f"--stage_modules: cannot import {module!r}: {e}") from e
  return dict(_REGISTRY)


def registered() -> dict[str, StageSpec]:
  return dict(_REGISTRY)


def export_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "export")


def _has_model(path: str) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def initial_models(cfg: TrainConfig) -> dict[str, str]:
  """Role -> newest model directory available before the run (or "")."""
  models = {"target": cfg.target.checkpoint, "draft": cfg.draft.checkpoint}
  for spec in _REGISTRY.values():  # Registration order: later stages refine earlier ones.
    path = export_dir(cfg.workdir, spec.name)
    if spec.produces and _has_model(path):
      if not (spec.produces == "target" and cfg.target.checkpoint):
        models[spec.produces] = path
  return models


def check_plan(cfg: TrainConfig) -> None:
  """Raises ConfigError if a stage would need a model that nothing provides."""
  have = {role: bool(path) for role, path in initial_models(cfg).items()}
  for name in cfg.stages:
    spec = _REGISTRY[name]
    if name == "target_sft" and cfg.target.checkpoint:
      continue
    missing = [r for r in spec.requires if not have[r]]
    if missing:
      raise ConfigError(
          f"stage {name!r} needs a {' and '.join(missing)} model, but none is given "
          f"(--{missing[0]}_checkpoint), made by an earlier stage in --stages, or "
          f"exported in {cfg.workdir}")
    if spec.produces:
      have[spec.produces] = True


@dataclasses.dataclass
class StageContext:
  """What a stage gets: settings, devices, tokenizer, models and bookkeeping helpers."""
  cfg: TrainConfig
  mesh: Mesh
  rules: Any
  tokenizer: Any
  models: dict[str, str]
  sigterm: Any = None   # loop.SigtermFlag (single-process runs)
  summaries: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def process_index(self) -> int:
    return jax.process_index()

  @property
  def process_count(self) -> int:
    return jax.process_count()

  @property
  def is_primary(self) -> bool:
    return jax.process_index() == 0

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.cfg.workdir, stage)

  def model_dir(self, role: str) -> str:
    if not self.models.get(role):
      raise RuntimeError(f"no {role} model is available yet")
    return self.models[role]

  def preempted(self, ckpts, step: int) -> bool:
    """Whether to save and stop now (SIGTERM here, or JAX's preemption sync point)."""
    if self.process_count > 1:
      return ckpts.reached_preemption(step)
    return self.sigterm is not None and self.sigterm.triggered.is_set()

  def barrier(self, name: str) -> None:
    if self.process_count > 1:
      multihost_utils.sync_global_devices(name)

  def done_path(self, stage: str) -> str:
    return os.path.join(self.stage_dir(stage), "done.json")

  def read_done(self, stage: str) -> Optional[dict[str, Any]]:
    try:
      with open(self.done_path(stage)) as f:
        return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
      return None

  def write_done(self, stage: str, record: dict[str, Any]) -> None:
    if self.is_primary:
      os.makedirs(self.stage_dir(stage), exist_ok=True)
      tmp = self.done_path(stage) + ".tmp"
      with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
      os.replace(tmp, self.done_path(stage))
    self.barrier(f"done_{stage}")

  def export(self, stage: str, role: str, model) -> str:
    """Writes `model` (+ tokenizer) as a HF directory; it becomes the role's model."""
    from dream_r_jax.models import save_pretrained  # pylint: disable=g-import-not-at-top
    from dream_r_jax.train import evaluation  # pylint: disable=g-import-not-at-top
    path = export_dir(self.cfg.workdir, stage)
    local = evaluation.local_model(model)
    if self.is_primary:
      save_pretrained(local, path, tokenizer=self.tokenizer)
      logging.info("[%s] exported the %s model to %s", stage, role, path)
    self.barrier(f"export_{stage}")
    self.models[role] = path
    return path
