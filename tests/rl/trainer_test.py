"""SAPO iterations: rewards of known candidates, dropped groups, and learning."""
import jax
import numpy as np
import pytest

from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.rl import states as states_lib
from dream_r_jax.rl.rewards import RewardConfig
from dream_r_jax.rl.trainer import Rollout, SapoTrainer, candidate_rewards, choose_groups
from dream_r_jax.sharding import rules as rules_lib
from dream_r_jax.sharding.mesh import make_mesh
from dream_r_jax.testing import sapo as sapo_testing
from dream_r_jax.train import step as step_lib

D, E = 7, 2  # the bundled tokenizer's delimiter ("\n") and EOS ids


def test_rewards_of_known_candidates():
  tok = tok_lib.bundled_tokenizer()
  enc = lambda text: tok.encode(text, add_special_tokens=False)
  state = states_lib.StateSet(prefix=[np.asarray([1])],
                              next_step=[np.asarray(enc("3 + 4 = 7"))],
                              prev_step=[np.asarray(enc("a = 3, b = 4"))],
                              record=np.zeros(1, np.int64), step_index=np.ones(1, np.int32))
  length = 12
  cands = [enc("3 + 4 = 7\n"),                  # the target's step
           enc("\n"),                           # empty
           enc("a = 3, b = 4\n"),               # the previous step again
           enc("4 + 3 = 7 = 7\n"),              # not a step of the task
           enc("4 * 3 * 4 * 3 * 4 * 3 * 4"),    # runs into L without a delimiter
           enc("4 + 3 = 7\n")]                  # the target's step, operands swapped
  tokens, lengths = states_lib.pad_rows([c[:length] for c in cands], length)
  ended = np.asarray([c[:length][-1] == D for c in cands])
  cpn = np.asarray([0.9, 0.2, 0.5, 0.3, 0.4, 0.95], np.float32)
  accept = cpn >= 0.8
  cfg = RewardConfig.parse("acceptance=1,faithfulness=0.5,concision=0.25,format=1")
  total, parts, content, malformed = candidate_rewards(
      cfg, state, len(cands), tokens=tokens, lengths=lengths, ended=ended, cpn=cpn,
      accept=accept, stop_ids=(D, E), decode=tok.decode)
  assert content.sum(axis=1).tolist() == [len(c) - 1 for c in cands[:4]] + [12, 5]
  assert malformed.tolist() == [False, False, False, True, True, False]
  np.testing.assert_array_equal(parts["format"], [0, -1, -1, -1, -1, 0])
  # Token F1: "4 + 3 = 7" shares " +", " =", " 7" with "3 + 4 = 7" but not the digits,
  # whose leading spaces differ ("3" vs " 3"): 2 * 3 / (5 + 5).
  np.testing.assert_allclose(parts["faithfulness"][[0, 1, 5]], [1, 0, 0.6], rtol=1e-6)
  np.testing.assert_allclose(parts["acceptance"], cpn)
  np.testing.assert_array_equal(parts["concision"], 0)  # no accepted step is longer
  want = cpn + 0.5 * parts["faithfulness"] + 0.25 * parts["concision"] + parts["format"]
  np.testing.assert_allclose(total, want, rtol=1e-6)


@pytest.fixture(scope="module")
def world():
  return sapo_testing.toy_world()


def _trainer(world, **kw):
  scfg = world.scfg.replace(**kw).validate(8)
  mesh = make_mesh((8, 1), ("data", "model"))
  trainer = SapoTrainer(world.draft, world.target, world.tokenizer, scfg, mesh=mesh,
                        prefix_width=world.prefix_width)
  tx = step_lib.optimizer(scfg.optim)
  abstract = step_lib.abstract_state(lambda: world.draft, tx)
  shardings = step_lib.state_shardings(abstract, mesh, rules_lib.DEFAULT_RULES)
  return trainer, tx, shardings, trainer.init_state(tx, shardings)


def _mean_reward(trainer, params, states):
  roll, _, _ = trainer.rollout(params, states, jax.random.key(1234))
  return float(np.mean(roll.rewards))


def test_sapo_iterations_raise_the_mean_reward(world):
  states = world.states
  trainer, tx, shardings, state = _trainer(world, iterations=60)
  before = _mean_reward(trainer, state["params"], states)
  for it in range(60):
    state, m = trainer.iteration(state, states, jax.random.fold_in(jax.random.key(0), it),
                                 tx=tx, state_sharding=shardings)
  after = _mean_reward(trainer, state["params"], states)
  assert after > before + 0.08, (before, after)
  assert m["update/kl"] > 0 and int(state["step"]) == 60
  # The frozen reference survived 60 donated updates untouched.
  ref = jax.tree.leaves(trainer.ref_params)[0]
  assert np.isfinite(np.asarray(ref)).all()


def test_groups_without_signal_are_dropped(world):
  # A random draft writes no well-formed step: every candidate gets format -1, every
  # group is flat, and no update happens.
  trainer, tx, shardings, state = _trainer(
      world, iterations=1, rewards="acceptance=0,faithfulness=0,concision=0,format=1")
  before = jax.tree.map(np.asarray, state["params"])
  state, m = trainer.iteration(state, world.states, jax.random.key(0), tx=tx,
                               state_sharding=shardings)
  assert m["rollout/signal_fraction"] == 0.0 and "update/loss" not in m
  assert m["rollout/reward_format"] == -1.0
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, state["params"]))
  assert int(state["step"]) == 0



def test_choose_groups_takes_groups_with_signal_first():
  signal = np.asarray([False, True, False, True, True, False])
  assert choose_groups(signal, 2).tolist() == [1, 3]
  # Fewer groups with signal than asked: the first ones without fill up, in order.
  assert choose_groups(signal, 4).tolist() == [0, 1, 3, 4]
  assert choose_groups(signal, 6).tolist() == list(range(6))
  assert choose_groups(signal, 9).tolist() == list(range(6))


def _roll(rewards, accept):
  n = len(rewards)
  zeros = np.zeros((n, 2))
  return Rollout(tokens=zeros, lengths=np.ones(n, int), logp_old=zeros, content=zeros > 0,
                 cpn=np.asarray(rewards), accept=np.asarray(accept, bool),
                 rewards=np.asarray(rewards, np.float32), parts={}, malformed=np.zeros(n, bool))


def test_acceptance_signal_drops_groups_the_target_judges_alike(world):
  rewards = [0.9, 0.8, 0.3, 0.2, 0.5, 0.5, 0.9, 0.1]
  accept = [1, 1, 1, 0, 1, 1, 0, 0]
  by_reward, _, _, _ = _trainer(world, group_size=2)
  by_accept, _, _, _ = _trainer(world, group_size=2, signal="acceptance")
  assert by_reward.group_signal(_roll(rewards, accept)).tolist() == [True, True, False, True]
  assert by_accept.group_signal(_roll(rewards, accept)).tolist() == [False, True, False,
                                                                     False]


def test_oversampled_rollout_updates_on_the_groups_with_signal(world, monkeypatch):
  # 16 states rolled out, 8 groups to the update, and only the last 8 carry signal: an
  # update that took the first 8 groups (or all 16) would see no signal (or half).
  trainer, tx, shardings, state = _trainer(world, iterations=2, rollout_states=16)
  pool = world.states.take(list(range(len(world.states))) * 2)
  signal = np.arange(len(pool)) >= 8
  monkeypatch.setattr(trainer, "group_signal", lambda roll: signal)
  state, m = trainer.iteration(state, pool, jax.random.key(3), tx=tx,
                               state_sharding=shardings)
  assert m["rollout/signal_fraction"] == 0.5 and m["update/signal_fraction"] == 1.0
  assert int(state["step"]) == 1 and np.isfinite(m["update/loss"]) and m["update/loss"] != 0


def test_heldout_metrics_split_acceptance_by_step(world):
  trainer, _, _, state = _trainer(world)
  m = trainer.evaluate(state["params"], world.states, chunk=8)
  steps = world.states.step_index
  per_step = {int(j): m[f"heldout/acceptance_step{int(j)}"] for j in np.unique(steps)}
  assert len([k for k in m if k.startswith("heldout/acceptance_step")]) == len(per_step)
  weighted = sum(per_step[int(j)] for j in steps) / len(steps)
  np.testing.assert_allclose(weighted, m["heldout/acceptance"], rtol=1e-6)
  roll, _, _ = trainer.rollout(state["params"], world.states, jax.random.key(0), group=1,
                               greedy=True)
  want = np.mean(roll.accept & (roll.parts["exact_match"] < 1))
  assert m["heldout/false_accept"] == pytest.approx(want)
