"""Which prompts SAPO's states come from (dream_r_jax.rl.data)."""
import os
import types

import numpy as np
import pytest

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.rl import data as data_lib
from dream_r_jax.rl import states as states_lib
from dream_r_jax.rl.config import SapoConfig
from dream_r_jax.train import distill


def _ctx(root, distill_examples):
  target = os.path.join(root, "target_sft", "export")
  os.makedirs(target, exist_ok=True)
  with open(os.path.join(target, "config.json"), "w") as f:
    f.write("{}")
  cfg = types.SimpleNamespace(distill_examples=distill_examples, max_len=80,
                              max_new_tokens=48, task_config="default", eval_batch_size=8)
  return types.SimpleNamespace(
      cfg=cfg, tokenizer=tok_lib.bundled_tokenizer(), is_primary=True,
      model_dir=lambda role: target, stage_dir=lambda name: os.path.join(root, name),
      barrier=lambda name: None)


@pytest.fixture
def answered(monkeypatch):
  """Stands in for the target's generation; records which examples it was asked for (the
  reference solutions play the target's answers)."""
  calls = []

  def fake_target_rows(target, tokenizer, examples, **kw):
    calls.append([ex["index"] for ex in examples])
    prompts, outputs, _ = states_lib.reference_trajectories(tokenizer, examples)
    gens = types.SimpleNamespace(prompts=prompts, outputs=outputs,
                                 hit_eos=np.ones(len(prompts), bool))
    return distill.build_rows(gens, list(range(len(examples))), kw["max_len"]), gens

  monkeypatch.setattr(distill, "target_rows", fake_target_rows)
  return calls


def _source(n):
  cfg = task_lib.get_config("default")
  return [dict(task_lib.example_at(cfg, 1, i), index=i) for i in range(n)]


def test_states_come_from_prompts_the_draft_was_not_distilled_on(tmp_path, answered):
  ctx, source = _ctx(str(tmp_path), distill_examples=10), _source(30)
  scfg = SapoConfig(trajectory_examples=6)
  rows = data_lib._generate_rows(ctx, scfg, None, source)  # pylint: disable=protected-access
  assert answered == [list(range(10, 16))]
  # Records index the train split, so images are fetched for the right examples.
  assert sorted(set(rows["record"].tolist())) == list(range(10, 16))
  # A second run with the same settings reuses the cached trajectories.
  again = data_lib._generate_rows(ctx, scfg, None, source)  # pylint: disable=protected-access
  assert len(answered) == 1 and np.array_equal(again["input_ids"], rows["input_ids"])


def test_small_train_split_overlaps_the_distilled_prompts_as_little_as_it_can(tmp_path,
                                                                              answered):
  ctx, source = _ctx(str(tmp_path), distill_examples=10), _source(12)
  generate = data_lib._generate_rows  # pylint: disable=protected-access
  generate(ctx, SapoConfig(trajectory_examples=6), None, source)
  assert answered == [list(range(6, 12))]


def test_distill_source_needs_the_stored_trajectories(tmp_path, monkeypatch):
  ctx = _ctx(str(tmp_path), distill_examples=10)
  monkeypatch.setattr(data_lib.sft, "task_source", lambda ctx, split: _source(12))
  with pytest.raises(ValueError, match="sapo_states_from=distill"):
    data_lib.load_states(ctx, SapoConfig(states_from="distill"), None)
