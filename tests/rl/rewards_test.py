"""SAPO reward terms on hand-made candidates, their weighted sum, ablation and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.rl import rewards
from dream_r_jax.rl.rewards import RewardConfig, RewardInputs


def _pad(rows, width=6):
  tokens = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
  return jnp.asarray(tokens), jnp.asarray(mask)


def test_acceptance_is_the_cpn_with_nan_as_zero():
  inputs = RewardInputs(cpn=jnp.array([0.9, 0.2, jnp.nan]))
  np.testing.assert_allclose(rewards.get_reward("acceptance")(inputs), [0.9, 0.2, 0.0])


def test_faithfulness_is_multiset_token_f1():
  cand, cand_mask = _pad([[1, 2, 3], [1, 1, 2], [4, 5], [7, 7, 7, 7], [], [], [9, 8]])
  tgt, tgt_mask = _pad([[3, 2, 1], [1, 2, 2, 5], [6], [7], [1], [], [8, 9]], width=5)
  # [1,1,2] vs [1,2,2,5]: overlap {1, 2} = 2 -> 2*2 / (3 + 4). [7]*4 vs [7]: overlap 1 -> 2/5.
  want = [1.0, 4 / 7, 0.0, 2 / 5, 0.0, 1.0, 1.0]
  got = rewards.token_f1(cand, cand_mask, tgt, tgt_mask)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  inputs = RewardInputs(cand_tokens=cand, cand_mask=cand_mask, target_tokens=tgt,
                        target_mask=tgt_mask)
  np.testing.assert_allclose(rewards.get_reward("faithfulness")(inputs), want, rtol=1e-6)
  # Order matters to exact_match, not to F1.
  np.testing.assert_array_equal(rewards.get_reward("exact_match")(inputs),
                                [0, 0, 0, 0, 0, 1, 0])


def test_exact_match_reads_valid_tokens_in_order_wherever_they_are():
  a = jnp.array([[5, 0, 6, 0], [5, 6, 0, 0]])
  a_mask = jnp.array([[1, 0, 1, 0], [1, 1, 0, 0]])
  b = jnp.array([[5, 6, 9], [5, 6, 7]])
  b_mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  assert rewards.same_sequence(a, a_mask, b, b_mask).tolist() == [True, False]


def test_concision_penalises_longer_steps_only_when_accepted():
  _, cand_mask = _pad([[1] * 3, [1] * 6, [1] * 6, [1] * 2])
  _, tgt_mask = _pad([[1] * 4, [1] * 4, [1] * 4, []])
  inputs = RewardInputs(cand_mask=cand_mask, target_mask=tgt_mask,
                        accepted=jnp.array([True, True, False, True]))
  # Shorter: 0. Longer by half: 1 - 6/4 = -0.5. Rejected: 0. Empty target counts as 1: -1.
  np.testing.assert_allclose(rewards.get_reward("concision")(inputs), [0.0, -0.5, 0.0, -1.0])


def test_format_penalises_empty_malformed_and_repeated_steps():
  cand, cand_mask = _pad([[1, 2], [], [3], [4, 5], [6, 7], [8]])
  prev, prev_mask = _pad([[9], [9], [9], [9], [6, 7], [8, 0]])
  inputs = RewardInputs(cand_tokens=cand, cand_mask=cand_mask,
                        malformed=jnp.array([0, 0, 1, 0, 0, 0], bool),
                        repeated=jnp.array([0, 0, 0, 1, 0, 0], bool),
                        prev_tokens=prev, prev_mask=prev_mask)
  # Row 4 repeats the previous step's ids; row 5 does not ([8] vs [8, 0]).
  np.testing.assert_array_equal(rewards.get_reward("format")(inputs),
                                [0.0, -1.0, -1.0, -1.0, -1.0, 0.0])
  # Without the optional flags only emptiness counts.
  only_mask = RewardInputs(cand_mask=cand_mask)
  np.testing.assert_array_equal(rewards.get_reward("format")(only_mask),
                                [0.0, -1.0, 0.0, 0.0, 0.0, 0.0])


def _inputs():
  cand, cand_mask = _pad([[1, 2, 3], [1, 2, 3, 4, 5, 6], []])
  tgt, tgt_mask = _pad([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
  return RewardInputs(cpn=jnp.array([0.9, 0.6, 0.1]), accepted=jnp.array([True, True, False]),
                      cand_tokens=cand, cand_mask=cand_mask, target_tokens=tgt,
                      target_mask=tgt_mask)


def test_compute_rewards_weighs_and_ablates_each_term():
  # Per candidate: acceptance .9/.6/.1, faithfulness 1, 2*3/9, 0, concision 0, -1, 0,
  # format 0, 0, -1.
  parts_want = dict(acceptance=[0.9, 0.6, 0.1], faithfulness=[1.0, 2 / 3, 0.0],
                    concision=[0.0, -1.0, 0.0], format=[0.0, 0.0, -1.0])
  cfg = RewardConfig(dict(acceptance=1.0, faithfulness=0.5, concision=0.25, format=2.0))
  total, parts = jax.jit(rewards.compute_rewards, static_argnums=0)(cfg, _inputs())
  for name, want in parts_want.items():
    np.testing.assert_allclose(parts[name], want, rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(total, [0.9 + 0.5, 0.6 + 1 / 3 - 0.25, 0.1 - 2.0], rtol=1e-6)
  ablated, _ = rewards.compute_rewards(cfg.ablate("faithfulness"), _inputs())
  np.testing.assert_allclose(ablated, [0.9, 0.6 - 0.25, 0.1 - 2.0], rtol=1e-6)


def test_combine_skips_zero_weight_terms_even_if_nan():
  cfg = RewardConfig.parse("faithfulness=0,concision=0, format=0")
  assert cfg.weight("acceptance") == 1.0 and cfg.weight("format") == 0.0
  total, parts = rewards.combine_rewards(
      cfg, dict(acceptance=jnp.array([0.5, 1.0]), faithfulness=jnp.array([jnp.nan, 1.0])))
  np.testing.assert_allclose(total, [0.5, 1.0])
  assert set(parts) == {"acceptance", "faithfulness"}


@pytest.mark.parametrize("weights, message", [
    (dict(acceptance=0.0, faithfulness=0.0, concision=0.0, format=0.0),
     r"all reward weights are zero"),
    (dict(acceptance=float("nan")), r"reward weight acceptance=nan is not finite"),
    (dict(acceptance=float("inf")), r"not finite"),
    (dict(format=-1.0), r"reward weight format=-1.0 is negative"),
    (dict(acceptence=1.0), r"unknown reward 'acceptence'; known rewards: \['acceptance'"),
])
def test_bad_weights_raise(weights, message):
  with pytest.raises(ValueError, match=message):
    RewardConfig(weights)


def test_bad_combine_and_parse_inputs_raise():
  cfg = RewardConfig()
  with pytest.raises(ValueError, match=r"\['concision', 'faithfulness', 'format'\] have "
                     r"nonzero weight but are not in parts"):
    rewards.combine_rewards(cfg, dict(acceptance=jnp.zeros(2)))
  only_acc = RewardConfig(dict(acceptance=1.0))
  with pytest.raises(ValueError, match=r"same shape \[N\]"):
    rewards.combine_rewards(only_acc, dict(acceptance=jnp.zeros(2),
                                           faithfulness=jnp.zeros(3)))
  with pytest.raises(ValueError, match=r"'concision' needs RewardInputs fields"):
    rewards.compute_rewards(RewardConfig(dict(concision=1.0)), RewardInputs(cpn=jnp.zeros(2)))
  with pytest.raises(ValueError, match=r"'format=x': 'x' is not a number"):
    RewardConfig.parse("format=x")
  with pytest.raises(ValueError, match=r"not of the form name=value"):
    RewardConfig.parse("format")
