"""The supervised stages: `target_sft` and `draft_sft`.

`target_sft` trains the bundled target on the task's reasoning SFT rows mixed with
verdict (judge) rows. `draft_sft` lets the target answer training prompts greedily and
distils those trajectories into the much smaller draft. Each stage resumes from its own
checkpoints, evaluates greedy answer accuracy on `eval_split` at the end, exports its
model as a Hugging Face directory and writes `done.json`, which a later run with the
same settings takes as "nothing left to do".
"""
from __future__ import annotations

import os
import time
from typing import Any

from absl import logging

from dream_r_jax.data import benchmarks
from dream_r_jax.data import pipeline
from dream_r_jax.data import tfds_builder
from dream_r_jax.models import ModelConfig, load_pretrained
from dream_r_jax.models.hf import read_config
from dream_r_jax.train import distill
from dream_r_jax.train import evaluation
from dream_r_jax.train import loop
from dream_r_jax.train import metrics as metrics_lib
from dream_r_jax.train import presets
from dream_r_jax.train.stages import StageContext, register_stage


def task_source(ctx: StageContext, split: str, num_examples=None):
  cfg = ctx.cfg
  return tfds_builder.load_task(cfg.task_config, split, cfg.resolved_data_dir,
                                num_examples=num_examples,
                                split_sizes=dict(cfg.split_sizes) or None)


def role_config(ctx: StageContext, role: str) -> ModelConfig:
  """The config a role's model is built with (preset, or its checkpoint's config.json)."""
  rc = ctx.cfg.role(role)
  if rc.checkpoint:
    return read_config(rc.checkpoint)
  return presets.model_config(rc.preset, ctx.tokenizer, rc.overrides)


def flops_per_token(cfg: ModelConfig) -> float:
  """Forward FLOPs of one decoded token (weights only; 2 per multiply-add)."""
  vd = cfg.vocab_size * cfg.hidden_size
  # num_params counts the embedding table once when tied, else table and head; a token
  # pays for the head matmul but not for the table lookup.
  stored = vd if cfg.tie_word_embeddings else 2 * vd
  return 2.0 * (cfg.num_params() - stored + vd)


def evaluate(ctx: StageContext, stage: str, model, step: int) -> dict[str, float]:
  cfg = ctx.cfg
  if not cfg.eval_examples:
    return {}
  if cfg.eval_benchmark:
    source = benchmarks.load_benchmark(cfg.eval_benchmark, cfg.eval_examples)
    name = os.path.splitext(os.path.basename(cfg.eval_benchmark))[0]
  else:
    source = task_source(ctx, cfg.eval_split, cfg.eval_examples)
    name = cfg.eval_split
  examples = [source[i] for i in range(len(source))]
  result = evaluation.answer_accuracy(model, ctx.tokenizer, examples,
                                      batch_size=cfg.eval_batch_size,
                                      max_new_tokens=cfg.max_new_tokens)
  writer = metrics_lib.ScalarWriter(os.path.join(ctx.stage_dir(stage), "tensorboard"),
                                    enabled=ctx.is_primary)
  writer.write(step, {f"eval/{name}_accuracy": result["accuracy"],
                      "eval/generate_tokens_per_second":
                          result["generate_tokens_per_second"]})
  writer.close()
  logging.info("[%s] %s accuracy %.4f (%d examples)", stage, name,
               result["accuracy"], int(result["num_examples"]))
  return result


def _fingerprint(ctx: StageContext, role: str, inputs: dict[str, str]) -> dict[str, Any]:
  rc = ctx.cfg.role(role)
  stamp = {r: os.path.getmtime(os.path.join(p, "config.json")) for r, p in inputs.items()}
  return {"steps": rc.optim.steps, "learning_rate": rc.optim.learning_rate,
          "batch_size": ctx.cfg.batch_size, "preset": rc.preset, "overrides":
          {k: str(v) for k, v in dict(rc.overrides).items()}, "init": rc.checkpoint,
          "inputs": inputs, "input_mtimes": stamp, "task": ctx.cfg.task_config}


def _already_done(ctx: StageContext, stage: str, role: str, fingerprint) -> bool:
  done = ctx.read_done(stage)
  export = os.path.join(ctx.stage_dir(stage), "export")
  if done and done.get("fingerprint") == fingerprint and os.path.isdir(export):
    logging.info("[%s] already complete (%s); skipping", stage, ctx.done_path(stage))
    ctx.models[role] = export
    ctx.summaries[stage] = done.get("summary", {})
    return True
  return False


def _finish(ctx, stage, role, result: loop.SFTResult, fingerprint, extra) -> dict[str, Any]:
  export = ctx.export(stage, role, result.model)
  summary = {"final_step": result.final_step, "resumed_from": result.start_step,
             "train_tokens_per_second": result.tokens_per_second,
             "final_loss": result.last_metrics.get("loss"), "export": export,
             "flops_per_token": flops_per_token(result.model.cfg), **extra}
  summary.update({f"eval_{k}": v for k, v in
                  evaluate(ctx, stage, result.model, result.final_step).items()})
  ctx.write_done(stage, {"fingerprint": fingerprint, "summary": summary})
  return summary


@register_stage("target_sft", produces="target")
def target_sft(ctx: StageContext) -> dict[str, Any]:
  """Trains the bundled target on reasoning + verdict rows (skipped for a checkpoint)."""
  cfg = ctx.cfg
  if cfg.target.checkpoint:
    logging.info("[target_sft] skipped: the target is the checkpoint %s",
                 cfg.target.checkpoint)
    return {"skipped": True}
  fingerprint = _fingerprint(ctx, "target", {})
  if _already_done(ctx, "target_sft", "target", fingerprint):
    return ctx.summaries["target_sft"]
  source = task_source(ctx, "train")
  data = pipeline.make_dataset(source, ctx.tokenizer, batch_size=cfg.batch_size,
                               max_len=cfg.max_len, seed=cfg.seed,
                               verdict_ratio=cfg.verdict_ratio,
                               shard_index=ctx.process_index, shard_count=ctx.process_count)
  job = loop.SFTJob(stage="target_sft", model_cfg=role_config(ctx, "target"),
                    optim=cfg.target.optim, get_batch=data.__getitem__, seed=cfg.seed,
                    data_meta={"task": cfg.task_config, "seed": cfg.seed,
                               "verdict_ratio": cfg.verdict_ratio,
                               "train_examples": len(source)})
  result = loop.train_sft(ctx, job)
  return _finish(ctx, "target_sft", "target", result, fingerprint, {})


def _trajectories(ctx: StageContext, fingerprint) -> tuple[dict[str, Any], dict[str, Any]]:
  """The target's greedy trajectories on training prompts (cached in the stage dir)."""
  cfg = ctx.cfg
  path = os.path.join(ctx.stage_dir("draft_sft"), "trajectories.npz")
  meta = {"format": 2, "target": fingerprint["inputs"]["target"],
          "target_mtime": fingerprint["input_mtimes"]["target"],
          "examples": cfg.distill_examples, "max_len": cfg.max_len,
          "max_new_tokens": cfg.max_new_tokens, "task": cfg.task_config}
  rows = distill.load_rows(path, meta)
  if rows is not None:
    logging.info("[draft_sft] %d target trajectories from %s", len(rows["input_ids"]), path)
    return rows, {}
  source = task_source(ctx, "train")
  n = min(cfg.distill_examples, len(source))
  # The prompts are the first n of the train split; target_sft saw them in its shuffled
  # order, so the draft learns the target's behaviour on data the target was fit to.
  examples = [source[i] for i in range(n)]
  target, _ = load_pretrained(ctx.model_dir("target"), mesh=ctx.mesh, rules=ctx.rules)
  t0 = time.time()
  rows, gens = distill.target_rows(target, ctx.tokenizer, examples,
                                   batch_size=cfg.eval_batch_size,
                                   max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len)
  correct = [evaluation.answer_correct(ctx.tokenizer, o, e["answer"])
             for o, e in zip(gens.outputs, examples)]
  if ctx.is_primary:
    os.makedirs(ctx.stage_dir("draft_sft"), exist_ok=True)
    distill.save_rows(path, rows, meta)
  ctx.barrier("trajectories")
  stats = {"trajectories": len(rows["input_ids"]), "prompts": n,
           "target_train_accuracy": sum(correct) / max(n, 1),
           "trajectory_seconds": time.time() - t0,
           "target_generate_tokens_per_second": gens.tokens_per_second}
  logging.info("[draft_sft] target trajectories: %s", stats)
  return rows, stats


@register_stage("draft_sft", produces="draft", requires=("target",))
def draft_sft(ctx: StageContext) -> dict[str, Any]:
  """Distils the target's greedy trajectories into the draft."""
  cfg = ctx.cfg
  fingerprint = _fingerprint(ctx, "draft", {"target": ctx.model_dir("target")})
  if _already_done(ctx, "draft_sft", "draft", fingerprint):
    return ctx.summaries["draft_sft"]
  rows, stats = _trajectories(ctx, fingerprint)
  source = task_source(ctx, "train")
  image_fn = None
  if source[0].get("image") is not None:
    image_fn = lambda r: source[r]["image"]
  data = distill.DistillDataset(rows, batch_size=cfg.batch_size, seed=cfg.seed,
                                shard_index=ctx.process_index,
                                shard_count=ctx.process_count, image_fn=image_fn)
  draft_cfg = role_config(ctx, "draft")
  job = loop.SFTJob(stage="draft_sft", model_cfg=draft_cfg, optim=cfg.draft.optim,
                    get_batch=data.__getitem__, init_checkpoint=cfg.draft.checkpoint,
                    seed=cfg.seed + 1, data_meta={"rows": int(data.n), "seed": cfg.seed})
  result = loop.train_sft(ctx, job)
  target_cfg = read_config(ctx.model_dir("target"))
  ratio = flops_per_token(target_cfg) / flops_per_token(draft_cfg)
  logging.info("[draft_sft] draft/target FLOPs per token: 1/%.1f", ratio)
  return _finish(ctx, "draft_sft", "draft", result, fingerprint,
                 dict(stats, target_over_draft_flops_per_token=ratio))

