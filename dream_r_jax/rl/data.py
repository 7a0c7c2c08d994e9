"""Where a SAPO run's states come from: the target's trajectories, or reference solutions.

  * `target` (default): the target answers `trajectory_examples` training prompts that come
    after the `distill_examples` prompts `draft_sft` was distilled on. The draft has never
    seen them, so its steps there are judged as they will be at test time (on its own
    training prompts the SFT draft reproduces the target almost exactly, which leaves RL
    nothing to learn). Cached in `<workdir>/sapo/trajectories.npz`.
  * `distill`: reuses `draft_sft`'s stored trajectories (`<workdir>/draft_sft/
    trajectories.npz`): no generation, but the draft was trained on exactly these.
  * `reference`: the task's reference solutions replace the target's (for tests, or a
    target that cannot yet solve the task).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import numpy as np
from absl import logging

from dream_r_jax.rl import states as states_lib
from dream_r_jax.rl.config import SapoConfig
from dream_r_jax.train import distill
from dream_r_jax.train import sft


def _stored_rows(path: str, target_dir: str) -> Optional[dict[str, np.ndarray]]:
  """The rows in `path` if they hold the trajectories of the target at `target_dir`."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      meta = json.loads(str(f["meta"]))
      rows = {k: f[k] for k in f.files if k != "meta"}
  except (OSError, ValueError, KeyError) as e:
    logging.warning("[sapo] ignoring unreadable trajectories %s: %s", path, e)
    return None
  same = os.path.abspath(str(meta.get("target", ""))) == os.path.abspath(target_dir)
  needed = {"input_ids", "loss_mask", "lengths", "record"}
  return rows if same and needed <= set(rows) else None


def _fresh_prompts(ctx, scfg: SapoConfig, source) -> tuple[int, int]:
  """(first, count): the training prompts after the ones draft_sft was distilled on."""
  n = min(scfg.trajectory_examples, len(source))
  first = min(ctx.cfg.distill_examples, len(source) - n)
  if first < ctx.cfg.distill_examples:
    logging.warning("[sapo] the train split has %d prompts: %d of the %d state prompts are "
                    "among the %d draft_sft was distilled on", len(source),
                    ctx.cfg.distill_examples - first, n, ctx.cfg.distill_examples)
  return first, n


def _generate_rows(ctx, scfg: SapoConfig, target, source,
                   trajectories_dir: Optional[str] = None) -> dict[str, np.ndarray]:
  cfg = ctx.cfg
  first, n = _fresh_prompts(ctx, scfg, source)
  meta = {"target": os.path.abspath(ctx.model_dir("target")),
          "target_mtime": os.path.getmtime(os.path.join(ctx.model_dir("target"),
                                                        "config.json")),
          "first_example": first, "examples": n, "max_len": cfg.max_len,
          "max_new_tokens": cfg.max_new_tokens, "task": cfg.task_config}
  path = os.path.join(ctx.stage_dir("sapo"), "trajectories.npz")
  for where in ([trajectories_dir] if trajectories_dir else []) + [ctx.stage_dir("sapo")]:
    rows = distill.load_rows(os.path.join(where, "trajectories.npz"), meta)
    if rows is not None:
      return rows
  examples = [source[i] for i in range(first, first + n)]
  logging.info("[sapo] the target answers training prompts %d..%d for states", first,
               first + n - 1)
  rows, _ = distill.target_rows(target, ctx.tokenizer, examples,
                                batch_size=cfg.eval_batch_size,
                                max_new_tokens=cfg.max_new_tokens, max_len=cfg.max_len)
  rows["record"] = rows["record"] + first  # records index the train split
  if ctx.is_primary:
    os.makedirs(ctx.stage_dir("sapo"), exist_ok=True)
    distill.save_rows(path, rows, meta)
  ctx.barrier("sapo_trajectories")
  return rows


def load_states(ctx, scfg: SapoConfig, target,
                trajectories_dir: Optional[str] = None
                ) -> tuple[states_lib.StateSet, Optional[Callable[[int], Any]], str]:
  """All states of the run, the record -> image function, and where the states came from.

  Args:
    ctx: the stage context.
    scfg: the run's settings (`states_from`, `trajectory_examples`, `max_step_tokens`).
    target: the loaded target (to generate trajectories when none are stored).
    trajectories_dir: another SAPO run's directory whose cached `trajectories.npz` to reuse
      when it was made the same way (the ablation shares the main run's).
  """
  tok = ctx.tokenizer
  source = sft.task_source(ctx, "train")
  image_fn = None
  if source[0].get("image") is not None:
    image_fn = lambda r: source[int(r)]["image"]
  if scfg.states_from == "reference":
    n = min(scfg.trajectory_examples, len(source))
    prompts, outputs, records = states_lib.reference_trajectories(
        tok, [source[i] for i in range(n)])
    origin = f"reference solutions of {n} training examples"
  elif scfg.states_from == "distill":
    path = os.path.join(ctx.stage_dir("draft_sft"), "trajectories.npz")
    rows = _stored_rows(path, ctx.model_dir("target"))
    if rows is None:
      raise ValueError(f"--sapo_states_from=distill needs draft_sft's trajectories of this "
                       f"target in {path}; run draft_sft first or use "
                       "--sapo_states_from=target")
    prompts, outputs, records = states_lib.trajectories_from_rows(rows)
    origin = f"target trajectories from {path} (the draft's distillation prompts)"
  else:
    rows = _generate_rows(ctx, scfg, target, source, trajectories_dir)
    prompts, outputs, records = states_lib.trajectories_from_rows(rows)
    first = int(rows["record"].min()) if len(rows["record"]) else 0
    origin = (f"target trajectories on {len(prompts)} training prompts from {first} on, "
              "none of them distilled into the draft")
  states = states_lib.cut_states(prompts, outputs, records,
                                 delimiter_ids=states_lib.delimiter_ids(tok),
                                 eos_ids=(tok.eos_token_id,),
                                 max_step_tokens=scfg.max_step_tokens)
  if not len(states):
    raise ValueError(f"no SAPO states in {origin}: no trajectory has a complete step (one "
                     "ending with the step delimiter). Train the target further, or use "
                     "--sapo_states_from=reference")
  logging.info("[sapo] %d states from %s", len(states), origin)
  return states, image_fn, origin
