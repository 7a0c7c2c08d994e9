"""SAPO states: (prompt [+ image], the target's steps s_<j) with the target's next step s_j.

States are cut from whole trajectories: the target's own greedy generations (what DESIGN.md
section 5 asks for, and what `draft_sft` already stores in `trajectories.npz`), or the task's
reference solutions when no target trajectory is at hand. A trajectory is a prompt and an
output; the output is split after every step-delimiter token, and each complete step j (one
that ends with a delimiter and has content) gives one state:

    prefix    = prompt + s_1 + delim + ... + s_{j-1} + delim
    next_step = s_j        (content only: what faithfulness and concision compare against)
    prev_step = s_{j-1}    (content only, empty for j = 1: what a repeated step repeats)

Everything here is host-side NumPy on variable-length token lists.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib


@dataclasses.dataclass
class StateSet:
  """M states; the token lists are int32 and unpadded.

  Attributes:
    prefix: per state, the prompt and the previous steps (each with its delimiter).
    next_step: per state, the content tokens of the target's next step s_j.
    prev_step: per state, the content tokens of s_{j-1} (empty for the first step).
    record: [M] the source example index of the state's prompt (to fetch its image).
    step_index: [M] j, 0-based.
  """
  prefix: list[np.ndarray]
  next_step: list[np.ndarray]
  prev_step: list[np.ndarray]
  record: np.ndarray
  step_index: np.ndarray

  def __len__(self) -> int:
    return len(self.prefix)

  def take(self, idx: Sequence[int]) -> "StateSet":
    idx = [int(i) for i in idx]
    return StateSet(prefix=[self.prefix[i] for i in idx],
                    next_step=[self.next_step[i] for i in idx],
                    prev_step=[self.prev_step[i] for i in idx],
                    record=self.record[idx], step_index=self.step_index[idx])

  @property
  def max_prefix_len(self) -> int:
    return max((len(p) for p in self.prefix), default=0)


def cut_states(prompts: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
               records: Sequence[int], *, delimiter_ids: Sequence[int],
               eos_ids: Sequence[int], max_step_tokens: int = 0) -> StateSet:
  """Every complete step of every trajectory as a state.

  Args:
    prompts: per trajectory, the prompt ids.
    outputs: per trajectory, the generated ids (an EOS ends the trajectory; a last step
      without its delimiter, cut by the token budget, gives no state).
    records: per trajectory, the source example index.
    delimiter_ids: step-delimiter token ids.
    eos_ids: end-of-sequence token ids.
    max_step_tokens: if > 0, steps whose content is longer are skipped as next steps (a
      draft step of at most this many tokens could never match them).

  Returns:
    The states, in trajectory order, then step order.
  """
  delim, eos = set(int(i) for i in delimiter_ids), set(int(i) for i in eos_ids)
  out = StateSet([], [], [], np.zeros((0,), np.int64), np.zeros((0,), np.int32))
  recs, steps = [], []
  for prompt, output, record in zip(prompts, outputs, records):
    prompt = np.asarray(prompt, np.int32)
    output = np.asarray(output, np.int32)
    start, prev, j = 0, np.zeros((0,), np.int32), 0
    for pos, tok in enumerate(output.tolist()):
      if tok in eos:
        break
      if tok not in delim:
        continue
      content = output[start:pos]
      if len(content) and (max_step_tokens <= 0 or len(content) < max_step_tokens):
        out.prefix.append(np.concatenate([prompt, output[:start]]))
        out.next_step.append(content)
        out.prev_step.append(prev)
        recs.append(int(record))
        steps.append(j)
      prev, start, j = content, pos + 1, j + 1
  out.record = np.asarray(recs, np.int64)
  out.step_index = np.asarray(steps, np.int32)
  return out


def trajectories_from_rows(rows: dict[str, np.ndarray]):
  """(prompts, outputs, records) from `draft_sft`'s distillation rows.

  A row holds prompt + output right-padded to `max_len`, `loss_mask` 1 on the output and
  `lengths` the real length (see `dream_r_jax.train.distill.build_rows`).
  """
  prompts, outputs = [], []
  for ids, mask, n in zip(rows["input_ids"], rows["loss_mask"], rows["lengths"]):
    on = np.flatnonzero(np.asarray(mask)[:int(n)] > 0)
    start = int(on[0]) if len(on) else int(n)
    prompts.append(np.asarray(ids[:start], np.int32))
    outputs.append(np.asarray(ids[start:int(n)], np.int32))
  return prompts, outputs, [int(r) for r in rows["record"]]


def reference_trajectories(tokenizer, examples: Sequence[dict[str, Any]],
                           records: Optional[Sequence[int]] = None):
  """(prompts, outputs, records) from the task's reference solutions."""
  prompts, outputs = [], []
  for ex in examples:
    ids, mask = tok_lib.encode_sft(tokenizer, ex)
    start = int(np.argmax(mask > 0))
    prompts.append(ids[:start])
    outputs.append(ids[start:])
  return prompts, outputs, list(records if records is not None else range(len(examples)))


def delimiter_ids(tokenizer) -> tuple[int, ...]:
  return tuple(tokenizer.encode(task_lib.STEP_DELIMITER, add_special_tokens=False))


def split_heldout(states: StateSet, num_heldout: int) -> tuple[StateSet, StateSet]:
  """(train, held-out): the held-out states are those of the last source records.

  Whole trajectories go to one side, so no held-out state shares a prompt with a training
  state; held-out takes records from the end until it has at least `num_heldout` states.
  """
  if num_heldout <= 0:
    return states, states.take([])
  order = list(dict.fromkeys(states.record.tolist()))  # records, first-seen order
  held: set[int] = set()
  count = 0
  for rec in reversed(order):
    if count >= num_heldout:
      break
    held.add(rec)
    count += int(np.sum(states.record == rec))
  is_held = np.asarray([r in held for r in states.record.tolist()], bool)
  train, heldout = np.flatnonzero(~is_held), np.flatnonzero(is_held)[:num_heldout]
  if not len(train):
    raise ValueError(f"{len(states)} states cannot spare {num_heldout} held-out states and "
                     "leave any to train on; lower the held-out count or add prompts")
  return states.take(train), states.take(heldout)


def pad_rows(rows: Sequence[np.ndarray], width: int, pad_id: int = 0):
  """Right-padded `[len(rows), width]` int32 ids and their lengths."""
  ids = np.full((len(rows), width), pad_id, np.int32)
  lens = np.zeros((len(rows),), np.int32)
  for i, r in enumerate(rows):
    if len(r) > width:
      raise ValueError(f"a row of {len(r)} tokens does not fit width {width}")
    ids[i, :len(r)] = r
    lens[i] = len(r)
  return ids, lens


def images_for(states: StateSet, image_fn: Optional[Callable[[int], Any]]) -> list:
  """Per state, its prompt's image (None for text-only tasks)."""
  if image_fn is None:
    return [None] * len(states)
  return [image_fn(int(r)) for r in states.record]
