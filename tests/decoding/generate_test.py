"""Jitted `generate` / `decode_loop` against a naive loop of full forwards.

The naive reference recomputes the whole sequence every token and takes the argmax, so it
shares nothing with the cache, the while loop or the stopping logic under test. Stop rules
are checked against `reference_stops`, a plain-Python reading of `StopConfig`'s documented
semantics applied to the unconstrained greedy tokens.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dream_r_jax.decoding import generate as gen
from dream_r_jax.decoding.sampling import SamplingConfig
from dream_r_jax.models import KVCache
from dream_r_jax.testing.models import TEXT_MODEL_TYPES, Jitted, random_ids, tiny_model

PROMPT_LENS = np.array([5, 9, 3])
MAX_NEW = 12
REF_LEN = 24  # >= 9 + MAX_NEW
PAD = 0


def prompts(vocab_size):
  ids = random_ids(11, (3, 9), vocab_size)
  ids[np.arange(9)[None] >= PROMPT_LENS[:, None]] = PAD
  return ids


def naive_greedy(model, ids, n):
  """n argmax tokens of one prompt [T], one full (cache-free) forward per token."""
  fwd = Jitted(model)
  seq = list(ids)
  for _ in range(n):
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, :len(seq)] = seq
    logits = np.asarray(fwd(padded))[0, len(seq) - 1]
    seq.append(int(np.argmax(logits)))
  return np.asarray(seq[len(ids):])


def reference_stops(tokens, *, eos=(), stop_ids=(), max_stops=0, max_step_tokens=0,
                    budget=MAX_NEW):
  """(length, step lengths, hit_eos) that StopConfig prescribes for an unconstrained row."""
  steps, n = [0], 0
  for tok in tokens[:budget]:
    n += 1
    steps[-1] += 1
    if tok in eos:
      return n, steps, True
    if tok in stop_ids or (max_step_tokens and steps[-1] >= max_step_tokens):
      if max_stops and len(steps) == max_stops:
        return n, steps, False
      steps.append(0)
  return n, steps, False


@pytest.fixture(scope="module")
def setup():
  """A llama-family model (its greedy rows are varied, not one repeated token)."""
  model = tiny_model("llama", seed=1)
  ids = prompts(model.cfg.vocab_size)
  free = gen.generate(model, ids, PROMPT_LENS, max_new_tokens=MAX_NEW)
  tokens = np.asarray(free.tokens)
  # The fixture's premise: rows differ and are not degenerate, so stops land mid-row.
  assert all(len(set(row)) >= 6 for row in tokens.tolist())
  return model, ids, tokens


def check_against(out, tokens, expected):
  lengths = np.asarray(out.lengths)
  step_lens = np.asarray(out.step_lens)
  for row, (n, steps, eos) in enumerate(expected):
    assert lengths[row] == n, (row, lengths, expected)
    np.testing.assert_array_equal(np.asarray(out.tokens)[row, :n], tokens[row, :n])
    np.testing.assert_array_equal(np.asarray(out.tokens)[row, n:], PAD)
    got_steps = step_lens[row].tolist()
    want_steps = steps + [0] * (len(got_steps) - len(steps))
    assert got_steps == want_steps, (row, step_lens, expected)
    assert bool(out.hit_eos[row]) == eos
  np.testing.assert_array_equal(step_lens.sum(-1), lengths)
  # The returned cache holds the prompt and every generated token.
  np.testing.assert_array_equal(np.asarray(out.cache.lengths), PROMPT_LENS + lengths)


@pytest.mark.parametrize("model_type", TEXT_MODEL_TYPES)
def test_greedy_generate_equals_naive_full_forward_loop(model_type):
  model = tiny_model(model_type, seed=3)
  ids = prompts(model.cfg.vocab_size)
  out = gen.generate(model, ids, PROMPT_LENS, max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(np.asarray(out.lengths), [MAX_NEW] * 3)
  assert int(out.forward_passes) == MAX_NEW
  for row in range(3):
    want = naive_greedy(model, ids[row, :PROMPT_LENS[row]], MAX_NEW)
    np.testing.assert_array_equal(np.asarray(out.tokens[row]), want)


def test_eos_stops_a_row(setup):
  model, ids, tokens = setup
  # EOS := the token row 0 produces at step k, the first step whose token is new in the row.
  k = next(i for i in range(3, MAX_NEW) if tokens[0, i] not in tokens[0, :i])
  eos = int(tokens[0, k])
  out = gen.generate(model, ids, PROMPT_LENS, max_new_tokens=MAX_NEW, eos_ids=[eos])
  expected = [reference_stops(t, eos=(eos,)) for t in tokens.tolist()]
  assert expected[0][0] == k + 1 and expected[0][2]
  check_against(out, tokens, expected)


def test_two_delimiters_stop_a_row(setup):
  model, ids, tokens = setup
  # The delimiter: a token some row produces at least twice, and not at its last step.
  counts = [(row.count(t), t) for row in tokens[:, :-1].tolist() for t in set(row)]
  delim = max(counts)[1]
  assert max(counts)[0] >= 2
  out = gen.generate(model, ids, PROMPT_LENS, max_new_tokens=MAX_NEW, stop_ids=[delim],
                     max_stops=2)
  expected = [reference_stops(t, stop_ids=(delim,), max_stops=2) for t in tokens.tolist()]
  assert any(n < MAX_NEW for n, _, _ in expected)  # the delimiters really stop something
  check_against(out, tokens, expected)


def test_max_step_tokens_ends_steps(setup):
  model, ids, tokens = setup
  delim = int(tokens[1, 1])  # ends row 1's first step after 2 tokens
  out = gen.generate(model, ids, PROMPT_LENS, max_new_tokens=MAX_NEW, stop_ids=[delim],
                     max_stops=3, max_step_tokens=4)
  expected = [reference_stops(t, stop_ids=(delim,), max_stops=3, max_step_tokens=4)
              for t in tokens.tolist()]
  # Rows without the delimiter end 3 forced steps of 4 tokens each.
  assert any(s == [4, 4, 4] for _, s, _ in expected)
  assert expected[1][1][0] == 2
  check_against(out, tokens, expected)


def test_step_lens_without_stops_count_all_tokens(setup):
  model, ids, tokens = setup
  out = gen.generate(model, ids, PROMPT_LENS, max_new_tokens=MAX_NEW, max_step_tokens=5)
  # max_stops=0: steps never stop decoding, so every token is counted (in the one column).
  check_against(out, tokens, [(MAX_NEW, [MAX_NEW], False)] * 3)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "max_new"))
def _prefill_and_decode(graphdef, state, ids, lens, budget, *, cfg, max_new):
  cache = KVCache.init(cfg, ids.shape[0], ids.shape[1] + max_new)
  last, cache = gen.prefill(graphdef, state, cache, ids, lens)
  return gen.decode_loop(graphdef, state, cache, last, jax.random.key(0),
                         jnp.ones((ids.shape[0],), bool), max_new=max_new,
                         stop=gen.StopConfig(), sampling=SamplingConfig(), budget=budget,
                         pad_id=PAD)


def test_per_row_budget(setup):
  model, ids, tokens = setup
  budget = np.array([2, 7, 0])
  graphdef, state = nnx.split(model)
  out = _prefill_and_decode(graphdef, state, jnp.asarray(ids), jnp.asarray(PROMPT_LENS),
                            jnp.asarray(budget), cfg=model.cfg, max_new=MAX_NEW)
  check_against(out, tokens, [reference_stops(t, budget=b)
                              for t, b in zip(tokens.tolist(), budget)])
  # The loop ends once the largest budget is spent, not after max_new passes.
  assert int(out.forward_passes) == 7
  # last_logits continue each row exactly where it stopped (a budget-0 row: its prompt).
  fwd = Jitted(model)
  for row in range(3):
    seq = np.concatenate([ids[row, :PROMPT_LENS[row]], tokens[row, :budget[row]]])
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, :len(seq)] = seq
    want = np.asarray(fwd(padded))[0, len(seq) - 1]
    np.testing.assert_allclose(np.asarray(out.last_logits[row]), want, atol=1e-5, rtol=0)


def test_bad_generate_arguments_raise_before_compute(setup):
  model, ids, _ = setup
  with pytest.raises(ValueError, match=r"prompt_lens=\[5, 10, 3\]"):
    gen.generate(model, ids, [5, 10, 3], max_new_tokens=4)
  with pytest.raises(ValueError, match=r"prompt_lens=\[0, 9, 3\]"):
    gen.generate(model, ids, [0, 9, 3], max_new_tokens=4)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    gen.generate(model, ids, PROMPT_LENS, max_new_tokens=0)


def test_generator_reuses_one_split_and_equals_generate(setup):
  model, ids, tokens = setup
  g = gen.Generator(model)
  for _ in range(2):  # the second call reuses the compiled program
    out = g(ids, PROMPT_LENS, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(np.asarray(out.tokens), tokens)
  assert len(g._fns) == 1  # pylint: disable=protected-access
  graphdef, state = nnx.split(model)
  from_split = gen.Generator(split=(model.cfg, graphdef, state))
  np.testing.assert_array_equal(
      np.asarray(from_split(ids, PROMPT_LENS, max_new_tokens=MAX_NEW).tokens), tokens)
  with pytest.raises(ValueError, match="exactly one of model= or split="):
    gen.Generator()
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    g(ids, PROMPT_LENS, max_new_tokens=0)
