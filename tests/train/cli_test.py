"""experiments/train.py as users run it: bad input fails fast and clearly; SIGTERM saves."""
import os
import signal
import subprocess
import time

import pytest


# Each case costs a process start; the full list of checks is in config_test.py.
@pytest.mark.parametrize("args, message", [
    (["--batch_size=0"], "--batch_size=0 must be positive"),
    (["--mesh_shape=3,-1"], "--mesh_shape=[3, -1] does not divide the 8 devices"),
    (["--stages=target_sft,nope"], "unknown stage(s) ['nope']"),
    (["--stages=draft_sft"], "stage 'draft_sft' needs a target model"),
])
def test_invalid_settings_fail_before_any_work(helpers, tmp_path, data_dir, args, message):
  workdir = tmp_path / "run"
  t0 = time.time()
  proc = helpers.run_train(*helpers.smoke_args(workdir, data_dir, *args), num_devices=8)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()  # Nothing was written.
  assert time.time() - t0 < 60


def test_unknown_flag_and_missing_flagfile(helpers, tmp_path):
  proc = helpers.run_train("--workdir", str(tmp_path), "--bogus_flag=1")
  assert proc.returncode != 0
  assert "Unknown command line flag 'bogus_flag'" in proc.stderr
  missing = str(tmp_path / "missing.flags")
  proc = helpers.run_train(f"--flagfile={missing}", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert missing in proc.stderr and "No such file" in proc.stderr


def test_sigterm_saves_a_checkpoint_and_the_next_run_continues(helpers, tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  args = helpers.smoke_args(workdir, data_dir, "--stages=target_sft", "--target_steps=400",
                            "--checkpoint_every=1000", "--profile_steps=",
                            "--eval_examples=0")
  proc = subprocess.Popen(helpers.train_command(*args), cwd=helpers.repo,
                          env=helpers.subprocess_env(), stderr=subprocess.PIPE, text=True)
  log = []
  try:
    for line in proc.stderr:  # Wait until training is under way.
      log.append(line)
      if "[target_sft] step 3/400" in line:
        proc.send_signal(signal.SIGTERM)
        break
    log.extend(proc.stderr)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = "".join(log)
  assert proc.returncode == 0, text[-3000:]
  assert "preempted (SIGTERM) at step" in text
  ckpt_dir = os.path.join(workdir, "target_sft", "checkpoints")
  steps = [int(s) for s in os.listdir(ckpt_dir) if s.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 400, steps
  # The next run resumes from the saved step instead of starting over.
  proc = helpers.run_train(*helpers.smoke_args(
      workdir, data_dir, "--stages=target_sft", f"--target_steps={steps[0] + 2}",
      "--profile_steps=", "--eval_examples=0"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"[target_sft] resumed from step {steps[0]}" in proc.stderr
  assert f"[target_sft] step {steps[0] + 1}/{steps[0] + 2}" in proc.stderr
  assert "[target_sft] step 1/" not in proc.stderr
