"""Training batches with grain: shuffle, mix reasoning and verdict examples, pad, shard.

    grain.MapDataset.range(N).shuffle(seed).repeat(epochs)   # global order of records
      -> map_with_index                                      # (global position, record id)
      -> batch(local_batch_size)                             # chunks of one process's rows
      -> [shard_index::shard_count]                          # this process's chunks
      -> map(collate)                                        # read, tokenize, pad, stack

Global batch b is the positions [b * B, (b + 1) * B) of the shuffled order, and process p
gets rows [p * B / P, (p + 1) * B / P) of it, so concatenating the processes' batches in
process order gives exactly the single-process batch (the layout that
`jax.make_array_from_process_local_data` expects). Whether a row is a reasoning (SFT)
or a verdict example, and which verdict, is drawn from a generator seeded by
(seed, global position), so it does not depend on the number of processes either.

The order is a permutation of record ids rather than `MapDataset.source(source)` so that
records are read (and images decoded) only after sharding, by the process that uses them.
The result is a `MapDataset`: batch k is `ds[k]`, so a run resumed at step k needs no
iterator state; `ds.to_iter_dataset()` (optionally `.mp_prefetch(...)`) streams it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import grain
import numpy as np

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib

KIND_SFT, KIND_VERDICT = 0, 1


def _verdict_ids(tokenizer, example, rng, n_image):
  verdicts = task_lib.verdict_examples(example, rng)
  prefix, candidate, label = verdicts[int(rng.integers(len(verdicts)))]
  ids, mask = tok_lib.encode_verdict(tokenizer, example, prefix, candidate, label, n_image)
  return ids, mask, label


def _pair(position: int, record_id: int) -> tuple[int, int]:
  return position, record_id


class _Collate:
  """Turns a chunk of (global position, record id) into one padded batch (picklable)."""

  def __init__(self, source, tokenizer, max_len: int, seed: int, verdict_ratio: float,
               num_image_tokens: Optional[int]):
    self.source = source
    self.tokenizer = tokenizer
    self.max_len = max_len
    self.seed = seed
    self.verdict_ratio = verdict_ratio
    self.num_image_tokens = num_image_tokens

  def encode(self, position: int, record_id: int) -> dict[str, Any]:
    example = self.source[record_id]
    rng = np.random.default_rng([self.seed, position])
    label = False
    if rng.random() < self.verdict_ratio:
      kind = KIND_VERDICT
      ids, mask, label = _verdict_ids(self.tokenizer, example, rng, self.num_image_tokens)
    else:
      kind = KIND_SFT
      ids, mask = tok_lib.encode_sft(self.tokenizer, example, self.num_image_tokens)
    if len(ids) > self.max_len:
      raise ValueError(f"example {example['id']!r} is {len(ids)} tokens, more than "
                       f"max_len={self.max_len}; raise max_len")
    return {"ids": ids, "mask": mask, "kind": kind, "label": label,
            "image": example.get("image"), "id": example["id"]}

  def __call__(self, chunk: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    rows = [self.encode(int(p), int(r)) for p, r in chunk]
    batch_size = len(rows)
    input_ids = np.zeros((batch_size, self.max_len), np.int32)  # <pad> is id 0.
    loss_mask = np.zeros((batch_size, self.max_len), np.float32)
    for i, row in enumerate(rows):
      input_ids[i, :len(row["ids"])] = row["ids"]
      loss_mask[i, :len(row["mask"])] = row["mask"]
    batch = {
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "lengths": np.asarray([len(r["ids"]) for r in rows], np.int32),
        "kind": np.asarray([r["kind"] for r in rows], np.int32),
        "verdict_label": np.asarray([r["label"] for r in rows], np.bool_),
        "position": np.asarray([p for p, _ in chunk], np.int64),
        "record": np.asarray([r for _, r in chunk], np.int64),
    }
    images = [r["image"] for r in rows]
    if any(im is not None for im in images):
      if any(im is None for im in images) or len({im.shape for im in images}) != 1:
        raise ValueError("a batch mixes images of different sizes or with no image; "
                         "resize images to one size before batching")
      batch["images"] = np.stack(images).astype(np.uint8)
    return batch


def make_dataset(source, tokenizer, *, batch_size: int, max_len: int, seed: int = 0,
                 verdict_ratio: float = 0.0, shard_index: int = 0, shard_count: int = 1,
                 num_epochs: Optional[int] = None,
                 num_image_tokens: Optional[int] = None) -> grain.MapDataset:
  """A deterministic dataset of padded training batches for this process.

  Args:
    source: random-access examples (`tfds_builder.load_task`, a list of example dicts).
    tokenizer: a tokenizer from `tokenizer.load_tokenizer`.
    batch_size: the global batch size (all processes together).
    max_len: every batch is padded (on the right, with id 0) to this length; a longer
      example is an error rather than silently truncated.
    seed: shuffle and mixing seed.
    verdict_ratio: the fraction of rows that are judge (verdict) examples; the rest are
      reasoning SFT examples.
    shard_index: this process's index (`jax.process_index()`).
    shard_count: the number of processes (`jax.process_count()`).
    num_epochs: passes over the source, each reshuffled; None repeats forever.
    num_image_tokens: image placeholder count; by default derived from the image size.

  Returns:
    A `grain.MapDataset` whose elements are dicts of numpy arrays: `input_ids` int32
    [b, max_len], `loss_mask` float32 [b, max_len], `lengths` int32 [b], `kind` int32 [b]
    (0 SFT, 1 verdict), `verdict_label` bool [b], `position` int64 [b] (global position)
    and `record` int64 [b] (index into `source`) for checks and debugging, and, when
    examples have images, `images` uint8 [b, H, W, 3]; here b = batch_size //
    shard_count. Only whole global batches are produced, so every process sees the same
    number of batches.
  """
  if batch_size <= 0 or max_len <= 0:
    raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
  if shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(f"bad shard {shard_index} of {shard_count}")
  if batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {shard_count} shards")
  if not 0.0 <= verdict_ratio <= 1.0:
    raise ValueError(f"verdict_ratio must be in [0, 1], got {verdict_ratio}")
  if not len(source):  # pylint: disable=g-explicit-length-test
    raise ValueError("the source has no examples")
  if len(source) < batch_size and num_epochs is not None:
    raise ValueError(f"{len(source)} examples make no batch of {batch_size}")
  local = batch_size // shard_count
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map_with_index(_pair)
  ds = ds.batch(local, drop_remainder=True, batch_fn=list)
  num_chunks = len(ds) - len(ds) % shard_count
  ds = ds[shard_index:num_chunks:shard_count]
  return ds.map(_Collate(source, tokenizer, max_len, seed, verdict_ratio, num_image_tokens))
