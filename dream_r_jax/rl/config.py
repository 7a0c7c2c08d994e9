"""Settings of a SAPO run: one frozen dataclass, checked before any work."""
from __future__ import annotations

import dataclasses
import math

from dream_r_jax.rl import sapo
from dream_r_jax.rl.rewards import RewardConfig
from dream_r_jax.rl.rollout import RolloutConfig
from dream_r_jax.train.config import ConfigError, OptimConfig

DEFAULT_REWARDS = "acceptance=1,faithfulness=0.5,concision=0.25,format=1"
STATE_SOURCES = ("target", "distill", "reference")
FORMAT_CHECKS = ("task", "none")
SIGNALS = ("reward", "acceptance")


@dataclasses.dataclass(frozen=True)
class SapoConfig:
  """What a SAPO run does; the flags in `dream_r_jax.rl.flags` describe each field."""
  iterations: int = 100
  states_per_iteration: int = 16
  rollout_states: int = 0
  signal: str = "reward"
  group_size: int = 8
  ppo_epochs: int = 1
  learning_rate: float = 1e-4
  warmup_steps: int = 5
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  loss: str = "sapo"
  eps_low: float = 0.2
  eps_high: float = 0.28
  beta: float = 0.02
  rewards: str = DEFAULT_REWARDS
  format_check: str = "task"
  max_step_tokens: int = 16
  temperature: float = 1.0
  greedy_candidates: int = 0
  tau: float = 0.8
  min_mass: float = 0.5
  judge: str = "cpn"
  likelihood_threshold: float = -1.0
  states_from: str = "target"
  trajectory_examples: int = 512
  heldout_states: int = 64
  eval_every: int = 10
  seed: int = 0

  def replace(self, **kw) -> "SapoConfig":
    return dataclasses.replace(self, **kw)

  @property
  def pool_states(self) -> int:
    """States rolled out per iteration (`rollout_states`, 0: `states_per_iteration`)."""
    return self.rollout_states or self.states_per_iteration

  @property
  def reward_config(self) -> RewardConfig:
    return RewardConfig.parse(self.rewards)

  @property
  def optim(self) -> OptimConfig:
    return OptimConfig(steps=self.iterations * self.ppo_epochs,
                       learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                       min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay,
                       grad_clip=self.grad_clip)

  def rollout_config(self, tokenizer) -> RolloutConfig:
    return RolloutConfig.for_tokenizer(tokenizer, max_step_tokens=self.max_step_tokens,
                                       temperature=self.temperature, tau=self.tau,
                                       min_mass=self.min_mass, judge=self.judge,
                                       likelihood_threshold=self.likelihood_threshold,
                                       greedy_candidates=self.greedy_candidates)

  def validate(self, data_parallel: int = 1) -> "SapoConfig":
    """Raises ConfigError (a ValueError) listing every bad setting, by flag name, at once."""
    errors = []
    for name in ("iterations", "states_per_iteration", "ppo_epochs", "max_step_tokens",
                 "eval_every", "trajectory_examples"):
      if getattr(self, name) < 1:
        errors.append(f"--sapo_{name}={getattr(self, name)} must be >= 1")
    if self.group_size < 2:
      errors.append(f"--sapo_group_size={self.group_size} must be >= 2 (advantages are "
                    "relative to the group)")
    if self.rollout_states and self.rollout_states < self.states_per_iteration:
      errors.append(f"--sapo_rollout_states={self.rollout_states} must be 0 or >= "
                    f"--sapo_states_per_iteration={self.states_per_iteration} (the update "
                    "takes that many groups out of the rollout)")
    if self.rollout_states < 0:
      errors.append(f"--sapo_rollout_states={self.rollout_states} must be >= 0")
    if self.signal not in SIGNALS:
      errors.append(f"--sapo_signal={self.signal!r}: choose one of {SIGNALS}")
    if self.heldout_states < 0 or self.warmup_steps < 0:
      errors.append("--sapo_heldout_states and --sapo_warmup_steps must be >= 0")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      errors.append(f"--sapo_lr={self.learning_rate} must be a positive number")
    if not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
      errors.append("--sapo_min_lr_ratio must be in [0, 1], --sapo_weight_decay >= 0")
    if self.temperature <= 0:
      errors.append(f"--sapo_temperature={self.temperature} must be > 0 (the group needs "
                    "different candidates)")
    if not 0 <= self.greedy_candidates < self.group_size:
      errors.append(f"--sapo_greedy_candidates={self.greedy_candidates} must be in [0, "
                    f"--sapo_group_size={self.group_size}) (the group needs samples)")
    if self.loss not in sapo.LOSSES:
      errors.append(f"--sapo_loss={self.loss!r}: choose one of {sorted(sapo.LOSSES)}")
    if self.states_from not in STATE_SOURCES:
      errors.append(f"--sapo_states_from={self.states_from!r}: choose one of "
                    f"{STATE_SOURCES}")
    if self.format_check not in FORMAT_CHECKS:
      errors.append(f"--sapo_format_check={self.format_check!r}: choose one of "
                    f"{FORMAT_CHECKS}")
    for name in ("states_per_iteration", "rollout_states"):
      if getattr(self, name) % data_parallel:
        errors.append(f"--sapo_{name}={getattr(self, name)} is not divisible by the "
                      f"mesh's data axis ({data_parallel})")
    if not 0 <= self.eps_low < 1 or not self.eps_high >= 0 or not self.beta >= 0:
      errors.append(f"--sapo_eps_low={self.eps_low} must be in [0, 1), --sapo_eps_high="
                    f"{self.eps_high} and --sapo_beta={self.beta} >= 0")
    checks = (("rewards", lambda: self.reward_config),
              ("tau/min_mass/judge", lambda: RolloutConfig(
                  delimiter_ids=(0,), tau=self.tau, min_mass=self.min_mass, judge=self.judge,
                  likelihood_threshold=self.likelihood_threshold)))
    for name, check in checks:
      try:
        check()
      except ValueError as e:
        errors.append(f"--sapo_{name}: {e}")
    if errors:
      raise ConfigError("invalid SAPO settings:\n  " + "\n  ".join(errors))
    return self
