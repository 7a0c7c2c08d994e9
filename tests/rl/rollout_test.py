"""SAPO states and rollout programs against direct recomputations with full forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.decoding.generate import generate
from dream_r_jax.models import image_processing, mrope
from dream_r_jax.rl import rollout as rollout_lib
from dream_r_jax.rl import states as states_lib
from dream_r_jax.speculative import tbvm
from dream_r_jax.testing import sapo as sapo_testing
from dream_r_jax.train import distill

G, L = 8, 8  # the toy world's group size and step length
D, E = 7, 2  # the bundled tokenizer's delimiter ("\n") and EOS ids


def test_cut_states_splits_complete_steps():
  prompts = [np.asarray([1, 50, 51]), np.asarray([1, 60])]
  outputs = [np.asarray([10, 11, D, D, 12, D, 13, E, 14, D]),  # empty step, unfinished step
             np.asarray([20, D, 21, 22, 23])]                 # cut by the token budget
  s = states_lib.cut_states(prompts, outputs, [5, 9], delimiter_ids=(D,), eos_ids=(E,),
                            max_step_tokens=3)
  assert [p.tolist() for p in s.prefix] == [[1, 50, 51], [1, 50, 51, 10, 11, D, D],
                                            [1, 60]]
  assert [x.tolist() for x in s.next_step] == [[10, 11], [12], [20]]
  # The empty step gives no state but is the previous step of the next one.
  assert [x.tolist() for x in s.prev_step] == [[], [], []]
  assert s.record.tolist() == [5, 5, 9] and s.step_index.tolist() == [0, 2, 0]
  # max_step_tokens=2: a 2-token step cannot be written with its delimiter in 2 tokens.
  short = states_lib.cut_states(prompts, outputs, [5, 9], delimiter_ids=(D,), eos_ids=(E,),
                                max_step_tokens=2)
  assert [x.tolist() for x in short.next_step] == [[12], [20]]


def test_states_from_stored_rows_and_heldout_split():
  tok = tok_lib.bundled_tokenizer()
  examples = [task_lib.example_at(task_lib.get_config("text"), 3, i) for i in range(5)]
  prompts, outputs, records = states_lib.reference_trajectories(tok, examples, [7, 8, 9, 10,
                                                                               11])
  gens = type("Gens", (), dict(prompts=prompts, outputs=outputs,
                               hit_eos=np.ones(5, bool)))
  rows = distill.build_rows(gens, records, max_len=96)
  back = states_lib.trajectories_from_rows(rows)
  for a, b in zip(back, (prompts, outputs, records)):
    assert [np.asarray(x).tolist() for x in a] == [np.asarray(x).tolist() for x in b]
  s = states_lib.cut_states(*back, delimiter_ids=(D,), eos_ids=(E,))
  # One state per reference step, whose text is the step.
  assert len(s) == sum(len(e["steps"]) for e in examples)
  assert tok.decode(s.next_step[1]) == examples[0]["steps"][1]
  assert tok.decode(s.prev_step[1]) == examples[0]["steps"][0]
  train, held = states_lib.split_heldout(s, 6)
  assert len(held) == 6 and not set(train.record) & set(held.record)
  assert set(held.record) == {10, 11}  # whole prompts, from the end


def _world(image: bool):
  """A random draft and target, states, host inputs for both (text: the toy world)."""
  tok = tok_lib.bundled_tokenizer()
  if image:
    examples = [task_lib.example_at(task_lib.get_config("default"), 11, i) for i in range(2)]
    s = states_lib.cut_states(*states_lib.reference_trajectories(tok, examples),
                              delimiter_ids=(D,), eos_ids=(E,)).take([0, 1, 4, 5])
    draft = sapo_testing.random_preset_model("smoke_vl_draft", 1)
    target = sapo_testing.random_preset_model("smoke_vl_target", 2, std=0.2)
    images = [examples[r]["image"] for r in s.record]
  else:
    world = sapo_testing.toy_world()
    s, draft, target, images = world.states, world.draft, world.target, [None] * 8
  ids, lens = states_lib.pad_rows(s.prefix, -(-s.max_prefix_len // 16) * 16)
  rc = rollout_lib.RolloutConfig.for_tokenizer(tok, max_step_tokens=L, temperature=1.0)
  d_in, grid = rollout_lib.prefix_inputs(draft.cfg, ids, lens, images)
  t_in, _ = rollout_lib.prefix_inputs(target.cfg, ids, lens, images)
  return dict(tok=tok, states=s, images=images, draft=draft, target=target, rc=rc,
              d_in=d_in, t_in=t_in, grid=grid)


def _split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


@pytest.fixture(scope="module")
def world():
  return _world(image=False)


@pytest.fixture(scope="module", params=["text", "image"])
def any_world(request, world):
  return world if request.param == "text" else _world(image=True)


def _full_logits(model, rows, images):
  """Per row, the logits of a full causal forward (no cache) over the unpadded sequence.

  The rows are right-padded into one batch: padding after a row's tokens cannot change
  its logits under the causal mask.
  """
  ids, lens = states_lib.pad_rows(rows, max(len(r) for r in rows))
  graphdef, state = nnx.split(model)
  positions = pixels = grid = None
  if images[0] is not None:
    pixels, grid = image_processing.preprocess_images(list(images))
    mask = (np.arange(ids.shape[1])[None] < lens[:, None]).astype(np.int32)
    positions, _ = mrope.get_rope_index(model.cfg, ids, grid, mask)
    grid = tuple(tuple(int(v) for v in g) for g in grid)
  logits = np.asarray(_forward(graphdef, state, ids, positions, pixels, grid))
  return [logits[i, :n] for i, n in enumerate(lens)]


@jax.jit(static_argnames=("graphdef", "grid"))
def _forward(graphdef, state, ids, positions, pixels, grid):
  model = nnx.merge(graphdef, state)
  return model(ids, positions=positions, pixel_values=pixels,
               image_grid_thw=None if grid is None else np.asarray(grid))


def _repeat(items, k):
  return [x for x in items for _ in range(k)]


def _sample(world, rng=0, rc=None, group=G):
  draft = world["draft"]
  graphdef, state = _split(draft)
  out = rollout_lib.sample_candidates(graphdef, state, world["d_in"], jax.random.key(rng),
                                      rc=rc or world["rc"], group=group, grid=world["grid"])
  return jax.device_get(out)


def test_candidates_stay_inside_their_mask_and_logp_old_is_recomputed(any_world):
  world = any_world
  rc, s = world["rc"], world["states"]
  out = _sample(world)
  n = len(s) * G
  assert out["tokens"].shape == (n, L) and out["logp"].shape == (n, L)
  stops = np.isin(out["tokens"], rc.delimiter_ids + rc.eos_ids)
  inside = np.arange(L)[None] < out["lengths"][:, None]
  assert np.all((out["lengths"] >= 1) & (out["lengths"] <= L))
  assert np.all(out["tokens"][~inside] == rc.pad_id) and np.all(out["logp"][~inside] == 0)
  # A step ends at its first stop token, or runs into L without one.
  assert np.all(np.sum(stops & inside, axis=1) == out["ended"])
  last = out["tokens"][np.arange(n), out["lengths"] - 1]
  assert np.all(np.isin(last, rc.delimiter_ids + rc.eos_ids) == out["ended"])
  assert np.all(out["ended"] | (out["lengths"] == L))
  assert len({tuple(t) for t in out["tokens"]}) > len(s)  # a group is not one step G times

  # logp_old: the log-prob of each sampled token under the draft, token by token from a
  # full forward over prefix + candidate.
  # A random draft may sample an image placeholder, which a full forward would take for
  # an image; such rows are left out of the comparison.
  image_id = world["draft"].cfg.image_token_id
  check = [i for i in range(n) if image_id is None or image_id not in out["tokens"][i]]
  assert len(check) >= n // 2
  rows = [np.concatenate([s.prefix[i // G], out["tokens"][i, :out["lengths"][i]]])
          for i in check]
  logits = _full_logits(world["draft"], rows, [_repeat(world["images"], G)[i] for i in check])
  for r, i in enumerate(check):
    p, k = len(s.prefix[i // G]), out["lengths"][i]
    want = jax.nn.log_softmax(logits[r][p - 1:p - 1 + k], axis=-1)
    want = np.take_along_axis(np.asarray(want), out["tokens"][i, :k, None], axis=1)[:, 0]
    np.testing.assert_allclose(out["logp"][i, :k], want, atol=2e-5)
  # The teacher-forced path (reference and update) agrees with the sampling-time values.
  graphdef, state = _split(world["draft"])
  again = rollout_lib.reference_logprobs(graphdef, state, world["d_in"], out["tokens"],
                                         out["lengths"], rc=rc, group=G, grid=world["grid"])
  np.testing.assert_allclose(np.asarray(again), out["logp"], atol=2e-5)


def test_greedy_candidates_are_the_drafts_greedy_step(world):
  rc = world["rc"]
  greedy = _sample(world, rc=rollout_lib.RolloutConfig(**{**vars(rc), "temperature": 0.0}),
                   group=2)
  ids, lens = world["d_in"]["prefix_ids"], world["d_in"]["prefix_lens"]
  ref = generate(world["draft"], ids, lens, max_new_tokens=L, eos_ids=rc.eos_ids,
                 stop_ids=rc.delimiter_ids, max_stops=1, max_step_tokens=L,
                 pad_id=rc.pad_id)
  want, want_len = jax.device_get((ref.tokens, ref.lengths))
  np.testing.assert_array_equal(greedy["lengths"], np.repeat(want_len, 2))
  np.testing.assert_array_equal(greedy["tokens"], np.repeat(want[:, :L], 2, axis=0))


def test_greedy_candidates_lead_each_group_and_the_rest_are_sampled(world):
  rc = world["rc"]
  greedy = _sample(world, rc=rollout_lib.RolloutConfig(**{**vars(rc), "temperature": 0.0}),
                   group=1)
  mixed = _sample(world, rc=rollout_lib.RolloutConfig(**{**vars(rc), "temperature": 3.0,
                                                          "greedy_candidates": 1}), group=G)
  first = np.arange(len(mixed["lengths"])) % G == 0
  np.testing.assert_array_equal(mixed["tokens"][first], greedy["tokens"])
  np.testing.assert_array_equal(mixed["lengths"][first], greedy["lengths"])
  # The other candidates are samples: at temperature 3 they are not all the greedy step.
  rest = mixed["tokens"][~first].reshape(len(greedy["tokens"]), G - 1, -1)
  assert np.any(rest != greedy["tokens"][:, None])
  with pytest.raises(ValueError, match="greedy_candidates"):
    rollout_lib.RolloutConfig(**{**vars(rc), "greedy_candidates": -1})


def test_scores_are_the_targets_verdict_on_prefix_candidate_template(world):
  rc, s = world["rc"], world["states"]
  out = _sample(world, rng=3)
  graphdef, state = nnx.split(world["target"])  # the trainer passes the target's State
  got = jax.device_get(rollout_lib.score_candidates(
      graphdef, state, world["t_in"], out["tokens"], out["lengths"], rc=rc, group=G,
      grid=world["grid"]))
  n = len(s) * G
  rows = [np.concatenate([s.prefix[i // G], out["tokens"][i, :out["lengths"][i]],
                          rc.template_ids]) for i in range(n)]
  logits = _full_logits(world["target"], rows, _repeat(world["images"], G))
  verdict = np.stack([lg[-1] for lg in logits])
  stats = tbvm.verdict_stats(verdict, rc.pos_ids, rc.neg_ids)
  np.testing.assert_allclose(got["cpn"], stats.cpn, atol=1e-5)
  np.testing.assert_allclose(got["mass"], stats.mass, rtol=1e-4)
  accept, _ = tbvm.cpn_accept(verdict[:, None], rc.pos_ids, rc.neg_ids, rc.tau, rc.min_mass)
  np.testing.assert_array_equal(got["accept"], np.asarray(accept)[:, 0])
  assert np.ptp(got["cpn"]) > 0.05  # candidates are told apart


def test_likelihood_judge_is_the_targets_mean_logprob_of_the_candidate(world):
  rc, s = world["rc"], world["states"]
  out = _sample(world, rng=4)
  graphdef, state = nnx.split(world["target"])
  lrc = rollout_lib.RolloutConfig(**{**vars(rc), "judge": "likelihood",
                                     "likelihood_threshold": -4.0})
  got = jax.device_get(rollout_lib.score_candidates(
      graphdef, state, world["t_in"], out["tokens"], out["lengths"], rc=lrc, group=G,
      grid=world["grid"]))
  n = len(s) * G
  rows = [np.concatenate([s.prefix[i // G], out["tokens"][i, :out["lengths"][i]]])
          for i in range(n)]
  logits = _full_logits(world["target"], rows, _repeat(world["images"], G))
  means = []
  for i in range(n):
    p, k = len(s.prefix[i // G]), out["lengths"][i]
    logp = np.asarray(jax.nn.log_softmax(logits[i][p - 1:p - 1 + k], axis=-1))
    means.append(np.take_along_axis(logp, out["tokens"][i, :k, None], axis=1).mean())
  means = np.asarray(means)
  np.testing.assert_allclose(got["cpn"], np.exp(means), rtol=1e-4)
  np.testing.assert_array_equal(got["accept"], means >= -4.0)
  assert 0 < got["accept"].sum() < n or np.ptp(means) > 0.05
  with pytest.raises(ValueError, match="judge"):
    rollout_lib.RolloutConfig(delimiter_ids=(1,), judge="oracle")
  with pytest.raises(ValueError, match="likelihood_threshold"):
    rollout_lib.RolloutConfig(delimiter_ids=(1,), judge="likelihood",
                              likelihood_threshold=0.5)


def test_verdict_inputs_put_the_template_right_after_each_candidate():
  tokens = jnp.asarray([[5, 6, 7, 0], [8, 0, 0, 0]])
  ids, n = rollout_lib.verdict_inputs(tokens, jnp.asarray([3, 1]), (90, 91), pad_id=0)
  assert np.asarray(ids).tolist() == [[5, 6, 7, 90, 91, 0], [8, 90, 91, 0, 0, 0]]
  assert np.asarray(n).tolist() == [5, 3]
