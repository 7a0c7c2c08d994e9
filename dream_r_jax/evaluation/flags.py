"""Flags of the evaluation (`experiments.evaluate` and the pipeline stage `eval`)."""
from absl import flags

from dream_r_jax.evaluation.runner import METHODS, EvalConfig

SPEC_METHODS = flags.DEFINE_list("spec_methods", list(METHODS),
                                 f"Methods to run side by side; from {list(METHODS)}.")
SPEC_EXAMPLES = flags.DEFINE_integer("spec_examples", 64, "Test examples to evaluate "
                                     "(each is run alone, batch 1, for latency).")
SPEC_SPLIT = flags.DEFINE_enum("spec_split", "test", ["train", "validation", "test"],
                               "Split of the bundled task to evaluate on.")
SPEC_BENCHMARK_FILE = flags.DEFINE_string(
    "spec_benchmark_file", "", "A local MathVista/MMMU-style JSONL file to evaluate on "
    "instead of the bundled task.")
SPEC_NUM_STEPS = flags.DEFINE_integer("spec_num_steps", 4, "K: steps drafted per chain.")
SPEC_MAX_STEP_TOKENS = flags.DEFINE_integer("spec_max_step_tokens", 16,
                                            "A step ends at the delimiter or this many tokens.")
SPEC_MAX_NEW_TOKENS = flags.DEFINE_integer("spec_max_new_tokens", 96,
                                           "Generation budget per example.")
SPEC_VERIFIER = flags.DEFINE_enum("spec_verifier", "cpn", ["cpn", "score", "likelihood",
                                                           "exact"],
                                  "TBVM verifier of the step methods.")
SPEC_TAU = flags.DEFINE_float("spec_tau", 0.8, "CPN ratio-test threshold, in (0.5, 1).")
SPEC_MIN_MASS = flags.DEFINE_float("spec_min_mass", 0.5, "Minimum verdict-token mass.")
SPEC_TAUS = flags.DEFINE_list("spec_taus", [], "Thresholds for the speed/accuracy sweep "
                              "plot (fpsr only): taus for the cpn verifier (e.g. "
                              "0.6,0.8,0.95), minimum mean log-probs for likelihood (e.g. "
                              "-1,-0.3,-0.1).")
SPEC_SWEEP_EXAMPLES = flags.DEFINE_integer("spec_sweep_examples", 0, "Examples per sweep "
                                           "point (0 = all).")
SPEC_GAMMA = flags.DEFINE_integer("spec_gamma", 4, "token_sd: tokens drafted per round.")
SPEC_SCORE_THRESHOLD = flags.DEFINE_float("spec_score_threshold", 7.0,
                                          "specreason: accept a step scoring at least this.")
SPEC_LIKELIHOOD_THRESHOLD = flags.DEFINE_float(
    "spec_likelihood_threshold", -1.0,
    "likelihood verifier: accept a step whose mean target log-prob is at least this.")
SPEC_OVERLAP = flags.DEFINE_enum("spec_overlap", "async", ["async", "threads", "none"],
                                 "How the engine overlaps draft and target programs: "
                                 "async dispatch, one host thread per mesh, or none.")
SPEC_CHAIN_BUCKET = flags.DEFINE_integer(
    "spec_chain_bucket", -1, "The target verifies a drafted chain padded only to the next "
    "multiple of this many tokens (one compiled verify pass per width): -1 = "
    "--spec_max_step_tokens (K widths), 0 = always the full K * max_step_tokens.")
SPEC_DRAFT_DEVICES = flags.DEFINE_integer("spec_draft_devices", 1, "Devices of the draft mesh.")
SPEC_TARGET_DEVICES = flags.DEFINE_integer("spec_target_devices", 1,
                                           "Devices of the target mesh.")


def eval_config_from_flags() -> EvalConfig:
  return EvalConfig(
      methods=tuple(SPEC_METHODS.value), num_steps=SPEC_NUM_STEPS.value,
      max_step_tokens=SPEC_MAX_STEP_TOKENS.value, max_new_tokens=SPEC_MAX_NEW_TOKENS.value,
      verifier=SPEC_VERIFIER.value, tau=SPEC_TAU.value, min_mass=SPEC_MIN_MASS.value,
      score_threshold=SPEC_SCORE_THRESHOLD.value,
      likelihood_threshold=SPEC_LIKELIHOOD_THRESHOLD.value, gamma=SPEC_GAMMA.value,
      overlap=SPEC_OVERLAP.value, chain_bucket=SPEC_CHAIN_BUCKET.value,
      num_draft_devices=SPEC_DRAFT_DEVICES.value,
      num_target_devices=SPEC_TARGET_DEVICES.value)


def sweep_from_flags() -> tuple[tuple[float, ...], int]:
  try:
    taus = tuple(float(t) for t in SPEC_TAUS.value)
  except ValueError as e:
    raise ValueError(f"--spec_taus={SPEC_TAUS.value}: not numbers") from e
  return taus, SPEC_SWEEP_EXAMPLES.value
