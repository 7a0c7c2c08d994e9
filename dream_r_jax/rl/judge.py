"""Does the target judge? Its verdicts on the task's right and corrupted steps.

SAPO's acceptance reward is only as good as the target's verdicts: a target whose CPN is
the same for right and wrong steps accepts nothing (or everything), whatever the draft
writes. `judge_check` scores, for a few examples, each reference step and a corrupted copy
(`task.verdict_examples`, the data `target_sft` teaches the judge with) and reports how far
apart the two are; the `sapo` stage logs it and records it in its summary.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.rl.states import StateSet

# Below this gap in acceptance between right and corrupted steps the acceptance reward
# carries next to no signal.
MIN_SEPARATION = 0.2


def verdict_states(tokenizer, examples: Sequence[dict[str, Any]], seed: int = 0,
                   max_prefix_len: int = 0):
  """(StateSet of verdict prefixes, candidate steps with their delimiter, labels)."""
  rng = np.random.default_rng(seed)
  prefix, steps, labels, records = [], [], [], []
  for r, ex in enumerate(examples):
    prompt = tok_lib.encode_prompt(tokenizer, ex)
    for prefix_text, step, label in task_lib.verdict_examples(ex, rng):
      # The prefix text is the prompt text and the earlier steps, each ending with the
      # delimiter, so its tokens are the prompt's followed by the steps'.
      rest = prefix_text[len(task_lib.prompt_text(ex)):]
      ids = np.concatenate([prompt, tokenizer.encode(rest, add_special_tokens=False)])
      if max_prefix_len and len(ids) > max_prefix_len:
        continue
      prefix.append(ids.astype(np.int32))
      steps.append(np.asarray(tokenizer.encode(step + task_lib.STEP_DELIMITER,
                                               add_special_tokens=False), np.int32))
      labels.append(bool(label))
      records.append(r)
  n = len(prefix)
  states = StateSet(prefix=prefix, next_step=steps, prev_step=[np.zeros(0, np.int32)] * n,
                    record=np.asarray(records, np.int64), step_index=np.zeros(n, np.int32))
  return states, steps, np.asarray(labels, bool)


def judge_check(trainer, tokenizer, examples: Sequence[dict[str, Any]], *,
                chunk: int) -> dict[str, float]:
  """Mean CPN and TBVM acceptance of right vs corrupted steps under the trainer's target."""
  states, steps, labels = verdict_states(tokenizer, examples,
                                         max_prefix_len=trainer.prefix_width)
  if not len(states) or labels.all() or not labels.any():
    return {}
  image_fn = lambda r: examples[int(r)].get("image")
  if examples[0].get("image") is None:
    image_fn = None
  got = trainer.score_steps(states, steps, chunk=chunk, image_fn=image_fn)
  return {"judge/cpn_right": float(got["cpn"][labels].mean()),
          "judge/cpn_wrong": float(got["cpn"][~labels].mean()),
          "judge/accept_right": float(got["accept"][labels].mean()),
          "judge/accept_wrong": float(got["accept"][~labels].mean()),
          "judge/verdict_mass": float(got["mass"].mean()),
          "judge/steps": float(len(labels))}
