"""SpecReason-style step speculation, and the baseline registry's common runner signature."""
import jax
import numpy as np
import pytest
from flax import nnx

from dream_r_jax.decoding.generate import generate
from dream_r_jax.decoding.sampling import SamplingConfig
from dream_r_jax.sharding import mesh as mesh_lib
from dream_r_jax.speculative import baselines
from dream_r_jax.speculative import specreason
from dream_r_jax.speculative import tbvm
from dream_r_jax.speculative.engine import RoleModel
from dream_r_jax.speculative.programs import RoundConfig
from dream_r_jax.speculative.verifiers import VerifierConfig
from dream_r_jax.testing.models import Jitted, tiny_model

V = 32
IDS = np.random.default_rng(0).integers(3, V, (3, 6)).astype(np.int32)
LENS = np.array([6, 3, 5], np.int32)
EOS, DELIM, TEMPLATE, SCORES = 1, 5, (7, 8), tuple(range(20, 30))
VERDICT_TEMPLATE, YES, NO = (9,), 11, 10
L, N = 4, 15  # max_step_tokens, token budget


def _model(noise=0.0):
  """The target, or with `noise` the draft: the target with every weight perturbed, so its
  greedy steps differ from the target's. The final norm is scaled up (sharper logits) so
  that the target's expected scores spread enough for a threshold to split them."""
  model = tiny_model("qwen2", seed=1, vocab_size=V)
  rs = np.random.default_rng(99)

  def one(path, x):
    x = np.asarray(x)
    x = x + noise * x.std() * rs.standard_normal(x.shape).astype(x.dtype)
    return x * 6.0 if str(getattr(path[0], "key", path[0])) == "final_norm" else x

  nnx.update(model, jax.tree_util.tree_map_with_path(one, nnx.state(model, nnx.Param)))
  return model


def _greedy(model):
  out = generate(model, IDS, LENS, max_new_tokens=N, eos_ids=(EOS,))
  return [list(map(int, np.asarray(out.tokens[i, :out.lengths[i]]))) for i in range(3)]


@pytest.fixture(scope="module")
def setup():
  meshes = mesh_lib.role_meshes(1, 1)
  draft = RoleModel(_model(noise=0.3), meshes[mesh_lib.Role.DRAFT])
  target = RoleModel(_model(), meshes[mesh_lib.Role.TARGET])
  refs = dict(target=_greedy(_model()), draft=_greedy(_model(noise=0.3)))
  assert refs["target"] != refs["draft"]
  return draft, target, refs


def _run(setup, threshold, **kw):
  draft, target, _ = setup
  return baselines.run_method(
      "specreason", draft=draft, target=target, prompt_ids=IDS, prompt_lens=LENS,
      max_new_tokens=N, eos_ids=(EOS,), max_step_tokens=L, delimiter_ids=(DELIM,),
      template_ids=TEMPLATE, score_ids=SCORES, score_threshold=threshold, **kw)


def test_nothing_accepted_equals_target_greedy(setup):
  out = _run(setup, threshold=10.0)  # expected scores lie in [0, 9]
  assert out.tokens == setup[2]["target"]
  for s, ref in zip(out.stats, out.tokens):
    assert s["unit"] == "step" and s["accepted"] == 0 and s["drafted"] == s["rounds"] > 0
    assert s["target_tokens"] == len(ref) and s["draft_tokens"] == 0


def test_everything_accepted_equals_draft_greedy(setup):
  out = _run(setup, threshold=0.0)
  assert out.tokens == setup[2]["draft"]
  for s, ref in zip(out.stats, out.tokens):
    assert s["accepted"] == s["drafted"] == s["rounds"] >= -(-len(ref) // L)
    assert s["draft_tokens"] == len(ref) and s["target_tokens"] == 0
    # One scoring pass per step; the draft feeds each of its tokens once (plus prefills).
    assert s["target_forward_passes"] == 1 + s["rounds"]
    assert s["draft_forward_passes"] == 1 + len(ref)


def _expected_score(z):
  return float(tbvm.expected_scores(z, SCORES))


def _reference_specreason(draft_model, target_model, threshold, template=TEMPLATE,
                          judge=_expected_score):
  """SpecReason written plainly: full forwards, one row at a time, no caches."""
  width = 32
  draft_fwd, target_fwd = Jitted(draft_model), Jitted(target_model)

  def next_logits(fwd, seq):
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(seq)] = seq  # causal: right padding does not change position len-1
    return np.asarray(fwd(ids)[0, len(seq) - 1])

  def greedy_step(fwd, seq, budget):
    step = []
    while True:
      step.append(int(np.argmax(next_logits(fwd, seq + step))))
      if step[-1] in (DELIM, EOS) or len(step) in (L, budget):
        return step

  outs, scores = [], []
  for row, n in zip(IDS, LENS):
    prompt, out = list(row[:n]), []
    while len(out) < N and EOS not in out:
      step = greedy_step(draft_fwd, prompt + out, N - len(out))
      scores.append(judge(next_logits(target_fwd, prompt + out + step + list(template))))
      if scores[-1] < threshold:
        step = greedy_step(target_fwd, prompt + out, N - len(out))
      out += step
    outs.append(out)
  return outs, np.asarray(scores)


def test_mixed_verdicts_match_a_plain_reference(setup):
  threshold = 5.35  # amid this pair's expected scores (5.2 .. 5.4): some pass, some fail
  ref, scores = _reference_specreason(_model(noise=0.3), _model(), threshold)
  assert np.any(scores >= threshold) and np.any(scores < threshold)
  assert np.min(np.abs(scores - threshold)) > 1e-3  # no verdict rests on rounding
  out = _run(setup, threshold=threshold)
  assert out.tokens == ref
  assert [s["drafted"] for s in out.stats] == [s["rounds"] for s in out.stats]
  assert sum(s["accepted"] for s in out.stats) == int(np.sum(scores >= threshold))
  for s, toks in zip(out.stats, out.tokens):
    assert 0 <= s["accepted"] <= s["drafted"]
    assert s["draft_tokens"] + s["target_tokens"] == len(toks)


def test_verdict_judge_reads_yes_no_as_a_score(setup):
  """With no score tokens, the run's cpn verdict (yes/no) is the judge: score = 9 * CPN."""
  draft, target, _ = setup
  threshold = 5.4  # amid this pair's 9 * CPN values (4.7 .. 5.8)
  ref, scores = _reference_specreason(
      _model(noise=0.3), _model(), threshold, template=VERDICT_TEMPLATE,
      judge=lambda z: float(9 / (1 + np.exp(z[NO] - z[YES]))))
  assert np.any(scores >= threshold) and np.any(scores < threshold)
  assert np.min(np.abs(scores - threshold)) > 1e-3
  out = baselines.run_method("specreason", draft=draft, target=target, prompt_ids=IDS,
                             prompt_lens=LENS, max_new_tokens=N, rc=_engine_rc(),
                             score_threshold=threshold)
  assert out.tokens == ref
  assert sum(s["accepted"] for s in out.stats) == int(np.sum(scores >= threshold))
  with pytest.raises(ValueError, match="4.5, 9"):
    baselines.run_method("specreason", draft=draft, target=target, prompt_ids=IDS,
                         prompt_lens=LENS, max_new_tokens=N, rc=_engine_rc(),
                         score_threshold=9.5)


def _engine_rc():
  """The speculative engine's round config of a run (K = 3, cpn yes/no verdicts)."""
  return RoundConfig(num_steps=3, max_step_tokens=L, delimiter_ids=(DELIM,), eos_ids=(EOS,),
                     template_ids=VERDICT_TEMPLATE,
                     verifier=VerifierConfig(pos_ids=(YES,), neg_ids=(NO,), min_mass=0.0))


def test_registry_runs_every_method_with_common_stats(setup):
  draft, target, refs = setup
  common = dict(draft=draft, target=target, prompt_ids=IDS, prompt_lens=LENS,
                max_new_tokens=N, eos_ids=(EOS,))
  assert set(baselines.METHODS) >= {"target", "token_sd", "specreason"}
  # The engine's round config supplies EOS, delimiter and step length to the baselines.
  from_rc = dict(common, eos_ids=None, rc=_engine_rc())
  outs = {"target": baselines.run_method("target", **common),
          "token_sd": baselines.run_method("token_sd", gamma=2, **from_rc),
          "specreason": baselines.run_method("specreason", template_ids=TEMPLATE,
                                             score_ids=SCORES, score_threshold=10.0,
                                             **from_rc)}
  for name, out in outs.items():
    assert out.tokens == refs["target"], name  # all three are lossless here
    assert out.wall_s > 0
    for s, toks in zip(out.stats, out.tokens):
      assert set(s) == set(baselines.STAT_KEYS), name
      assert s["tokens"] == len(toks) == s["draft_tokens"] + s["target_tokens"], name
      assert s["accepted"] <= s["drafted"], name
  target_stats = outs["target"].stats
  assert [s["target_forward_passes"] for s in target_stats] == [1 + len(t) for t in
                                                                refs["target"]]
  assert all(s["draft_forward_passes"] == 0 for s in target_stats)
  with pytest.raises(ValueError, match="unknown method"):
    baselines.run_method("medusa", **common)
  with pytest.raises(ValueError, match="needs a draft"):
    baselines.run_method("token_sd", **dict(common, draft=None))
  with pytest.raises(ValueError, match="template_ids"):
    specreason.round_config(max_step_tokens=L, delimiter_ids=(DELIM,), template_ids=(),
                            score_ids=SCORES)
  # One option set drives every method: another method's option is ignored, a typo is not.
  assert baselines.run_method("target", gamma=3, score_threshold=7.0,
                              **common).tokens == refs["target"]
  with pytest.raises(TypeError, match="gama"):
    baselines.run_method("target", sampling=SamplingConfig(), gama=3, **common)


class _DigitTokenizer:
  """Just enough of a Hugging Face tokenizer: one token per character, "?" unknown."""
  unk_token_id = 0

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    return [0 if c == "?" else ord(c) for c in text]


def test_score_prompt_ids_checks_the_tokenizer():
  template, scores = specreason.score_prompt_ids(_DigitTokenizer(), "s:")
  assert template == (ord("s"), ord(":")) and scores == tuple(range(ord("0"), ord("9") + 1))
  with pytest.raises(ValueError, match="unknown token"):
    specreason.score_prompt_ids(_DigitTokenizer(), "score?")
  with pytest.raises(ValueError, match="single known token"):
    specreason.score_prompt_ids(_DigitTokenizer(), "s:", digit_prefix=" ")
