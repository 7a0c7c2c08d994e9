"""SAPO loss and group advantages against direct NumPy evaluations of the formulas."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.rl import sapo

EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.05
HP = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA)


def _np_sapo(new, old, ref, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA):
  """The issue's formula in float64, its gradient w.r.t. logp_new and the clip fraction."""
  new, old, ref, adv, m = (np.asarray(x, np.float64) for x in (new, old, ref, adv, mask))
  a = adv[:, None]
  rho = np.exp(new - old)
  pg = -np.minimum(rho * a, np.clip(rho, 1 - eps_low, 1 + eps_high) * a)
  kl = np.exp(ref - new) - (ref - new) - 1
  denom = max(m.sum(), 1.0)
  loss = ((pg + beta * kl) * m).sum() / denom
  # Clipping binds where the advantage pushes rho further out of the trust region.
  binds = ((a > 0) & (rho > 1 + eps_high)) | ((a < 0) & (rho < 1 - eps_low))
  grad = m * (np.where(binds, 0.0, -a * rho) + beta * (1 - np.exp(ref - new))) / denom
  return dict(loss=loss, grad=grad, clip_fraction=(binds * m).sum() / denom,
              kl=(kl * m).sum() / denom, ratio_mean=(rho * m).sum() / denom,
              pg_loss=(pg * m).sum() / denom)


def _random_batch(seed, n=6, t=9, spread=0.3):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 1.0, size=(n, t)).astype(np.float32)
  new = (old + rng.normal(0, spread, size=(n, t))).astype(np.float32)
  ref = (new + rng.normal(0, 0.5, size=(n, t))).astype(np.float32)
  adv = rng.normal(size=n).astype(np.float32)
  mask = rng.random((n, t)) < 0.7
  mask[2] = False  # An empty row.
  return new, old, ref, adv, mask


def _loss_and_grad(new, old, ref, adv, mask, **hp):
  hp = hp or HP
  fn = lambda x: sapo.sapo_loss(x, old, ref, adv, mask, **hp)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(new))
  return loss, metrics, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_gradient_and_metrics_match_numpy(seed):
  batch = _random_batch(seed)
  loss, metrics, grad = _loss_and_grad(*batch)
  want = _np_sapo(*batch)
  assert 0.05 < want["clip_fraction"] < 0.5  # Both branches of the min occur.
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, want["grad"], rtol=1e-5, atol=1e-8)
  for key in ("clip_fraction", "kl", "ratio_mean", "pg_loss"):
    np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
  assert metrics["num_tokens"] == batch[4].sum()
  np.testing.assert_array_equal(grad[2], 0.0)  # The empty row gets no gradient.


def test_extreme_ratios():
  new, old, ref, adv, mask = _random_batch(3)
  new[:, 0] = old[:, 0] + 20.0  # rho = e^20
  new[:, 1] = old[:, 1] - 20.0  # rho = e^-20
  ref[:, 2] = new[:, 2] - 20.0  # KL term with exp(-20)
  mask[:, :3] = True
  loss, metrics, grad = _loss_and_grad(new, old, ref, adv, mask)
  want = _np_sapo(new, old, ref, adv, mask)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
  np.testing.assert_allclose(grad, want["grad"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["clip_fraction"], want["clip_fraction"], rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio_max"], np.exp(20.0), rtol=1e-5)


def test_gradient_matches_finite_differences():
  new, old, ref, adv, mask = _random_batch(4, n=3, t=4)
  _, _, grad = _loss_and_grad(new, old, ref, adv, mask)
  loss_fn = jax.jit(lambda x: sapo.sapo_loss(x, old, ref, adv, mask, **HP)[0])
  f = lambda x: float(loss_fn(jnp.asarray(x, jnp.float32)))
  h = 1e-2
  for i, j in np.argwhere(mask)[:6]:
    step = np.zeros_like(new)
    step[i, j] = h
    # Float64 central difference of the float32 loss; the kink of min is avoided by seed.
    fd = (f(new.astype(np.float64) + step) - f(new.astype(np.float64) - step)) / (2 * h)
    np.testing.assert_allclose(grad[i, j], fd, rtol=2e-2, atol=1e-4)


def test_on_policy_gradient_is_the_plain_token_mean_policy_gradient():
  _, old, _, adv, mask = _random_batch(5)
  grad = jax.grad(lambda x: sapo.sapo_loss(x, old, old, adv, mask, **HP)[0])(jnp.asarray(old))
  expected = -adv[:, None] * (mask / mask.sum()).astype(np.float32)
  np.testing.assert_array_equal(grad, expected)


def test_clip_fraction_by_hand():
  # rho = 1.5, 1.5, 0.5, 0.5, 1.0 with advantages +1, -1, +1, -1, +1: clipping binds only for
  # (1.5, +1) and (0.5, -1); rho is outside the range on four tokens.
  ratios = np.array([[1.5, 1.5, 0.5, 0.5, 1.0]], np.float32)
  new = np.log(ratios).reshape(5, 1)
  zeros = np.zeros_like(new)
  adv = np.array([1.0, -1.0, 1.0, -1.0, 1.0], np.float32)
  _, metrics = sapo.sapo_loss(new, zeros, new, adv, np.ones((5, 1), bool), **HP)
  np.testing.assert_allclose(metrics["clip_fraction"], 2 / 5, rtol=1e-6)
  np.testing.assert_allclose(metrics["clip_fraction_high"], 1 / 5, rtol=1e-6)
  np.testing.assert_allclose(metrics["clip_fraction_low"], 1 / 5, rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio_outside_fraction"], 4 / 5, rtol=1e-6)
  # pg per token: -(1.28), 1.5, -0.5, 0.8, -1.0 (kl is 0 since ref == new).
  np.testing.assert_allclose(metrics["loss"], (-1.28 + 1.5 - 0.5 + 0.8 - 1.0) / 5, rtol=1e-6)


def test_padding_with_nonfinite_values_changes_nothing():
  new, old, ref, adv, mask = _random_batch(6)
  clean = _loss_and_grad(new, old, ref, adv, mask)
  dirty = [x.copy() for x in (new, old, ref)]
  for x, bad in zip(dirty, (np.nan, -np.inf, np.inf)):
    x[~mask] = bad
  got = _loss_and_grad(*dirty, adv, mask)
  np.testing.assert_array_equal(got[0], clean[0])
  np.testing.assert_array_equal(got[2], clean[2])


def test_all_masked_batch_gives_zero_loss_and_gradient():
  new, old, ref, adv, _ = _random_batch(7)
  loss, metrics, grad = _loss_and_grad(new, old, ref, adv, np.zeros(new.shape, bool))
  assert loss == 0.0 and metrics["num_tokens"] == 0.0 and metrics["clip_fraction"] == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_float_mask_weights_tokens():
  new, old, ref, adv, mask = _random_batch(8)
  weights = mask * np.random.default_rng(8).uniform(0.5, 2.0, mask.shape).astype(np.float32)
  loss, _, grad = _loss_and_grad(new, old, ref, adv, weights)
  want = _np_sapo(new, old, ref, adv, weights)
  np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
  np.testing.assert_allclose(grad, want["grad"], rtol=1e-5, atol=1e-8)


def test_jit_matches_eager():
  batch = _random_batch(9)
  eager = sapo.sapo_loss(*batch, **HP)
  jitted = jax.jit(functools.partial(sapo.sapo_loss, **HP))(*batch)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  np.testing.assert_allclose(jitted[1]["clip_fraction"], eager[1]["clip_fraction"])


def test_loss_registry_and_grpo_symmetric_clip():
  assert sapo.get_loss("sapo") is sapo.sapo_loss
  # rho = 1.25 with A > 0 is clipped by GRPO (1 + 0.2) but not by SAPO (1 + 0.28).
  new = np.log(np.full((1, 1), 1.25, np.float32))
  args = (new, np.zeros_like(new), new, np.ones(1, np.float32), np.ones((1, 1), bool))
  grpo, _ = sapo.get_loss("grpo")(*args, **HP)
  sapo_value, _ = sapo.get_loss("sapo")(*args, **HP)
  np.testing.assert_allclose([grpo, sapo_value], [-1.2, -1.25], rtol=1e-6)
  with pytest.raises(ValueError, match=r"unknown loss 'ppo'; known losses: \['grpo', 'sapo'\]"):
    sapo.get_loss("ppo")


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps_low=1.0), r"eps_low must be in \[0, 1\), got eps_low=1.0"),
    (dict(eps_high=-0.1), r"eps_high must be >= 0"),
    (dict(beta=float("nan")), r"beta must be >= 0"),
    (dict(advantages=np.zeros((6, 1), np.float32)), r"advantages must have shape \(6,\)"),
    (dict(mask=np.ones((6, 8), bool)), r"mask has shape \(6, 8\), but logp_new has shape"),
])
def test_bad_inputs_raise(kwargs, message):
  new, old, ref, adv, mask = _random_batch(0)
  args = dict(logp_new=new, logp_old=old, logp_ref=ref, advantages=adv, mask=mask, **HP)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    sapo.sapo_loss(**args)


def test_group_advantages_match_numpy_ddof0():
  rewards = np.random.default_rng(10).normal(size=12).astype(np.float32)
  groups = rewards.astype(np.float64).reshape(3, 4)
  want = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(sapo.group_advantages(rewards, 4), want.reshape(-1), rtol=1e-5)
  # Two rewards 1 and 3: mean 2, population std 1 (ddof=1 would give sqrt 2).
  np.testing.assert_allclose(sapo.group_advantages(jnp.array([1.0, 3.0]), 2),
                             [-1 / (1 + 1e-6), 1 / (1 + 1e-6)], rtol=1e-7)


def test_all_equal_group_gets_exact_zeros_and_no_signal():
  # 0.1 three times: the float mean is not exactly 0.1, so a plain formula leaves noise.
  rewards = jnp.array([0.1, 0.1, 0.1, 0.0, 1.0, 0.0, 7.0, 7.0, 7.0])
  adv = sapo.group_advantages(rewards, 3)
  np.testing.assert_array_equal(adv[:3], 0.0)
  np.testing.assert_array_equal(adv[6:], 0.0)
  assert np.all(adv[3:6] != 0.0)
  assert sapo.group_has_signal(rewards, 3).tolist() == [False, True, False]
  jitted = jax.jit(sapo.group_advantages, static_argnums=1)(rewards, 3)
  np.testing.assert_allclose(jitted, adv, rtol=1e-6)


@pytest.mark.parametrize("rewards, group_size, message", [
    (np.zeros(4), 1, r"group_size must be an integer >= 2, got 1"),
    (np.zeros(6), 4, r"number of rewards \(6\) is not divisible by group_size=4"),
    (np.array([0.0, np.nan, 1.0, 2.0]), 2, r"non-finite at indices \[1\]"),
    (np.array([0.0, 1.0, np.inf, 2.0]), 2, r"non-finite at indices \[2\]"),
    (np.zeros((2, 2)), 2, r"rewards must have shape \[N\]"),
])
def test_group_advantages_bad_input(rewards, group_size, message):
  with pytest.raises(ValueError, match=message):
    sapo.group_advantages(rewards, group_size)
  with pytest.raises(ValueError, match=message):
    sapo.validate_rewards(rewards, group_size)
