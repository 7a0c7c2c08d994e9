"""The pipeline stage `eval`: speed and accuracy of every method, side by side."""
from __future__ import annotations

import os

from absl import flags, logging

from dream_r_jax.evaluation import evaluate as evaluate_lib
from dream_r_jax.evaluation.runner import EvalConfig
from dream_r_jax.train import stages


def _settings():
  """EvalConfig and sweep from the flags when parsed (CLI), else defaults (library use)."""
  if flags.FLAGS.is_parsed() and "spec_methods" in flags.FLAGS:
    from dream_r_jax.evaluation import flags as eval_flags  # pylint: disable=g-import-not-at-top
    taus, sweep_examples = eval_flags.sweep_from_flags()
    return (eval_flags.eval_config_from_flags(), taus, sweep_examples,
            eval_flags.SPEC_EXAMPLES.value, eval_flags.SPEC_SPLIT.value,
            eval_flags.SPEC_BENCHMARK_FILE.value)
  return EvalConfig(), (), 0, 64, "test", ""


def load_examples(ctx, num: int, split: str, benchmark_file: str):
  if benchmark_file:
    from dream_r_jax.data import benchmarks  # pylint: disable=g-import-not-at-top
    source = benchmarks.load_benchmark(benchmark_file, max_examples=num)
  else:
    from dream_r_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    source = tfds_builder.load_task(ctx.cfg.task_config, split, ctx.cfg.resolved_data_dir,
                                    split_sizes=dict(ctx.cfg.split_sizes) or None)
  return [source[i] for i in range(min(num, len(source)))]


@stages.register_stage("eval", requires=("target", "draft"))
def eval_stage(ctx) -> dict:
  ec, taus, sweep_examples, num, split, bench = _settings()
  draft, target, tokenizer = evaluate_lib.load_pair(ctx.model_dir("draft"),
                                                    ctx.model_dir("target"))
  examples = load_examples(ctx, num, split, bench)
  workdir = ctx.stage_dir("eval")
  if not ctx.is_primary:
    return {}
  # When the draft is SAPO's, the SFT draft it started from runs too (same target, same
  # examples), so the report shows what SAPO changed.
  extra, label = {}, "draft"
  sapo_dir = stages.export_dir(ctx.cfg.workdir, "sapo")
  sft_dir = stages.export_dir(ctx.cfg.workdir, "draft_sft")
  if (os.path.abspath(ctx.model_dir("draft")) == os.path.abspath(sapo_dir)
      and os.path.isfile(os.path.join(sft_dir, "config.json"))):
    extra["sft"] = evaluate_lib.load_draft(sft_dir, tokenizer, target.cfg.vocab_size)
    label = "sapo"
  report = evaluate_lib.run_evaluation(
      workdir=workdir, draft=draft, target=target, tokenizer=tokenizer, examples=examples,
      ec=ec, taus=taus, sweep_examples=sweep_examples, progress=logging.info,
      extra_config=dict(draft=ctx.model_dir("draft"), target=ctx.model_dir("target"),
                        split=split, benchmark_file=bench),
      extra_drafts=extra, draft_label=label)
  summary = {name: {k: m[k] for k in ("accuracy", "speedup_vs_target", "step_acceptance")}
             for name, m in report["methods"].items()}
  for name, d in report.get("drafts", {}).items():
    summary[f"fpsr[{name} draft]"] = {k: d[k] for k in ("accuracy", "speedup_vs_target",
                                                       "step_acceptance")}
  summary["report"] = os.path.join(workdir, "report.json")
  return summary
