"""SAPO reward terms, registered by name, and their weighted sum (DESIGN.md section 5).

    r_i = w_acc * acceptance + w_faith * faithfulness + w_len * concision + w_fmt * format

Each term is a pure function of a `RewardInputs` pytree, vectorized over N candidate steps,
and carries its own sign: `concision` and `format` are <= 0, so every weight is >= 0 and
setting a weight to 0 ablates its term. Token inputs are `[N, L]` id arrays with a mask
(nonzero on the step's tokens; any positions, not necessarily a prefix).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RewardInputs:
  """Everything the reward terms read about N candidate steps; unused fields are None."""
  cpn: Optional[jax.Array] = None            # [N] float, target's CPN for the candidate
  accepted: Optional[jax.Array] = None       # [N] bool, the target's verifier accepted it
  cand_tokens: Optional[jax.Array] = None    # [N, L] int, the candidate step
  cand_mask: Optional[jax.Array] = None      # [N, L]
  target_tokens: Optional[jax.Array] = None  # [N, S] int, the target's own next step
  target_mask: Optional[jax.Array] = None    # [N, S]
  malformed: Optional[jax.Array] = None      # [N] bool, caller-detected malformed step
  repeated: Optional[jax.Array] = None       # [N] bool, caller-detected repetition
  prev_tokens: Optional[jax.Array] = None    # [N, P] int, the step before the candidate
  prev_mask: Optional[jax.Array] = None      # [N, P]


RewardFn = Callable[[RewardInputs], jax.Array]


@dataclasses.dataclass(frozen=True)
class Reward:
  name: str
  fn: RewardFn
  requires: tuple[str, ...]

  def available(self, inputs: RewardInputs) -> bool:
    return all(getattr(inputs, f) is not None for f in self.requires)

  def __call__(self, inputs: RewardInputs) -> jax.Array:
    missing = [f for f in self.requires if getattr(inputs, f) is None]
    if missing:
      raise ValueError(f"reward {self.name!r} needs RewardInputs fields "
                       f"{list(self.requires)}; missing: {missing}.")
    with jax.named_scope(f"reward_{self.name}"):
      return self.fn(inputs).astype(jnp.float32)


REWARDS: dict[str, Reward] = {}


def register_reward(name: str, *, requires: tuple[str, ...]):
  """Decorator: registers `fn(inputs: RewardInputs) -> [N]` as the reward term `name`."""

  def decorator(fn: RewardFn) -> RewardFn:
    if name in REWARDS:
      raise ValueError(f"reward {name!r} is already registered.")
    REWARDS[name] = Reward(name, fn, tuple(requires))
    return fn

  return decorator


def get_reward(name: str) -> Reward:
  """The registered reward called `name`; ValueError listing the known names otherwise."""
  try:
    return REWARDS[name]
  except KeyError:
    raise ValueError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}.") from None


def _lengths(mask: jax.Array) -> jax.Array:
  return jnp.sum(mask.astype(bool), axis=-1, dtype=jnp.int32)


def token_f1(a: jax.Array, a_mask: jax.Array, b: jax.Array, b_mask: jax.Array) -> jax.Array:
  """Bag-of-tokens F1 between `a [N, L]` and `b [N, S]`: 2|a & b| / (|a| + |b|) (multisets).

  Two empty steps score 1, one empty step scores 0. The multiset overlap is counted exactly:
  the i-th occurrence of a token in `a` is matched iff `b` holds that token more than i times.
  """
  a_valid, b_valid = a_mask.astype(bool), b_mask.astype(bool)
  in_b = jnp.sum((a[:, :, None] == b[:, None, :]) & b_valid[:, None, :], axis=-1)  # [N, L]
  length = a.shape[1]
  earlier = jnp.tril(jnp.ones((length, length), bool), k=-1)  # [L, L], j < i
  same_before = (a[:, :, None] == a[:, None, :]) & a_valid[:, None, :] & earlier
  occurrence = jnp.sum(same_before, axis=-1)  # [N, L], 0 for the first occurrence
  overlap = jnp.sum(a_valid & (occurrence < in_b), axis=-1)
  total = _lengths(a_valid) + _lengths(b_valid)
  return jnp.where(total > 0, 2.0 * overlap / jnp.maximum(total, 1), 1.0)


def _compact(tokens: jax.Array, mask: jax.Array, width: int) -> jax.Array:
  """The valid tokens of each row moved to the front, in order, padded with -1 to `width`."""
  valid = mask.astype(bool)
  order = jnp.argsort(~valid, axis=-1, stable=True)
  packed = jnp.where(jnp.take_along_axis(valid, order, axis=-1),
                     jnp.take_along_axis(tokens.astype(jnp.int32), order, axis=-1), -1)
  return jnp.pad(packed, ((0, 0), (0, width - packed.shape[1])), constant_values=-1)


def same_sequence(a: jax.Array, a_mask: jax.Array, b: jax.Array, b_mask: jax.Array) -> jax.Array:
  """bool `[N]`: the valid tokens of `a` and `b`, read in order, are the same sequence."""
  width = max(a.shape[1], b.shape[1])
  return jnp.all(_compact(a, a_mask, width) == _compact(b, b_mask, width), axis=-1)


@register_reward("acceptance", requires=("cpn",))
def acceptance_reward(inputs: RewardInputs) -> jax.Array:
  """The target's CPN for the candidate, in [0, 1]; NaN (a judge with no verdict mass) is 0."""
  cpn = inputs.cpn.astype(jnp.float32)
  return jnp.where(jnp.isnan(cpn), 0.0, cpn)


@register_reward("faithfulness",
                 requires=("cand_tokens", "cand_mask", "target_tokens", "target_mask"))
def faithfulness_reward(inputs: RewardInputs) -> jax.Array:
  """Token F1 between the candidate and the target's own next step, in [0, 1]."""
  return token_f1(inputs.cand_tokens, inputs.cand_mask, inputs.target_tokens,
                  inputs.target_mask)


@register_reward("exact_match",
                 requires=("cand_tokens", "cand_mask", "target_tokens", "target_mask"))
def exact_match_reward(inputs: RewardInputs) -> jax.Array:
  """1 if the candidate is token for token the target's own next step, else 0."""
  return same_sequence(inputs.cand_tokens, inputs.cand_mask, inputs.target_tokens,
                       inputs.target_mask).astype(jnp.float32)


@register_reward("concision", requires=("cand_mask", "target_mask", "accepted"))
def concision_reward(inputs: RewardInputs) -> jax.Array:
  """`min(0, 1 - |d| / |s|)` for accepted candidates, 0 for rejected ones; in (-inf, 0].

  Only a step longer than the target's is penalised, and only when accepted: a rejected
  step is replaced by the target's anyway, so its length costs nothing. An empty target step
  counts as length 1.
  """
  len_d = _lengths(inputs.cand_mask).astype(jnp.float32)
  len_s = jnp.maximum(_lengths(inputs.target_mask), 1).astype(jnp.float32)
  penalty = jnp.minimum(0.0, 1.0 - len_d / len_s)
  return jnp.where(inputs.accepted.astype(bool), penalty, 0.0)


@register_reward("format", requires=("cand_mask",))
def format_reward(inputs: RewardInputs) -> jax.Array:
  """-1 for a bad step, else 0. Bad: empty, flagged `malformed`, flagged `repeated`, or
  (when `prev_tokens`/`prev_mask` are given) the same token sequence as the previous step."""
  bad = _lengths(inputs.cand_mask) == 0
  if inputs.malformed is not None:
    bad |= inputs.malformed.astype(bool)
  if inputs.repeated is not None:
    bad |= inputs.repeated.astype(bool)
  if inputs.prev_tokens is not None and inputs.prev_mask is not None:
    if inputs.cand_tokens is None:
      raise ValueError("reward 'format' needs cand_tokens to compare with prev_tokens.")
    bad |= same_sequence(inputs.cand_tokens, inputs.cand_mask, inputs.prev_tokens,
                         inputs.prev_mask)
  return -bad.astype(jnp.float32)


DEFAULT_WEIGHTS = (("acceptance", 1.0), ("faithfulness", 0.5), ("concision", 0.25),
                   ("format", 1.0))


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Weights of the reward terms, by registered name; a term left out weighs 0.

  Attributes:
    weights: `(name, weight)` pairs (a mapping is accepted and converted). Every weight is
      finite and >= 0 (terms carry their own sign) and at least one is > 0.
  """
  weights: tuple[tuple[str, float], ...] = DEFAULT_WEIGHTS

  def __post_init__(self):
    items = self.weights.items() if isinstance(self.weights, Mapping) else self.weights
    weights = tuple(sorted((str(k), float(v)) for k, v in items))
    object.__setattr__(self, "weights", weights)
    names = [k for k, _ in weights]
    if len(set(names)) != len(names):
      raise ValueError(f"reward weights name a term twice: {names}.")
    for name, w in weights:
      get_reward(name)
      if not math.isfinite(w):
        raise ValueError(f"reward weight {name}={w} is not finite.")
      if w < 0:
        raise ValueError(f"reward weight {name}={w} is negative; weights are >= 0 and the "
                         "penalty terms (concision, format) are already <= 0.")
    if not any(w > 0 for _, w in weights):
      raise ValueError(f"all reward weights are zero ({dict(weights)}); at least one term "
                       "must count.")

  @classmethod
  def parse(cls, spec: str) -> "RewardConfig":
    """From a flag string like `"concision=0,faithfulness=1"`, overriding the defaults."""
    weights = dict(DEFAULT_WEIGHTS)
    for item in filter(None, (s.strip() for s in spec.split(","))):
      name, sep, value = item.partition("=")
      if not sep:
        raise ValueError(f"reward weight {item!r} is not of the form name=value.")
      try:
        weights[name.strip()] = float(value)
      except ValueError:
        raise ValueError(f"reward weight {item!r}: {value!r} is not a number.") from None
    return cls(weights)

  def weight(self, name: str) -> float:
    return dict(self.weights).get(name, 0.0)

  def ablate(self, name: str) -> "RewardConfig":
    """The same config with the term `name` switched off."""
    get_reward(name)
    return RewardConfig({**dict(self.weights), name: 0.0})


def combine_rewards(cfg: RewardConfig,
                    parts: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of reward terms.

  Args:
    cfg: the weights.
    parts: term name -> `[N]` values (unweighted). Terms with weight 0 may be absent; if
      present they are returned for logging and do not enter the sum (not even as NaN).

  Returns:
    `(total [N] float32, parts)`, with `parts` as float32 arrays.

  Raises:
    ValueError: an unknown term name, a weighted term missing, shapes that differ.
  """
  for name in parts:
    get_reward(name)
  missing = [n for n, w in cfg.weights if w > 0 and n not in parts]
  if missing:
    raise ValueError(f"reward terms {missing} have nonzero weight but are not in parts "
                     f"(got {sorted(parts)}).")
  parts = {n: jnp.asarray(v, jnp.float32) for n, v in parts.items()}
  shapes = {n: v.shape for n, v in parts.items()}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
    raise ValueError(f"reward terms must all have the same shape [N], got {shapes}.")
  with jax.named_scope("combine_rewards"):
    total = sum(w * parts[n] for n, w in cfg.weights if w > 0)
  return total, parts


def compute_rewards(cfg: RewardConfig,
                    inputs: RewardInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Evaluates every weighted term (and every zero-weight term whose inputs are present,
  for logging) and combines them. Raises ValueError if a weighted term lacks inputs."""
  parts = {}
  for name, reward in REWARDS.items():
    if cfg.weight(name) > 0 or reward.available(inputs):
      parts[name] = reward(inputs)
  return combine_rewards(cfg, parts)
