"""From this process's host batches to global, sharded device batches, with prefetch.

A host batch (from `dream_r_jax.data.pipeline` or `distill.DistillDataset`) holds this
process's rows: `input_ids`, `loss_mask` and, for image tasks, `images`. Here images
become Qwen2.5-VL `pixel_values`, M-RoPE `positions` are computed on the host (they need
concrete token ids), and every array becomes one global `jax.Array` laid out over the
mesh's "data" axis with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from dream_r_jax.models import ModelConfig
from dream_r_jax.models import image_processing
from dream_r_jax.train import step as step_lib

HostBatch = dict[str, np.ndarray]


def image_grid(image: np.ndarray, count: int) -> tuple[tuple[int, int, int], ...]:
  """`image_grid_thw` of `count` images of `image`'s size, as hashable host data."""
  _, grid = image_processing.preprocess_images([image])
  return tuple(tuple(int(v) for v in grid[0]) for _ in range(count))


class Featurizer:
  """Host batch -> model inputs (`input_ids`, `loss_mask`[, `positions`, `pixel_values`])."""

  def __init__(self, cfg: ModelConfig):
    self.cfg = cfg

  def __call__(self, batch: HostBatch) -> HostBatch:
    out = {"input_ids": np.asarray(batch["input_ids"], np.int32),
           "loss_mask": np.asarray(batch["loss_mask"], np.float32)}
    images = batch.get("images")
    if images is None or self.cfg.vision is None:
      return out
    from dream_r_jax.models import mrope  # pylint: disable=g-import-not-at-top
    pixels, grid = image_processing.preprocess_images(list(images))
    ids = out["input_ids"]
    lengths = batch.get("lengths")
    mask = (np.ones_like(ids) if lengths is None else
            (np.arange(ids.shape[1])[None] < np.asarray(lengths)[:, None]).astype(np.int32))
    positions, _ = mrope.get_rope_index(self.cfg, ids, grid, mask)
    out["positions"] = np.asarray(positions, np.int32)
    out["pixel_values"] = pixels.astype(np.float32)
    return out


def global_batch(local: HostBatch, mesh: Mesh, process_count: int) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over "data" (rows in process order)."""
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in local.items()}
  shardings = step_lib.batch_shardings(shapes, mesh)
  out = {}
  for k, v in local.items():
    axis = 1 if k == "positions" else 0
    global_shape = list(v.shape)
    global_shape[axis] *= process_count
    out[k] = jax.make_array_from_process_local_data(shardings[k], v, tuple(global_shape))
  return out


def global_shapes(local: HostBatch, process_count: int) -> dict[str, jax.ShapeDtypeStruct]:
  out = {}
  for k, v in local.items():
    shape = list(v.shape)
    shape[1 if k == "positions" else 0] *= process_count
    out[k] = jax.ShapeDtypeStruct(tuple(shape), v.dtype)
  return out


class Prefetcher:
  """Reads and featurizes batches `start, start + 1, ...` in a background thread.

  Tokenizing, decoding PNGs and patchifying images is Python/NumPy work; doing it while
  the device runs the previous step keeps the step time the device's.
  """

  def __init__(self, get: Callable[[int], HostBatch], featurize: Callable[[HostBatch], Any],
               start: int, stop: int, depth: int = 3):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(get, featurize, start, stop),
                                    daemon=True)
    self._thread.start()

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def _run(self, get, featurize, start, stop):
    try:
      for i in range(start, stop):
        if self._stop.is_set():
          return
        self._put((i, featurize(get(i)), None))
      self._put((None, None, None))  # End of the range.
    except BaseException as e:  # pylint: disable=broad-except
      self._put((None, None, e))

  def __iter__(self) -> Iterator[tuple[int, Any]]:
    return self

  def __next__(self) -> tuple[int, Any]:
    i, item, error = self._queue.get()
    if error is not None:
      raise error
    if i is None:
      raise StopIteration
    return i, item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

