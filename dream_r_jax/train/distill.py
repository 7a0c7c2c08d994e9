"""Distillation data for `draft_sft`: the target's greedy trajectories on training prompts.

The target answers `distill_examples` training prompts greedily; each sequence (prompt +
the target's tokens up to EOS) becomes an SFT row whose loss covers the target's tokens
(its image is read back from the task source when batched). A trajectory that ran out of
budget without EOS is kept as it is: the draft is to imitate the target, whatever the
target does. The rows are stored in `<stage>/trajectories.npz`, so a resumed stage trains
on exactly the data it started with.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dream_r_jax.train import evaluation


def target_rows(target, tokenizer, examples: Sequence[dict[str, Any]], *, batch_size: int,
                max_new_tokens: int, max_len: int
                ) -> tuple[dict[str, np.ndarray], evaluation.Generations]:
  """The target's greedy trajectories on `examples` as padded SFT rows (record i is
  example i), and the generations themselves."""
  gens = evaluation.greedy_generations(target, tokenizer, examples, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens)
  rows = build_rows(gens, list(range(len(examples))), max_len,
                    pad_id=tokenizer.pad_token_id or 0)
  return rows, gens


def build_rows(gens: evaluation.Generations, records: Sequence[int], max_len: int,
               pad_id: int = 0) -> dict[str, np.ndarray]:
  """Padded SFT rows from generations (loss on the generated tokens).

  Args:
    gens: the target's generations, one per prompt.
    records: the source index of each prompt's example (to fetch its image later).
    max_len: row length; longer sequences are dropped.
    pad_id: padding id.
  """
  keep = [i for i in range(len(gens.outputs)) if len(gens.prompts[i]) < max_len]
  n = len(keep)
  ids = np.full((n, max_len), pad_id, np.int32)
  mask = np.zeros((n, max_len), np.float32)
  lengths = np.zeros((n,), np.int32)
  for r, i in enumerate(keep):
    p, o = gens.prompts[i], gens.outputs[i][:max_len - len(gens.prompts[i])]
    ids[r, :len(p)] = p
    ids[r, len(p):len(p) + len(o)] = o
    mask[r, len(p):len(p) + len(o)] = 1.0
    lengths[r] = len(p) + len(o)
  return {"input_ids": ids, "loss_mask": mask, "lengths": lengths,
          "record": np.asarray([records[i] for i in keep], np.int64)}


def save_rows(path: str, rows: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, meta=np.asarray(json.dumps(meta, sort_keys=True)), **rows)
  os.replace(tmp, path)


def load_rows(path: str, meta: dict[str, Any]) -> Optional[dict[str, np.ndarray]]:
  """The stored rows if they were made with `meta`, else None."""
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    if str(f["meta"]) != json.dumps(meta, sort_keys=True):
      return None
    return {k: f[k] for k in f.files if k != "meta"}


class DistillDataset:
  """Batches of distillation rows: batch i is the same whatever the number of processes.

  Epoch e visits the rows in a permutation drawn from (seed, e); global batch i is
  positions [i * B, (i + 1) * B) of the concatenated epochs, and process p gets rows
  [p * B / P, (p + 1) * B / P) of it (the layout of `dream_r_jax.data.pipeline`).
  """

  def __init__(self, rows: dict[str, np.ndarray], *, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1,
               image_fn: Optional[Callable[[int], np.ndarray]] = None):
    self.rows = rows
    self.image_fn = image_fn
    self.n = len(rows["input_ids"])
    if self.n == 0:
      raise ValueError("no distillation rows: every prompt is longer than max_len")
    self.batch_size, self.seed = batch_size, seed
    self.shard_index, self.shard_count = shard_index, shard_count
    self.local = batch_size // shard_count

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    start = index * self.batch_size + self.shard_index * self.local
    positions = np.arange(start, start + self.local)
    epochs, offsets = np.divmod(positions, self.n)
    picks = np.asarray([self._order(int(e))[o] for e, o in zip(epochs, offsets)])
    batch = {k: v[picks] for k, v in self.rows.items()}
    if self.image_fn is not None:
      batch["images"] = np.stack([self.image_fn(int(r)) for r in batch["record"]])
    return batch
