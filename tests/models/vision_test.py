"""The Qwen2.5-VL vision tower against transformers' `Qwen2_5_VisionTransformerPretrainedModel`."""
import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from dream_r_jax.models import vision
from dream_r_jax.models.config import ModelConfig, VisionConfig

_REF_PATH = os.path.join(os.path.dirname(__file__), "..", "reference", "hf_vision_reference.py")
_spec = importlib.util.spec_from_file_location("hf_vision_reference", _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

# Three blocks: window, full, window. 56-pixel windows are 2x2 merge units (4x4 patches).
VCFG = dataclasses.replace(ModelConfig.tiny("qwen2_5_vl").vision, depth=3,
                           fullatt_block_indexes=(1,))
GRIDS = [
    [[1, 6, 10]],  # 3x5 merge units: windows of 2x2, 2x1, 1x2 and 1x1 units
    [[1, 6, 10], [1, 4, 4]],  # two images; the second fills exactly one window
    [[1, 4, 8], [2, 4, 6]],  # a two-frame grid: full attention stays within each frame
]
PREFIX = "model.visual."  # what transformers 5.x saves; 4.x checkpoints use "visual."


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("hf_vision"))
  spec = {"config": vision.vision_config_to_hf(VCFG), "grids": GRIDS, "seed": 0,
          "scale": 0.2, "prefix": PREFIX}
  return ref.run_reference("vision", spec, out)


@pytest.fixture(scope="module")
def tensors(golden):
  return load_file(os.path.join(golden, "vision.safetensors"))


def _tower(vcfg=VCFG, tensors=None):
  tower = vision.VisionTower(vcfg, rngs=nnx.Rngs(0))
  if tensors is not None:
    vision.load_vision_params(tower, tensors, prefix=PREFIX)
  return tower


def _forward(tower, pixel_values, grid):
  """`tower(pixel_values, grid)` under one jit (faster than eager op-by-op compiles)."""
  graphdef, state = nnx.split(tower)
  grid = tuple(map(tuple, grid))
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, grid))
  return np.asarray(fn(state, jnp.asarray(pixel_values)).astype(jnp.float32))


@pytest.mark.parametrize("case", range(len(GRIDS)))
def test_layout_matches_hf(golden, case):
  data = np.load(os.path.join(golden, f"case{case}.npz"))
  win, cu = vision.window_index(GRIDS[case], VCFG.spatial_merge_size, VCFG.window_size,
                                VCFG.patch_size)
  np.testing.assert_array_equal(win, data["window_index"])
  np.testing.assert_array_equal(cu, data["cu_window_seqlens"])
  np.testing.assert_array_equal(vision.rope_positions(GRIDS[case], VCFG.spatial_merge_size),
                                data["position_ids"])


@pytest.mark.parametrize("case", range(len(GRIDS)))
def test_features_match_hf(golden, tensors, case):
  data = np.load(os.path.join(golden, f"case{case}.npz"))
  tower = _tower(tensors=tensors)
  out = _forward(tower, data["pixel_values"], GRIDS[case])
  assert out.shape == data["features"].shape
  assert vision.num_merged_tokens(VCFG, GRIDS[case]) == out.shape[0]
  assert np.abs(data["features"]).mean() > 0.1  # not a degenerate (near-zero) output
  np.testing.assert_allclose(out, data["features"], atol=1e-4, rtol=0)


def test_window_attention_matters(golden, tensors):
  """Full attention everywhere is measurably wrong, so the parity test sees the windows."""
  data = np.load(os.path.join(golden, "case0.npz"))
  tower = _tower(dataclasses.replace(VCFG, fullatt_block_indexes=(0, 1, 2)), tensors)
  out = _forward(tower, data["pixel_values"], GRIDS[0])
  assert np.abs(out - data["features"]).max() > 1e-2


def test_jit_with_static_grid(golden, tensors):
  data = np.load(os.path.join(golden, "case1.npz"))
  tower = _tower(tensors=tensors)
  grid = tuple(map(tuple, GRIDS[1]))
  jitted = nnx.jit(lambda m, x: m(x, grid))
  out = np.asarray(jitted(tower, jnp.asarray(data["pixel_values"])))
  np.testing.assert_allclose(out, data["features"], atol=1e-4, rtol=0)
  with pytest.raises(TypeError, match="image_grid_thw must be concrete"):
    jax.jit(lambda x, g: tower(x, g))(jnp.asarray(data["pixel_values"]),
                                       jnp.asarray(GRIDS[1]))


def test_images_are_independent(golden, tensors):
  """Two images in one call give each image's features as if it were alone."""
  data = np.load(os.path.join(golden, "case1.npz"))
  tower = _tower(tensors=tensors)
  both = _forward(tower, data["pixel_values"], GRIDS[1])
  first = _forward(tower, data["pixel_values"][:60], GRIDS[1][:1])
  np.testing.assert_allclose(both[:15], first, atol=1e-5, rtol=0)


def test_hf_round_trip(tensors):
  tower = _tower(tensors=tensors)
  back = vision.vision_params_to_hf(tower, prefix=PREFIX)
  assert sorted(back) == sorted(tensors)
  for key, value in tensors.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # Without the Hugging Face shape, the Conv3d kernel is inferred (3 channels, 2 frames).
  patch = tower.patch_weight_pd[...]
  np.testing.assert_array_equal(vision.VISION_RULES[0][3](np.asarray(patch), None),
                                tensors[PREFIX + "patch_embed.proj.weight"])


def test_loader_rejects_bad_weights(tensors):
  legacy = {"visual." + k[len(PREFIX):]: v for k, v in tensors.items()}
  vision.load_vision_params(vision.VisionTower(VCFG, rngs=nnx.Rngs(1)), legacy, "visual.")
  missing = dict(tensors)
  del missing[PREFIX + "blocks.2.attn.qkv.bias"]
  with pytest.raises(ValueError, match=r"blocks\.2\.attn\.qkv_bias_nh"):
    _tower(tensors=missing)
  extra = {**tensors, PREFIX + "blocks.0.attn.q_norm.weight": np.ones(16, np.float32)}
  with pytest.raises(ValueError, match=r"unexpected vision weight .*q_norm"):
    _tower(tensors=extra)
  bad = {**tensors, PREFIX + "merger.mlp.2.weight": np.ones((3, 128), np.float32)}
  with pytest.raises(ValueError, match=r"merger\.mlp\.2\.weight.* has shape \(3, 128\)"):
    _tower(tensors=bad)
  deep = {**tensors, PREFIX + "blocks.7.norm1.weight": np.ones(32, np.float32)}
  with pytest.raises(ValueError, match=r"blocks\.7\.norm1\.weight.*lacks"):
    _tower(tensors=deep)


def test_bad_inputs():
  tower = _tower()
  with pytest.raises(ValueError, match=r"pixel_values has shape \(10, 1176\).*\(60, 1176\)"):
    tower(jnp.zeros((10, 1176)), [[1, 6, 10]])
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    tower(jnp.zeros((15, 1176)), [[1, 3, 5]])


def test_config_round_trip(golden):
  with open(os.path.join(golden, "config.json")) as f:
    hf = json.load(f)  # what transformers made of vision_config_to_hf(VCFG)
  assert vision.vision_config_from_hf(hf) == VCFG
  assert vision.vision_config_from_hf({"vision_config": hf}) == VCFG
  legacy = {  # the 4.x keys of a released Qwen2.5-VL-7B config.json
      "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
      "temporal_patch_size": 2, "model_type": "qwen2_5_vl"}
  assert vision.vision_config_from_hf(legacy) == VisionConfig(out_hidden_size=3584)
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    vision.vision_config_from_hf({**legacy, "hidden_act": "gelu"})


def test_bf16_is_close_to_fp32(golden, tensors):
  data = np.load(os.path.join(golden, "case1.npz"))
  tower = vision.VisionTower(VCFG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                             rngs=nnx.Rngs(0))
  vision.load_vision_params(tower, tensors, prefix=PREFIX)
  graphdef, state = nnx.split(tower)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, ((1, 6, 10), (1, 4, 4))))(
      state, jnp.asarray(data["pixel_values"]))
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - data["features"])
  assert err.max() < 0.1 * np.abs(data["features"]).max()
