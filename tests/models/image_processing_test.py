"""Image preprocessing against transformers' Qwen2-VL image processor (the PIL backend)."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from dream_r_jax.models import image_processing as ip

_REF_PATH = os.path.join(os.path.dirname(__file__), "..", "reference", "hf_vision_reference.py")
_spec = importlib.util.spec_from_file_location("hf_vision_reference", _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _image(h, w, seed):
  """Smooth gradients plus noise: both the low and the high frequencies get resampled."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  base = np.stack([yy * 255 / max(h - 1, 1), xx * 255 / max(w - 1, 1),
                   128 + 100 * np.sin((xx + yy) / 7)], axis=-1)
  return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


IMAGES = {"exact_a": _image(56, 84, 0), "exact_b": _image(112, 56, 1),
          "small": _image(20, 30, 2), "large": _image(300, 400, 3),
          "photo": _image(480, 640, 4), "wide": _image(40, 700, 5)}
CASES = [
    # Sizes that are already multiples of 28 within range: no resampling at all.
    {"images": ["exact_a", "exact_b"], "min_pixels": ip.MIN_PIXELS,
     "max_pixels": ip.MAX_PIXELS},
    # Up to min_pixels, down to max_pixels (antialiased), and a 1:17 aspect ratio.
    {"images": ["small", "large", "wide"], "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 40},
    # The defaults on a VGA image: 480x640 -> 476x644 (height shrinks, width grows).
    {"images": ["photo"], "min_pixels": ip.MIN_PIXELS, "max_pixels": ip.MAX_PIXELS},
]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("hf_preprocess"))
  np.savez(os.path.join(out, "images.npz"), **IMAGES)
  return ref.run_reference("preprocess", {"cases": CASES}, out)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_hf_processor(golden, case):
  data = np.load(os.path.join(golden, f"case{case}.npz"))
  c = CASES[case]
  pixels, grid = ip.preprocess_images([IMAGES[n] for n in c["images"]],
                                      min_pixels=c["min_pixels"], max_pixels=c["max_pixels"])
  np.testing.assert_array_equal(grid, data["image_grid_thw"])
  assert pixels.dtype == np.float32 and pixels.shape == data["pixel_values"].shape
  np.testing.assert_allclose(pixels, data["pixel_values"], atol=1e-5, rtol=0)


def test_resized_cases_really_resample():
  for name in ("small", "large", "wide", "photo"):
    h, w = IMAGES[name].shape[:2]
    c = CASES[1] if name != "photo" else CASES[2]
    assert ip.smart_resize(h, w, 28, c["min_pixels"], c["max_pixels"]) != (h, w)


def test_resize_is_pillow_bicubic():
  rng = np.random.default_rng(0)
  for _ in range(40):
    h, w = rng.integers(1, 120, size=2)
    oh, ow = rng.integers(1, 160, size=2)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(img).resize((int(ow), int(oh)), Image.BICUBIC))
    np.testing.assert_array_equal(ip.resize_bicubic(img, int(oh), int(ow)), want,
                                  err_msg=f"{(h, w)} -> {(oh, ow)}")


def test_smart_resize():
  assert ip.smart_resize(56, 84) == (56, 84)
  assert ip.smart_resize(20, 30) == (56, 84)  # scaled up to at least 56 * 56 pixels
  assert ip.smart_resize(480, 640) == (476, 644)
  assert ip.smart_resize(4000, 3000) == (1148, 840)  # under 28 * 28 * 1280 pixels
  with pytest.raises(ValueError, match="aspect ratio"):
    ip.smart_resize(10, 3000)


def test_patch_layout():
  """Row r of pixel_values is the patch the vision tower's Conv3d expects there."""
  h, w, p, m = 56, 84, 14, 2
  img = np.arange(3 * h * w, dtype=np.float32).reshape(3, h, w)
  patches = ip.patchify(img)
  assert patches.shape == (h // p * w // p, 3 * 2 * p * p)
  r = 0
  for by in range(h // p // m):
    for bx in range(w // p // m):
      for iy in range(m):
        for ix in range(m):
          y, x = (by * m + iy) * p, (bx * m + ix) * p
          block = patches[r].reshape(3, 2, p, p)
          np.testing.assert_array_equal(block[:, 0], img[:, y:y + p, x:x + p])
          np.testing.assert_array_equal(block[:, 1], block[:, 0])  # temporal repeat
          r += 1


def test_inputs_and_token_counts():
  pil = Image.fromarray(IMAGES["small"])
  a, ga = ip.preprocess_images([IMAGES["small"], IMAGES["exact_a"]])
  b, gb = ip.preprocess_images([pil, IMAGES["exact_a"]])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ga, [[1, 4, 6], [1, 4, 6]])
  np.testing.assert_array_equal(ip.num_image_tokens(ga), [6, 6])
  assert a.shape[0] == int(np.prod(ga, axis=-1).sum())
  with pytest.raises(ValueError, match=r"image 0 must be uint8 \[H, W, 3\]"):
    ip.preprocess_images([IMAGES["small"].astype(np.float32)])
  with pytest.raises(ValueError, match="image 1"):
    ip.preprocess_images([IMAGES["small"], IMAGES["small"][..., 0]])
