"""Sampling: top-k / top-p filters, and `sample` drawing from exactly `probs`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.decoding.sampling import SamplingConfig, filtered_logits, probs, sample

V = 16


def logits_batch(seed=0, rows=4):
  # Distinct values (no ties), so "the k largest" and "the nucleus" are well defined.
  return jnp.asarray(np.random.default_rng(seed).normal(0, 2.0, (rows, V)), jnp.float32)


def kept(filtered):
  return np.asarray(filtered) > np.finfo(np.float32).min / 2


@pytest.mark.parametrize("k", [1, 3, V - 1])
def test_top_k_keeps_exactly_the_k_largest(k):
  logits = logits_batch()
  keep = kept(filtered_logits(logits, SamplingConfig(temperature=1.0, top_k=k)))
  np.testing.assert_array_equal(keep.sum(-1), k)
  want = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
  for row in range(logits.shape[0]):
    assert set(np.flatnonzero(keep[row])) == set(want[row])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95])
def test_top_p_keeps_the_minimal_nucleus(top_p, temperature):
  logits = logits_batch(1, rows=8)
  keep = kept(filtered_logits(logits, SamplingConfig(temperature=temperature, top_p=top_p)))
  p = np.asarray(jax.nn.softmax(logits / temperature, axis=-1))
  for row in range(p.shape[0]):
    order = np.argsort(-p[row])
    # The minimal nucleus: the fewest most-likely tokens whose mass reaches top_p.
    m = int(np.searchsorted(np.cumsum(p[row, order]), top_p) + 1)
    assert set(np.flatnonzero(keep[row])) == set(order[:m]), (row, m)


def test_greedy_is_argmax_and_one_hot():
  logits = logits_batch(2)
  cfg = SamplingConfig()
  assert cfg.greedy
  want = np.argmax(np.asarray(logits), -1)
  np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.key(0), cfg)), want)
  np.testing.assert_array_equal(np.asarray(probs(logits, cfg)), np.eye(V)[want])


def test_sample_follows_probs():
  """Empirical frequencies of N draws are within a stated total-variation bound of `probs`.

  With N draws, |freq_i - p_i| is ~ N(0, p_i (1 - p_i) / N), so E[TV] ~= 0.5 * sqrt(2 / pi)
  * sum_i sqrt(p_i / N) ~= 0.006 here (5 supported tokens, N = 20000), and at most 0.5 *
  sqrt(5 / N) ~= 0.008. The bound 0.02 is > 3x the expectation. The test also checks that
  it could fail: mistakes a sampler is prone to (ignoring the temperature, or the top-p
  filter) move the distribution by more than 3x the bound.
  """
  n = 20000
  logits = 0.2 * logits_batch(3, rows=1)[0]
  cfg = SamplingConfig(temperature=0.7, top_k=8, top_p=0.8)
  p = np.asarray(probs(logits, cfg), np.float64)
  assert abs(p.sum() - 1) < 1e-5 and (p > 0).sum() == 5  # both filters bite
  draws = np.asarray(sample(jnp.broadcast_to(logits, (n, V)), jax.random.key(42), cfg))
  freq = np.bincount(draws, minlength=V) / n
  assert freq[p == 0].sum() == 0  # filtered tokens are never drawn
  tv = 0.5 * np.abs(freq - p).sum()
  assert tv < 0.02, tv
  for wrong in (SamplingConfig(temperature=1.0, top_k=8, top_p=0.8),
                SamplingConfig(temperature=0.7, top_k=8)):
    assert 0.5 * np.abs(np.asarray(probs(logits, wrong)) - p).sum() > 0.06


def test_sample_is_deterministic_per_key_and_varies_across_keys():
  logits = jnp.zeros((64, V))  # uniform: any key dependence shows
  cfg = SamplingConfig(temperature=1.0)
  a = np.asarray(sample(logits, jax.random.key(1), cfg))
  np.testing.assert_array_equal(a, np.asarray(sample(logits, jax.random.key(1), cfg)))
  assert not np.array_equal(a, np.asarray(sample(logits, jax.random.key(2), cfg)))
  assert len(set(a.tolist())) > 4  # rows draw independently


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
])
def test_invalid_configs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingConfig(**kwargs)
