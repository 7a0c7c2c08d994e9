"""Golden logits: this package vs transformers (PyTorch) on tiny random checkpoints."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dream_r_jax.models import ModelConfig, Transformer, config_to_hf, load_pretrained
from dream_r_jax.models import save_pretrained
from dream_r_jax.testing import reference

FAMILIES = {
    "qwen2": ModelConfig.tiny("qwen2"),
    "qwen3": ModelConfig.tiny("qwen3"),
    "llama": ModelConfig.tiny("llama"),
    "qwen2_tied": ModelConfig.tiny("qwen2", tie_word_embeddings=True),
}
IDS = np.random.default_rng(0).integers(0, 128, size=(2, 12)).tolist()
MASK = [[1] * 12, [1] * 8 + [0] * 4]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  """One reference run: HF creates random checkpoints and logits; it also loads ours."""
  root = tmp_path_factory.mktemp("hf")
  jobs = []
  for name, cfg in FAMILIES.items():
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump(config_to_hf(cfg), f)
    jobs.append(dict(name=name, model_dir=d, create=True, seed=1, input_ids=IDS))
    jobs.append(dict(name=name + "/masked", model_dir=d, create=False, input_ids=IDS,
                     attention_mask=MASK))
  # Checkpoints written by this package, read by transformers.
  for name in ("qwen3", "llama"):
    model = Transformer(FAMILIES[name], rngs=nnx.Rngs(3))
    d = save_pretrained(model, os.path.join(root, "ours_" + name))
    jobs.append(dict(name="ours_" + name, model_dir=d, create=False, input_ids=IDS))
  out = reference.run_reference(jobs, os.path.join(root, "ref"))
  return root, out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_match_transformers(golden, name):
  root, out = golden
  model, cfg = load_pretrained(os.path.join(root, name), dtype="float32")
  assert cfg == FAMILIES[name].replace(dtype="float32", param_dtype="float32")
  ours = np.asarray(model(jnp.asarray(IDS)))
  ref = out[name]
  assert np.abs(ref).max() > 0.1  # random weights give non-trivial logits
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_padded_logits_match_transformers(golden, name):
  root, out = golden
  model, _ = load_pretrained(os.path.join(root, name), dtype="float32")
  ours = np.asarray(model(jnp.asarray(IDS), attention_mask=jnp.asarray(MASK)))
  ref = out[name + "/masked"]
  mask = np.asarray(MASK, bool)
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_saved_checkpoint_loads_in_transformers_and_back(golden, name):
  root, out = golden
  model = Transformer(FAMILIES[name], rngs=nnx.Rngs(3))
  ours = np.asarray(model(jnp.asarray(IDS)))
  np.testing.assert_allclose(out["ours_" + name], ours, atol=1e-4, rtol=0)
  back, cfg = load_pretrained(os.path.join(root, "ours_" + name))
  assert cfg == FAMILIES[name]
  np.testing.assert_array_equal(np.asarray(back(jnp.asarray(IDS))), ours)
