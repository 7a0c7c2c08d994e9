"""The pipeline stage `sapo`: RL of the draft against the target's verdicts.

    python -m experiments.train --flagfile=experiments/flags/quickstart.flags \
        --workdir=/tmp/dream_r --stages=target_sft,draft_sft,sapo,eval

Starts from the SFT draft (also the frozen reference), runs `--sapo_iterations` rollout +
update iterations on states cut from the target's trajectories, and exports the trained
draft as `<workdir>/sapo/export`, which later stages (`eval`) then use as the draft. Like
the SFT stages it resumes from its own Orbax checkpoints (one per `--checkpoint_every`
iterations, rollouts reseeded from the iteration number so a resumed run draws what the
uninterrupted one would have), writes TensorBoard scalars under `<workdir>/sapo/tensorboard`,
traces `--profile_steps` iterations, saves and exits on SIGTERM, and writes `done.json`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import flags, logging
from flax import nnx

from dream_r_jax.models import Transformer, config_to_hf, load_pretrained
from dream_r_jax.rl import data as data_lib
from dream_r_jax.rl import judge as judge_lib
from dream_r_jax.rl import states as states_lib
from dream_r_jax.rl.config import SapoConfig
from dream_r_jax.rl.trainer import SapoTrainer, task_step_ok
from dream_r_jax.train import checkpoint as ckpt_lib
from dream_r_jax.train import loop
from dream_r_jax.train import metrics as metrics_lib
from dream_r_jax.train import sft
from dream_r_jax.train import step as step_lib
from dream_r_jax.train.config import ConfigError
from dream_r_jax.train.stages import StageContext, export_dir, register_stage

STAGE = "sapo"


def settings() -> SapoConfig:
  """The `--sapo_*` flags when parsed (CLI), else the defaults (library use)."""
  if flags.FLAGS.is_parsed() and "sapo_iterations" in flags.FLAGS:
    from dream_r_jax.rl import flags as sapo_flags  # pylint: disable=g-import-not-at-top
    return sapo_flags.config_from_flags()
  return SapoConfig()


def reference_dir(ctx: StageContext) -> str:
  """The SFT draft: the newest draft unless that is this stage's own export."""
  own = os.path.abspath(export_dir(ctx.cfg.workdir, STAGE))
  current = ctx.models.get("draft", "")
  if current and os.path.abspath(current) != own:
    return current
  sft = export_dir(ctx.cfg.workdir, "draft_sft")
  if os.path.isfile(os.path.join(sft, "config.json")):
    return sft
  raise ConfigError(f"the sapo stage needs the SFT draft as its reference, but the only "
                    f"draft is its own export {own}; run draft_sft in this workdir")


def _fingerprint(ctx: StageContext, scfg: SapoConfig, ref: str) -> dict[str, Any]:
  inputs = {"target": ctx.model_dir("target"), "reference": ref}
  stamps = {k: os.path.getmtime(os.path.join(v, "config.json")) for k, v in inputs.items()}
  return {"sapo": {k: str(v) for k, v in vars(scfg).items()}, "inputs": inputs,
          "input_mtimes": stamps, "task": ctx.cfg.task_config}


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _batch_states(train: states_lib.StateSet, scfg: SapoConfig,
                  iteration: int) -> states_lib.StateSet:
  """The states of iteration `iteration` (1-based): consecutive slices of per-epoch
  permutations drawn from (seed, epoch), so any iteration is reproducible on its own."""
  n, s = len(train), scfg.pool_states
  positions = np.arange((iteration - 1) * s, iteration * s)
  epochs, offsets = np.divmod(positions, n)
  order = {int(e): np.random.default_rng([scfg.seed, int(e)]).permutation(n)
           for e in np.unique(epochs)}
  return train.take([order[int(e)][o] for e, o in zip(epochs, offsets)])


def run_sapo(ctx: StageContext, scfg: SapoConfig,
             trajectories_dir: Optional[str] = None) -> dict[str, Any]:
  """Trains the draft with SAPO and exports it; returns the stage summary.

  Args:
    ctx: the pipeline's stage context (target and SFT draft available).
    scfg: the run's settings.
    trajectories_dir: where to look for the target's `trajectories.npz` (default: this
      workdir's `draft_sft`).

  Raises:
    ConfigError: bad settings, or no SFT draft to start from.
    loop.Preempted: SIGTERM; a checkpoint was saved.
    loop.NonFiniteLossError: the update diverged.
  """
  cfg = ctx.cfg
  scfg.validate(ctx.mesh.shape.get("data", 1))
  if ctx.process_count > 1:
    # Rollouts gather candidates to the host for rewards; with several processes each one
    # would need its rows (not the global arrays), which is not written yet.
    raise ConfigError("the sapo stage runs in a single process for now; run it without "
                      "--num_processes (its devices can still form a mesh)")
  ref_dir = reference_dir(ctx)
  fingerprint = _fingerprint(ctx, scfg, ref_dir)
  done = ctx.read_done(STAGE)
  if (done and done.get("fingerprint") == fingerprint
      and os.path.isdir(export_dir(cfg.workdir, STAGE))):
    logging.info("[sapo] already complete (%s); skipping", ctx.done_path(STAGE))
    ctx.models["draft"] = export_dir(cfg.workdir, STAGE)
    return done.get("summary", {})

  target, _ = load_pretrained(ctx.model_dir("target"), mesh=ctx.mesh, rules=ctx.rules)
  reference, draft_cfg = load_pretrained(ref_dir, mesh=ctx.mesh, rules=ctx.rules)
  states, image_fn, origin = data_lib.load_states(ctx, scfg, target, trajectories_dir)
  train, heldout = states_lib.split_heldout(states, scfg.heldout_states)
  trainer = SapoTrainer(reference, target, ctx.tokenizer, scfg, mesh=ctx.mesh,
                        image_fn=image_fn, prefix_width=_round_up(states.max_prefix_len, 16),
                        step_ok=task_step_ok if scfg.format_check == "task" else None)
  chunk = scfg.states_per_iteration * scfg.group_size
  baseline = trainer.evaluate(trainer.ref_params, heldout, chunk=chunk)
  judge = _check_judge(ctx, trainer, chunk)

  stage_dir = ctx.stage_dir(STAGE)
  tx = step_lib.optimizer(scfg.optim)
  state_shape = step_lib.abstract_state(lambda: Transformer(draft_cfg, rngs=nnx.Rngs(0)), tx)
  shardings = step_lib.state_shardings(state_shape, ctx.mesh, ctx.rules)
  ckpts = ckpt_lib.StageCheckpoints(os.path.join(stage_dir, "checkpoints"),
                                    keep=cfg.keep_checkpoints)
  expected = {"stage": STAGE, "model_config": config_to_hf(draft_cfg)}
  data_meta = {"states": len(train), "heldout": len(heldout), "origin": origin,
               "seed": scfg.seed}
  latest = ckpts.latest_step()
  if latest is not None:
    state, _ = ckpts.restore(latest, step_lib.with_shardings(state_shape, shardings),
                             expected)
    logging.info("[sapo] resumed from iteration %d", latest)
  else:
    state = trainer.init_state(tx, shardings)
  start, total = latest or 0, scfg.iterations
  meta = lambda it: dict(expected, step=it, data=data_meta, sapo=fingerprint["sapo"])

  writer = metrics_lib.ScalarWriter(os.path.join(stage_dir, "tensorboard"),
                                    enabled=ctx.is_primary)
  profile = metrics_lib.ProfileWindow(os.path.join(stage_dir, "profile"), *cfg.profile_steps)
  key = jax.random.key(scfg.seed)
  last: dict[str, float] = {}
  heldout_metrics: dict[str, float] = {}
  t0, first = time.time(), None
  try:
    if start == 0:
      writer.write(0, {**baseline, **judge})
    for it in range(start + 1, total + 1):
      profile.before_step(it)
      state, m = trainer.iteration(state, _batch_states(train, scfg, it),
                                   jax.random.fold_in(key, it), tx=tx,
                                   state_sharding=shardings)
      profile.after_step(it, state)
      if m.get("update/finite", 1.0) < 1.0:
        raise loop.NonFiniteLossError(
            f"[sapo] non-finite loss ({m.get('update/loss')}) or gradient norm "
            f"({m.get('update/grad_norm')}) at iteration {it}; stopped without saving. The "
            f"last good checkpoint (iteration {ckpts.latest_step()}) is kept in "
            f"{ckpts.directory}.")
      first = first or time.time()
      if it % scfg.eval_every == 0 or it == total:
        heldout_metrics = trainer.evaluate(state["params"], heldout, chunk=chunk)
        m.update(heldout_metrics)
      last = m
      if it % cfg.log_every == 0 or it == total:
        writer.write(it, {k: v for k, v in m.items() if k != "update/finite"})
        logging.info(_progress_line(it, total, m, start, first))
      loop.checkpoint_or_preempt(ctx, ckpts, STAGE, it, total, cfg.checkpoint_every,
                                 state, meta(it))
    if start < total:
      ckpts.save(total, state, meta(total), force=True)
    ckpts.wait()
  finally:
    profile.close()
    writer.close()
    ckpts.wait()
    ckpts.close()
  if not heldout_metrics:
    heldout_metrics = trainer.evaluate(state["params"], heldout, chunk=chunk)
  model = nnx.merge(trainer.graphdef, state["params"])
  export = ctx.export(STAGE, "draft", model)
  summary = {"final_iteration": max(start, total), "resumed_from": start, "export": export,
             "reference": ref_dir, "states": len(train), "heldout_states": len(heldout),
             "states_from": origin, "train_seconds": time.time() - t0,
             **judge, **{f"sft_{k}": v for k, v in baseline.items()}, **heldout_metrics,
             **{k: v for k, v in last.items() if k.startswith(("rollout/", "update/"))}}
  ctx.write_done(STAGE, {"fingerprint": fingerprint, "summary": summary})
  return summary


def _check_judge(ctx: StageContext, trainer: SapoTrainer, chunk: int,
                 num_examples: int = 8) -> dict[str, float]:
  """The target's verdicts on right vs corrupted validation steps; warns when they are
  too close for the acceptance reward to mean anything."""
  source = sft.task_source(ctx, "validation", num_examples)
  out = judge_lib.judge_check(trainer, ctx.tokenizer,
                              [source[i] for i in range(len(source))], chunk=chunk)
  if out:
    gap = out["judge/accept_right"] - out["judge/accept_wrong"]
    log = logging.warning if gap < judge_lib.MIN_SEPARATION else logging.info
    judge = trainer.rc.judge
    log("[sapo] the target's %s judge on %d validation steps: accepts %.2f of right and "
        "%.2f of corrupted steps (score %.3f vs %.3f)%s", judge, int(out["judge/steps"]),
        out["judge/accept_right"], out["judge/accept_wrong"], out["judge/cpn_right"],
        out["judge/cpn_wrong"], "" if gap >= judge_lib.MIN_SEPARATION else
        "; the acceptance reward carries little signal" + (
            ": train target_sft's judge longer (--target_steps, --verdict_ratio) or use "
            "--sapo_judge=likelihood" if judge == "cpn" else ""))
  return out


def _progress_line(it: int, total: int, m: dict[str, float], start: int,
                   first: float) -> str:
  done = it - start
  rate = (time.time() - first) / max(done - 1, 1)
  eta = metrics_lib._duration((total - it) * rate) if done > 1 else "?"  # pylint: disable=protected-access
  held = (f" heldout acc {m['heldout/acceptance']:.3f}" if "heldout/acceptance" in m
          else "")
  return (f"[sapo] iteration {it}/{total} reward {m['rollout/reward']:.3f} "
          f"cpn {m['rollout/cpn']:.3f} acc {m['rollout/acceptance']:.3f} "
          f"step_len {m['rollout/step_length']:.1f} "
          f"kl {m.get('update/kl', float('nan')):.4f} "
          f"clip {m.get('update/clip_fraction', float('nan')):.3f} "
          f"signal {m['rollout/signal_fraction']:.2f}{held} eta {eta}")


@register_stage(STAGE, produces="draft", requires=("target", "draft"))
def sapo_stage(ctx: StageContext) -> dict[str, Any]:
  """Trains the draft with SAPO against the target's verdicts (settings: `--sapo_*`)."""
  return run_sapo(ctx, settings())
