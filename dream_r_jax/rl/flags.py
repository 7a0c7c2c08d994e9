"""Flags of the `sapo` stage (`--sapo_*`) and their translation to `SapoConfig`.

Importing this module defines the flags; `experiments/train.py` imports it so that the
stage reads them (without it the stage runs with `SapoConfig`'s defaults).
"""
from __future__ import annotations

from absl import flags

from dream_r_jax.rl.config import (DEFAULT_REWARDS, FORMAT_CHECKS, SIGNALS, STATE_SOURCES,
                                   SapoConfig)

_D = SapoConfig()

ITERATIONS = flags.DEFINE_integer("sapo_iterations", _D.iterations,
                                  "SAPO iterations (one rollout and its updates each).")
STATES_PER_ITERATION = flags.DEFINE_integer(
    "sapo_states_per_iteration", _D.states_per_iteration,
    "States rolled out per iteration (divisible by the mesh's data axis).")
ROLLOUT_STATES = flags.DEFINE_integer(
    "sapo_rollout_states", _D.rollout_states,
    "States rolled out per iteration (0: --sapo_states_per_iteration). When larger, the "
    "update takes the first --sapo_states_per_iteration groups that carry signal (DAPO's "
    "dynamic sampling), so that its batch is not spent on groups with nothing to learn.")
SIGNAL = flags.DEFINE_enum(
    "sapo_signal", _D.signal, list(SIGNALS),
    "Which groups carry signal (the others are dropped): reward: rewards not all equal; "
    "acceptance: the target accepts some candidates of the group and rejects others.")
GROUP_SIZE = flags.DEFINE_integer("sapo_group_size", _D.group_size,
                                  "G: candidate steps sampled per state (>= 2).")
PPO_EPOCHS = flags.DEFINE_integer("sapo_ppo_epochs", _D.ppo_epochs,
                                  "Gradient steps on each rollout.")
LR = flags.DEFINE_float("sapo_lr", _D.learning_rate, "Peak AdamW learning rate.")
WARMUP_STEPS = flags.DEFINE_integer("sapo_warmup_steps", _D.warmup_steps,
                                    "Linear warmup steps before the cosine decay.")
MIN_LR_RATIO = flags.DEFINE_float("sapo_min_lr_ratio", _D.min_lr_ratio,
                                  "Final / peak learning rate.")
WEIGHT_DECAY = flags.DEFINE_float("sapo_weight_decay", _D.weight_decay,
                                  "AdamW weight decay (matrices only).")
GRAD_CLIP = flags.DEFINE_float("sapo_grad_clip", _D.grad_clip,
                               "Global gradient-norm clip (<= 0: off).")
LOSS = flags.DEFINE_string("sapo_loss", _D.loss, "Registered policy loss: sapo or grpo.")
EPS_LOW = flags.DEFINE_float("sapo_eps_low", _D.eps_low, "Lower clip width of the ratio.")
EPS_HIGH = flags.DEFINE_float("sapo_eps_high", _D.eps_high, "Upper clip width of the ratio.")
BETA = flags.DEFINE_float("sapo_beta", _D.beta, "Weight of the k3 KL to the SFT draft.")
REWARDS = flags.DEFINE_string(
    "sapo_rewards", DEFAULT_REWARDS,
    "Reward weights, name=weight, comma separated; unnamed terms keep their defaults and "
    "0 switches a term off (e.g. 'concision=0').")
FORMAT_CHECK = flags.DEFINE_enum(
    "sapo_format_check", _D.format_check, list(FORMAT_CHECKS),
    "task: a step the bundled task cannot parse is malformed; none: only empty, repeated "
    "and unfinished steps are.")
MAX_STEP_TOKENS = flags.DEFINE_integer("sapo_max_step_tokens", _D.max_step_tokens,
                                       "Tokens per candidate step, delimiter included.")
TEMPERATURE = flags.DEFINE_float("sapo_temperature", _D.temperature,
                                 "Sampling temperature of the rollouts (> 0).")
GREEDY_CANDIDATES = flags.DEFINE_integer(
    "sapo_greedy_candidates", _D.greedy_candidates,
    "Candidates per group that are the draft's greedy step instead of a sample (the greedy "
    "step is what drafts at test time).")
TAU = flags.DEFINE_float("sapo_tau", _D.tau, "TBVM threshold deciding 'accepted' for the "
                         "concision term and the acceptance metrics, in (0.5, 1).")
MIN_MASS = flags.DEFINE_float("sapo_min_mass", _D.min_mass,
                              "TBVM minimum verdict-token mass, in [0, 1].")
JUDGE = flags.DEFINE_enum(
    "sapo_judge", _D.judge, ["cpn", "likelihood"],
    "How the target judges candidates for the acceptance reward: cpn (its verdict, the "
    "TBVM default) or likelihood (mean log-prob of the candidate under the target).")
LIKELIHOOD_THRESHOLD = flags.DEFINE_float(
    "sapo_likelihood_threshold", _D.likelihood_threshold,
    "likelihood judge: accept a candidate whose mean target log-prob is at least this.")
STATES_FROM = flags.DEFINE_enum(
    "sapo_states_from", _D.states_from, list(STATE_SOURCES),
    "target: states cut from the target's greedy trajectories on training prompts the "
    "draft was not distilled on (after the first --distill_examples); distill: from "
    "draft_sft's stored trajectories (the draft's own training prompts); reference: from "
    "the task's reference solutions.")
TRAJECTORY_EXAMPLES = flags.DEFINE_integer(
    "sapo_trajectory_examples", _D.trajectory_examples,
    "Training prompts to take states from when no stored trajectories fit.")
HELDOUT_STATES = flags.DEFINE_integer(
    "sapo_heldout_states", _D.heldout_states,
    "States kept out of training (whole prompts) for the held-out acceptance.")
EVAL_EVERY = flags.DEFINE_integer("sapo_eval_every", _D.eval_every,
                                  "Held-out evaluation interval, in iterations.")
SEED = flags.DEFINE_integer("sapo_seed", _D.seed, "Seed of rollouts and state order.")


def config_from_flags() -> SapoConfig:
  """The `SapoConfig` the parsed flags describe (validated by the stage)."""
  return SapoConfig(
      iterations=ITERATIONS.value, states_per_iteration=STATES_PER_ITERATION.value,
      rollout_states=ROLLOUT_STATES.value, signal=SIGNAL.value,
      group_size=GROUP_SIZE.value, ppo_epochs=PPO_EPOCHS.value, learning_rate=LR.value,
      warmup_steps=WARMUP_STEPS.value, min_lr_ratio=MIN_LR_RATIO.value,
      weight_decay=WEIGHT_DECAY.value, grad_clip=GRAD_CLIP.value, loss=LOSS.value,
      eps_low=EPS_LOW.value, eps_high=EPS_HIGH.value, beta=BETA.value,
      rewards=REWARDS.value, format_check=FORMAT_CHECK.value,
      max_step_tokens=MAX_STEP_TOKENS.value, temperature=TEMPERATURE.value,
      greedy_candidates=GREEDY_CANDIDATES.value, tau=TAU.value,
      min_mass=MIN_MASS.value, judge=JUDGE.value,
      likelihood_threshold=LIKELIHOOD_THRESHOLD.value, states_from=STATES_FROM.value,
      trajectory_examples=TRAJECTORY_EXAMPLES.value, heldout_states=HELDOUT_STATES.value,
      eval_every=EVAL_EVERY.value, seed=SEED.value)
