r"""Where FPSR's time goes: the engine's phase timings, next to target-only latency.

    .venv/bin/python benchmarks/fpsr_timeline.py --workdir=runs/quickstart

Loads the target (`<workdir>/target_sft/export`) and the draft (`sapo/export`, else
`draft_sft/export`) and runs, at batch 1 on `--examples` test-style examples of the default
task (one host device each for draft and target):

1. `target` and `fpsr` as the eval stage runs them (the default "async" overlap): median
   latencies and the median per-example speedup;
2. `fpsr` again with `overlap="none"`, where every program is awaited before the next one
   starts, so each phase's duration is that program's own cost: per phase (prefill, draft,
   speculative draft, verify+fallback, sync+draft, by role), how often it runs per example
   and its median duration, and the host time between programs.

From these it prints the target's decode cost per token (target-only latency less the
target's prefill, over its tokens), the verify pass in target decode steps, and the floor of
a one-round answer with perfect overlap: max(target prefill, draft prefill + first chain) +
verify. `--trace_dir` also writes a `jax.profiler` trace of fpsr (open it in TensorBoard or
Perfetto). Prints figures; asserts nothing.
"""
import collections
import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app, flags

from dream_r_jax.data import task as task_lib
from dream_r_jax.evaluation import evaluate
from dream_r_jax.evaluation import runner

WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "A quickstart work directory.")
EXAMPLES = flags.DEFINE_integer("examples", 48, "Examples (batch 1, one at a time).")
VERIFIER = flags.DEFINE_string("verifier", "likelihood", "Step verifier.")
THRESHOLD = flags.DEFINE_float("likelihood_threshold", -0.3, "likelihood: threshold.")
NUM_STEPS = flags.DEFINE_integer("num_steps", 4, "K, steps per drafted chain.")
TRACE_DIR = flags.DEFINE_string("trace_dir", "", "If set, also writes a jax.profiler trace "
                                "of fpsr on 4 examples there (named scopes: draft, verify, "
                                "rollback, fallback, draft_sync).")


def _covered(intervals) -> float:
  """Length of the union of [start, end) intervals."""
  total, end = 0.0, -np.inf
  for s, e in sorted(intervals):
    if e > end:
      total += e - max(s, end)
      end = e
  return total


def main(_):
  root = WORKDIR.value
  draft_dir = os.path.join(root, "sapo", "export")
  if not os.path.exists(os.path.join(draft_dir, "config.json")):
    draft_dir = os.path.join(root, "draft_sft", "export")
  draft, target, tok = evaluate.load_pair(draft_dir, os.path.join(root, "target_sft", "export"))
  ec = runner.EvalConfig(methods=("target", "fpsr"), verifier=VERIFIER.value,
                         likelihood_threshold=THRESHOLD.value, num_steps=NUM_STEPS.value,
                         max_step_tokens=16, max_new_tokens=64)
  examples = [task_lib.example_at(task_lib.get_config("default"), 99, i)
              for i in range(EXAMPLES.value)]
  ev = runner.Evaluator(draft, target, tok, ec)
  res = ev.run(examples)
  ev.ec = dataclasses.replace(ec, overlap="none")
  alone = ev.run(examples, methods=["fpsr"])["fpsr"]
  if TRACE_DIR.value:
    ev.ec = ec
    with jax.profiler.trace(TRACE_DIR.value):
      ev.run(examples[:4], methods=["fpsr"])
    print(f"wrote a jax.profiler trace to {TRACE_DIR.value}")

  n = len(examples)
  t_lat, f_lat = np.asarray(res["target"].latency_s), np.asarray(res["fpsr"].latency_s)
  rounds = [s["rounds"] for s in res["fpsr"].stats]
  print(f"draft {draft_dir}; {n} examples; verifier {ec.verifier}")
  print(f"target-only median latency {np.median(t_lat) * 1e3:.2f} ms; fpsr "
        f"{np.median(f_lat) * 1e3:.2f} ms; median speedup {np.median(t_lat / f_lat):.2f}x; "
        f"rounds per example {np.mean(rounds):.2f} (one round: "
        f"{np.mean(np.asarray(rounds) == 1):.0%})")

  durations, counts = collections.defaultdict(list), collections.Counter()
  uncovered = []
  for timeline, latency in zip(alone.timelines, alone.latency_s):
    for phase, role, start, end in timeline:
      durations[(phase, role)].append(end - start)
      counts[(phase, role)] += 1
    uncovered.append(latency - _covered([(s, e) for _, _, s, e in timeline]))
  med = {k: float(np.median(v)) * 1e3 for k, v in durations.items()}
  print(f"\nfpsr with overlap='none' (each program alone): median "
        f"{np.median(alone.latency_s) * 1e3:.2f} ms")
  print("| phase | role | per example | median ms |\n|---|---|---|---|")
  for key, value in med.items():
    print(f"| {key[0]} | {key[1]} | {counts[key] / n:.2f} | {value:.2f} |")
  print(f"time in no phase (host work between programs), median per example: "
        f"{np.median(uncovered) * 1e3:.2f} ms")

  tokens = np.mean([len(t) for t in res["target"].tokens])
  prefill_t = med[("prefill", "target")]
  per_token = (np.median(t_lat) * 1e3 - prefill_t) / tokens
  verify = med[("verify+fallback", "target")]
  floor = max(prefill_t, med[("prefill", "draft")] + med[("draft", "draft")]) + verify
  print(f"\ntarget decode: {per_token:.3f} ms per token ({tokens:.1f} tokens per answer, "
        f"prefill {prefill_t:.2f} ms); one verify+fallback pass = {verify / per_token:.1f} "
        f"target decode steps")
  print(f"floor of a one-round fpsr answer (perfect overlap, no host time): {floor:.2f} ms "
        f"= {np.median(t_lat) * 1e3 / floor:.2f}x target-only")


if __name__ == "__main__":
  app.run(main)
