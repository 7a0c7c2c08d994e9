"""The smoke preset end to end, in process: files written, resume, non-finite stop."""
import glob
import json
import os

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from dream_r_jax.models import load_pretrained
from dream_r_jax.train import flags as train_flags
from dream_r_jax.train import loop
from dream_r_jax.train import runner


def _scalars(stage_dir):
  acc = event_accumulator.EventAccumulator(os.path.join(stage_dir, "tensorboard"))
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


SMOKE_FLAGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments", "flags", "smoke.flags")


def _cfg(workdir, data_dir, *extra):
  return train_flags.config_from_args([f"--flagfile={SMOKE_FLAGS}", f"--workdir={workdir}",
                                       f"--data_dir={data_dir}", *extra])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
  """One smoke run of both stages (shared by the tests that only read its outputs)."""
  workdir = str(tmp_path_factory.mktemp("smoke"))
  summaries = runner.run(_cfg(workdir, data_dir))
  return workdir, summaries


def test_smoke_writes_checkpoints_events_traces_and_exports(smoke_run):
  workdir, summaries = smoke_run
  assert set(summaries) == {"target_sft", "draft_sft"}
  for stage, role in (("target_sft", "target"), ("draft_sft", "draft")):
    d = os.path.join(workdir, stage)
    steps = sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints")) if s.isdigit())
    assert steps == [2, 4], steps  # every 2 steps, the last 2 kept
    scalars = _scalars(d)
    for tag in ("loss", "learning_rate", "grad_norm", "tokens_per_second",
                "eval/validation_accuracy"):
      assert tag in scalars, (stage, sorted(scalars))
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for _, v in scalars["loss"])
    assert glob.glob(os.path.join(d, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    model, cfg = load_pretrained(os.path.join(d, "export"))
    assert cfg.model_type == "qwen2_5_vl"
    assert os.path.exists(os.path.join(d, "export", "tokenizer.json"))
    with open(os.path.join(d, "done.json")) as f:
      done = json.load(f)
    assert done["summary"]["final_step"] == 4
    assert 0.0 <= done["summary"]["eval_accuracy"] <= 1.0
    ids = np.asarray([[1, 5, 9, 12]], np.int32)
    assert model(ids).shape == (1, 4, cfg.vocab_size)
  # The draft is the smaller model and was distilled from the target's outputs.
  assert summaries["draft_sft"]["target_over_draft_flops_per_token"] > 1.0
  assert summaries["draft_sft"]["trajectories"] == 16


def test_second_run_resumes_and_completed_stages_are_skipped(smoke_run, data_dir):
  workdir, _ = smoke_run
  # Same settings: nothing left to do, nothing retrained.
  again = runner.run(_cfg(workdir, data_dir))
  assert again["target_sft"]["final_step"] == 4
  before = _scalars(os.path.join(workdir, "target_sft"))["loss"]
  # More steps: the target continues from its step-4 checkpoint, not from scratch.
  more = runner.run(_cfg(workdir, data_dir, "--stages=target_sft", "--target_steps=6",
                         "--eval_examples=0", "--profile_steps="))
  assert more["target_sft"]["resumed_from"] == 4
  assert more["target_sft"]["final_step"] == 6
  losses = _scalars(os.path.join(workdir, "target_sft"))["loss"]
  assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
  assert losses[:4] == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path)
  cfg = _cfg(workdir, data_dir, "--stages=target_sft", "--inject_nan_at_step=3",
             "--profile_steps=", "--eval_examples=0")
  with pytest.raises(loop.NonFiniteLossError, match="step 3.*last good checkpoint \\(step 2\\)"):
    runner.run(cfg)
  ckpt_dir = os.path.join(workdir, "target_sft", "checkpoints")
  assert sorted(s for s in os.listdir(ckpt_dir) if s.isdigit()) == ["2"]
  assert not os.path.exists(os.path.join(workdir, "target_sft", "export"))
  # The next run (without the fault) continues from the good checkpoint.
  summary = runner.run(_cfg(workdir, data_dir, "--stages=target_sft", "--profile_steps=",
                            "--eval_examples=0"))
  assert summary["target_sft"]["resumed_from"] == 2
