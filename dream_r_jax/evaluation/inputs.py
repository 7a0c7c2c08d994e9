"""Examples -> model inputs: right-padded prompt ids and, for images, the vision inputs."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.models import image_processing


@dataclasses.dataclass
class Prompts:
  ids: np.ndarray                   # [B, T] int32, right-padded with the pad id
  lens: np.ndarray                  # [B] int32
  images: list                      # per row: uint8 [H, W, 3] or None

  @property
  def has_images(self) -> bool:
    return any(img is not None for img in self.images)


def encode_prompts(tokenizer, examples: Sequence[dict[str, Any]], *,
                   pad_to: Optional[int] = None) -> Prompts:
  """Tokenizes the prompts of `examples` (image placeholders included)."""
  rows = [tok_lib.encode_prompt(tokenizer, ex) for ex in examples]
  t = max(len(r) for r in rows) if pad_to is None else pad_to
  if any(len(r) > t for r in rows):
    raise ValueError(f"a prompt has {max(len(r) for r in rows)} tokens, more than pad_to={t}")
  ids = np.full((len(rows), t), tokenizer.pad_token_id or 0, np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return Prompts(ids=ids, lens=np.asarray([len(r) for r in rows], np.int32),
                 images=[ex.get("image") for ex in examples])


def vision_inputs(prompts: Prompts):
  """(pixel_values, image_grid_thw) for the rows' images in row order, or (None, None).

  Host arrays: the program that reads them copies them straight to its own devices.
  """
  images = [img for img in prompts.images if img is not None]
  if not images:
    return None, None
  pixel_values, grid = image_processing.preprocess_images(images)
  return np.asarray(pixel_values), np.asarray(grid)


def engine_images(prompts: Prompts):
  """The engine's `images` callable: cfg -> (pixel_values, grid, positions, rope_delta)."""
  if not prompts.has_images:
    return None
  # Host arrays: each role's program copies them straight to its own mesh (a device array
  # would first sit on the default device and then be copied again).
  pixel_values, grid = vision_inputs(prompts)
  grid_t = tuple(tuple(int(x) for x in row) for row in grid)
  positions = {}  # draft and target usually read image tokens alike: compute them once

  def for_model(cfg):
    from dream_r_jax.models import mrope  # pylint: disable=g-import-not-at-top
    key = (cfg.vision.spatial_merge_size, cfg.image_token_id, cfg.video_token_id)
    if key not in positions:
      mask = (np.arange(prompts.ids.shape[1])[None] < prompts.lens[:, None]).astype(np.int32)
      positions[key] = mrope.get_rope_index(cfg, prompts.ids, grid, mask, host=True)
    return (pixel_values, grid_t) + positions[key]

  return for_model
