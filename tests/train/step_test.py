"""The SFT loss and train step: values, sharding invariance, the non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dream_r_jax.models import ModelConfig, Transformer
from dream_r_jax.sharding.mesh import make_mesh
from dream_r_jax.train import step as step_lib
from dream_r_jax.train.config import OptimConfig


def _batch(cfg, b=8, t=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, cfg.vocab_size, size=(b, t)).astype(np.int32)
  mask = np.zeros((b, t), np.float32)
  mask[:, t // 2:] = 1.0
  return {"input_ids": ids, "loss_mask": mask}


def test_sft_loss_is_masked_token_mean():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 7, size=(2, 5)), jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 0, 0, 1]], jnp.float32)
  loss, num = step_lib.sft_loss(logits, ids, mask)
  logp = jax.nn.log_softmax(logits, axis=-1)
  terms = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if mask[b, t]]
  assert int(num) == 5
  np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-6)


def test_schedule_warms_up_then_decays():
  o = OptimConfig(steps=100, learning_rate=1e-2, warmup_steps=10, min_lr_ratio=0.1)
  lr = step_lib.schedule(o)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(10), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(lr(100), 1e-3, rtol=1e-5)
  assert float(lr(50)) < 1e-2


def _run_steps(mesh, cfg, batches, o, inject=-1):
  tx = step_lib.optimizer(o)
  make_model = lambda: Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef = nnx.split(nnx.eval_shape(make_model))[0]
  shapes = step_lib.abstract_state(make_model, tx)
  shardings = step_lib.state_shardings(shapes, mesh)
  state = jax.jit(lambda: step_lib.init_state(make_model(), tx), out_shardings=shardings)()
  batch_sh = step_lib.batch_shardings(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}, mesh)
  train_step = step_lib.make_train_step(graphdef, tx, o, mesh=mesh, state_sharding=shardings,
                                        batch_sharding=batch_sh, inject_nan_at_step=inject)
  losses, states = [], []
  for b in batches:
    state, m = train_step(state, jax.device_put(b, batch_sh))
    losses.append(jax.device_get(m))
    states.append(jax.device_get(state))
  return losses, states


def test_sharded_step_equals_single_device_and_learns():
  cfg = ModelConfig.tiny("qwen2")
  o = OptimConfig(steps=4, learning_rate=1e-2, warmup_steps=0)
  batches = [_batch(cfg, seed=0)] * 4
  single, _ = _run_steps(make_mesh((1, 1), ("data", "model"), jax.devices()[:1]), cfg,
                         batches, o)
  sharded, _ = _run_steps(make_mesh((4, 2), ("data", "model")), cfg, batches, o)
  a = [float(m["loss"]) for m in single]
  b = [float(m["loss"]) for m in sharded]
  np.testing.assert_allclose(a, b, rtol=2e-5)
  assert a[-1] < a[0] - 0.05  # The same batch four times: the loss must fall.
  assert all(float(m["target_tokens"]) == 8 * 6 for m in single)
  assert all(float(m["tokens"]) == 8 * 12 for m in single)


def test_non_finite_step_leaves_state_unchanged():
  cfg = ModelConfig.tiny("qwen2")
  o = OptimConfig(steps=3, learning_rate=1e-2, warmup_steps=0)
  mesh = make_mesh((8, 1), ("data", "model"))
  metrics, states = _run_steps(mesh, cfg, [_batch(cfg)] * 2, o, inject=2)
  assert [bool(m["finite"]) for m in metrics] == [True, False]
  assert [int(s["step"]) for s in states] == [1, 1]
  same = jax.tree.map(np.array_equal, states[0]["params"], states[1]["params"])
  assert all(jax.tree.leaves(same))
  assert not np.isfinite(float(metrics[1]["loss"]))


def test_weight_decay_skips_vectors():
  params = {"w_dv": jnp.ones((2, 2)), "scale_d": jnp.ones((2,))}
  tx = step_lib.optimizer(OptimConfig(steps=2, learning_rate=0.1, warmup_steps=0,
                                      weight_decay=0.5, grad_clip=0.0))
  zero = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  _, state = tx.update(zero, state, params)  # Step 0 has learning rate 0.
  updates, _ = tx.update(zero, state, params)
  new = optax.apply_updates(params, updates)
  assert float(new["scale_d"][0]) == 1.0
  assert float(new["w_dv"][0, 0]) < 1.0
