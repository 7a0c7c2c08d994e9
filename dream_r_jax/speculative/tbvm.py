"""TBVM: threshold-based verification of drafted reasoning steps (DESIGN.md section 3).

Pure, jittable functions that turn the target's outputs for a `[B, K]` block of drafted steps
into a per-step accept decision and the per-row accepted length. The default rule is the CPN
ratio test:

    P_pos = sum of p over pos_ids,  P_neg = sum of p over neg_ids,  mass = P_pos + P_neg
    accept  <=>  mass >= min_mass  and  log P_pos - log P_neg >= log(tau / (1 - tau))

Alongside it live the other verifier modes (`score`, `likelihood`, `exact`). Selection by
name, configs and a common input structure are in `dream_r_jax.speculative.verifiers`.

Hyperparameters (`tau`, `min_mass`, id lists, thresholds) are normally Python values and are
validated on the host. They may also be traced arrays (e.g. a tau sweep under one `jit`); the
range checks are then skipped and the threshold is computed in float32, so an exact boundary
tie can land one ulp either way.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[jax.Array, np.ndarray, Sequence[int]]


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def leading_accepted(accept: jax.Array) -> jax.Array:
  """Number of leading `True` steps along the last axis.

  Args:
    accept: bool `[..., K]`, the per-step decisions.

  Returns:
    int32 `[...]`: for each row, the index of its first rejection (K if there is none).
  """
  return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1, dtype=jnp.int32)


def check_tau(tau) -> None:
  """Raises ValueError unless `tau` lies in the open interval (0.5, 1)."""
  if _is_traced(tau):
    return
  t = float(np.asarray(tau))
  if not 0.5 < t < 1.0:  # Also rejects NaN.
    raise ValueError(f"tau must lie in (0.5, 1), got tau={t}.")


def check_min_mass(min_mass) -> None:
  """Raises ValueError unless `min_mass` lies in [0, 1]."""
  if _is_traced(min_mass):
    return
  m = float(np.asarray(min_mass))
  if not 0.0 <= m <= 1.0:
    raise ValueError(f"min_mass must lie in [0, 1], got min_mass={m}.")


def check_token_ids(name: str, ids: ArrayLike, vocab_size: Optional[int] = None) -> jax.Array:
  """Validates a list of verdict token ids and returns it as an int32 array.

  Args:
    name: the argument's name, used in error messages.
    ids: the token ids, a non-empty 1-D list of distinct ints.
    vocab_size: if given, every id must lie in [0, vocab_size).

  Returns:
    int32 `[n]` array of the ids (a traced input is returned unchecked).

  Raises:
    ValueError: empty, not 1-D, duplicated or out-of-range ids.
  """
  if _is_traced(ids):
    return ids
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D list of token ids, got shape {arr.shape}.")
  if arr.size == 0:
    raise ValueError(f"{name} is empty: at least one verdict token id is needed.")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}.")
  if len(np.unique(arr)) != arr.size:
    # A duplicated id would count its probability twice.
    raise ValueError(f"{name} holds duplicate token ids: {arr.tolist()}.")
  if vocab_size is not None and (arr.min() < 0 or arr.max() >= vocab_size):
    raise ValueError(
        f"{name} must lie in [0, {vocab_size}) (the vocabulary), got {arr.tolist()}.")
  return jnp.asarray(arr, jnp.int32)


def _check_disjoint(pos_ids, neg_ids) -> None:
  if _is_traced(pos_ids) or _is_traced(neg_ids):
    return
  both = np.intersect1d(np.asarray(pos_ids), np.asarray(neg_ids))
  if both.size:
    raise ValueError(f"pos_ids and neg_ids overlap on token ids {both.tolist()}.")


def _check_block(name: str, x: jax.Array, rank: int, layout: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {x.shape}.")
  if x.shape[1] < 1:
    raise ValueError(f"{name} has K={x.shape[1]} drafted steps; K must be >= 1.")


class VerdictStats(NamedTuple):
  """What the target's verdict distribution says about each step (all float32 `[...]`)."""
  log_odds: jax.Array  # log P_pos - log P_neg; +inf when P_neg == 0.
  mass: jax.Array      # P_pos + P_neg.
  cpn: jax.Array       # P_pos / (P_pos + P_neg); 0 when both are exactly 0.


def verdict_stats(verdict_logits: jax.Array, pos_ids: ArrayLike,
                  neg_ids: ArrayLike) -> VerdictStats:
  """Log-odds, verdict mass and CPN from verdict logits of any leading shape.

  The log-odds are computed from the raw logits, `logsumexp(z[pos]) - logsumexp(z[neg])`: the
  softmax normaliser cancels, so the ratio test is not disturbed by the rounding of the
  normaliser (with single ids it is exactly `z[pos] - z[neg]`).

  Args:
    verdict_logits: float `[..., V]`, the target's logits at the verdict position.
    pos_ids: int `[P]`, positive verdict token ids.
    neg_ids: int `[Q]`, negative verdict token ids, disjoint from `pos_ids`.

  Returns:
    A `VerdictStats` of float32 `[...]` arrays.
  """
  vocab = verdict_logits.shape[-1]
  pos_ids = check_token_ids("pos_ids", pos_ids, vocab)
  neg_ids = check_token_ids("neg_ids", neg_ids, vocab)
  _check_disjoint(pos_ids, neg_ids)
  with jax.named_scope("tbvm/verdict_stats"):
    z = verdict_logits.astype(jnp.float32)  # [..., V]
    lse_all = jax.nn.logsumexp(z, axis=-1)  # [...]
    lse_pos = jax.nn.logsumexp(jnp.take(z, pos_ids, axis=-1), axis=-1)  # [...]
    lse_neg = jax.nn.logsumexp(jnp.take(z, neg_ids, axis=-1), axis=-1)  # [...]
    # NaN only when both sets are exactly empty of mass (-inf logits); that never passes a
    # `>=` test, which is what a judge that did not answer deserves.
    log_odds = lse_pos - lse_neg
    mass = jnp.exp(jnp.logaddexp(lse_pos, lse_neg) - lse_all)
    cpn = jnp.where(jnp.isnan(log_odds), 0.0, jax.nn.sigmoid(log_odds))
  return VerdictStats(log_odds=log_odds, mass=mass, cpn=cpn)


def cpn_scores(verdict_logits: jax.Array, pos_ids: ArrayLike, neg_ids: ArrayLike) -> jax.Array:
  """CPN = P_pos / (P_pos + P_neg), float32 `[...]` for logits `[..., V]` (SAPO's reward)."""
  return verdict_stats(verdict_logits, pos_ids, neg_ids).cpn


def _log_odds_threshold(tau) -> jax.Array:
  if _is_traced(tau):
    tau = tau.astype(jnp.float32)
    return jnp.log(tau) - jnp.log1p(-tau)
  # Float64 on the host, so tau=0.8 gives exactly float32(log 4) and a 4:1 verdict ties.
  t = float(np.asarray(tau))
  return jnp.float32(math.log(t) - math.log1p(-t))


def cpn_accept(
    verdict_logits: jax.Array,  # [B, K, V]
    pos_ids: ArrayLike,         # [P]
    neg_ids: ArrayLike,         # [Q]
    tau,
    min_mass,
) -> tuple[jax.Array, jax.Array]:
  """The TBVM ratio test for each of K drafted steps, and the accepted prefix length.

  Args:
    verdict_logits: float `[B, K, V]`, the target's logits at each step's verdict position.
    pos_ids: positive verdict token ids (non-empty, distinct).
    neg_ids: negative verdict token ids (non-empty, distinct, disjoint from `pos_ids`).
    tau: in (0.5, 1); a step needs `P_pos / P_neg >= tau / (1 - tau)`.
    min_mass: in [0, 1]; a step whose `P_pos + P_neg` is below it is rejected.

  Returns:
    `(accept, accepted_len)`: bool `[B, K]`, each step's test on its own, and int32 `[B]`,
    the number of leading accepted steps per row. A step with `P_neg == 0` passes the ratio
    test; a step with `P_pos == P_neg == 0` fails it.

  Raises:
    ValueError: bad rank, K < 1, tau or min_mass out of range, bad id lists.
  """
  verdict_logits = jnp.asarray(verdict_logits)
  _check_block("verdict_logits", verdict_logits, 3, "[B, K, V]")
  check_tau(tau)
  check_min_mass(min_mass)
  stats = verdict_stats(verdict_logits, pos_ids, neg_ids)
  with jax.named_scope("tbvm/cpn_accept"):
    threshold = _log_odds_threshold(tau)
    min_mass = jnp.asarray(min_mass, jnp.float32)
    accept = (stats.mass >= min_mass) & (stats.log_odds >= threshold)  # [B, K]
    return accept, leading_accepted(accept)


def expected_scores(score_logits: jax.Array, score_ids: ArrayLike) -> jax.Array:
  """Expected score `sum_k k * p(k)`, with p renormalised over the score tokens.

  Args:
    score_logits: float `[..., V]`, the target's logits at the score position.
    score_ids: int `[S]`, the ids of the tokens meaning 0, 1, ..., S-1 (SpecReason: "0".."9").

  Returns:
    float32 `[...]` in [0, S-1].
  """
  score_ids = check_token_ids("score_ids", score_ids, score_logits.shape[-1])
  with jax.named_scope("tbvm/expected_scores"):
    z = jnp.take(score_logits.astype(jnp.float32), score_ids, axis=-1)  # [..., S]
    p = jax.nn.softmax(z, axis=-1)  # [..., S]
    values = jnp.arange(z.shape[-1], dtype=jnp.float32)  # [S]
    return jnp.sum(p * values, axis=-1)


def score_accept(score_logits: jax.Array, score_ids: ArrayLike,
                 threshold) -> tuple[jax.Array, jax.Array]:
  """SpecReason-style verification: accept iff the expected score >= `threshold`.

  Args:
    score_logits: float `[B, K, V]`.
    score_ids: int `[S]`, ids of the score tokens in value order.
    threshold: the minimum expected score (SpecReason uses 7 on a 0..9 scale).

  Returns:
    `(accept [B, K] bool, accepted_len [B] int32)`.
  """
  score_logits = jnp.asarray(score_logits)
  _check_block("verdict_logits", score_logits, 3, "[B, K, V]")
  score_ids = check_token_ids("score_ids", score_ids, score_logits.shape[-1])
  if score_ids.shape[0] < 2:
    raise ValueError(f"score_ids needs at least 2 score tokens, got {score_ids.shape[0]}.")
  accept = expected_scores(score_logits, score_ids) >= jnp.float32(threshold)
  return accept, leading_accepted(accept)


def gather_token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(token) under `logits`: float32 `[...]` for logits `[..., V]` and tokens `[...]`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def mean_step_logprob(step_logprobs: jax.Array, step_mask: jax.Array) -> jax.Array:
  """Masked mean over L of `[..., L]` log-probs; -inf for a step with no valid token."""
  valid = step_mask.astype(bool)
  # `where`, not a product: padded positions may hold -inf or NaN.
  total = jnp.sum(jnp.where(valid, step_logprobs.astype(jnp.float32), 0.0), axis=-1)
  count = jnp.sum(valid, axis=-1)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), -jnp.inf)


def likelihood_accept(step_logprobs: jax.Array, step_mask: jax.Array,
                      threshold) -> tuple[jax.Array, jax.Array]:
  """Accept iff the target's mean log-prob of the step's tokens >= `threshold`.

  Args:
    step_logprobs: float `[B, K, L]`, the target's log-prob of each drafted token.
    step_mask: `[B, K, L]`, nonzero on the step's tokens. An empty step is rejected.
    threshold: the minimum mean log-probability (<= 0).

  Returns:
    `(accept [B, K] bool, accepted_len [B] int32)`.
  """
  step_logprobs = jnp.asarray(step_logprobs)
  _check_block("step_logprobs", step_logprobs, 3, "[B, K, L]")
  _check_same_shape(("step_logprobs", step_logprobs), ("step_mask", step_mask))
  with jax.named_scope("tbvm/likelihood_accept"):
    accept = mean_step_logprob(step_logprobs, step_mask) >= jnp.float32(threshold)
    return accept, leading_accepted(accept)


def exact_accept(draft_tokens: jax.Array, target_tokens: jax.Array, step_mask: jax.Array,
                 target_mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Accept iff the drafted step is token for token the target's greedy step.

  Args:
    draft_tokens: int `[B, K, L]`, the drafted steps.
    target_tokens: int `[B, K, L]`, the target's greedy tokens for the same steps. Usually
      the argmax of the target's logits one position before each drafted token (teacher
      forced), in which case `target_mask` is omitted: a step whose every token is the
      target's argmax, its end included, is exactly the step greedy decoding would write.
    step_mask: `[B, K, L]`, nonzero on the drafted step's tokens. An empty step is rejected.
    target_mask: optional `[B, K, L]` mask of a separately decoded target step; the masks
      must then be equal as well (same length).

  Returns:
    `(accept [B, K] bool, accepted_len [B] int32)`.
  """
  draft_tokens = jnp.asarray(draft_tokens)
  _check_block("draft_tokens", draft_tokens, 3, "[B, K, L]")
  named = [("draft_tokens", draft_tokens), ("target_tokens", target_tokens),
           ("step_mask", step_mask)]
  if target_mask is not None:
    named.append(("target_mask", target_mask))
  _check_same_shape(*named)
  with jax.named_scope("tbvm/exact_accept"):
    valid = step_mask.astype(bool)  # [B, K, L]
    same = jnp.all(jnp.where(valid, draft_tokens == target_tokens, True), axis=-1)  # [B, K]
    if target_mask is not None:
      same &= jnp.all(valid == target_mask.astype(bool), axis=-1)
    accept = same & jnp.any(valid, axis=-1)
    return accept, leading_accepted(accept)


def _check_same_shape(*named: tuple[str, jax.Array]) -> None:
  first_name, first = named[0]
  for name, x in named[1:]:
    if jnp.shape(x) != jnp.shape(first):
      raise ValueError(
          f"{name} has shape {jnp.shape(x)}, but {first_name} has shape {jnp.shape(first)}.")
