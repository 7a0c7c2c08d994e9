r"""The SAPO reward ablation: each reward term off in turn, from the same SFT draft.

    python -m dream_r_jax.rl.ablation --flagfile=experiments/flags/quickstart.flags \
        --workdir=/tmp/dream_r --num_cpu_devices=2 --sapo_iterations=300 --spec_examples=64

needs a workdir where `target_sft` and `draft_sft` have run. Every variant (`full`, then
`no_<term>` for each term with a nonzero weight) trains its own SAPO draft under
`<workdir>/ablation/<variant>` with the same settings, states and seed, except for that
term's weight, and is evaluated with `run_evaluation` (methods `target` and `fpsr`) on the
same examples; the SFT draft is evaluated as the first row. Finished variants are skipped
on a rerun (the stage's `done.json`). The rows go to `<workdir>/ablation/ablation.json`,
`ablation.md`, and into `report["ablation"]` of `<workdir>/eval/report.json` if it exists.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import jax
from absl import logging

from dream_r_jax.evaluation import evaluate as evaluate_lib
from dream_r_jax.evaluation import report as report_lib
from dream_r_jax.evaluation.runner import EvalConfig
from dream_r_jax.rl import stage as stage_lib
from dream_r_jax.rl.config import SapoConfig
from dream_r_jax.rl.trainer import REWARD_TERMS
from dream_r_jax.sharding import rules as rules_lib
from dream_r_jax.sharding.mesh import make_mesh
from dream_r_jax.train import config as config_lib
from dream_r_jax.train import stages as stages_lib
from dream_r_jax.train.config import ConfigError, TrainConfig

_FPSR_KEYS = ("accuracy", "step_acceptance", "speedup_vs_target", "median_latency_s",
              "mean_generated_tokens", "target_forward_passes")


def variants(scfg: SapoConfig, terms: Sequence[str] = REWARD_TERMS) -> list[tuple[str,
                                                                                    SapoConfig]]:
  """(`full`, scfg), then (`no_<term>`, scfg with that term's weight 0) per weighted term."""
  base = scfg.reward_config
  out = [("full", scfg)]
  for term in terms:
    if base.weight(term) > 0 and any(w > 0 for n, w in base.weights if n != term):
      weights = ",".join(f"{n}={w:g}" for n, w in base.ablate(term).weights)
      out.append((f"no_{term}", scfg.replace(rewards=weights)))
  return out


def _row(name: str, weights, report: dict, sapo_summary: dict, prefix: str = "") -> dict:
  fpsr = report["methods"]["fpsr"]
  row = {"variant": name, "weights": weights,
         "target_accuracy": report["methods"]["target"]["accuracy"],
         **{f"fpsr_{k}": fpsr.get(k) for k in _FPSR_KEYS}}
  for key in ("heldout/acceptance", "heldout/cpn", "heldout/step_length", "heldout/reward"):
    row[key.replace("/", "_")] = sapo_summary.get(prefix + key)
  return row


def run_ablation(*, workdir: str, cfg: TrainConfig, scfg: SapoConfig, ec: EvalConfig,
                 examples: Sequence[dict], terms: Sequence[str] = REWARD_TERMS,
                 progress: Callable[[str], None] = logging.info) -> list[dict]:
  """Trains and evaluates every ablation variant; returns one row per variant.

  Args:
    workdir: a pipeline workdir with `target_sft` (or `cfg.target.checkpoint`) and
      `draft_sft` done.
    cfg: the pipeline settings (task, data, mesh, checkpointing).
    scfg: the full SAPO settings; the variants differ only in reward weights.
    ec: evaluation settings; only `target` and `fpsr` are run.
    examples: the evaluation examples, the same for every row.
    terms: the reward terms to switch off in turn.
    progress: a line printer.

  Returns:
    Rows (dicts): `variant`, `weights`, `target_accuracy`, `fpsr_*` (accuracy,
    step_acceptance, speedup_vs_target, ...) from the evaluation and `heldout_*`
    (acceptance, cpn, step_length, reward of the greedy step on SAPO's held-out states).
  """
  target_dir = cfg.target.checkpoint or stages_lib.export_dir(workdir, "target_sft")
  sft_dir = stages_lib.export_dir(workdir, "draft_sft")
  for what, path in (("target", target_dir), ("SFT draft", sft_dir)):
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise ConfigError(f"the ablation needs the {what} at {path}; run the pipeline's "
                        "target_sft and draft_sft stages in this workdir first")
  cfg = config_lib.validate(cfg.replace(workdir=workdir, stages=("sapo",)),
                            num_devices=jax.device_count(),
                            known_stages=stages_lib.load_stage_modules())
  mesh = make_mesh(cfg.mesh_shape, cfg.mesh_axes)
  rules = rules_lib.FSDP_RULES if cfg.fsdp else rules_lib.DEFAULT_RULES
  ec = dataclasses.replace(ec, methods=("target", "fpsr"))
  root = os.path.join(workdir, "ablation")
  rows = []

  def evaluate(name, draft_dir):
    draft, target, tokenizer = evaluate_lib.load_pair(draft_dir, target_dir,
                                                      tokenizer_dir=sft_dir)
    return evaluate_lib.run_evaluation(
        workdir=os.path.join(root, name, "eval"), draft=draft, target=target,
        tokenizer=tokenizer, examples=examples, ec=ec, progress=progress,
        extra_config={"draft": draft_dir, "target": target_dir, "variant": name})

  # draft_sft's export holds the pipeline's tokenizer (the stage saved it there).
  tokenizer = _tokenizer(sft_dir)
  sft_summary = {}
  for name, variant in variants(scfg, terms):
    progress(f"[ablation] {name}: rewards {variant.rewards}")
    vcfg = cfg.replace(workdir=os.path.join(root, name), data_dir=cfg.resolved_data_dir)
    ctx = stages_lib.StageContext(cfg=vcfg, mesh=mesh, rules=rules,
                                  tokenizer=tokenizer,
                                  models={"target": target_dir, "draft": sft_dir})
    summary = stage_lib.run_sapo(ctx, variant,
                                 trajectories_dir=os.path.join(workdir, "sapo"))
    if not rows:  # The SFT draft's row, with its held-out numbers from the first run.
      sft_summary = summary
      rows.append(_row("sft", None, evaluate("sft", sft_dir), sft_summary, prefix="sft_"))
    weights = dict(variant.reward_config.weights)
    rows.append(_row(name, weights, evaluate(name, summary["export"]), summary))
    progress("[ablation] " + json.dumps(rows[-1], default=str))
  _write(workdir, rows)
  return rows


def _tokenizer(path: str):
  from dream_r_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  return tok_lib.load_tokenizer(path)


def markdown_table(rows: Sequence[dict]) -> str:
  head = ("| variant | fpsr accuracy | target accuracy | step acceptance | fpsr speedup | "
          "tokens | held-out acceptance | held-out step length |")
  lines = [head, "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, f: "-" if v is None else format(v, f)
  for r in rows:
    lines.append(
        f"| {r['variant']} | {fmt(r['fpsr_accuracy'], '.3f')} | "
        f"{fmt(r['target_accuracy'], '.3f')} | {fmt(r['fpsr_step_acceptance'], '.3f')} | "
        f"{fmt(r['fpsr_speedup_vs_target'], '.2f')}x | "
        f"{fmt(r['fpsr_mean_generated_tokens'], '.1f')} | "
        f"{fmt(r['heldout_acceptance'], '.3f')} | {fmt(r['heldout_step_length'], '.2f')} |")
  return "\n".join(lines) + "\n"


def _write(workdir: str, rows: list[dict], report_path: Optional[str] = None) -> None:
  root = os.path.join(workdir, "ablation")
  report_lib.write_atomic(os.path.join(root, "ablation.json"), json.dumps(rows, indent=2))
  report_lib.write_atomic(os.path.join(root, "ablation.md"), markdown_table(rows))
  report_path = report_path or os.path.join(workdir, "eval", "report.json")
  if os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
    report["ablation"] = rows
    report_lib.write_atomic(report_path, json.dumps(report, indent=2))


def main(argv):
  """CLI: the pipeline, evaluation and SAPO flags; see the module docstring."""
  del argv
  from dream_r_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  from dream_r_jax.evaluation import flags as eval_flags  # pylint: disable=g-import-not-at-top
  from dream_r_jax.rl import flags as sapo_flags  # pylint: disable=g-import-not-at-top
  from dream_r_jax.train import distributed  # pylint: disable=g-import-not-at-top
  from dream_r_jax.train import flags as train_flags  # pylint: disable=g-import-not-at-top
  # Before anything touches a device (on CPU, --num_cpu_devices=2 gives the evaluation
  # its draft and target devices).
  distributed.initialize(train_flags.COORDINATOR_ADDRESS.value,
                         train_flags.NUM_PROCESSES.value, train_flags.PROCESS_ID.value,
                         train_flags.NUM_CPU_DEVICES.value, train_flags.DISTRIBUTED_AUTO.value)
  cfg = train_flags.config_from_flags()
  source = tfds_builder.load_task(cfg.task_config, eval_flags.SPEC_SPLIT.value,
                                  cfg.resolved_data_dir,
                                  split_sizes=dict(cfg.split_sizes) or None)
  examples = [source[i] for i in range(min(eval_flags.SPEC_EXAMPLES.value, len(source)))]
  rows = run_ablation(workdir=cfg.workdir, cfg=cfg, scfg=sapo_flags.config_from_flags(),
                      ec=eval_flags.eval_config_from_flags(), examples=examples, progress=print)
  print(markdown_table(rows))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  # The flag modules define their flags at import, before app.run parses the command line.
  from dream_r_jax.evaluation import flags as _ef  # pylint: disable=g-import-not-at-top,unused-import
  from dream_r_jax.rl import flags as _sf  # pylint: disable=g-import-not-at-top,unused-import
  from dream_r_jax.train import flags as _tf  # pylint: disable=g-import-not-at-top,unused-import
  app.run(main)
