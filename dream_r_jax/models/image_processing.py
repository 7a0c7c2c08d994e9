"""Qwen2.5-VL image preprocessing in NumPy: the Hugging Face processor's output, without torch.

The steps are those of transformers' `Qwen2VLImageProcessorPil` (the processor class that
works without torchvision): `smart_resize` to a multiple of 28 within [min, max] pixels,
bicubic resampling of the uint8 image, rescale by 1/255, normalise with the OpenAI CLIP
mean/std, then patchify into `pixel_values` [num_patches, 3 * 2 * 14 * 14] with each image
repeated over the 2 temporal patches, and `image_grid_thw` [num_images, 3].

The resampler is a port of Pillow's fixed-point two-pass bicubic filter (one axis, round to
uint8, the other axis), so it reproduces `PIL.Image.resize(..., BICUBIC)` of Pillow >= 13
bit for bit rather than approximating it. Without a resize (sizes already multiples of 28)
the output equals both processor backends. transformers 5.x picks the torchvision backend
(`Qwen2VLImageProcessor`) when torchvision is installed; it resizes with torch's
antialiased bicubic kernel, which this module does not reproduce bit for bit.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280  # The processor class default (released configs may differ).
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images.


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """The target (height, width): multiples of `factor`, area in range, aspect kept."""
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                     f"{max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _bicubic(x: np.ndarray) -> np.ndarray:
  """Pillow's bicubic kernel (a = -0.5), written in its operation order."""
  a = -0.5
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _coefficients(in_size: int, out_size: int):
  """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: taps [out, k] and int weights."""
  scale = float(np.float32(in_size)) / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  ksize = int(math.ceil(support)) * 2 + 1
  center = (np.arange(out_size) + 0.5) * scale
  # C casts truncate toward zero; the clamps make the sign irrelevant except below 0.
  xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
  xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
  taps = np.arange(ksize)
  valid = taps[None, :] < xmax[:, None]
  w = _bicubic(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
  w = np.where(valid, w, 0.0)
  total = np.zeros((out_size, 1))
  for j in range(ksize):  # Sequential, as in C: np.sum's pairwise order can differ by an ulp.
    total = total + w[:, j:j + 1]
  w = np.where(total != 0.0, w / np.where(total == 0.0, 1.0, total), w)
  w = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)),
               np.trunc(0.5 + w * (1 << _PRECISION_BITS))).astype(np.int64)
  index = np.minimum(xmin[:, None] + taps[None, :], in_size - 1)  # masked taps weigh 0
  return index, w


def _resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
  """One Pillow pass along `axis` of a uint8 image: fixed-point sum, round, clip."""
  index, w = _coefficients(img.shape[axis], out_size)
  src = np.moveaxis(img, axis, 0).astype(np.int32)  # [in, other, C]
  # Pillow accumulates in int32 too; its two spare bits keep the sum from overflowing.
  acc = np.full((out_size,) + src.shape[1:], 1 << (_PRECISION_BITS - 1), np.int32)
  for j in range(w.shape[1]):
    acc += src[index[:, j]] * w[:, j, None, None].astype(np.int32)
  out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
  return np.moveaxis(out, 0, axis)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """`PIL.Image.fromarray(image).resize((width, height), BICUBIC)` for uint8 [H, W, C]."""
  in_h, in_w = image.shape[:2]
  if (in_h, in_w) == (height, width):
    return image.copy()
  # The intermediate is rounded to uint8, so the pass order changes the result. Pillow 13
  # runs the vertical pass first when the height shrinks by more than twice as many pixels
  # as the width (python-pillow/Pillow#9549); earlier versions always went horizontal first.
  vertical_first = in_h > height and in_h - height > 2 * (in_w - width)
  out = image
  for axis in ((0, 1) if vertical_first else (1, 0)):
    size = (height, width)[axis]
    if out.shape[axis] != size:
      out = _resample_axis(out, size, axis=axis)
  return out


def _as_rgb_uint8(image, i: int) -> np.ndarray:
  if hasattr(image, "convert"):  # a PIL image
    image = np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image {i} must be uint8 [H, W, 3] (or a PIL image), got "
                     f"{image.dtype} {image.shape}")
  return image


def patchify(image: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> np.ndarray:
  """Normalised [C, H, W] -> [gh * gw, C * tp * p * p], merge blocks contiguous.

  Rows run over (block row, block column, row in block, column in block); each row holds
  (channel, temporal copy, pixel row, pixel column), the layout of the vision tower's Conv3d.
  """
  c, h, w = image.shape
  gh, gw = h // patch_size, w // patch_size
  x = image.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size,
                    merge_size, patch_size)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size,)
                      + x.shape[5:])
  return x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)


def preprocess_images(images: Sequence[np.ndarray], min_pixels: int = MIN_PIXELS,
                      max_pixels: int = MAX_PIXELS, patch_size: int = PATCH_SIZE,
                      merge_size: int = MERGE_SIZE,
                      temporal_patch_size: int = TEMPORAL_PATCH_SIZE):
  """Images (uint8 [H, W, 3] or PIL) -> (pixel_values float32, image_grid_thw int64).

  Returns:
    pixel_values: [sum of gh * gw, 3 * tp * p * p], the images' patches in order.
    image_grid_thw: [num_images, 3] rows (1, gh, gw) in patches.
  """
  mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(OPENAI_CLIP_STD, np.float32)
  factor = patch_size * merge_size
  patches, grids = [], []
  for i, image in enumerate(images):
    image = _as_rgb_uint8(image, i)
    h, w = smart_resize(image.shape[0], image.shape[1], factor, min_pixels, max_pixels)
    image = resize_bicubic(image, h, w)
    # The processor rescales in float64, then casts, then normalises in float32.
    x = (image.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # [C, H, W]
    patches.append(patchify(x, patch_size, merge_size, temporal_patch_size))
    grids.append((1, h // patch_size, w // patch_size))
  if not patches:
    raise ValueError("preprocess_images needs at least one image")
  return (np.concatenate(patches).astype(np.float32, copy=False),
          np.asarray(grids, np.int64))


def num_image_tokens(grid_thw, merge_size: int = MERGE_SIZE) -> np.ndarray:
  """Placeholder tokens per image: t * h * w / merge_size**2, [num_images] int64."""
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  return np.prod(grid, axis=-1) // merge_size ** 2
