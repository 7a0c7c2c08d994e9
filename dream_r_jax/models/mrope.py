"""Multimodal rotary positions (M-RoPE) of Qwen2.5-VL, as Hugging Face computes them.

Text tokens advance one position per token on all three components (temporal, height,
width). An image of merged grid (t, h, w) occupies t*h*w tokens whose components are
`start + (frame, row, column)`, and the text after it resumes at `start + max(h, w)`.
`rope_deltas` is `max position + 1 - number of real tokens`: the next real token of a row
sits at (real tokens so far) + delta.

With images this walks the tokens of each row on the host (the image runs and their grids
are data-dependent), so `input_ids` must be concrete; without images the positions are a
cumulative sum and the function is pure JAX.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from dream_r_jax.models.config import ModelConfig


def text_positions(input_ids: jax.Array,  # [B, T]
                   attention_mask: Optional[jax.Array] = None):  # [B, T]
  """Text-only M-RoPE positions ([3, B, T] int32, deltas [B] int32); jittable.

  Real tokens count from 0 in each row; padding gets position 0 (Hugging Face's fill).
  """
  b, t = input_ids.shape
  if attention_mask is None:
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  else:
    mask = jnp.asarray(attention_mask).astype(bool)
    pos = jnp.where(mask, jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
  return jnp.broadcast_to(pos[None], (3, b, t)).astype(jnp.int32), jnp.zeros((b,), jnp.int32)


def _image_positions(grid, start: int, merge: int) -> np.ndarray:
  """[3, t*h*w/merge^2] positions of one image's merged tokens, offset by `start`."""
  t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(cfg: ModelConfig,
                   input_ids,  # [B, T] int
                   image_grid_thw=None,  # [num_images, 3] int, images in row-major order
                   attention_mask=None,  # [B, T], 1 = real token
                   *, host: bool = False):
  """Qwen2.5-VL position ids [3, B, T] int32 and rope deltas [B] int32.

  With `host=True` (images only) the results are NumPy arrays, for callers that pass them
  to a program on devices of their choosing (a device array would first land on the
  default device).

  Equals `Qwen2_5_VLModel.get_rope_index` (transformers 5.x) for images: the images are
  consumed from `image_grid_thw` in order over the batch; padded positions are 0. A run of
  image tokens may hold several images back to back (each takes its own grid).

  Raises:
    TypeError: when images are given but `input_ids` is traced.
    ValueError: when image tokens don't match `image_grid_thw`, or video tokens appear.
  """
  if image_grid_thw is None:
    return text_positions(input_ids, attention_mask)
  if isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
    raise TypeError("get_rope_index with images needs concrete input_ids and attention_mask "
                    "(it runs on the host); compute positions outside jit and pass them in")
  ids = np.asarray(input_ids)
  b, t = ids.shape
  mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask) != 0
  grids = np.asarray(image_grid_thw).reshape(-1, 3)
  merge = cfg.vision.spatial_merge_size
  if cfg.video_token_id is not None and np.any((ids == cfg.video_token_id) & mask):
    raise ValueError("input_ids hold video tokens; video positions are not supported")

  positions = np.zeros((3, b, t), np.int64)
  deltas = np.zeros((b,), np.int64)
  next_image = 0
  for row in range(b):
    tokens = ids[row][mask[row]]
    is_image = tokens == cfg.image_token_id
    chunks, pos, i = [], 0, 0
    while i < len(tokens):
      if not is_image[i]:
        j = i
        while j < len(tokens) and not is_image[j]:
          j += 1
        chunks.append(np.broadcast_to(np.arange(j - i) + pos, (3, j - i)))
        pos, i = pos + j - i, j
        continue
      if next_image >= len(grids):
        raise ValueError(f"row {row} of input_ids has more image tokens than "
                         f"image_grid_thw {grids.tolist()} has images")
      grid = grids[next_image]
      n = int(np.prod(grid)) // merge ** 2
      if i + n > len(tokens) or not np.all(is_image[i:i + n]):
        run = int(np.argmin(np.append(is_image[i:], False)))
        raise ValueError(f"row {row} of input_ids has a run of {run} image tokens at real "
                         f"token {i}, but image {next_image} of image_grid_thw "
                         f"{grid.tolist()} needs {n}")
      chunks.append(_image_positions(grid, pos, merge))
      pos += max(int(grid[1]), int(grid[2])) // merge
      i += n
      next_image += 1
    if chunks:
      row_pos = np.concatenate(chunks, axis=1)
      positions[:, row, mask[row]] = row_pos
      deltas[row] = row_pos.max() + 1 - len(tokens)
  if next_image != len(grids):
    raise ValueError(f"image_grid_thw has {len(grids)} images but input_ids hold image "
                     f"tokens for {next_image}")
  if host:
    return positions.astype(np.int32), deltas.astype(np.int32)
  return jnp.asarray(positions, jnp.int32), jnp.asarray(deltas, jnp.int32)
