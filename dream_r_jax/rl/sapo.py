"""SAPO: the draft's policy loss and group-relative advantages (DESIGN.md section 5).

Everything here is pure and jittable. Losses share one signature,

    loss_fn(logp_new, logp_old, logp_ref, advantages, mask, *, eps_low, eps_high, beta)
        -> (loss, metrics)

and are registered by name (`sapo`, `grpo`) so that a flag string selects one.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

ADVANTAGE_EPS = 1e-6

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str):
  """Decorator: registers a loss with the common signature under `name`."""

  def decorator(fn: LossFn) -> LossFn:
    if name in LOSSES:
      raise ValueError(f"loss {name!r} is already registered.")
    LOSSES[name] = fn
    return fn

  return decorator


def get_loss(name: str) -> LossFn:
  """The registered loss called `name`; ValueError listing the known names otherwise."""
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}.") from None


def _check_hparams(eps_low, eps_high, beta) -> None:
  for name, value, ok, want in (
      ("eps_low", eps_low, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
      ("eps_high", eps_high, lambda v: v >= 0.0, ">= 0"),
      ("beta", beta, lambda v: v >= 0.0, ">= 0")):
    if isinstance(value, jax.core.Tracer):
      continue
    if not ok(float(value)):  # NaN fails every test.
      raise ValueError(f"{name} must be {want}, got {name}={value}.")


@register_loss("sapo")
def sapo_loss(
    logp_new: jax.Array,    # [N, T]
    logp_old: jax.Array,    # [N, T]
    logp_ref: jax.Array,    # [N, T]
    advantages: jax.Array,  # [N]
    mask: jax.Array,        # [N, T]
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-level clipped policy loss with a k3 KL penalty to the reference.

      rho  = exp(logp_new - logp_old)
      pg   = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
      kl   = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1
      loss = sum((pg + beta * kl) * mask) / max(sum(mask), 1)

  The mean runs over all valid tokens of the batch (not per sequence), so long and short
  candidates weigh by their token counts. Masked-out positions are replaced by zeros before
  any arithmetic, so padding holding -inf or NaN changes neither the loss nor its gradient.
  Where the two branches of `min` are equal the gradient follows the unclipped branch.

  Args:
    logp_new: log-probs of the sampled tokens under the policy being trained (differentiated).
    logp_old: the same under the rollout policy.
    logp_ref: the same under the frozen reference (the SFT draft).
    advantages: one advantage per sequence, broadcast over its tokens.
    mask: bool or float, nonzero on the tokens that count (float values weigh tokens).
    eps_low: lower clip width, in [0, 1).
    eps_high: upper clip width, >= 0 (DAPO-style clip-higher when > eps_low).
    beta: KL coefficient, >= 0.

  Returns:
    `(loss, metrics)`, a scalar and a dict of scalars (all masked token means unless said):
      `loss`; `pg_loss` (mean pg); `kl` (mean k3 KL); `ratio_mean`; `ratio_max` (max rho over
      valid tokens, 0 if none); `clip_fraction`: the fraction of valid tokens on which the
      clipped branch is strictly smaller, i.e. `A > 0 and rho > 1 + eps_high` or
      `A < 0 and rho < 1 - eps_low`, the tokens whose pg gradient clipping zeroes;
      `clip_fraction_low` / `clip_fraction_high` its two halves; `ratio_outside_fraction`:
      the fraction of valid tokens with rho outside [1 - eps_low, 1 + eps_high] whatever the
      advantage's sign; `num_tokens` (sum of the mask).
  """
  _check_hparams(eps_low, eps_high, beta)
  n, t = logp_new.shape
  for name, x in (("logp_old", logp_old), ("logp_ref", logp_ref), ("mask", mask)):
    if x.shape != (n, t):
      raise ValueError(f"{name} has shape {x.shape}, but logp_new has shape {(n, t)}.")
  if advantages.shape != (n,):
    raise ValueError(f"advantages must have shape {(n,)} (one per sequence), "
                     f"got {advantages.shape}.")

  with jax.named_scope("sapo_loss"):
    m = mask.astype(jnp.float32)  # [N, T]
    valid = m != 0
    logp_new = jnp.where(valid, logp_new.astype(jnp.float32), 0.0)
    logp_old = jnp.where(valid, logp_old.astype(jnp.float32), 0.0)
    logp_ref = jnp.where(valid, logp_ref.astype(jnp.float32), 0.0)
    adv = advantages.astype(jnp.float32)[:, None]  # [N, 1]

    ratio = jnp.exp(logp_new - logp_old)  # [N, T]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    clip_active = clipped < unclipped  # `min` picks the clipped branch.
    pg = -jnp.where(clip_active, clipped, unclipped)  # [N, T]
    log_ref_ratio = logp_ref - logp_new
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0  # [N, T]

    num_tokens = jnp.sum(m)
    denom = jnp.maximum(num_tokens, 1.0)

    def token_mean(x):
      return jnp.sum(jnp.where(valid, x * m, 0.0)) / denom

    loss = token_mean(pg + beta * kl)

    sg = jax.lax.stop_gradient
    ratio_sg = sg(ratio)
    low = clip_active & (adv < 0)
    high = clip_active & (adv > 0)
    outside = (ratio_sg < 1.0 - eps_low) | (ratio_sg > 1.0 + eps_high)
    metrics = {
        "loss": sg(loss),
        "pg_loss": sg(token_mean(pg)),
        "kl": sg(token_mean(kl)),
        "ratio_mean": token_mean(ratio_sg),
        "ratio_max": jnp.max(jnp.where(valid, ratio_sg, 0.0)),
        "clip_fraction": token_mean(clip_active.astype(jnp.float32)),
        "clip_fraction_low": token_mean(low.astype(jnp.float32)),
        "clip_fraction_high": token_mean(high.astype(jnp.float32)),
        "ratio_outside_fraction": token_mean(outside.astype(jnp.float32)),
        "num_tokens": num_tokens,
    }
  return loss, metrics


@register_loss("grpo")
def grpo_loss(logp_new, logp_old, logp_ref, advantages, mask, *, eps_low, eps_high=None,
              beta):
  """`sapo_loss` with the symmetric clip of GRPO: `eps_low` on both sides.

  `eps_high` is accepted for a uniform call signature and ignored.
  """
  del eps_high
  return sapo_loss(logp_new, logp_old, logp_ref, advantages, mask, eps_low=eps_low,
                   eps_high=eps_low, beta=beta)


def validate_rewards(rewards, group_size: int) -> None:
  """Host-side checks of a concrete reward vector; raises ValueError naming the problem."""
  _check_group_shape(np.shape(rewards), group_size)
  r = np.asarray(rewards)
  if not np.issubdtype(r.dtype, np.number) or np.issubdtype(r.dtype, np.complexfloating):
    raise ValueError(f"rewards must be real numbers, got dtype {r.dtype}.")
  bad = np.flatnonzero(~np.isfinite(r))
  if bad.size:
    raise ValueError(f"rewards must be finite; non-finite at indices {bad[:10].tolist()} "
                     f"(values {r[bad[:10]].tolist()}).")


def _check_group_shape(shape, group_size: int) -> None:
  if len(shape) != 1:
    raise ValueError(f"rewards must have shape [N], got {tuple(shape)}.")
  if int(group_size) != group_size or group_size < 2:
    raise ValueError(f"group_size must be an integer >= 2, got {group_size}.")
  if shape[0] % group_size:
    raise ValueError(f"the number of rewards ({shape[0]}) is not divisible by "
                     f"group_size={group_size}.")


def group_has_signal(rewards: jax.Array, group_size: int) -> jax.Array:
  """bool `[N // group_size]`: True for groups whose rewards are not all exactly equal."""
  _check_group_shape(rewards.shape, group_size)
  groups = rewards.reshape(-1, group_size)
  return jnp.max(groups, axis=-1) > jnp.min(groups, axis=-1)


def group_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
  """Group-relative advantages `(r - group mean) / (group std + 1e-6)`, std with ddof 0.

  Args:
    rewards: float `[N]`, consecutive groups of `group_size` candidates of one state.
    group_size: G >= 2, dividing N.

  Returns:
    float `[N]`. A group whose rewards are all exactly equal gets exact zeros (its mean can
    differ from its members by rounding, which would otherwise leave noise of order 1e-11).

  Raises:
    ValueError: bad shape or group_size, and (for concrete inputs) non-finite rewards.
  """
  if isinstance(rewards, jax.core.Tracer):
    _check_group_shape(rewards.shape, group_size)
  else:
    validate_rewards(rewards, group_size)
  rewards = jnp.asarray(rewards)
  if not jnp.issubdtype(rewards.dtype, jnp.floating):
    rewards = rewards.astype(jnp.float32)
  with jax.named_scope("group_advantages"):
    groups = rewards.reshape(-1, group_size)  # [N / G, G]
    mean = jnp.mean(groups, axis=-1, keepdims=True)
    std = jnp.std(groups, axis=-1, keepdims=True)  # ddof=0
    adv = (groups - mean) / (std + ADVANTAGE_EPS)
    signal = group_has_signal(rewards, group_size)[:, None]  # [N / G, 1]
    return jnp.where(signal, adv, 0.0).reshape(-1)
