"""The `sapo` stage end to end on the smoke presets: files written, resume, skip when done."""
import contextlib
import json
import os

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.models import load_pretrained, save_pretrained
from dream_r_jax.rl import flags as sapo_flags  # pylint: disable=unused-import
from dream_r_jax.rl import states as states_lib
from dream_r_jax.testing import sapo as sapo_testing
from dream_r_jax.train import distill
from dream_r_jax.train import runner
from dream_r_jax.train.config import RoleConfig, TrainConfig
from dream_r_jax.train.stages import export_dir

SPLITS = {"train": 24, "validation": 8, "test": 8}
SAPO_ARGS = ["--sapo_states_per_iteration=8", "--sapo_group_size=2",
             "--sapo_states_from=distill", "--sapo_max_step_tokens=16", "--sapo_heldout_states=4", "--sapo_eval_every=2",
             "--sapo_lr=1e-3", "--sapo_warmup_steps=0"]


@contextlib.contextmanager
def _sapo_flags(*args):
  """The `--sapo_*` flags parsed as on a command line, reset afterwards."""
  fv = flags.FLAGS
  fv.unparse_flags()
  fv(["train", *SAPO_ARGS, *args], known_only=True)
  try:
    yield
  finally:
    fv.unparse_flags()


def _scalars(stage_dir):
  acc = event_accumulator.EventAccumulator(os.path.join(stage_dir, "tensorboard"))
  acc.Reload()
  return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _save_random(preset, path, seed, tok):
  save_pretrained(sapo_testing.random_preset_model(preset, seed), path, tokenizer=tok)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir holding what target_sft and draft_sft leave: two models and the target's
  trajectories (here the task's reference solutions stand in for them)."""
  root = str(tmp_path_factory.mktemp("sapo_stage"))
  tok = tok_lib.bundled_tokenizer()
  target = export_dir(root, "target_sft")
  _save_random("smoke_vl_target", target, 0, tok)
  _save_random("smoke_vl_draft", export_dir(root, "draft_sft"), 1, tok)
  examples = [task_lib.example_at(task_lib.get_config("default"), 7, i) for i in range(6)]
  prompts, outputs, records = states_lib.reference_trajectories(tok, examples)
  gens = type("Gens", (), dict(prompts=prompts, outputs=outputs,
                              hit_eos=np.ones(len(prompts), bool)))
  rows = distill.build_rows(gens, records, max_len=80)
  distill.save_rows(os.path.join(root, "draft_sft", "trajectories.npz"), rows,
                    {"target": target})
  return root


def _cfg(workdir, **kw):
  return TrainConfig(workdir=workdir, stages=("sapo",), split_sizes=SPLITS,
                     data_dir=os.path.join(os.path.dirname(workdir), "sapo_data"),
                     target=RoleConfig(preset="smoke_vl_target"),
                     draft=RoleConfig(preset="smoke_vl_draft"), batch_size=8,
                     checkpoint_every=2, keep_checkpoints=2, log_every=1, eval_examples=0,
                     **kw)


def test_stage_writes_checkpoints_events_export_and_resumes(workdir):
  stage_dir = os.path.join(workdir, "sapo")
  with _sapo_flags("--sapo_iterations=3"):
    first = runner.run(_cfg(workdir, profile_steps=(2, 3)),
                       stage_modules=["dream_r_jax.rl.stage"])["sapo"]
  assert first["final_iteration"] == 3 and first["resumed_from"] == 0
  assert "target trajectories from" in first["states_from"]
  steps = sorted(int(s) for s in os.listdir(os.path.join(stage_dir, "checkpoints"))
                 if s.isdigit())
  assert steps == [2, 3], steps
  scalars = _scalars(stage_dir)
  for tag in ("rollout/reward", "rollout/reward_acceptance", "rollout/reward_faithfulness",
              "rollout/reward_concision", "rollout/reward_format", "rollout/step_length",
              "update/kl", "update/clip_fraction", "heldout/acceptance"):
    assert tag in scalars, sorted(scalars)
  assert [s for s, _ in scalars["rollout/reward"]] == [1, 2, 3]
  assert [s for s, _ in scalars["heldout/acceptance"]] == [0, 2, 3]  # 0: the SFT draft
  assert all(np.isfinite(v) for _, v in scalars["update/kl"])
  assert os.listdir(os.path.join(stage_dir, "profile", "plugins", "profile"))
  # The export is the trained draft (it moved away from the reference) and loads.
  model, cfg = load_pretrained(first["export"])
  ref, _ = load_pretrained(export_dir(workdir, "draft_sft"))
  assert cfg.model_type == "qwen2_5_vl"
  assert os.path.exists(os.path.join(first["export"], "tokenizer.json"))
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(ref))))
  assert diff > 0
  with open(os.path.join(stage_dir, "done.json")) as f:
    assert json.load(f)["summary"]["final_iteration"] == 3

  # Same settings: nothing to do. More iterations: continue from iteration 3, with the
  # SFT draft still the reference although the newest draft is now sapo's own export.
  with _sapo_flags("--sapo_iterations=3"):
    again = runner.run(_cfg(workdir), stage_modules=["dream_r_jax.rl.stage"])["sapo"]
  assert again["resumed_from"] == 0 and again["final_iteration"] == 3
  with _sapo_flags("--sapo_iterations=4"):
    more = runner.run(_cfg(workdir), stage_modules=["dream_r_jax.rl.stage"])["sapo"]
  assert more["resumed_from"] == 3 and more["final_iteration"] == 4
  assert more["reference"] == export_dir(workdir, "draft_sft")
  assert [s for s, _ in _scalars(stage_dir)["rollout/reward"]] == [1, 2, 3, 4]


def test_bad_settings_fail_before_any_work(workdir):
  with _sapo_flags("--sapo_group_size=1", "--sapo_rewards=acceptance=0,faithfulness=0,"
                   "concision=0,format=0", "--sapo_states_per_iteration=6",
                   "--sapo_greedy_candidates=1", "--sapo_rollout_states=4"):
    with pytest.raises(ValueError) as e:
      runner.run(_cfg(workdir), stage_modules=["dream_r_jax.rl.stage"])
  msg = str(e.value)
  assert "--sapo_group_size=1" in msg and "all reward weights are zero" in msg
  assert "--sapo_states_per_iteration=6 is not divisible" in msg
  assert "--sapo_greedy_candidates=1 must be in [0, --sapo_group_size=1)" in msg
  assert "--sapo_rollout_states=4 must be 0 or >= --sapo_states_per_iteration=6" in msg


def test_eval_stage_compares_the_sapo_draft_with_the_sft_draft(tmp_path):
  from dream_r_jax.evaluation import flags as eval_flags  # pylint: disable=g-import-not-at-top,unused-import
  root = str(tmp_path / "run")
  tok = tok_lib.bundled_tokenizer()
  _save_random("smoke_vl_target", export_dir(root, "target_sft"), 0, tok)
  _save_random("smoke_vl_draft", export_dir(root, "draft_sft"), 1, tok)
  _save_random("smoke_vl_draft", export_dir(root, "sapo"), 2, tok)
  fv = flags.FLAGS
  fv.unparse_flags()
  fv(["train", "--spec_methods=target,fpsr", "--spec_examples=2", "--spec_num_steps=2",
      "--spec_max_step_tokens=6", "--spec_max_new_tokens=12", "--spec_verifier=exact"],
     known_only=True)
  try:
    summary = runner.run(_cfg(root).replace(stages=("eval",)))["eval"]
  finally:
    fv.unparse_flags()
  assert {"fpsr[sapo draft]", "fpsr[sft draft]"} <= set(summary)
  with open(summary["report"]) as f:
    report = json.load(f)
  assert list(report["drafts"]) == ["sapo", "sft"]
  assert report["config"]["draft"] == export_dir(root, "sapo")
  # The exact verifier is lossless whichever draft runs.
  for d in report["drafts"].values():
    assert d["accuracy"] == report["methods"]["target"]["accuracy"]
