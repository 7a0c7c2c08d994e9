r"""Speed and accuracy of speculative reasoning, side by side with the baselines.

    python -m experiments.evaluate --flagfile=experiments/flags/quickstart.flags \
        --workdir=/tmp/dream_r

Runs the pipeline stage `eval` alone: the draft and target are the newest exports in
`--workdir` (or `--draft_checkpoint` / `--target_checkpoint`). Writes
`<workdir>/eval/report.json`, `report.md` and the plots.
"""
from absl import app, flags

from dream_r_jax.evaluation import flags as _eval_flags  # pylint: disable=unused-import
from experiments import train

if __name__ == "__main__":
  flags.FLAGS.set_default("stages", ["eval"])
  app.run(train.main)
