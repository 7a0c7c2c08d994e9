"""TBVM acceptance rules on hand-made verdict logits with known answers."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.speculative import tbvm

V = 16
POS, NEG = (1, 3), (2,)
BACKGROUND = -30.0  # Tokens that are neither verdict carry ~1e-13 of the mass.


def _logits(pos_logit, neg_logit, shape=(1, 1)):
  """Verdict logits with `pos_logit` on token 1, `neg_logit` on token 2, the rest faint."""
  z = np.full(shape + (V,), BACKGROUND, np.float32)
  z[..., 1] = pos_logit
  z[..., 2] = neg_logit
  return z


def _np_reference(z, pos, neg, tau, min_mass):
  """DESIGN.md section 3 in float64 NumPy."""
  z = z.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p_pos, p_neg = p[..., list(pos)].sum(-1), p[..., list(neg)].sum(-1)
  with np.errstate(divide="ignore"):
    log_ratio = np.log(p_pos) - np.log(p_neg)
  accept = (p_pos + p_neg >= min_mass) & (log_ratio >= math.log(tau / (1 - tau)))
  return accept, np.cumprod(accept, -1).sum(-1), log_ratio, p_pos + p_neg


def test_ratio_exactly_at_tau_accepts_and_slightly_above_rejects():
  # P_pos / P_neg = 4 exactly (logits log 4 and 0), which is tau / (1 - tau) for tau = 0.8.
  z = _logits(math.log(4.0), 0.0)
  accept, n = tbvm.cpn_accept(z, POS, NEG, tau=0.8, min_mass=0.5)
  assert accept.tolist() == [[True]] and n.tolist() == [1]
  accept, n = tbvm.cpn_accept(z, POS, NEG, tau=0.8000001, min_mass=0.5)
  assert accept.tolist() == [[False]] and n.tolist() == [0]
  # A hair below the 4:1 ratio fails at tau = 0.8.
  accept, _ = tbvm.cpn_accept(_logits(math.log(4.0) - 1e-6, 0.0), POS, NEG, 0.8, 0.5)
  assert accept.tolist() == [[False]]


def test_ratio_at_tau_with_two_positive_tokens():
  # P_pos = 2 + 2 over P_neg = 1: the positive set's mass is summed, not its maximum taken.
  z = _logits(math.log(2.0), 0.0)
  z[..., 3] = math.log(2.0)
  assert tbvm.cpn_accept(z, POS, NEG, 0.8, 0.5)[0].tolist() == [[True]]
  # Ratio 4:1 passes tau=0.8 only with both positive tokens counted.
  assert tbvm.cpn_accept(z, (1,), NEG, 0.8, 0.5)[0].tolist() == [[False]]


def test_min_mass_boundary():
  # Verdict tokens share about 0.6 of the mass; ten other tokens hold the rest.
  z = np.full((1, 1, V), -30.0, np.float32)
  z[..., 1], z[..., 2] = 2.0, -1.0
  z[..., 4:14] = 0.4
  _, _, _, mass = _np_reference(z, POS, NEG, 0.8, 0.0)
  mass = float(mass[0, 0])
  assert 0.3 < mass < 0.9
  assert tbvm.cpn_accept(z, POS, NEG, 0.8, mass - 1e-4)[0].tolist() == [[True]]
  assert tbvm.cpn_accept(z, POS, NEG, 0.8, mass + 1e-4)[0].tolist() == [[False]]
  stats = tbvm.verdict_stats(z, POS, NEG)
  np.testing.assert_allclose(stats.mass, [[mass]], rtol=1e-6)


def test_zero_negative_mass_accepts_and_zero_total_mass_rejects():
  z = _logits(0.0, -np.inf, shape=(1, 2))
  z[0, 1, [1, 3]] = -np.inf  # Second step: no verdict token has any mass.
  accept, n = tbvm.cpn_accept(z, POS, NEG, tau=0.99, min_mass=0.0)
  assert accept.tolist() == [[True, False]] and n.tolist() == [1]
  np.testing.assert_array_equal(tbvm.cpn_scores(z, POS, NEG), [[1.0, 0.0]])


def test_rejection_in_the_middle_of_a_row_and_rows_that_differ():
  good, bad = (3.0, 0.0), (0.0, 3.0)
  rows = [[good, good, bad, good],   # stops at the rejection although step 4 passes
          [bad, good, good, good],   # nothing accepted
          [good, good, good, good]]  # everything accepted
  z = np.full((3, 4, V), BACKGROUND, np.float32)
  for b, row in enumerate(rows):
    for k, (p, q) in enumerate(row):
      z[b, k, 1], z[b, k, 2] = p, q
  accept, n = tbvm.cpn_accept(z, POS, NEG, tau=0.8, min_mass=0.5)
  assert accept.tolist() == [[True, True, False, True], [False, True, True, True],
                             [True, True, True, True]]
  assert n.dtype == jnp.int32 and n.tolist() == [2, 0, 4]


def test_matches_numpy_reference_on_random_logits():
  rng = np.random.default_rng(0)
  z = rng.normal(0, 3, size=(6, 5, V)).astype(np.float32)
  z[..., 1:4] += 3.0  # Keep the verdict mass around min_mass so both branches occur.
  accept, n = tbvm.cpn_accept(z, POS, NEG, tau=0.7, min_mass=0.6)
  want_accept, want_n, log_ratio, mass = _np_reference(z, POS, NEG, 0.7, 0.6)
  near_tie = (np.abs(log_ratio - math.log(0.7 / 0.3)) < 1e-4) | (np.abs(mass - 0.6) < 1e-4)
  assert not near_tie.any()
  assert 0 < want_accept.sum() < want_accept.size
  np.testing.assert_array_equal(accept, want_accept)
  np.testing.assert_array_equal(n, want_n)
  np.testing.assert_allclose(tbvm.cpn_scores(z, POS, NEG),
                             np.exp(log_ratio) / (1 + np.exp(log_ratio)), rtol=1e-5)


def test_jit_matches_eager_and_traced_tau_is_allowed():
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(0, 3, size=(4, 6, V)), jnp.bfloat16)
  eager = tbvm.cpn_accept(z, POS, NEG, 0.75, 0.3)
  jitted = jax.jit(functools.partial(tbvm.cpn_accept, pos_ids=POS, neg_ids=NEG, tau=0.75,
                                     min_mass=0.3))(z)
  traced = jax.jit(lambda z, t, m: tbvm.cpn_accept(z, POS, NEG, t, m))(z, 0.75, 0.3)
  for got in (jitted, traced):
    np.testing.assert_array_equal(got[0], eager[0])
    np.testing.assert_array_equal(got[1], eager[1])
  assert 0 < int(eager[0].sum()) < eager[0].size


@pytest.mark.parametrize("kwargs, message", [
    (dict(tau=0.5), r"tau must lie in \(0.5, 1\), got tau=0.5"),
    (dict(tau=1.0), r"tau must lie in \(0.5, 1\)"),
    (dict(tau=float("nan")), r"tau must lie in"),
    (dict(min_mass=-0.1), r"min_mass must lie in \[0, 1\], got min_mass=-0.1"),
    (dict(min_mass=1.5), r"min_mass must lie in \[0, 1\]"),
    (dict(pos_ids=()), r"pos_ids is empty"),
    (dict(neg_ids=[]), r"neg_ids is empty"),
    (dict(pos_ids=(1, 2)), r"pos_ids and neg_ids overlap on token ids \[2\]"),
    (dict(pos_ids=(1, 1)), r"pos_ids holds duplicate token ids"),
    (dict(neg_ids=(V,)), r"neg_ids must lie in \[0, 16\)"),
    (dict(verdict_logits=np.zeros((2, V), np.float32)),
     r"verdict_logits must have rank 3 \[B, K, V\], got shape \(2, 16\)"),
    (dict(verdict_logits=np.zeros((2, 0, V), np.float32)), r"K must be >= 1"),
])
def test_invalid_inputs_raise_naming_the_input(kwargs, message):
  args = dict(verdict_logits=_logits(1.0, 0.0), pos_ids=POS, neg_ids=NEG, tau=0.8,
              min_mass=0.5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    tbvm.cpn_accept(**args)


def test_leading_accepted():
  accept = jnp.array([[True, False, True], [True, True, True], [False, False, False]])
  assert tbvm.leading_accepted(accept).tolist() == [1, 3, 0]


DIGITS = tuple(range(4, 14))  # Token ids of "0".."9".


def _score_logits(values_to_logits, other=-np.inf):
  z = np.full((1, 1, V), other, np.float32)
  for value, logit in values_to_logits.items():
    z[0, 0, DIGITS[value]] = logit
  return z


@pytest.mark.parametrize("digit_logits, expected", [
    ({7: 0.0}, 7.0),
    ({6: 1.0, 8: 1.0}, 7.0),
    ({6: 1.0, 9: 1.0}, 7.5),
    ({5: 0.0, 9: math.log(3.0)}, 8.0),  # 1/4 * 5 + 3/4 * 9
    ({v: 0.0 for v in range(10)}, 4.5),
])
def test_expected_score(digit_logits, expected):
  z = _score_logits(digit_logits)
  np.testing.assert_allclose(tbvm.expected_scores(z, DIGITS), [[expected]], rtol=1e-6)
  accept, n = tbvm.score_accept(z, DIGITS, threshold=7.0)
  assert accept.tolist() == [[expected >= 7.0]] and n.tolist() == [int(expected >= 7.0)]


def test_score_is_renormalised_over_the_digits():
  # A non-digit token with most of the mass does not dilute the score.
  z = _score_logits({8: 0.0, 2: -2.0}, other=-np.inf)
  z[0, 0, 0] = 50.0
  p8 = 1 / (1 + math.exp(-2.0))
  np.testing.assert_allclose(tbvm.expected_scores(z, DIGITS), [[8 * p8 + 2 * (1 - p8)]],
                             rtol=1e-6)


def test_likelihood_accept_ignores_padding_and_rejects_empty_steps():
  lp = np.array([[[-0.5, -0.5, -np.inf, np.nan],     # mean -0.5: accept
                  [-1.0, -2.0, 0.0, -np.inf],        # mean -1.0: accept (>=)
                  [-1.5, -1.5, -1.5, -1.5],          # mean -1.5: reject
                  [0.0, 0.0, 0.0, 0.0]]], np.float32)  # empty: reject
  mask = np.array([[[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]], bool)
  np.testing.assert_allclose(tbvm.mean_step_logprob(lp, mask), [[-0.5, -1.0, -1.5, -np.inf]])
  accept, n = tbvm.likelihood_accept(lp, mask, threshold=-1.0)
  assert accept.tolist() == [[True, True, False, False]] and n.tolist() == [2]


def test_gather_token_logprobs_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 3, 5, V)).astype(np.float32)
  tokens = rng.integers(0, V, size=(2, 3, 5))
  logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
  want = np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(tbvm.gather_token_logprobs(logits, tokens), want, rtol=1e-5)


def test_exact_accept():
  target = np.array([[[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 0], [4, 4, 0, 0]]])
  draft = np.array([[[5, 6, 7, 9],      # same valid tokens, padding differs: accept
                     [8, 9, 0, 0],      # same: accept
                     [1, 2, 4, 0],      # last token differs: reject
                     [4, 4, 0, 0]]])    # same but after a rejection
  mask = np.array([[[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]])
  accept, n = tbvm.exact_accept(draft, target, mask)
  assert accept.tolist() == [[True, True, False, True]] and n.tolist() == [2]
  # A target step of another length (its own mask) is a mismatch even if the prefix agrees.
  target_mask = mask.copy()
  target_mask[0, 1, 2] = 1
  assert tbvm.exact_accept(draft, target, mask, target_mask)[0].tolist() == [
      [True, False, False, True]]
  # Empty steps never pass.
  assert tbvm.exact_accept(draft, target, np.zeros_like(mask))[1].tolist() == [0]
  with pytest.raises(ValueError, match=r"target_tokens has shape \(1, 4, 3\)"):
    tbvm.exact_accept(draft, target[..., :3], mask)
