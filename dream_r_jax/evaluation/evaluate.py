"""The evaluation job: load draft and target, run the methods side by side, write the report.

Used by `python -m experiments.evaluate` and by the pipeline stage `eval`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.decoding.generate import generate
from dream_r_jax.evaluation import plots, report as report_lib
from dream_r_jax.evaluation.runner import EvalConfig, Evaluator, check_same_tokenizer
from dream_r_jax.models import load_pretrained


def load_pair(draft_dir: str, target_dir: str, tokenizer_dir: Optional[str] = None):
  """Loads both models (float32) and the shared tokenizer; checks that tokenizers agree."""
  tokenizer = tok_lib.load_tokenizer(tokenizer_dir or target_dir)
  target, _ = load_pretrained(target_dir, dtype="float32")
  draft = load_draft(draft_dir, tokenizer, target.cfg.vocab_size)
  return draft, target, tokenizer


def load_draft(draft_dir: str, tokenizer, vocab_size: int):
  """A draft (float32) for a target with this tokenizer and vocabulary size; checked."""
  if os.path.exists(os.path.join(draft_dir, "tokenizer.json")):
    check_same_tokenizer(tok_lib.load_tokenizer(draft_dir), tokenizer)
  draft, _ = load_pretrained(draft_dir, dtype="float32")
  if draft.cfg.vocab_size != vocab_size:
    raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} != target vocab_size "
                     f"{vocab_size}: they must share a tokenizer")
  return draft


def per_token_cost(evaluator: Evaluator, tokens: int = 64, repeats: int = 3) -> dict:
  """Seconds per decoded token of draft and target, each on its own mesh (batch 1)."""
  out = {}
  for name, role in (("draft", evaluator.draft), ("target", evaluator.target)):
    model = nnx.merge(role.graphdef, role.state)
    ids = np.full((1, 8), evaluator.tokenizer.bos_token_id or 1, np.int32)
    if model.cfg.vision is not None:
      ids[0, 1:] = 7  # plain text prompt; the cost is the language model's
    run = lambda: jax.block_until_ready(generate(model, ids, max_new_tokens=tokens).tokens)
    run()
    start = time.perf_counter()
    for _ in range(repeats):
      run()
    out[f"{name}_s_per_token"] = (time.perf_counter() - start) / repeats / tokens
  out["ratio"] = out["draft_s_per_token"] / out["target_s_per_token"]
  return out


def run_evaluation(*, workdir: str, draft, target, tokenizer, examples: Sequence[dict],
                   ec: EvalConfig, taus: Sequence[float] = (), sweep_examples: int = 0,
                   progress: Callable[[str], None] = print, extra_config=None,
                   extra_drafts: Optional[Mapping[str, Any]] = None,
                   draft_label: str = "draft") -> dict:
  """Runs `ec.methods` on `examples`, writes report.json / report.md / plots to workdir.

  `extra_drafts` ({label: draft model}) are run with `fpsr` against the same target on the
  same examples; `report["drafts"]` then compares them with the main draft (`draft_label`),
  e.g. the SFT draft against the SAPO draft.
  """
  if not examples:
    raise ValueError("no examples to evaluate")
  evaluator = Evaluator(draft, target, tokenizer, ec)
  progress(f"evaluating {list(ec.methods)} on {len(examples)} examples")
  results = evaluator.run(examples, progress=progress)
  cost = per_token_cost(evaluator)
  progress(f"draft/target per-token cost ratio: {cost['ratio']:.3f}")
  sweep = {}
  # The sweep varies the verifier's threshold: tau for cpn, the minimum mean log-prob
  # for likelihood.
  knob = {"cpn": "tau", "likelihood": "likelihood_threshold"}.get(ec.verifier)
  if taus and "fpsr" in ec.methods and knob:
    subset = list(examples[:sweep_examples or len(examples)])
    t_lat = results["target"].latency_s[:len(subset)]
    answers = [str(ex["answer"]) for ex in subset]
    for value in taus:
      res = evaluator.run(subset, methods=["fpsr"], **{knob: float(value)})["fpsr"]
      summary = report_lib.method_summary(res, t_lat, answers)
      sweep[str(float(value))] = {k: summary[k] for k in (
          "accuracy", "speedup_vs_target", "step_acceptance", "median_latency_s")}
      progress(f"{knob}={value}: speedup {summary['speedup_vs_target']:.2f}x, accuracy "
               f"{summary['accuracy']:.3f}")
  config = dict(dataclasses.asdict(ec), **(extra_config or {}))
  report = report_lib.build_report(results, examples, config, cost, sweep or None)
  if sweep:
    report["tau_sweep_parameter"] = knob
  if extra_drafts and "fpsr" in results:
    runs = {draft_label: results["fpsr"]}
    for label, model in extra_drafts.items():
      progress(f"fpsr with the {label} draft")
      runs[label] = evaluator.with_draft(model).run(examples, methods=["fpsr"])["fpsr"]
    report["drafts"] = report_lib.draft_comparison(runs, results["target"].latency_s,
                                                   examples)
  jpath, mpath = report_lib.write_report(report, workdir)
  timeline = None
  if "fpsr" in results:
    timeline = next((t for t in results["fpsr"].timelines if t), None)
  plots.write_plots(report, timeline, workdir)
  progress(f"wrote {jpath} and {mpath}")
  progress("\n" + report_lib.markdown_table(report))
  return report
