r"""Where the draft's steps are rejected, and what RL could still reach: drafts on SAPO states.

    .venv/bin/python benchmarks/sapo_states.py \
        --flagfile=experiments/flags/quickstart.flags --workdir=runs/quickstart

For each draft (default: the workdir's `draft_sft` and `sapo` exports) it takes SAPO's
states (`--sapo_states_from`: `target`, the fresh prompts SAPO trains on, or `distill`,
the prompts the SFT draft was distilled on) and reports, by step index j:

  * `greedy`: how often the target accepts the draft's greedy step (what drafts at test
    time);
  * `false`: how often it accepts a greedy step that is not its own next step (a lenient
    judge lets some wrong steps through);
  * `sample@T` and `pass@G@T`: the acceptance of one step sampled at temperature T, and how
    often at least one of G samples is accepted: the room a group-relative RL objective has
    to move the greedy step.

The target judges with the stage's settings (`--sapo_judge`, `--sapo_likelihood_threshold`,
`--sapo_tau`). Prints a Markdown table; asserts nothing.
"""
import collections
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app, flags

from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.evaluation import flags as _eval_flags  # pylint: disable=unused-import
from dream_r_jax.models import load_pretrained
from dream_r_jax.rl import data as data_lib
from dream_r_jax.rl import flags as sapo_flags
from dream_r_jax.rl import states as states_lib
from dream_r_jax.rl.trainer import SapoTrainer, false_accepts, mean_by_step, task_step_ok
from dream_r_jax.sharding import rules as rules_lib
from dream_r_jax.sharding.mesh import make_mesh
from dream_r_jax.train import flags as train_flags
from dream_r_jax.train import stages as stages_lib

DRAFTS = flags.DEFINE_list("drafts", ["draft_sft", "sapo"],
                           "Drafts: stage names (their export in --workdir) or directories.")
NUM_STATES = flags.DEFINE_integer("num_states", 512, "States per draft (the first ones of "
                                  "SAPO's training states, whole prompts).")
TEMPERATURES = flags.DEFINE_list("temperatures", ["1.0"], "Sampling temperatures.")
GROUP = flags.DEFINE_integer("group", 8, "G: samples per state.")
CHUNK = 16


def draft_rows(make_trainer, states: states_lib.StateSet, temperatures,
               group: int) -> dict[str, dict[int, float]]:
  """`{column: {step j: value}}` for one draft; columns as in the module docstring.

  `make_trainer(temperature)` gives the draft's `SapoTrainer` sampling at `temperature`.
  """
  cols = collections.defaultdict(list)
  trainer = make_trainer(1.0)
  params = trainer.ref_params
  samplers = {t: make_trainer(t) for t in temperatures}
  for start in range(0, len(states) - CHUNK + 1, CHUNK):
    chunk = states.take(range(start, start + CHUNK))
    roll, _, _ = trainer.rollout(params, chunk, jax.random.key(0), group=1, greedy=True)
    cols["greedy"].append(roll.accept)
    cols["false"].append(false_accepts(roll))
    for t, sampler in samplers.items():
      roll, _, _ = sampler.rollout(params, chunk, jax.random.key(start), group=group)
      accept = np.asarray(roll.accept, bool).reshape(CHUNK, group)
      cols[f"sample@{t:g}"].append(accept.mean(axis=1))
      cols[f"pass@{group}@{t:g}"].append(accept.any(axis=1))
  steps = states.step_index[:len(states) // CHUNK * CHUNK]
  out = {}
  for name, parts in cols.items():
    values = np.concatenate(parts).astype(np.float64)
    out[name] = {"all": float(values.mean()), **mean_by_step(values, steps)}
  return out


def main(_):
  cfg = train_flags.config_from_flags()
  cfg = cfg.replace(data_dir=cfg.resolved_data_dir)
  scfg = sapo_flags.config_from_flags()
  root = cfg.workdir
  tokenizer = tok_lib.load_tokenizer(stages_lib.export_dir(root, "draft_sft"))
  mesh = make_mesh((1, 1), ("data", "model"))
  target_dir = cfg.target.checkpoint or stages_lib.export_dir(root, "target_sft")
  ctx = stages_lib.StageContext(cfg=cfg, mesh=mesh, rules=rules_lib.DEFAULT_RULES,
                                tokenizer=tokenizer, models={"target": target_dir})
  target, _ = load_pretrained(target_dir, mesh=mesh)
  states, image_fn, origin = data_lib.load_states(ctx, scfg, target)
  states, _ = states_lib.split_heldout(states, scfg.heldout_states)
  states = states.take(range(min(NUM_STATES.value, len(states))))
  temperatures = [float(t) for t in TEMPERATURES.value]
  print(f"{len(states) // CHUNK * CHUNK} states from {origin}; judge {scfg.judge}")
  for name in DRAFTS.value:
    path = name if os.path.isdir(name) else stages_lib.export_dir(root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
      print(f"\n{name}: no draft at {path}; skipped")
      continue
    draft, _ = load_pretrained(path, mesh=mesh)
    make_trainer = lambda t, draft=draft: SapoTrainer(
        draft, target, tokenizer, scfg.replace(temperature=t, greedy_candidates=0),
        mesh=mesh, image_fn=image_fn, prefix_width=-(-states.max_prefix_len // 16) * 16,
        step_ok=task_step_ok if scfg.format_check == "task" else None)
    rows = draft_rows(make_trainer, states, temperatures, GROUP.value)
    keys = list(next(iter(rows.values())))
    print(f"\n{name} ({path})\n")
    print("| | " + " | ".join(k if k == "all" else f"step {k}" for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for col, values in rows.items():
      print(f"| {col} | " + " | ".join(f"{values[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
  app.run(main)
