r"""FPSR against target-only decoding as the target grows, at full acceptance.

    .venv/bin/python benchmarks/fpsr_scaling.py --workdir=runs/quickstart

The quickstart's target is so small that a verify pass costs as much as ~17 of its decode
steps (see `fpsr_timeline.py`), so speculation cannot pay. This benchmark asks what the same
engine gives when the target is larger. It keeps the quickstart draft (`sapo/export`, else
`draft_sft/export`) and the quickstart target, and adds random-weight targets of the same
Qwen2.5-VL shape (same vocabulary, vision tower and M-RoPE) with wider and deeper text
models.

Random targets cannot judge, so every method here uses the `likelihood` verifier with a
threshold of -1e9: every drafted step is accepted. Both methods write exactly
`--tokens` tokens per example (the budget ends the answer, no EOS in the way), so the
latencies compare equal work. The figures are an upper bound on FPSR's speedup for a
given target size and a perfect draft; the acceptance of a real pair scales them down.
Prints figures; asserts nothing.
"""
import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app, flags
from flax import nnx

from dream_r_jax.data import task as task_lib
from dream_r_jax.evaluation import evaluate
from dream_r_jax.evaluation import runner
from dream_r_jax.models import Transformer

WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "A quickstart work directory.")
EXAMPLES = flags.DEFINE_integer("examples", 8, "Examples per target (batch 1).")
TOKENS = flags.DEFINE_integer("tokens", 24, "Tokens each method writes per example.")
SIZES = flags.DEFINE_list("sizes", ["512x8", "1024x12"],
                          "Random targets as HIDDENxLAYERS (head_dim 32, MLP 3x hidden).")


def _random_target(cfg, hidden: int, layers: int, seed: int = 0):
  heads = hidden // cfg.head_dim
  vision = dataclasses.replace(cfg.vision, out_hidden_size=hidden)
  big = cfg.replace(hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers,
                    num_heads=heads, num_kv_heads=max(1, heads // 4), vision=vision)
  return Transformer(big, rngs=nnx.Rngs(seed))


def main(_):
  root = WORKDIR.value
  draft_dir = os.path.join(root, "sapo", "export")
  if not os.path.exists(os.path.join(draft_dir, "config.json")):
    draft_dir = os.path.join(root, "draft_sft", "export")
  target_dir = os.path.join(root, "target_sft", "export")
  examples = [task_lib.example_at(task_lib.get_config("default"), 99, i)
              for i in range(EXAMPLES.value)]
  ec = runner.EvalConfig(methods=("target", "fpsr"), verifier="likelihood",
                         likelihood_threshold=-1e9, num_steps=4, max_step_tokens=16,
                         max_new_tokens=TOKENS.value)
  print(f"draft {draft_dir}; {len(examples)} examples; {TOKENS.value} tokens each; every "
        "drafted step accepted")
  print("| target | parameters | target-only ms | ms per token | fpsr ms | speedup |")
  print("|---|---|---|---|---|---|")
  targets = [("quickstart target", None)] + [(s, tuple(map(int, s.split("x"))))
                                             for s in SIZES.value]
  for label, size in targets:
    draft, target, tok = evaluate.load_pair(draft_dir, target_dir)
    if size is not None:
      target = _random_target(target.cfg, *size)
    params = target.cfg.num_params()
    res = runner.Evaluator(draft, target, tok, ec).run(examples)
    t, f = np.asarray(res["target"].latency_s), np.asarray(res["fpsr"].latency_s)
    lengths = {len(x) for x in res["fpsr"].tokens} | {len(x) for x in res["target"].tokens}
    note = "" if lengths == {TOKENS.value} else f" (lengths {sorted(lengths)})"
    print(f"| {label} | {params / 1e6:.1f} M | {np.median(t) * 1e3:.1f} | "
          f"{np.median(t) * 1e3 / TOKENS.value:.2f} | {np.median(f) * 1e3:.1f} | "
          f"{np.median(t / f):.2f}x{note} |")


if __name__ == "__main__":
  app.run(main)
