"""Bad input is refused, before compute, with an error naming the input.

Checkpoints are made by `save_pretrained` and then edited on disk (a tensor removed, added,
reshaped), which is how real mismatches look: the right file with the wrong contents.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
from safetensors.numpy import load_file, save_file

from dream_r_jax.decoding.generate import generate
from dream_r_jax.models import KVCache, ModelConfig, config_from_hf, load_pretrained
from dream_r_jax.models import save_pretrained
from dream_r_jax.testing.models import Jitted, random_ids, tiny_model

IDS = random_ids(0, (2, 7), 128)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny qwen2 checkpoint written by save_pretrained, and its tensors."""
  model = tiny_model("qwen2", seed=4)
  path = save_pretrained(model, str(tmp_path_factory.mktemp("ckpt") / "qwen2"))
  return model, path, load_file(os.path.join(path, "model.safetensors"))


def edited_copy(tmp_path, saved, edit):
  """A copy of the saved checkpoint whose tensors went through `edit(dict)`."""
  _, path, tensors = saved
  out = tmp_path / "edited"
  out.mkdir()
  with open(os.path.join(path, "config.json")) as f:
    (out / "config.json").write_text(f.read())
  tensors = dict(tensors)
  edit(tensors)
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  return str(out)


def test_saved_checkpoint_loads_unedited(saved):
  """The baseline the edits below break: the untouched copy loads to the same logits."""
  model, path, _ = saved
  back, _ = load_pretrained(path)
  np.testing.assert_array_equal(np.asarray(Jitted(back)(IDS)), np.asarray(Jitted(model)(IDS)))


def test_unknown_model_type_is_named(tmp_path, saved):
  _, path, _ = saved
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg["model_type"] = "gpt_neox"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="model_type='gpt_neox' is not supported"):
    load_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="'mamba'"):
    config_from_hf(dict(cfg, model_type="mamba"))
  with pytest.raises(ValueError, match="'gpt2'"):
    ModelConfig.tiny("gpt2")


def test_missing_tensor_is_named(tmp_path, saved):
  path = edited_copy(tmp_path, saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensors: \['model\.layers\.1\.mlp\.up_proj"
                     r"\.weight'\]"):
    load_pretrained(path)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.extra.weight",
                                 "model.layers.2.mlp.up_proj.weight",  # only 2 layers
                                 "model.vision_tower.proj.weight"])
def test_unexpected_tensor_is_named(tmp_path, saved, key):
  path = edited_copy(tmp_path, saved, lambda t: t.update({key: np.ones((64, 32), np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensors: \['" + key.replace(".", r"\.")):
    load_pretrained(path)


@pytest.mark.parametrize("key, change, message", [
    # Transposed: the element count is right, so only a shape check catches it.
    ("model.layers.0.self_attn.k_proj.weight", lambda w: w.T,
     r"k_proj\.weight: expected shape \(16, 32\), got \(32, 16\)"),
    ("model.layers.1.mlp.down_proj.weight", lambda w: w[:, :-1],
     r"down_proj\.weight: expected shape \(32, 64\), got \(32, 63\)"),
    ("model.layers.0.input_layernorm.weight", lambda w: w.reshape(4, 8),
     r"input_layernorm\.weight: expected shape \(32,\), got \(4, 8\)"),
    ("model.embed_tokens.weight", lambda w: w[:100],
     r"embed_tokens\.weight: expected shape \(128, 32\), got \(100, 32\)"),
    ("lm_head.weight", lambda w: w.T,
     r"lm_head\.weight: expected shape \(128, 32\), got \(32, 128\)"),
])
def test_misshaped_tensor_is_named(tmp_path, saved, key, change, message):
  path = edited_copy(tmp_path, saved,
                     lambda t: t.update({key: np.ascontiguousarray(change(t[key]))}))
  with pytest.raises(ValueError, match=r"mis-shaped tensors: \['model\.|mis-shaped") as err:
    load_pretrained(path)
  assert err.match(message)
  assert "missing" not in str(err.value)  # reported once, as mis-shaped


def test_sequence_longer_than_the_cache():
  model = tiny_model("qwen2", seed=0)
  cache = KVCache.init(model.cfg, 2, 8)
  # Jitted calls build the state (fast); the model's own eager call must refuse overflow.
  _, cache = Jitted(model)(IDS[:, :6], cache=cache, num_new=[6, 4])
  with pytest.raises(ValueError, match="row 0 would reach 9 positions, capacity is 8"):
    model(jnp.asarray(IDS[:, :3]), cache=cache)
  with pytest.raises(ValueError, match="row 1 would reach 9 positions, capacity is 8"):
    model(jnp.asarray(IDS[:, :5]), cache=cache, num_new=jnp.asarray([1, 5]))
  # Right padding past capacity is fine; only the real (num_new) tokens must fit.
  cache.check_room(np.array([2, 4]))
  _, full = Jitted(model)(IDS[:, :5], cache=cache, num_new=[2, 4])
  np.testing.assert_array_equal(np.asarray(full.lengths), [8, 8])
  full.check_room(np.array([0, 0]))
  with pytest.raises(ValueError, match="row 1 would reach 9 positions, capacity is 8"):
    full.check_room(np.array([0, 1]))


def test_sequence_longer_than_the_position_limit():
  model = tiny_model("llama", seed=0, max_position_embeddings=32)
  cfg = model.cfg
  with pytest.raises(ValueError, match="max_len=33 exceeds .* max_position_embeddings=32"):
    KVCache.init(cfg, 1, 33)
  assert KVCache.init(cfg, 1, 32).max_len == 32
  with pytest.raises(ValueError, match="length 33 exceeds .* max_position_embeddings=32"):
    model(jnp.asarray(random_ids(1, (1, 33), cfg.vocab_size)))
  prompt = random_ids(2, (2, 20), cfg.vocab_size)
  with pytest.raises(ValueError, match=r"prompt length 20 \+ max_new_tokens 13 exceeds .*="
                     r"32"):
    generate(model, prompt, max_new_tokens=13)
  # Exactly at the limit is allowed: every position written is < 32.
  out = generate(model, prompt, max_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(out.cache.lengths), [32, 32])


def test_save_replaces_a_directory_atomically(tmp_path, monkeypatch):
  old_model, new_model = tiny_model("qwen3", seed=5), tiny_model("qwen3", seed=6)
  old_logits = np.asarray(Jitted(old_model)(IDS))
  new_logits = np.asarray(Jitted(new_model)(IDS))
  assert np.abs(old_logits - new_logits).max() > 0.05
  path = str(tmp_path / "model")
  # The old save is sharded, so a stale shard or index left behind would show.
  save_pretrained(old_model, path, max_shard_bytes=20_000)
  old_files = sorted(os.listdir(path))
  assert "model.safetensors.index.json" in old_files and len(old_files) > 3

  def broken_save_file(*args, **kwargs):
    raise OSError("disk full")

  with monkeypatch.context() as m:
    m.setattr(safetensors.flax, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
      save_pretrained(new_model, path)
  assert sorted(os.listdir(path)) == old_files
  assert os.listdir(tmp_path) == ["model"]  # no temporary or backup directory left behind
  back, _ = load_pretrained(path)
  np.testing.assert_array_equal(np.asarray(Jitted(back)(IDS)), old_logits)

  save_pretrained(new_model, path)
  assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
  assert os.listdir(tmp_path) == ["model"]
  back, _ = load_pretrained(path)
  np.testing.assert_array_equal(np.asarray(Jitted(back)(IDS)), new_logits)
