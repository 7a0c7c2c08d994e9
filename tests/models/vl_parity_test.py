"""Qwen2.5-VL end to end: our preprocessing + `load_pretrained` vs transformers' logits.

transformers builds a random-weight `Qwen2_5_VLForConditionalGeneration` from the config
that `config_to_hf` writes for `ModelConfig.tiny("qwen2_5_vl")`, saves it, and computes
logits for image-text batches; we load that directory and compare.
"""
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.models import hf
from dream_r_jax.models import image_processing as ip
from dream_r_jax.models.config import ModelConfig

_REF_PATH = os.path.join(os.path.dirname(__file__), "..", "reference", "hf_vision_reference.py")
_spec = importlib.util.spec_from_file_location("hf_vision_reference", _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

CFG = ModelConfig.tiny("qwen2_5_vl")
IMG, VS, VE = CFG.image_token_id, CFG.vision_start_token_id, 153


def _images():
  rng = np.random.default_rng(0)
  sizes = [(56, 84), (60, 100), (84, 112)]  # the second is resized to 56 x 112
  return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def _case(rows, left: bool, seed: int):
  """rows: per row a list of text lengths (ints) and image indices ("img0"...)."""
  rng = np.random.default_rng(seed)
  images = _images()
  order = [int(p[3:]) for row in rows for p in row if isinstance(p, str)]
  pixels, grid = ip.preprocess_images([images[i] for i in order])
  counts = iter(ip.num_image_tokens(grid))
  seqs = []
  for row in rows:
    ids = []
    for part in row:
      ids += (rng.integers(1, 150, size=part).tolist() if isinstance(part, int)
              else [VS] + [IMG] * int(next(counts)) + [VE])
    seqs.append(ids)
  width = max(map(len, seqs))
  ids = np.zeros((len(seqs), width), np.int64)
  mask = np.zeros((len(seqs), width), np.int64)
  for r, s in enumerate(seqs):
    sl = slice(width - len(s), width) if left else slice(0, len(s))
    ids[r, sl], mask[r, sl] = s, 1
  return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)


CASES = [
    _case([[3, "img0", 4], [2, "img1", 1, "img2", 3]], left=False, seed=1),
    _case([[5, "img2", 2], [1, "img0", 6]], left=True, seed=2),
]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("hf_vl"))
  os.makedirs(os.path.join(out, "model"))
  with open(os.path.join(out, "model", "config.json"), "w") as f:
    json.dump(hf.config_to_hf(CFG), f)
  for i, case in enumerate(CASES):
    np.savez(os.path.join(out, f"inputs{i}.npz"), **case)
  return ref.run_reference("vl", {"seed": 0, "scale": 0.1, "num_cases": len(CASES)}, out)


@pytest.fixture(scope="module")
def model(golden):
  model, cfg = hf.load_pretrained(os.path.join(golden, "model"))
  assert cfg.vision == CFG.vision and cfg.mrope_section == CFG.mrope_section
  return model


@pytest.mark.parametrize("case", range(len(CASES)))
def test_logits_match_hf(golden, model, case):
  c = CASES[case]
  want = np.load(os.path.join(golden, f"logits{case}.npz"))["logits"]
  out = model(jnp.asarray(c["input_ids"], jnp.int32),
              attention_mask=jnp.asarray(c["attention_mask"], jnp.int32),
              pixel_values=jnp.asarray(c["pixel_values"]), image_grid_thw=c["image_grid_thw"])
  got = np.asarray(out[0] if isinstance(out, tuple) else out)
  valid = c["attention_mask"].astype(bool)
  assert got.shape == want.shape
  assert want[valid].std() > 0.1
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)


def test_image_features_matter(golden, model):
  """Blank pixels change the logits after the image, so the test sees the vision tower."""
  c = CASES[0]
  want = np.load(os.path.join(golden, "logits0.npz"))["logits"]
  out = model(jnp.asarray(c["input_ids"], jnp.int32),
              attention_mask=jnp.asarray(c["attention_mask"], jnp.int32),
              pixel_values=jnp.zeros_like(jnp.asarray(c["pixel_values"])),
              image_grid_thw=c["image_grid_thw"])
  got = np.asarray(out[0] if isinstance(out, tuple) else out)
  assert np.abs(got[0, -1] - want[0, -1]).max() > 1e-2
