"""The evaluation job end to end on tiny random models (speed figures mean nothing here)."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from dream_r_jax.data import task
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.evaluation import evaluate
from dream_r_jax.evaluation import runner
from dream_r_jax.models import Transformer
from dream_r_jax.train import presets


@pytest.fixture(scope="module")
def setup():
  tok = tok_lib.bundled_tokenizer()
  cfg = task.get_config("default")
  examples = [task.example_at(cfg, 0, i) for i in range(3)]
  target = Transformer(presets.model_config("smoke_vl_target", tok), rngs=nnx.Rngs(1))
  draft = Transformer(presets.model_config("smoke_vl_draft", tok), rngs=nnx.Rngs(2))
  return tok, examples, draft, target


def test_report_has_every_method_and_field(setup, tmp_path):
  tok, examples, draft, target = setup
  ec = runner.EvalConfig(methods=("target", "sequential", "fpsr"), max_new_tokens=12,
                         num_steps=2, max_step_tokens=6, verifier="exact")
  rep = evaluate.run_evaluation(workdir=str(tmp_path), draft=draft, target=target,
                                tokenizer=tok, examples=examples, ec=ec,
                                progress=lambda _: None)
  with open(tmp_path / "report.json") as f:
    on_disk = json.load(f)
  assert on_disk["methods"].keys() == {"target", "sequential", "fpsr"}
  for m in on_disk["methods"].values():
    for key in ("accuracy", "accuracy_ci95", "median_latency_s", "speedup_vs_target",
                "step_acceptance", "target_forward_passes", "outputs"):
      assert key in m
    assert len(m["outputs"]) == len(examples)
  assert on_disk["methods"]["target"]["speedup_vs_target"] == pytest.approx(1.0)
  # The exact verifier is lossless: every method writes the target's greedy text.
  outs = {name: m["outputs"] for name, m in on_disk["methods"].items()}
  assert outs["fpsr"] == outs["target"] == outs["sequential"]
  assert 0 < on_disk["draft_target_cost_ratio"]["ratio"]
  assert on_disk["hardware"]["platform"] == "cpu"
  assert "tau_sweep" not in on_disk  # exact has no threshold to sweep
  for name in ("acceptance.png", "fpsr_timeline.png", "report.md"):
    assert os.path.getsize(tmp_path / name) > 0
  assert rep["methods"]["target"]["placement"]


def test_bad_inputs(setup):
  tok, _, _, _ = setup
  with pytest.raises(ValueError, match="tau"):
    runner.EvalConfig(tau=1.0)
  with pytest.raises(ValueError, match="unknown methods"):
    runner.EvalConfig(methods=("target", "medusa"))
  with pytest.raises(ValueError, match="chain_bucket=-2"):
    runner.EvalConfig(chain_bucket=-2)
  # -1 (the default) verifies in widths of one step: L, 2L, ..., K * L.
  rc = runner.round_config(tok, runner.EvalConfig(num_steps=3, max_step_tokens=5))
  assert rc.chain_widths() == (5, 10, 15)

  class TwoTokenVerdicts:
    def encode(self, text, add_special_tokens=False):
      return [3, 4] if text.strip() in ("yes", "no") else [5, 6, 7]

  with pytest.raises(ValueError, match="single tokens"):
    runner.verify_template_ids(TwoTokenVerdicts())

  class OtherVocab:
    def get_vocab(self):
      return {"a": 0}

  with pytest.raises(ValueError, match="tokenizers differ"):
    runner.check_same_tokenizer(OtherVocab(), tok)


def _target_vs_fpsr(setup, tmp_path, verifier, **kw):
  """run_evaluation of `target` and `fpsr` on the tiny models with `verifier`."""
  tok, examples, draft, target = setup
  ec = runner.EvalConfig(methods=("target", "fpsr"), max_new_tokens=12, num_steps=2,
                         max_step_tokens=6, verifier=verifier)
  return evaluate.run_evaluation(workdir=str(tmp_path), draft=draft, target=target,
                                 tokenizer=tok, examples=examples, ec=ec,
                                 progress=lambda _: None, **kw)


def test_extra_drafts_are_compared_on_the_same_examples(setup, tmp_path):
  target = setup[3]
  # A draft identical to the target has every step accepted by the exact verifier, and
  # every draft stays lossless.
  rep = _target_vs_fpsr(setup, tmp_path, "exact", extra_drafts={"twin": nnx.clone(target)},
                        draft_label="random")
  drafts = rep["drafts"]
  assert list(drafts) == ["random", "twin"]
  assert drafts["twin"]["step_acceptance"] == pytest.approx(1.0)
  fpsr = rep["methods"]["fpsr"]
  assert drafts["random"]["step_acceptance"] == fpsr["step_acceptance"]
  assert drafts["random"]["speedup_vs_target"] == fpsr["speedup_vs_target"]
  assert drafts["twin"]["tokens_per_accepted_step"] > 0
  for d in drafts.values():
    assert d["accuracy"] == rep["methods"]["target"]["accuracy"]
  with open(tmp_path / "report.md") as f:
    assert "| twin |" in f.read()


def test_threshold_sweep_follows_the_verifier(setup, tmp_path):
  rep = _target_vs_fpsr(setup, tmp_path, "likelihood", taus=(-1e4, -1e-6))
  assert rep["tau_sweep_parameter"] == "likelihood_threshold"
  loose, strict = rep["tau_sweep"]["-10000.0"], rep["tau_sweep"]["-1e-06"]
  # A random draft's steps all pass a threshold of -1e4 and all fail one of -1e-6.
  assert loose["step_acceptance"] == 1.0 and strict["step_acceptance"] == 0.0
  assert os.path.getsize(tmp_path / "tau_sweep.png") > 0
