"""M-RoPE positions against transformers' `Qwen2_5_VLModel.get_rope_index`."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.models import mrope
from dream_r_jax.models.config import ModelConfig

_REF_PATH = os.path.join(os.path.dirname(__file__), "..", "reference", "hf_vision_reference.py")
_spec = importlib.util.spec_from_file_location("hf_vision_reference", _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

CFG = ModelConfig.tiny("qwen2_5_vl")
IMG, VS, VE, PAD = CFG.image_token_id, CFG.vision_start_token_id, 153, 0


def _row(rng, parts):
  """parts: ints (that many text tokens) and grids (one image each). -> (ids, grids)."""
  ids, grids = [], []
  for part in parts:
    if isinstance(part, int):
      ids += rng.integers(1, 150, size=part).tolist()
    else:
      ids += [VS] + [IMG] * (int(np.prod(part)) // 4) + [VE]
      grids.append(list(part))
  return ids, grids


def _batch(rows, left=False):
  rng = np.random.default_rng(len(rows))
  built = [_row(rng, parts) for parts in rows]
  width = max(len(ids) for ids, _ in built)
  input_ids, mask, grids = [], [], []
  for ids, g in built:
    pad = [PAD] * (width - len(ids))
    input_ids.append(pad + ids if left else ids + pad)
    ones, zeros = [1] * len(ids), [0] * len(pad)
    mask.append(zeros + ones if left else ones + zeros)
    grids += g
  return {"input_ids": input_ids, "attention_mask": mask, "image_grid_thw": grids}


ROWS = [[3, (1, 4, 6), 2], [2, (1, 6, 4), 1, (1, 4, 4), 3]]
CASES = [
    _batch(ROWS),  # right padding
    _batch(ROWS, left=True),  # left padding
    {**_batch([[1, (1, 2, 8), 2, (2, 4, 4), 1]]), "attention_mask": None},  # no mask
    _batch([[4, (1, 4, 4)], [6], [(1, 8, 4), 5]]),  # a text-only row in the middle
]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  spec = {"config": {
      "text_config": {"vocab_size": CFG.vocab_size, "hidden_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "intermediate_size": 64,
                      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}},
      "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 32,
                        "num_heads": 2, "out_hidden_size": 64},
      "image_token_id": IMG, "video_token_id": CFG.video_token_id,
      "vision_start_token_id": VS},
      "cases": CASES}
  return ref.run_reference("rope", spec, str(tmp_path_factory.mktemp("hf_rope")))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_hf(golden, case):
  data = np.load(os.path.join(golden, f"case{case}.npz"))
  c = CASES[case]
  mask = None if c["attention_mask"] is None else np.asarray(c["attention_mask"])
  pos, deltas = mrope.get_rope_index(CFG, np.asarray(c["input_ids"]), c["image_grid_thw"],
                                     mask)
  assert pos.dtype == jnp.int32 and deltas.dtype == jnp.int32
  np.testing.assert_array_equal(pos, data["positions"])
  np.testing.assert_array_equal(deltas, data["deltas"])
  # The three components really differ, so a text-style (1-D) position would fail.
  assert np.any(data["positions"][1] != data["positions"][2])


def test_text_only_is_jittable_and_padding_aware():
  ids = jnp.array([[5, 6, 7, 0], [0, 0, 8, 9]])
  mask = jnp.array([[1, 1, 1, 0], [0, 0, 1, 1]])
  pos, deltas = jax.jit(lambda i, m: mrope.get_rope_index(CFG, i, None, m))(ids, mask)
  np.testing.assert_array_equal(pos, np.broadcast_to([[0, 1, 2, 0], [0, 0, 0, 1]], (3, 2, 4)))
  np.testing.assert_array_equal(deltas, [0, 0])
  pos, _ = mrope.get_rope_index(CFG, ids, None, None)
  np.testing.assert_array_equal(pos[2], [[0, 1, 2, 3]] * 2)


def test_bad_inputs():
  c = CASES[0]
  ids, grids = np.asarray(c["input_ids"]), c["image_grid_thw"]
  with pytest.raises(ValueError, match=r"image_grid_thw has 3 images but .* for 1"):
    mrope.get_rope_index(CFG, ids[:1], grids, None)
  with pytest.raises(ValueError, match=r"run of 6 image tokens .* needs 8"):
    mrope.get_rope_index(CFG, ids, [[1, 4, 8]] + grids[1:], None)
  with pytest.raises(ValueError, match="more image tokens than"):
    mrope.get_rope_index(CFG, ids, grids[:2], None)
  with pytest.raises(ValueError, match="video"):
    mrope.get_rope_index(CFG, np.array([[1, CFG.video_token_id]]), grids, None)
  with pytest.raises(TypeError, match="concrete input_ids"):
    jax.jit(lambda i: mrope.get_rope_index(CFG, i, grids, None))(jnp.asarray(ids))
