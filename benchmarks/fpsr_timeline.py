r"""Where FPSR's time goes: the engine's own phase timings, next to target-only latency.

    .venv/bin/python benchmarks/fpsr_timeline.py --workdir=runs/quickstart

Loads the target (`<workdir>/target_sft/export`) and the draft (`sapo/export`, else
`draft_sft/export`), runs `target` and `fpsr` at batch 1 on `--examples` test-style examples
of the default task (one host device each for draft and target), and prints, per phase of
the engine's timeline (prefill, draft, speculative draft, verify+fallback, sync+draft, by
role), how often it runs per example and its median duration, together with the median
latency of both methods and the time not covered by any phase (host bookkeeping between
programs). Prints figures; asserts nothing.
"""
import collections
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

# pylint: disable=g-import-not-at-top,wrong-import-position
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
  res = runner.Evaluator(draft, target, tok, ec).run(examples)
  fpsr = res["fpsr"]
  durations, counts = collections.defaultdict(list), collections.Counter()
  uncovered = []
  for timeline, latency in zip(fpsr.timelines, fpsr.latency_s):
    for phase, role, start, end in timeline:
      durations[(phase, role)].append(end - start)
      counts[(phase, role)] += 1
    uncovered.append(latency - _covered([(s, e) for _, _, s, e in timeline]))
  n = len(examples)
  print(f"draft {draft_dir}; {n} examples; verifier {ec.verifier}")
  print(f"target-only median latency {np.median(res['target'].latency_s) * 1e3:.2f} ms; "
        f"fpsr {np.median(fpsr.latency_s) * 1e3:.2f} ms; rounds per example "
        f"{np.mean([s['rounds'] for s in fpsr.stats]):.2f}")
  print("| phase | role | per example | median ms |\n|---|---|---|---|")
  for key, values in durations.items():
    print(f"| {key[0]} | {key[1]} | {counts[key] / n:.2f} | {np.median(values) * 1e3:.2f} |")
  print(f"time in no phase (host work between programs), median per example: "
        f"{np.median(uncovered) * 1e3:.2f} ms")


if __name__ == "__main__":
  app.run(main)
