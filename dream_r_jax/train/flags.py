"""Command-line flags of `experiments/train.py` and their translation to `TrainConfig`.

Defining the flags here (not in the main) lets tests and other entry points reuse them;
importing this module defines them once.
"""
from __future__ import annotations

from absl import flags

from dream_r_jax.train import config as config_lib
from dream_r_jax.train import presets
from dream_r_jax.train.config import ConfigError, OptimConfig, RoleConfig, TrainConfig

# Run layout.
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything the run writes "
                              "(checkpoints, TensorBoard events, traces, exports).")
STAGES = flags.DEFINE_list("stages", ["target_sft", "draft_sft"],
                           "Pipeline stages to run, in order (comma separated).")
STAGE_MODULES = flags.DEFINE_list("stage_modules", [],
                                  "Extra Python modules to import that register stages.")
# Data.
TASK_CONFIG = flags.DEFINE_string("task_config", "default",
                                  "Builder config (task preset) of the bundled dataset.")
DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data directory ('' = <workdir>/data).")
SPLIT_SIZES = flags.DEFINE_string("split_sizes", "", "Examples per split to build, e.g. "
                                  "'train=2000,validation=64,test=64' ('' = the defaults).")
TOKENIZER = flags.DEFINE_string("tokenizer", "", "Hugging Face tokenizer directory ('' = "
                                "the target checkpoint's, else the bundled tokenizer).")
MAX_LEN = flags.DEFINE_integer("max_len", 96, "Tokens per training row (rows are padded).")
VERDICT_RATIO = flags.DEFINE_float("verdict_ratio", 0.2, "Fraction of target_sft rows "
                                   "that are verdict (judge) examples.")
DISTILL_EXAMPLES = flags.DEFINE_integer("distill_examples", 1024, "Training prompts the "
                                        "target answers to make draft_sft's data.")
EVAL_SPLIT = flags.DEFINE_enum("eval_split", "validation", ["train", "validation", "test"],
                               "Split for the end-of-stage greedy accuracy.")
EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 128, "Examples in the end-of-stage "
                                     "evaluation (0 = no evaluation).")
EVAL_BENCHMARK = flags.DEFINE_string("eval_benchmark", "", "Local MathVista/MMMU-style "
                                     "JSONL file to evaluate on instead of --eval_split.")
EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", 64, "Batch size of greedy "
                                       "generation (evaluation and trajectories).")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Generation budget per prompt.")
# Models.
_ROLE_FLAGS = {}
for _role, _preset in (("target", "tiny_vl_target"), ("draft", "tiny_vl_draft")):
  _ROLE_FLAGS[_role] = dict(
      preset=flags.DEFINE_string(f"{_role}_preset", _preset,
                                 f"Model preset of the {_role}: one of "
                                 f"{', '.join(presets.PRESETS)}."),
      overrides=flags.DEFINE_string(f"{_role}_overrides", "",
                                    f"ModelConfig fields to override for the {_role}, e.g. "
                                    "'num_layers=2,mrope_section=(2;3;3)'."),
      checkpoint=flags.DEFINE_string(
          f"{_role}_checkpoint", "",
          f"Local Hugging Face directory of the {_role}" +
          (" (target_sft is then skipped)." if _role == "target" else
           " (draft_sft starts from it).")),
      steps=flags.DEFINE_integer(f"{_role}_steps", 100, f"Training steps of {_role}_sft."),
      lr=flags.DEFINE_float(f"{_role}_lr", 1e-3, f"Peak learning rate of {_role}_sft."),
  )
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch size (all processes).")
WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 10, "Linear warmup steps.")
MIN_LR_RATIO = flags.DEFINE_float("min_lr_ratio", 0.05, "Final / peak learning rate of the "
                                  "cosine decay.")
WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay (matrices only).")
GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip (<= 0: off).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of parameter init and data order.")
# Devices.
MESH_SHAPE = flags.DEFINE_list("mesh_shape", ["-1", "1"], "Device mesh shape; one entry may "
                               "be -1 (= the remaining devices).")
MESH_AXES = flags.DEFINE_list("mesh_axes", ["data", "model"], "Mesh axis names (the batch "
                              "is split over 'data', weights over 'model').")
FSDP = flags.DEFINE_bool("fsdp", False, "Also shard weights' embed axis over 'data'.")
# Bookkeeping.
CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 100, "Save a checkpoint every "
                                        "this many steps (and at the end).")
KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept per stage.")
LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Console/TensorBoard interval in steps.")
PROFILE_STEPS = flags.DEFINE_list("profile_steps", [], "START,STOP: trace steps "
                                  "[START, STOP) with jax.profiler into <stage>/profile.")
INJECT_NAN_AT_STEP = flags.DEFINE_integer("inject_nan_at_step", -1, "Testing only: make "
                                          "the loss of this step NaN.")
# Multi-process.
COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", "", "host:port of process "
                                          "0 ('' = JAX_COORDINATOR_ADDRESS or one process).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (0 = "
                                     "JAX_NUM_PROCESSES or 1).")
PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (-1 = "
                                  "JAX_PROCESS_ID).")
NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 0, "CPU devices per process "
                                       "(0 = JAX's default); for simulating hosts.")
DISTRIBUTED_AUTO = flags.DEFINE_bool("distributed_auto", False, "Call "
                                     "jax.distributed.initialize() with cluster "
                                     "auto-detection (TPU pods, SLURM).")


def _ints(values, name: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ConfigError(f"--{name}={','.join(values)} must be integers") from None


def _role(role: str) -> RoleConfig:
  f = _ROLE_FLAGS[role]
  overrides = {}
  for item in filter(None, (t.strip() for t in f["overrides"].value.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"--{role}_overrides: {item!r} is not FIELD=VALUE")
    overrides[key.strip()] = presets.parse_value(value)
  optim = OptimConfig(steps=f["steps"].value, learning_rate=f["lr"].value,
                      warmup_steps=WARMUP_STEPS.value, min_lr_ratio=MIN_LR_RATIO.value,
                      weight_decay=WEIGHT_DECAY.value, grad_clip=GRAD_CLIP.value)
  return RoleConfig(preset=f["preset"].value, overrides=overrides,
                    checkpoint=f["checkpoint"].value, optim=optim)


def config_from_flags() -> TrainConfig:
  """The `TrainConfig` the parsed flags describe (validated later by the runner)."""
  if not WORKDIR.value:
    raise ConfigError("--workdir is required")
  profile = _ints(PROFILE_STEPS.value, "profile_steps") or (0, 0)
  if len(profile) != 2:
    raise ConfigError(f"--profile_steps={PROFILE_STEPS.value} must be START,STOP")
  return TrainConfig(
      workdir=WORKDIR.value, stages=tuple(s.strip() for s in STAGES.value),
      task_config=TASK_CONFIG.value, data_dir=DATA_DIR.value,
      split_sizes=config_lib.parse_mapping(SPLIT_SIZES.value, what="--split_sizes"),
      tokenizer=TOKENIZER.value, max_len=MAX_LEN.value, verdict_ratio=VERDICT_RATIO.value,
      distill_examples=DISTILL_EXAMPLES.value, eval_split=EVAL_SPLIT.value,
      eval_examples=EVAL_EXAMPLES.value, eval_benchmark=EVAL_BENCHMARK.value,
      eval_batch_size=EVAL_BATCH_SIZE.value,
      max_new_tokens=MAX_NEW_TOKENS.value, target=_role("target"), draft=_role("draft"),
      batch_size=BATCH_SIZE.value, seed=SEED.value,
      mesh_shape=_ints(MESH_SHAPE.value, "mesh_shape"),
      mesh_axes=tuple(MESH_AXES.value), fsdp=FSDP.value,
      checkpoint_every=CHECKPOINT_EVERY.value, keep_checkpoints=KEEP_CHECKPOINTS.value,
      log_every=LOG_EVERY.value, profile_steps=profile,
      inject_nan_at_step=INJECT_NAN_AT_STEP.value)


def config_from_args(args: list[str]) -> TrainConfig:
  """`TrainConfig` from command-line style arguments (e.g. ["--flagfile=...", ...]).

  For notebooks and tests; it parses into the global flag values and resets them after,
  so do not call it from inside a running `app.run` main.
  """
  fv = flags.FLAGS
  fv.unparse_flags()
  try:
    fv(["train", *args])
    return config_from_flags()
  finally:
    fv.unparse_flags()


# The later stages' flags live with their stages; importing them here makes every
# pipeline flag known wherever the training flags are (flagfiles mix them freely).
from dream_r_jax.evaluation import flags as _eval_flags  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
from dream_r_jax.rl import flags as _sapo_flags  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position
