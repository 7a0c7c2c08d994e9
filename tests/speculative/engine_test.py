"""Golden-equivalence tests of the speculative engine (FPSR and the sequential loop)."""
import jax
import numpy as np
import pytest
from flax import nnx

from dream_r_jax.decoding.generate import generate
from dream_r_jax.decoding.sampling import SamplingConfig
from dream_r_jax.models import ModelConfig, Transformer
from dream_r_jax.sharding import mesh as mesh_lib
from dream_r_jax.speculative.engine import RoleModel, SpeculativeEngine
from dream_r_jax.speculative.programs import RoundConfig
from dream_r_jax.speculative.verifiers import VerifierConfig

CFG = ModelConfig.tiny("qwen2", vocab_size=32)
DRAFT_CFG = ModelConfig.tiny("qwen2", vocab_size=32, num_layers=1, hidden_size=16,
                             intermediate_size=32)
EOS, DELIM, TEMPLATE, POS, NEG = 2, 5, (7, 8), (9,), (10,)
N = 24
# Sharp sampling: the draft mostly, but not always, writes the target's greedy steps.
SAMPLING = SamplingConfig(temperature=0.02, top_k=2)
IDS = np.random.default_rng(0).integers(3, 32, (4, 6)).astype(np.int32)
LENS = np.array([6, 4, 5, 3], np.int32)


def _target():
  return Transformer(CFG, rngs=nnx.Rngs(1))


def _greedy_reference():
  out = generate(_target(), IDS, LENS, max_new_tokens=N, eos_ids=(EOS,))
  return [list(map(int, np.asarray(out.tokens[i, :out.lengths[i]]))) for i in range(4)]


@pytest.fixture(scope="module")
def reference():
  return _greedy_reference()


def _meshes(split=(2, 2), data=2):
  return mesh_lib.role_meshes(split[0], split[1], draft_shape=(data, split[0] // data),
                              target_shape=(data, split[1] // data))


def _engine(draft_model, verifier, *, k=3, l=4, sampling=SamplingConfig(), split=(2, 2),
            data=2, eos=EOS, overlap="threads", chain_bucket=0):
  meshes = _meshes(split, data)
  rc = RoundConfig(num_steps=k, max_step_tokens=l, delimiter_ids=(DELIM,), eos_ids=(eos,),
                   template_ids=TEMPLATE, verifier=verifier, draft_sampling=sampling,
                   chain_bucket=chain_bucket)
  return SpeculativeEngine(RoleModel(draft_model, meshes[mesh_lib.Role.DRAFT]),
                           RoleModel(_target(), meshes[mesh_lib.Role.TARGET]), rc,
                           overlap=overlap)


def test_nothing_accepted_equals_target_greedy(reference):
  verifier = VerifierConfig(name="cpn", tau=1 - 1e-9, min_mass=0.0, pos_ids=POS,
                            neg_ids=NEG)
  out = _engine(Transformer(DRAFT_CFG, rngs=nnx.Rngs(7)), verifier).run(
      IDS, LENS, max_new_tokens=N, schedule="fpsr")
  assert out.tokens == reference
  assert all(s.steps_accepted == 0 and s.steps_drafted > 0 for s in out.stats)
  # Every committed token came from the target's own fallback steps.
  assert [s.target_tokens for s in out.stats] == [len(t) for t in reference]


@pytest.mark.parametrize("schedule", ["fpsr", "sequential"])
def test_exact_verifier_with_identical_draft_accepts_everything(reference, schedule):
  out = _engine(_target(), VerifierConfig(name="exact")).run(IDS, LENS, max_new_tokens=N,
                                                             schedule=schedule)
  assert out.tokens == reference
  for s, ref in zip(out.stats, reference):
    assert s.steps_accepted == s.steps_drafted > 0
    assert s.draft_tokens == len(ref) and s.target_tokens == 0
    # One verify pass per round (plus prefill) instead of one pass per token.
    assert s.target_forward_passes == 1 + s.rounds < len(ref)


def test_exact_verifier_with_sampled_draft_is_lossless_and_partial(reference):
  """A sampling draft writes some steps the greedy target would not: exact rejects those."""
  out = _engine(_target(), VerifierConfig(name="exact"), sampling=SAMPLING).run(
      IDS, LENS, max_new_tokens=N, schedule="fpsr", rng=jax.random.key(3))
  assert out.tokens == reference
  accepted = sum(s.steps_accepted for s in out.stats)
  drafted = sum(s.steps_drafted for s in out.stats)
  assert 0 < accepted < drafted  # both branches of the round were exercised


@pytest.mark.parametrize("verifier", [
    VerifierConfig(name="exact"),
    VerifierConfig(name="likelihood", threshold=-3.3),
    VerifierConfig(name="cpn", tau=0.51, min_mass=0.0, pos_ids=POS, neg_ids=NEG),
])
def test_fpsr_equals_sequential(verifier):
  runs = {}
  for schedule in ("fpsr", "sequential"):
    out = _engine(_target(), verifier, sampling=SAMPLING).run(
        IDS, LENS, max_new_tokens=N, schedule=schedule, rng=jax.random.key(5))
    runs[schedule] = out
  assert runs["fpsr"].tokens == runs["sequential"].tokens
  acc = [s.accept_by_position for s in runs["fpsr"].stats]
  assert acc == [s.accept_by_position for s in runs["sequential"].stats]
  if verifier.name == "exact":
    flat = [a for row in acc for rnd in row for a in rnd if a >= 0]
    assert 0 < sum(flat) < len(flat)


@pytest.mark.parametrize("verifier", [
    VerifierConfig(name="exact"),
    VerifierConfig(name="cpn", tau=0.51, min_mass=0.0, pos_ids=POS, neg_ids=NEG),
])
def test_outputs_do_not_depend_on_overlap_or_verify_width(verifier):
  """Overlap modes only change timing; verify widths (chain_bucket) only change padding."""
  runs = []
  for overlap, bucket in (("none", 0), ("async", 2), ("threads", 5)):
    out = _engine(_target(), verifier, sampling=SAMPLING, overlap=overlap,
                  chain_bucket=bucket).run(IDS, LENS, max_new_tokens=N, schedule="fpsr",
                                           rng=jax.random.key(5))
    runs.append((out.tokens, [s.accept_by_position for s in out.stats],
                 [s.target_forward_passes for s in out.stats]))
    phases = {(phase, role) for phase, role, _, _ in out.timeline}
    assert {("prefill", "target"), ("prefill", "draft"), ("draft", "draft"),
            ("verify+fallback", "target")} <= phases
  assert runs[1] == runs[0] and runs[2] == runs[0]


def test_round_config_chain_widths():
  rc = lambda bucket: RoundConfig(num_steps=3, max_step_tokens=4, delimiter_ids=(DELIM,),
                                  eos_ids=(EOS,), template_ids=TEMPLATE,
                                  verifier=VerifierConfig(name="exact"), chain_bucket=bucket)
  assert rc(0).chain_widths() == (12,) and rc(0).chain_width(1) == 12
  assert rc(5).chain_widths() == (5, 10, 12)
  assert [rc(5).chain_width(n) for n in (0, 1, 5, 6, 10, 11, 12)] == [5, 5, 5, 10, 10, 12, 12]
  # Verifiers that read no verdict verify the chain alone, without templates.
  assert rc(0).verify_template == ()
  with pytest.raises(ValueError, match="chain_bucket"):
    rc(-1)


def test_eos_after_an_accepted_chain_ends_the_answer_in_the_same_round():
  """The target's EOS right after a fully accepted chain comes from the verify pass."""
  eos = 26  # the target's greedy output of row 0 first writes 26 after 14 tokens
  out = generate(_target(), IDS, LENS, max_new_tokens=N, eos_ids=(eos,))
  ref = [list(map(int, np.asarray(out.tokens[i, :out.lengths[i]]))) for i in range(4)]
  assert len(ref[0]) == 15 and ref[0][-1] == eos and DELIM not in ref[0]
  run = _engine(_target(), VerifierConfig(name="exact"), k=1, l=14, eos=eos).run(
      IDS, LENS, max_new_tokens=N, schedule="fpsr")
  assert run.tokens == ref
  s = run.stats[0]
  assert (s.rounds, s.draft_tokens, s.target_tokens) == (1, 14, 1)
  assert s.target_forward_passes == 2  # prefill and one verify pass; no decode step


def test_no_speculation_past_an_end_the_draft_expects():
  """A row whose draft expects EOS after chain r drafts afresh if the target goes on."""
  draft = lambda: Transformer(DRAFT_CFG, rngs=nnx.Rngs(7))
  greedy = generate(draft(), IDS, LENS, max_new_tokens=N)
  row0 = list(map(int, np.asarray(greedy.tokens[0])))
  eos = row0[4]  # the draft's token right after its first 4-token step (K=1, L=4)
  assert eos not in row0[:4] and DELIM not in row0[:4]
  accept_all = VerifierConfig(name="likelihood", threshold=-1e9)
  runs = {schedule: _engine(draft(), accept_all, k=1, l=4, eos=eos).run(
      IDS, LENS, max_new_tokens=N, schedule=schedule) for schedule in ("fpsr", "sequential")}
  assert runs["fpsr"].tokens == runs["sequential"].tokens
  # Row 0: its first chain is accepted, the target does not end the answer there, so the
  # draft (which did not speculate) drafts the EOS in a second round.
  assert runs["fpsr"].tokens[0] == row0[:5]
  s = runs["fpsr"].stats[0]
  assert (s.rounds, s.draft_tokens, s.target_tokens) == (2, 5, 0)


def test_rows_progress_independently(reference):
  """Rows accept different numbers of steps; each row still equals its greedy output."""
  out = _engine(_target(), VerifierConfig(name="exact"), sampling=SAMPLING, k=4, l=3).run(
      IDS, LENS, max_new_tokens=N, schedule="fpsr", rng=jax.random.key(11))
  assert out.tokens == reference
  rounds = {s.rounds for s in out.stats}
  assert len(rounds) > 1  # rows needed different numbers of rounds


def test_draft_and_target_live_on_disjoint_devices():
  eng = _engine(Transformer(DRAFT_CFG, rngs=nnx.Rngs(7)), VerifierConfig(name="exact"),
                split=(4, 4), data=1)
  draft_devs = {d for x in jax.tree.leaves(eng.draft.state) for d in x.devices()}
  target_devs = {d for x in jax.tree.leaves(eng.target.state) for d in x.devices()}
  assert len(draft_devs) == 4 and len(target_devs) == 4
  assert not draft_devs & target_devs


def test_shared_devices_rejected():
  mesh = mesh_lib.make_mesh((1, 2), ("data", "model"), jax.devices()[:2])
  rc = RoundConfig(num_steps=2, max_step_tokens=3, delimiter_ids=(DELIM,), eos_ids=(EOS,),
                   template_ids=TEMPLATE, verifier=VerifierConfig(name="exact"))
  with pytest.raises(ValueError, match="share devices"):
    SpeculativeEngine(RoleModel(Transformer(DRAFT_CFG, rngs=nnx.Rngs(0)), mesh),
                      RoleModel(_target(), mesh), rc)


def test_bad_round_config():
  with pytest.raises(ValueError, match="num_steps"):
    RoundConfig(num_steps=0, max_step_tokens=3, delimiter_ids=(DELIM,), eos_ids=(EOS,),
                template_ids=TEMPLATE, verifier=VerifierConfig(name="exact"))
  with pytest.raises(ValueError, match="verify template"):
    RoundConfig(num_steps=2, max_step_tokens=3, delimiter_ids=(DELIM,), eos_ids=(EOS,),
                template_ids=(), verifier=VerifierConfig(name="cpn", pos_ids=POS,
                                                         neg_ids=NEG))


def test_prompt_longer_than_position_limit():
  eng = _engine(Transformer(DRAFT_CFG, rngs=nnx.Rngs(7)), VerifierConfig(name="exact"))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    eng.run(IDS, LENS, max_new_tokens=CFG.max_position_embeddings)
