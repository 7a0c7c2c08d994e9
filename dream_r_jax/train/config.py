"""The training pipeline's settings: one frozen dataclass, validated before any work.

`TrainConfig` is what `experiments/train.py` builds from its flags and what a notebook
builds by hand; `validate` turns every bad value into one `ConfigError` that names the
setting, so a run never starts compiling, generating data or writing checkpoints on
input that would fail later.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from dream_r_jax.train import presets


class ConfigError(ValueError):
  """An invalid setting, found before any work started."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer of one SFT stage: AdamW with linear warmup, cosine decay, global-norm clip."""
  steps: int = 100
  learning_rate: float = 1e-3
  warmup_steps: int = 10
  min_lr_ratio: float = 0.05   # final lr = learning_rate * min_lr_ratio
  weight_decay: float = 0.01
  grad_clip: float = 1.0       # <= 0 disables clipping
  b1: float = 0.9
  b2: float = 0.98


@dataclasses.dataclass(frozen=True)
class RoleConfig:
  """Where one model (target or draft) comes from and how its SFT stage trains it.

  Attributes:
    preset: a bundled preset (`presets.PRESETS`) or a `ModelConfig` classmethod name.
    overrides: `ModelConfig` fields to override, e.g. {"num_layers": 2}.
    checkpoint: a local Hugging Face model directory. For the target, `target_sft` is
      then skipped and the checkpoint is used as is; for the draft it is the starting
      point that `draft_sft` distils into.
    optim: the optimizer of the role's SFT stage.
  """
  preset: str = ""
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  checkpoint: str = ""
  optim: OptimConfig = OptimConfig()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a pipeline run needs; see `flags.py` for the meaning of each field."""
  workdir: str
  stages: tuple[str, ...] = ("target_sft", "draft_sft")
  # Data.
  task_config: str = "default"
  data_dir: str = ""               # "" = <workdir>/data
  split_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  tokenizer: str = ""              # "" = the target checkpoint's, else the bundled one
  max_len: int = 96
  verdict_ratio: float = 0.2
  distill_examples: int = 1024     # training prompts the target answers for draft_sft
  eval_split: str = "validation"
  eval_examples: int = 128
  eval_benchmark: str = ""         # a local MathVista/MMMU-style JSONL instead of eval_split
  eval_batch_size: int = 64
  max_new_tokens: int = 64
  # Models and optimisation.
  target: RoleConfig = RoleConfig(preset="tiny_vl_target")
  draft: RoleConfig = RoleConfig(preset="tiny_vl_draft")
  batch_size: int = 32
  seed: int = 0
  # Devices.
  mesh_shape: tuple[int, ...] = (-1, 1)
  mesh_axes: tuple[str, ...] = ("data", "model")
  fsdp: bool = False
  # Bookkeeping.
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  log_every: int = 10
  profile_steps: tuple[int, int] = (0, 0)   # [start, stop) steps; (0, 0) = no trace
  inject_nan_at_step: int = -1              # tests only: poisons the loss at this step

  def replace(self, **kw) -> "TrainConfig":
    return dataclasses.replace(self, **kw)

  @property
  def resolved_data_dir(self) -> str:
    return self.data_dir or os.path.join(self.workdir, "data")

  def role(self, name: str) -> RoleConfig:
    return {"target": self.target, "draft": self.draft}[name]


def resolve_mesh_shape(shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry of `shape` so that the mesh uses all `num_devices` devices."""
  shape = tuple(int(s) for s in shape)
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"--mesh_shape={list(shape)}: entries must be positive, with at most "
                      "one -1 (= the remaining devices)")
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise ConfigError(f"--mesh_shape={list(shape)} does not divide the {num_devices} "
                        "devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(f"--mesh_shape={list(shape)} uses {math.prod(shape)} devices but "
                      f"{num_devices} are available; the mesh must use all of them")
  return shape


def _check_optim(name: str, o: OptimConfig, errors: list[str]) -> None:
  if o.steps < 0:
    errors.append(f"--{name}_steps={o.steps} must be >= 0")
  if not o.learning_rate > 0 or not math.isfinite(o.learning_rate):
    errors.append(f"--{name}_lr={o.learning_rate} must be a positive number")
  if o.warmup_steps < 0:
    errors.append(f"--warmup_steps={o.warmup_steps} must be >= 0")
  if o.weight_decay < 0:
    errors.append(f"--weight_decay={o.weight_decay} must be >= 0")
  if not 0 <= o.min_lr_ratio <= 1:
    errors.append(f"--min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")


def validate(cfg: TrainConfig, *, num_devices: int, process_count: int = 1,
             known_stages=()) -> TrainConfig:
  """Checks every setting; returns `cfg` with the mesh shape resolved.

  Raises:
    ConfigError: listing every invalid setting at once.
  """
  errors: list[str] = []
  if not cfg.workdir:
    errors.append("--workdir must be set (every file the run writes goes under it)")
  if not cfg.stages:
    errors.append("--stages is empty")
  unknown = [s for s in cfg.stages if s not in known_stages]
  if unknown:
    errors.append(f"--stages: unknown stage(s) {unknown}; registered stages are "
                  f"{sorted(known_stages)}")
  if len(set(cfg.stages)) != len(cfg.stages):
    errors.append(f"--stages={','.join(cfg.stages)} names a stage twice")
  for name, value in (("batch_size", cfg.batch_size), ("max_len", cfg.max_len),
                      ("eval_batch_size", cfg.eval_batch_size),
                      ("max_new_tokens", cfg.max_new_tokens),
                      ("checkpoint_every", cfg.checkpoint_every),
                      ("keep_checkpoints", cfg.keep_checkpoints),
                      ("log_every", cfg.log_every)):
    if value <= 0:
      errors.append(f"--{name}={value} must be positive")
  for name, value in (("eval_examples", cfg.eval_examples),
                      ("distill_examples", cfg.distill_examples)):
    if value < 0:
      errors.append(f"--{name}={value} must be >= 0")
  if "draft_sft" in cfg.stages and cfg.distill_examples < cfg.batch_size:
    errors.append(f"--distill_examples={cfg.distill_examples} is smaller than one batch "
                  f"(--batch_size={cfg.batch_size})")
  if not 0.0 <= cfg.verdict_ratio <= 1.0:
    errors.append(f"--verdict_ratio={cfg.verdict_ratio} must be in [0, 1]")
  if cfg.eval_split not in ("train", "validation", "test"):
    errors.append(f"--eval_split={cfg.eval_split!r} must be train, validation or test")
  if process_count > 1 and cfg.batch_size % process_count:
    errors.append(f"--batch_size={cfg.batch_size} is not divisible by the "
                  f"{process_count} processes")
  start, stop = cfg.profile_steps
  if start < 0 or stop < start:
    errors.append(f"--profile_steps={start},{stop} must be START,STOP with "
                  "0 <= START <= STOP")
  for role in ("target", "draft"):
    rc = cfg.role(role)
    _check_optim(role, rc.optim, errors)
    if rc.checkpoint:
      if not os.path.isfile(os.path.join(rc.checkpoint, "config.json")):
        errors.append(f"--{role}_checkpoint={rc.checkpoint!r} is not a Hugging Face model "
                      "directory (no config.json)")
    elif not presets.is_known(rc.preset):
      errors.append(f"--{role}_preset={rc.preset!r} is unknown; choose one of "
                    f"{presets.known_names()}")
    else:
      try:
        presets.check_overrides(rc.overrides)
      except ValueError as e:
        errors.append(f"--{role}_overrides: {e}")
  if cfg.eval_benchmark and not os.path.isfile(cfg.eval_benchmark):
    errors.append(f"--eval_benchmark={cfg.eval_benchmark!r} is not a file")
  if cfg.tokenizer and not os.path.isdir(cfg.tokenizer):
    errors.append(f"--tokenizer={cfg.tokenizer!r} is not a directory")
  if len(cfg.mesh_shape) != len(cfg.mesh_axes):
    errors.append(f"--mesh_shape={list(cfg.mesh_shape)} and --mesh_axes="
                  f"{list(cfg.mesh_axes)} differ in length")
  elif "data" not in cfg.mesh_axes:
    errors.append(f"--mesh_axes={list(cfg.mesh_axes)} needs a 'data' axis (the batch is "
                  "split over it)")
  mesh_shape = cfg.mesh_shape
  if not errors:
    try:
      mesh_shape = resolve_mesh_shape(cfg.mesh_shape, num_devices)
    except ConfigError as e:
      errors.append(str(e))
  if not errors:
    data = mesh_shape[cfg.mesh_axes.index("data")]
    if cfg.batch_size % data:
      errors.append(f"--batch_size={cfg.batch_size} is not divisible by the mesh's data "
                    f"axis ({data})")
  if errors:
    raise ConfigError("invalid settings:\n  " + "\n  ".join(errors))
  return cfg.replace(mesh_shape=tuple(mesh_shape))


def parse_mapping(text: str, *, what: str, value_type=int) -> dict[str, Any]:
  """"a=1,b=2" -> {"a": 1, "b": 2} (values converted with `value_type`)."""
  out: dict[str, Any] = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"{what}: {item!r} is not KEY=VALUE")
    try:
      out[key.strip()] = value_type(value.strip())
    except ValueError as e:
      raise ConfigError(f"{what}: {item!r}: {e}") from None
  return out

