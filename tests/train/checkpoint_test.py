"""Orbax checkpoints: restore onto another mesh, and refusal of bad checkpoints."""
import hashlib
import os

import jax
import numpy as np
import pytest
from flax import nnx

from dream_r_jax.models import ModelConfig, Transformer
from dream_r_jax.sharding.mesh import make_mesh
from dream_r_jax.train import checkpoint as ckpt_lib
from dream_r_jax.train import step as step_lib
from dream_r_jax.train.config import OptimConfig

CFG = ModelConfig.tiny("qwen2")
OPTIM = OptimConfig(steps=10, learning_rate=1e-2, warmup_steps=0)


def _setup(mesh, cfg=CFG):
  tx = step_lib.optimizer(OPTIM)
  make_model = lambda: Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef = nnx.split(nnx.eval_shape(make_model))[0]
  shapes = step_lib.abstract_state(make_model, tx)
  shardings = step_lib.state_shardings(shapes, mesh)
  return tx, graphdef, shapes, shardings


def _batch(b=8, t=10):
  rng = np.random.default_rng(1)
  return {"input_ids": rng.integers(1, CFG.vocab_size, size=(b, t)).astype(np.int32),
          "loss_mask": np.ones((b, t), np.float32)}


def _trained_state(mesh, steps=2):
  tx, graphdef, shapes, shardings = _setup(mesh)
  make_model = lambda: Transformer(CFG, rngs=nnx.Rngs(0))
  state = jax.jit(lambda: step_lib.init_state(make_model(), tx), out_shardings=shardings)()
  batch = _batch()
  bsh = step_lib.batch_shardings({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                  for k, v in batch.items()}, mesh)
  train_step = step_lib.make_train_step(graphdef, tx, OPTIM, mesh=mesh,
                                        state_sharding=shardings, batch_sharding=bsh)
  for _ in range(steps):
    state, _ = train_step(state, jax.device_put(batch, bsh))
  return state, graphdef, shardings, bsh


def _loss(mesh, graphdef, shardings, params):
  batch = _batch()
  bsh = step_lib.batch_shardings({k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                  for k, v in batch.items()}, mesh)
  fn = step_lib.make_eval_loss(graphdef, mesh=mesh, state_sharding=shardings,
                               batch_sharding=bsh)
  return float(fn(params, jax.device_put(batch, bsh)))


def test_restore_onto_a_different_mesh_gives_the_same_loss(tmp_path):
  mesh_a = make_mesh((4, 2), ("data", "model"))
  state, graphdef, shardings, _ = _trained_state(mesh_a)
  loss_a = _loss(mesh_a, graphdef, shardings, state["params"])
  ckpts = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), keep=2)
  ckpts.save(2, state, {"model": "tiny"}, force=True)
  ckpts.wait()
  ckpts.close()

  mesh_b = make_mesh((2, 4), ("data", "model"), jax.devices()[::-1])
  _, _, shapes, shardings_b = _setup(mesh_b)
  ckpts = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), keep=2)
  assert ckpts.latest_step() == 2
  restored, meta = ckpts.restore(2, step_lib.with_shardings(shapes, shardings_b),
                                 {"model": "tiny"})
  ckpts.close()
  assert meta["model"] == "tiny" and int(restored["step"]) == 2
  leaf = restored["params"]["layers"][0]["attn"]["q_weight_dnh"]
  assert leaf.sharding.mesh.devices.shape == (2, 4)
  assert leaf.sharding.spec == shardings_b["params"]["layers"][0]["attn"][
      "q_weight_dnh"].spec
  loss_b = _loss(mesh_b, graphdef, shardings_b, restored["params"])
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  # A restore that lost the training would show as the initial loss instead.
  fresh = _trained_state(mesh_a, steps=0)[0]
  assert abs(_loss(mesh_a, graphdef, shardings, fresh["params"]) - loss_a) > 1e-3


def _digest(path):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(path)):
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        h.update(name.encode() + f.read())
  return h.hexdigest()


@pytest.fixture
def saved(tmp_path):
  mesh = make_mesh((8, 1), ("data", "model"))
  state, *_ = _trained_state(mesh, steps=1)
  ckpts = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), keep=2)
  ckpts.save(1, state, {"model": "tiny"}, force=True)
  ckpts.close()
  return str(tmp_path / "ck"), mesh


def test_corrupted_checkpoint_is_named_and_left_alone(saved):
  directory, mesh = saved
  state_dir = os.path.join(directory, "1", "state")
  victims = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs
             if f in ("manifest.ocdbt", "_METADATA")]
  assert victims
  for v in victims:
    with open(v, "wb") as f:
      f.write(b"\x00garbage")
  before = _digest(directory)
  _, _, shapes, shardings = _setup(mesh)
  ckpts = ckpt_lib.StageCheckpoints(directory, keep=2)
  with pytest.raises(ckpt_lib.CheckpointError, match=os.path.join(directory, "1")):
    ckpts.restore(1, step_lib.with_shardings(shapes, shardings), {"model": "tiny"})
  ckpts.close()
  assert _digest(directory) == before


def test_checkpoint_of_another_model_is_refused(saved):
  directory, mesh = saved
  before = _digest(directory)
  _, _, shapes, shardings = _setup(mesh, CFG.replace(hidden_size=64))
  ckpts = ckpt_lib.StageCheckpoints(directory, keep=2)
  with pytest.raises(ckpt_lib.CheckpointError, match="does not fit this run.*shape"):
    ckpts.restore(1, step_lib.with_shardings(shapes, shardings), {"model": "tiny"})
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"its model differs \(value: 'tiny' in the checkpoint, 'other'"):
    ckpts.restore(1, step_lib.with_shardings(shapes, shardings), {"model": "other"})
  ckpts.close()
  assert _digest(directory) == before
