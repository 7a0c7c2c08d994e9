"""The SFT train step: a pure masked cross-entropy, an optax chain, one sharded jit.

The train state is a plain pytree `{"step", "params", "opt_state"}` with `params` the
model's pure dict (`nnx.State.to_pure_dict`): Orbax saves and restores it without NNX
in the way, and `dream_r_jax.sharding.rules` shards it by parameter name (optimizer
moments share their parameter's name, so they shard the same way).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dream_r_jax.sharding import rules as rules_lib
from dream_r_jax.train.config import OptimConfig

TrainState = dict[str, Any]   # {"step": int32 [], "params": pure dict, "opt_state": ...}
Batch = dict[str, jax.Array]  # see `sft_loss`


def schedule(o: OptimConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
  warmup = min(o.warmup_steps, max(o.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=warmup,
      decay_steps=max(o.steps, warmup + 1), end_value=o.learning_rate * o.min_lr_ratio)


def _decay_mask(params):
  # Norm scales and biases are not decayed: shrinking them toward zero changes what the
  # layer computes rather than regularising it.
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def optimizer(o: OptimConfig) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adamw(schedule(o), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*parts)


def init_state(model: nnx.Module, tx: optax.GradientTransformation) -> TrainState:
  params = nnx.state(model, nnx.Param).to_pure_dict()
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": tx.init(params)}


def sft_loss(logits: jax.Array,  # [B, T, V] float32
             input_ids: jax.Array,  # [B, T]
             loss_mask: jax.Array,  # [B, T], 1 where the token is a training target
             ) -> tuple[jax.Array, jax.Array]:
  """Mean next-token cross-entropy over the masked target tokens; also their count."""
  targets = input_ids[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  num = jnp.sum(mask)
  return jnp.sum(ce * mask) / jnp.maximum(num, 1.0), num


def forward(graphdef, params, batch: Batch, image_grid_thw=None) -> jax.Array:
  """Logits of the batch (`positions` and `pixel_values` present for image models)."""
  model = nnx.merge(graphdef, params)
  return model(batch["input_ids"], positions=batch.get("positions"),
               pixel_values=batch.get("pixel_values"),
               image_grid_thw=None if image_grid_thw is None else np.asarray(image_grid_thw))


def state_shardings(state_shape, mesh: Mesh, rules=rules_lib.DEFAULT_RULES):
  return rules_lib.state_shardings(state_shape, mesh, rules)


def batch_shardings(batch_shape: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  """Rows over "data"; positions [3, B, T] have rows on axis 1, pixel patches on axis 0."""
  out = {}
  for k, v in batch_shape.items():
    spec = [None] * len(v.shape)
    spec[1 if k == "positions" else 0] = "data"
    out[k] = NamedSharding(mesh, P(*spec))
  return out


def apply_if_finite(tx: optax.GradientTransformation, state: TrainState, grads, loss):
  """One optimizer update, skipped (state kept, step not advanced) if loss or grads are
  not finite. Returns (new_state, grad_norm, finite)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = {"step": state["step"] + finite.astype(jnp.int32),
               "params": keep(params, state["params"]),
               "opt_state": keep(opt_state, state["opt_state"])}
  return new_state, grad_norm, finite


def make_train_step(graphdef, tx: optax.GradientTransformation, o: OptimConfig, *,
                    mesh: Mesh, state_sharding, batch_sharding,
                    image_grid_thw=None, inject_nan_at_step: int = -1,
                    pad_id: int = 0) -> Callable:
  """The jitted `(state, batch) -> (state, metrics)`; `state` is donated.

  Metrics: loss, grad_norm, lr (of this update), tokens (non-padding tokens processed),
  target_tokens (tokens in the loss) and finite.

  A step whose loss or gradient is not finite leaves the state unchanged (the caller
  stops the run), so the state that the last checkpoint would hold is never poisoned.
  `image_grid_thw` is host data shared by every batch of a task (one image size), so it
  is baked into the program instead of being an argument.
  """
  lr_fn = schedule(o)
  replicated = NamedSharding(mesh, P())

  def step_fn(state: TrainState, batch: Batch):
    with jax.named_scope("train_step"):

      def loss_fn(params):
        with jax.named_scope("forward"):
          logits = forward(graphdef, params, batch, image_grid_thw)
        with jax.named_scope("loss"):
          return sft_loss(logits, batch["input_ids"], batch["loss_mask"])

      with jax.named_scope("grad"):
        (loss, num), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      if inject_nan_at_step >= 0:
        loss = jnp.where(state["step"] + 1 == inject_nan_at_step, jnp.nan, loss)
      with jax.named_scope("update"):
        new_state, grad_norm, finite = apply_if_finite(tx, state, grads, loss)
      metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state["step"]),
                 "target_tokens": num, "finite": finite,
                 "tokens": jnp.sum(batch["input_ids"] != pad_id).astype(jnp.float32)}
      return new_state, metrics

  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))


def make_eval_loss(graphdef, *, mesh: Mesh, state_sharding, batch_sharding,
                   image_grid_thw=None) -> Callable:
  """Jitted `(params, batch) -> loss` (no update): the fixed-batch check of a restore."""

  def fn(params, batch):
    logits = forward(graphdef, params, batch, image_grid_thw)
    return sft_loss(logits, batch["input_ids"], batch["loss_mask"])[0]

  return jax.jit(fn, in_shardings=(state_sharding["params"], batch_sharding),
                 out_shardings=NamedSharding(mesh, P()))


def abstract_state(model_fn: Callable[[], nnx.Module], tx) -> TrainState:
  """Shapes and dtypes of the train state, without allocating it."""
  return jax.eval_shape(lambda: init_state(model_fn(), tx))


def with_shardings(shapes, shardings) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)

