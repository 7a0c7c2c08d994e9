r"""Trains the DREAM-R pipeline's models: `python -m experiments.train --flagfile=...`.

    python -m experiments.train --flagfile=experiments/flags/quickstart.flags \
        --workdir=/tmp/dream_r

Stages (`--stages`): target_sft, draft_sft, and any stage registered by a module in
`dream_r_jax.train.stages.STAGE_MODULES` or `--stage_modules`. Everything is written under
`--workdir`; rerunning the same command resumes where the last run stopped.
"""
import sys

from absl import app
from absl import logging

from dream_r_jax.evaluation import flags as _eval_flags  # pylint: disable=unused-import
from dream_r_jax.rl import flags as _sapo_flags  # pylint: disable=unused-import
from dream_r_jax.train import flags as train_flags
from dream_r_jax.train.checkpoint import CheckpointError
from dream_r_jax.train.config import ConfigError
from dream_r_jax.train.loop import NonFiniteLossError, Preempted


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  from dream_r_jax.train import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  try:
    # Before anything touches a device: the process group decides the device list.
    from dream_r_jax.train import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(train_flags.COORDINATOR_ADDRESS.value,
                           train_flags.NUM_PROCESSES.value, train_flags.PROCESS_ID.value,
                           train_flags.NUM_CPU_DEVICES.value,
                           train_flags.DISTRIBUTED_AUTO.value)
    cfg = train_flags.config_from_flags()
    from dream_r_jax.train import runner  # pylint: disable=g-import-not-at-top
    runner.run(cfg, stage_modules=train_flags.STAGE_MODULES.value)
  except ConfigError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  except (CheckpointError, NonFiniteLossError) as e:
    logging.error("%s", e)
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)
  except Preempted as e:
    logging.warning("%s", e)
    sys.stderr.write(f"{e}\n")
    sys.exit(0)


if __name__ == "__main__":
  app.run(main)
