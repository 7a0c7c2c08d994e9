"""The SFT training loop shared by the SFT stages: resume, train, checkpoint, log, stop.

`train_sft` restores the stage's latest checkpoint if there is one (onto the current
mesh), trains to `optim.steps`, and returns the trained model. Along the way it writes
TensorBoard scalars and a console line, traces the chosen window of steps, saves
checkpoints every `checkpoint_every` steps, stops on a non-finite loss (the last good
checkpoint is kept and nothing newer is written), and on SIGTERM saves the current step
and raises `Preempted`, so that the next run continues from there.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from dream_r_jax.models import ModelConfig, Transformer, config_to_hf, load_pretrained
from dream_r_jax.train import batches as batches_lib
from dream_r_jax.train import checkpoint as ckpt_lib
from dream_r_jax.train import metrics as metrics_lib
from dream_r_jax.train import step as step_lib
from dream_r_jax.train.config import OptimConfig


class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN/inf; the run stopped."""


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """SIGTERM arrived; a checkpoint of `step` was saved and the run should exit."""

  def __init__(self, stage: str, step: int):
    super().__init__(f"{stage}: preempted (SIGTERM) at step {step}; checkpoint saved, "
                     "run again with the same flags to continue")
    self.stage, self.step = stage, step


def checkpoint_or_preempt(ctx, ckpts, stage: str, step: int, total: int, every: int,
                          state, meta: dict[str, Any]) -> None:
  """After step `step`: saves every `every` steps (the caller saves the last one) and, once
  SIGTERM has arrived, makes sure this step is saved and raises `Preempted`."""
  saved = step < total and step % every == 0 and ckpts.save(step, state, meta, force=True)
  if ctx.preempted(ckpts, step):
    if not saved:
      ckpts.save(step, state, meta, force=True)
    ckpts.wait()
    raise Preempted(stage, step)


class SigtermFlag:
  """Turns SIGTERM into a flag that the loop checks between steps (main thread only)."""

  def __init__(self):
    self.triggered = threading.Event()
    self._previous = None

  def __enter__(self) -> "SigtermFlag":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.triggered.set())
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class SFTJob:
  """One model's SFT run.

  Attributes:
    stage: stage name (directory `<workdir>/<stage>`).
    model_cfg: the model's config.
    optim: optimizer settings; `optim.steps` is the length of the run.
    get_batch: batch index -> this process's rows of that global batch (host arrays).
    init_checkpoint: HF directory to start from ("" = random init with `seed`).
    seed: parameter init seed.
    data_meta: JSON facts about the data stored with each checkpoint (e.g. its seed).
  """
  stage: str
  model_cfg: ModelConfig
  optim: OptimConfig
  get_batch: Callable[[int], dict[str, np.ndarray]]
  init_checkpoint: str = ""
  seed: int = 0
  data_meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SFTResult:
  model: nnx.Module
  start_step: int
  final_step: int
  last_metrics: dict[str, float]
  tokens_per_second: float


def _config_meta(cfg: ModelConfig) -> dict[str, Any]:
  return config_to_hf(cfg)


def _init_state(job: SFTJob, tx, mesh, shardings, rules):
  if job.init_checkpoint:
    model, _ = load_pretrained(job.init_checkpoint, config=job.model_cfg, mesh=mesh,
                               rules=rules)
    params = nnx.state(model).to_pure_dict()
    init = lambda p: {"step": jax.numpy.zeros((), jax.numpy.int32), "params": p,
                      "opt_state": tx.init(p)}
    return jax.jit(init, out_shardings=shardings)(params)
  make = lambda: step_lib.init_state(Transformer(job.model_cfg, rngs=nnx.Rngs(job.seed)), tx)
  return jax.jit(make, out_shardings=shardings)()


def train_sft(ctx, job: SFTJob) -> SFTResult:
  """Trains `job` on `ctx.mesh`, resuming from the stage's latest checkpoint."""
  cfg, mesh = ctx.cfg, ctx.mesh
  stage_dir = ctx.stage_dir(job.stage)
  tx = step_lib.optimizer(job.optim)
  abstract = nnx.eval_shape(lambda: Transformer(job.model_cfg, rngs=nnx.Rngs(0)))
  graphdef = nnx.split(abstract)[0]
  state_shape = step_lib.abstract_state(
      lambda: Transformer(job.model_cfg, rngs=nnx.Rngs(0)), tx)
  shardings = step_lib.state_shardings(state_shape, mesh, ctx.rules)
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(stage_dir, "checkpoints"),
                                    keep=cfg.keep_checkpoints)
  expected = {"stage": job.stage, "model_config": _config_meta(job.model_cfg)}
  latest = ckpts.latest_step()
  if latest is not None:
    state, meta = ckpts.restore(latest, step_lib.with_shardings(state_shape, shardings),
                                expected)
    if meta.get("data") != job.data_meta:
      logging.warning("%s: the data settings changed since checkpoint %d (%s -> %s)",
                      job.stage, latest, meta.get("data"), job.data_meta)
    logging.info("[%s] resumed from step %d", job.stage, latest)
  else:
    state = _init_state(job, tx, mesh, shardings, ctx.rules)
  start = int(jax.device_get(state["step"]))
  total = job.optim.steps

  def meta(step: int) -> dict[str, Any]:
    return dict(expected, step=step, data=job.data_meta, data_batches=step,
                batch_size=cfg.batch_size, mesh_shape=list(mesh.devices.shape))

  writer = metrics_lib.ScalarWriter(os.path.join(stage_dir, "tensorboard"),
                                    enabled=ctx.is_primary)
  progress = metrics_lib.Progress(job.stage, total, start)
  profile = metrics_lib.ProfileWindow(os.path.join(stage_dir, "profile"),
                                      *cfg.profile_steps)
  last: dict[str, float] = {}
  prefetch = None
  try:
    if start < total:
      featurize = batches_lib.Featurizer(job.model_cfg)
      host = job.get_batch(start)
      first = featurize(host)
      grid = None
      if "pixel_values" in first:
        images = host["images"]
        grid = batches_lib.image_grid(images[0], len(images) * ctx.process_count)
      shapes = batches_lib.global_shapes(first, ctx.process_count)
      train_step = step_lib.make_train_step(
          graphdef, tx, job.optim, mesh=mesh, state_sharding=shardings,
          batch_sharding=step_lib.batch_shardings(shapes, mesh), image_grid_thw=grid,
          inject_nan_at_step=cfg.inject_nan_at_step,
          pad_id=job.model_cfg.pad_token_id or 0)
      logging.info("[%s] training steps %d..%d on mesh %s", job.stage, start + 1, total,
                   dict(mesh.shape))
      prefetch = batches_lib.Prefetcher(job.get_batch, featurize, start, total)
      for index, host in prefetch:
        step = index + 1
        profile.before_step(step)
        batch = batches_lib.global_batch(host, mesh, ctx.process_count)
        state, m = train_step(state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        profile.after_step(step, state)
        if not m["finite"]:
          ckpts.wait()  # An async save of an earlier, finite step may still be landing.
          raise NonFiniteLossError(
              f"[{job.stage}] non-finite loss ({m['loss']}) or gradient norm "
              f"({m['grad_norm']}) at step {step}; stopped without saving. The last good "
              f"checkpoint (step {ckpts.latest_step()}) is kept in {ckpts.directory}.")
        progress.update(step, m["tokens"])
        last = m
        if step % cfg.log_every == 0 or step == total:
          tps = progress.tokens_per_second()
          logging.info(progress.line(step, m))
          writer.write(step, {"loss": m["loss"], "learning_rate": m["lr"],
                              "grad_norm": m["grad_norm"], "tokens_per_second": tps})
        checkpoint_or_preempt(ctx, ckpts, job.stage, step, total, cfg.checkpoint_every,
                              state, meta(step))
      ckpts.save(total, state, meta(total), force=True)
    ckpts.wait()
  finally:
    if prefetch is not None:
      prefetch.close()
    profile.close()
    writer.close()
    ckpts.wait()
    ckpts.close()
  model = nnx.merge(graphdef, state["params"])
  return SFTResult(model=model, start_step=start, final_step=max(start, total),
                   last_metrics=last, tokens_per_second=progress.tokens_per_second())
