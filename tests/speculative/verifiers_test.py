"""Verifier selection by name: configs, input checks and dispatch to each mode."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.speculative import tbvm
from dream_r_jax.speculative import verifiers
from dream_r_jax.speculative.verifiers import VerifierConfig, VerifierInputs, verify

V = 24
DIGITS = tuple(range(10, 20))


def _cpn_inputs():
  # Row 0: log-odds 2, 0.5, 2 (tau=0.8 needs log 4 = 1.386): accepted_len 1.
  z = np.full((2, 3, V), -30.0, np.float32)
  z[..., 1] = [[2.0, 0.5, 2.0], [2.0, 2.0, 2.0]]
  z[..., 2] = 0.0
  return VerifierInputs(verdict_logits=jnp.asarray(z))


def test_cpn_by_name_and_under_jit_with_static_config():
  cfg = VerifierConfig(name="cpn", tau=0.8, min_mass=0.5, pos_ids=[1], neg_ids=[2])
  assert cfg.pos_ids == (1,) and hash(cfg) == hash(VerifierConfig(pos_ids=(1,), neg_ids=(2,)))
  accept, n = verify(cfg, _cpn_inputs())
  assert accept.tolist() == [[True, False, True], [True, True, True]] and n.tolist() == [1, 3]
  accept_j, n_j = jax.jit(verify, static_argnums=0)(cfg, _cpn_inputs())
  np.testing.assert_array_equal(accept_j, accept)
  np.testing.assert_array_equal(n_j, n)


def test_score_mode_uses_default_threshold_7():
  z = np.full((1, 3, V), -np.inf, np.float32)
  z[0, 0, DIGITS[7]] = 0.0                              # score 7 -> accept
  z[0, 1, DIGITS[9]] = z[0, 1, DIGITS[4]] = 0.0         # score 6.5 -> reject
  z[0, 2, DIGITS[8]] = 0.0                              # score 8 -> after a rejection
  cfg = VerifierConfig(name="score", score_ids=DIGITS)
  assert cfg.resolved_threshold == 7.0
  accept, n = verify(cfg, VerifierInputs(verdict_logits=jnp.asarray(z)))
  assert accept.tolist() == [[True, False, True]] and n.tolist() == [1]
  lenient = VerifierConfig(name="score", score_ids=DIGITS, threshold=6.5)
  assert verify(lenient, VerifierInputs(verdict_logits=jnp.asarray(z)))[1].tolist() == [3]


def test_likelihood_mode():
  lp = jnp.log(jnp.array([[[0.5, 0.5], [0.1, 0.1]]]))  # means log 0.5 and log 0.1
  mask = jnp.ones((1, 2, 2), bool)
  inputs = VerifierInputs(step_logprobs=lp, step_mask=mask)
  cfg = VerifierConfig(name="likelihood")
  assert cfg.resolved_threshold == -1.0
  assert verify(cfg, inputs)[0].tolist() == [[True, False]]
  cfg = VerifierConfig(name="likelihood", threshold=math.log(0.05))
  assert verify(cfg, inputs)[0].tolist() == [[True, True]]


def test_exact_mode():
  draft = jnp.array([[[3, 4, 0], [5, 6, 0]]])
  target = jnp.array([[[3, 4, 9], [5, 7, 0]]])
  mask = jnp.array([[[1, 1, 0], [1, 1, 0]]])
  inputs = VerifierInputs(draft_tokens=draft, target_tokens=target, step_mask=mask)
  accept, n = jax.jit(verify, static_argnums=0)(VerifierConfig(name="exact"), inputs)
  assert accept.tolist() == [[True, False]] and n.tolist() == [1]


def test_verifier_inputs_is_a_pytree_without_the_unused_fields():
  inputs = VerifierInputs(step_logprobs=jnp.zeros((1, 1, 2)), step_mask=jnp.ones((1, 1, 2)))
  assert len(jax.tree.leaves(inputs)) == 2
  doubled = jax.tree.map(lambda x: 2 * x, inputs)
  assert doubled.verdict_logits is None and doubled.step_mask.tolist() == [[[2.0, 2.0]]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="nope"),
     r"unknown verifier 'nope'; known verifiers: \['cpn', 'exact', 'likelihood', 'score'\]"),
    (dict(tau=0.4), r"tau must lie in \(0.5, 1\), got tau=0.4"),
    (dict(min_mass=2.0), r"min_mass must lie in \[0, 1\]"),
    (dict(pos_ids=()), r"pos_ids is empty"),
    (dict(neg_ids=()), r"neg_ids is empty"),
    (dict(pos_ids=(1, 2, 5), neg_ids=(5, 2)), r"overlap on token ids \[2, 5\]"),
    (dict(name="score", score_ids=()), r"score_ids is empty"),
    (dict(name="score", score_ids=(3,)), r"score_ids needs at least 2 score tokens"),
    (dict(name="likelihood", threshold=float("-inf")), r"threshold must be finite"),
])
def test_bad_configs_raise_naming_the_field(kwargs, message):
  args = dict(name="cpn", pos_ids=(1,), neg_ids=(2,))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    VerifierConfig(**args)


def test_missing_inputs_and_ids_outside_the_vocabulary_raise():
  with pytest.raises(ValueError, match=r"'likelihood' needs .*missing: \['step_mask'\]"):
    verify(VerifierConfig(name="likelihood"),
           VerifierInputs(step_logprobs=jnp.zeros((1, 1, 2))))
  cfg = VerifierConfig(pos_ids=(1,), neg_ids=(V,))
  with pytest.raises(ValueError, match=r"neg_ids must lie in \[0, 24\)"):
    verify(cfg, _cpn_inputs())


def test_registering_a_custom_verifier():
  @verifiers.register_verifier("always", requires=("verdict_logits",))
  def _always(cfg, inputs):
    del cfg
    accept = jnp.ones(inputs.verdict_logits.shape[:2], bool)
    return accept, tbvm.leading_accepted(accept)

  try:
    assert verify(VerifierConfig(name="always"), _cpn_inputs())[1].tolist() == [3, 3]
    with pytest.raises(ValueError, match="already registered"):
      verifiers.register_verifier("always", requires=())(_always)
  finally:
    del verifiers.VERIFIERS["always"]
