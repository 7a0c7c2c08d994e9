"""Turns method results into `report.json` and a Markdown table (written atomically)."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from typing import Any, Sequence

import jax
import numpy as np

from dream_r_jax.data import task as task_lib


def wilson_ci95(correct: int, n: int) -> tuple[float, float]:
  """95% Wilson score interval for a binomial proportion."""
  if n == 0:
    return (0.0, 0.0)
  z = 1.959963984540054
  p = correct / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, center - half), min(1.0, center + half))


def is_correct(output: str, answer: str) -> bool:
  got = task_lib.parse_answer(output)
  try:
    return got is not None and int(got) == int(str(answer).strip())
  except ValueError:
    return str(got).strip() == str(answer).strip()


def _ratio(num: float, den: float):
  return float(num) / den if den else None


def method_summary(res, target_latency: Sequence[float], answers: Sequence[str]) -> dict:
  correct = [is_correct(o, a) for o, a in zip(res.outputs, answers)]
  n = len(correct)
  lat = np.asarray(res.latency_s)
  ratios = np.asarray(target_latency) / lat
  # Step methods count steps; token_sd counts tokens (its `unit`), reported the same way.
  drafted = sum(s.get("steps_drafted", s.get("drafted", 0)) for s in res.stats)
  accepted = sum(s.get("steps_accepted", s.get("accepted", 0)) for s in res.stats)
  out = dict(
      accuracy=float(np.mean(correct)) if n else 0.0,
      accuracy_ci95=list(wilson_ci95(int(sum(correct)), n)),
      median_latency_s=float(np.median(lat)),
      speedup_vs_target=float(np.median(ratios)),
      step_acceptance=(accepted / drafted) if drafted else None,
      target_forward_passes=float(np.mean([s.get("target_forward_passes", 0)
                                           for s in res.stats])),
      draft_forward_passes=float(np.mean([s.get("draft_forward_passes", 0)
                                          for s in res.stats])),
      acceptance_unit=next((s["unit"] for s in res.stats if s.get("unit")), "step"),
      mean_generated_tokens=float(np.mean([len(t) for t in res.tokens])),
      tokens_per_accepted_step=_ratio(sum(s.get("draft_tokens", 0) for s in res.stats),
                                      accepted),
      placement=res.placement,
      outputs=list(res.outputs),
  )
  positions = [p for s in res.stats for p in s.get("accept_by_position", [])]
  if positions:
    arr = np.asarray(positions, float)
    valid = arr >= 0
    out["acceptance_by_position"] = [
        float(arr[:, j][valid[:, j]].mean()) if valid[:, j].any() else None
        for j in range(arr.shape[1])]
  scores = [x for s in res.stats for rnd in s.get("scores", []) for x in rnd]
  if scores:
    out["verdict_scores"] = [float(x) for x in scores]
  return out


def hardware() -> dict[str, Any]:
  devs = jax.devices()
  return dict(platform=devs[0].platform, device_kind=devs[0].device_kind,
              num_devices=len(devs), cpu_count=os.cpu_count(), machine=platform.machine(),
              processor=platform.processor(), jax=jax.__version__)


def build_report(results: dict, examples: Sequence[dict], config: dict,
                 cost_ratio: dict, sweep: dict | None = None,
                 ablation: dict | None = None) -> dict:
  answers = [str(ex["answer"]) for ex in examples]
  if "target" not in results:
    raise ValueError("the report needs the 'target' method (speedups are relative to it)")
  t_lat = results["target"].latency_s
  report = dict(
      config=config, hardware=hardware(), draft_target_cost_ratio=cost_ratio,
      num_examples=len(examples),
      methods={name: method_summary(res, t_lat, answers) for name, res in results.items()})
  if sweep:
    report["tau_sweep"] = sweep
  if ablation:
    report["ablation"] = ablation
  return report


def draft_comparison(runs: dict, target_latency: Sequence[float],
                     examples: Sequence[dict]) -> dict:
  """{draft label: summary of its fpsr run} (same examples, same target, same run)."""
  answers = [str(ex["answer"]) for ex in examples]
  keys = ("accuracy", "accuracy_ci95", "speedup_vs_target", "step_acceptance",
          "tokens_per_accepted_step", "mean_generated_tokens", "target_forward_passes",
          "median_latency_s")
  out = {}
  for label, res in runs.items():
    summary = method_summary(res, target_latency, answers)
    out[label] = {k: summary.get(k) for k in keys}
  return out


def markdown_table(report: dict) -> str:
  lines = ["| method | accuracy | 95% CI | median latency (s) | speedup vs target | "
           "step acceptance | target passes |", "|---|---|---|---|---|---|---|"]
  for name, m in report["methods"].items():
    acc = m["step_acceptance"]
    lo, hi = m["accuracy_ci95"]
    lines.append(
        f"| {name} | {m['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | "
        f"{m['median_latency_s']:.4f} | {m['speedup_vs_target']:.2f}x | "
        f"{'-' if acc is None else f'{acc:.3f}'} | {m['target_forward_passes']:.1f} |")
  drafts = report.get("drafts")
  if drafts:
    lines += ["", "FPSR with each draft (same target, same examples):", "",
              "| draft | accuracy | speedup vs target | step acceptance | "
              "tokens per accepted step |", "|---|---|---|---|---|"]
    for label, d in drafts.items():
      acc, tps = d["step_acceptance"], d["tokens_per_accepted_step"]
      lines.append(f"| {label} | {d['accuracy']:.3f} | {d['speedup_vs_target']:.2f}x | "
                   f"{'-' if acc is None else f'{acc:.3f}'} | "
                   f"{'-' if tps is None else f'{tps:.1f}'} |")
  hw = report["hardware"]
  lines.append("")
  lines.append(f"{report['num_examples']} examples; {hw['platform']} "
               f"({hw['device_kind']}, {hw['cpu_count']} cores), jax {hw['jax']}; "
               f"draft/target per-token cost ratio "
               f"{report['draft_target_cost_ratio'].get('ratio', float('nan')):.3f}.")
  return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
  """Writes via a temporary file and rename: a crash never leaves a half-written report."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_report(report: dict, workdir: str) -> tuple[str, str]:
  jpath = os.path.join(workdir, "report.json")
  mpath = os.path.join(workdir, "report.md")
  write_atomic(jpath, json.dumps(report, indent=2))
  write_atomic(mpath, markdown_table(report))
  return jpath, mpath
