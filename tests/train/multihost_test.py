"""Two processes x 4 CPU devices train exactly like one process with 8 devices."""
import json
import os
import socket
import subprocess

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from dream_r_jax.models import load_pretrained
from dream_r_jax.train import flags as train_flags
from dream_r_jax.train import runner

STEPS = 3


def _losses(workdir):
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "target_sft", "tensorboard"))
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars("loss")]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _args(helpers, workdir, data_dir):
  return helpers.smoke_args(workdir, data_dir, "--stages=target_sft",
                            f"--target_steps={STEPS}", "--eval_examples=6",
                            "--eval_batch_size=2", "--max_new_tokens=8",
                            "--profile_steps=", "--mesh_shape=-1,1", "--checkpoint_every=2")


def test_two_processes_match_one_process(helpers, tmp_path, data_dir):
  multi = str(tmp_path / "multi")
  port = _free_port()
  env = helpers.subprocess_env(num_devices=4)
  procs = [subprocess.Popen(
      helpers.train_command(*_args(helpers, multi, data_dir),
                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                            f"--process_id={i}", "--num_cpu_devices=4"),
      cwd=helpers.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600)[0])
    finally:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  assert "process 1 of 2; 4 local / 8 global devices" in outs[1]

  single = str(tmp_path / "single")
  runner.run(train_flags.config_from_args(_args(helpers, single, data_dir)))
  a, b = _losses(multi), _losses(single)
  assert [s for s, _ in a] == list(range(1, STEPS + 1))
  assert [s for s, _ in a] == [s for s, _ in b]
  np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
  # Both processes wrote one checkpoint together, and the export is whole and the same.
  assert sorted(os.listdir(os.path.join(multi, "target_sft", "checkpoints"))) == ["2", "3"]
  exported = [load_pretrained(os.path.join(w, "target_sft", "export"))[0]
              for w in (multi, single)]
  ids = np.arange(1, 13, dtype=np.int32)[None]
  np.testing.assert_allclose(exported[0](ids), exported[1](ids), rtol=1e-5, atol=1e-6)
  # The evaluation split its examples over the processes and gathered the generations.
  done = [json.load(open(os.path.join(w, "target_sft", "done.json")))["summary"]
          for w in (multi, single)]
  assert done[0]["eval_num_examples"] == done[1]["eval_num_examples"] == 6
  assert done[0]["eval_accuracy"] == done[1]["eval_accuracy"]
  assert done[0]["eval_eos_rate"] == done[1]["eval_eos_rate"]
