"""Verifier modes selected by name: one config, one input structure, one `verify` call.

The engine builds a `VerifierInputs` with the fields its mode needs and calls

    accept, accepted_len = verify(cfg, inputs)   # bool [B, K], int32 [B]

for any registered mode. Fields each built-in mode reads:

    cpn         verdict_logits [B, K, V]  (target logits at each step's verdict position)
    score       verdict_logits [B, K, V]  (target logits at each step's score position)
    likelihood  step_logprobs [B, K, L], step_mask [B, K, L]
    exact       draft_tokens [B, K, L], target_tokens [B, K, L], step_mask [B, K, L],
                optionally target_mask [B, K, L]

`VerifierConfig` is frozen and hashable, so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax

from dream_r_jax.speculative import tbvm


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifierInputs:
  """What the target produced for a `[B, K]` block of drafted steps; unused fields are None."""
  verdict_logits: Optional[jax.Array] = None  # [B, K, V] float
  step_logprobs: Optional[jax.Array] = None   # [B, K, L] float, target log p(draft token)
  step_mask: Optional[jax.Array] = None       # [B, K, L] nonzero on the drafted step's tokens
  draft_tokens: Optional[jax.Array] = None    # [B, K, L] int
  target_tokens: Optional[jax.Array] = None   # [B, K, L] int, target greedy tokens
  target_mask: Optional[jax.Array] = None     # [B, K, L] optional, target step's own mask


@dataclasses.dataclass(frozen=True)
class VerifierConfig:
  """Which verifier to run and its hyperparameters.

  Attributes:
    name: a registered verifier (`cpn`, `score`, `likelihood`, `exact`, ...).
    tau: `cpn`: accept iff P_pos / P_neg >= tau / (1 - tau); in (0.5, 1).
    min_mass: `cpn`: reject a step whose P_pos + P_neg is below it; in [0, 1].
    pos_ids: `cpn`: positive verdict token ids.
    neg_ids: `cpn`: negative verdict token ids.
    score_ids: `score`: token ids of the scores 0, 1, ..., in value order.
    threshold: `score` / `likelihood`: the acceptance threshold; None takes the mode's
      default (`score`: 7.0, `likelihood`: -1.0).
  """
  name: str = "cpn"
  tau: float = 0.8
  min_mass: float = 0.5
  pos_ids: tuple[int, ...] = ()
  neg_ids: tuple[int, ...] = ()
  score_ids: tuple[int, ...] = ()
  threshold: Optional[float] = None

  def __post_init__(self):
    for field in ("pos_ids", "neg_ids", "score_ids"):
      # Tuples keep the config hashable (a jit static argument) whatever the caller passed.
      object.__setattr__(self, field, tuple(int(i) for i in getattr(self, field)))
    verifier = get_verifier(self.name)
    tbvm.check_tau(self.tau)
    tbvm.check_min_mass(self.min_mass)
    if self.threshold is not None and not math.isfinite(self.threshold):
      raise ValueError(f"threshold must be finite, got {self.threshold}.")
    if verifier.check_config is not None:
      verifier.check_config(self)

  @property
  def resolved_threshold(self) -> Optional[float]:
    """`threshold`, or the mode's default when it is None."""
    if self.threshold is not None:
      return self.threshold
    return get_verifier(self.name).default_threshold


VerifierFn = Callable[[VerifierConfig, VerifierInputs], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Verifier:
  """A registered verifier: the function, the inputs it reads and its config check."""
  name: str
  fn: VerifierFn
  requires: tuple[str, ...]
  default_threshold: Optional[float] = None
  check_config: Optional[Callable[[VerifierConfig], None]] = None

  def __call__(self, cfg: VerifierConfig,
               inputs: VerifierInputs) -> tuple[jax.Array, jax.Array]:
    missing = [f for f in self.requires if getattr(inputs, f) is None]
    if missing:
      raise ValueError(
          f"verifier {self.name!r} needs VerifierInputs fields {list(self.requires)}; "
          f"missing: {missing}.")
    with jax.named_scope(f"verify_{self.name}"):
      return self.fn(cfg, inputs)


VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str, *, requires: tuple[str, ...],
                      default_threshold: Optional[float] = None,
                      check_config: Optional[Callable[[VerifierConfig], None]] = None):
  """Decorator: registers `fn(cfg, inputs) -> (accept [B, K], accepted_len [B])` as `name`."""

  def decorator(fn: VerifierFn) -> VerifierFn:
    if name in VERIFIERS:
      raise ValueError(f"verifier {name!r} is already registered.")
    VERIFIERS[name] = Verifier(name, fn, tuple(requires), default_threshold, check_config)
    return fn

  return decorator


def get_verifier(name: str) -> Verifier:
  """The registered verifier called `name`; ValueError listing the known names otherwise."""
  try:
    return VERIFIERS[name]
  except KeyError:
    raise ValueError(
        f"unknown verifier {name!r}; known verifiers: {sorted(VERIFIERS)}.") from None


def verify(cfg: VerifierConfig, inputs: VerifierInputs) -> tuple[jax.Array, jax.Array]:
  """Runs the verifier `cfg.name`: returns `(accept [B, K] bool, accepted_len [B] int32)`."""
  return get_verifier(cfg.name)(cfg, inputs)


def _check_cpn_config(cfg: VerifierConfig) -> None:
  pos = tbvm.check_token_ids("pos_ids", cfg.pos_ids)
  neg = tbvm.check_token_ids("neg_ids", cfg.neg_ids)
  overlap = sorted(set(pos.tolist()) & set(neg.tolist()))
  if overlap:
    raise ValueError(f"pos_ids and neg_ids overlap on token ids {overlap}.")


def _check_score_config(cfg: VerifierConfig) -> None:
  ids = tbvm.check_token_ids("score_ids", cfg.score_ids)
  if ids.shape[0] < 2:
    raise ValueError(f"score_ids needs at least 2 score tokens, got {list(cfg.score_ids)}.")


@register_verifier("cpn", requires=("verdict_logits",), check_config=_check_cpn_config)
def _cpn(cfg: VerifierConfig, inputs: VerifierInputs):
  return tbvm.cpn_accept(inputs.verdict_logits, cfg.pos_ids, cfg.neg_ids, cfg.tau,
                         cfg.min_mass)


@register_verifier("score", requires=("verdict_logits",), default_threshold=7.0,
                   check_config=_check_score_config)
def _score(cfg: VerifierConfig, inputs: VerifierInputs):
  return tbvm.score_accept(inputs.verdict_logits, cfg.score_ids, cfg.resolved_threshold)


@register_verifier("likelihood", requires=("step_logprobs", "step_mask"),
                   default_threshold=-1.0)
def _likelihood(cfg: VerifierConfig, inputs: VerifierInputs):
  return tbvm.likelihood_accept(inputs.step_logprobs, inputs.step_mask,
                                cfg.resolved_threshold)


@register_verifier("exact", requires=("draft_tokens", "target_tokens", "step_mask"))
def _exact(cfg: VerifierConfig, inputs: VerifierInputs):
  del cfg  # The exact verifier has no hyperparameters.
  return tbvm.exact_accept(inputs.draft_tokens, inputs.target_tokens, inputs.step_mask,
                           inputs.target_mask)
