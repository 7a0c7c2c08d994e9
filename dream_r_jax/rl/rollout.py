"""SAPO rollout: the draft samples G candidate steps per state, the target scores them.

Three jitted programs, each taking a model as `(graphdef, params)` (graphdef static):

  * `sample_candidates` (scope `rollout`, draft mesh): prefills the S state prefixes once,
    repeats the cache G times and samples one step per row (stopping at a delimiter, EOS or
    `max_step_tokens`), recording each sampled token's log-probability under the sampling
    distribution: `logp_old`, with no second pass.
  * `score_candidates` (scope `score`, target mesh): prefills the prefixes on the target,
    repeats the cache, feeds `candidate + verify template` and reads the verdict logits after
    the template: CPN and the TBVM accept decision of every candidate in one batched pass.
  * `candidate_logprobs`: teacher-forced log-probs of the candidate tokens, through the
    same prefix cache; the frozen reference gives `logp_ref` with it, and the SAPO update
    differentiates it for `logp_new`.

Rows are ordered state-major: row `s * G + g` is candidate g of state s, which is the
layout `group_advantages` expects. Log-probs are those of the tempered distribution
`softmax(logits / temperature)` that the candidates were drawn from, for old, new and
reference alike, so that the ratio is an importance ratio (temperature 0, greedy, scores
log-probs at temperature 1).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dream_r_jax.decoding.generate import prefill_fresh, token_in
from dream_r_jax.models import image_processing
from dream_r_jax.speculative import tbvm

Inputs = dict[str, Any]  # prefix_ids [S, P], prefix_lens [S], positions, rope_delta, pixels


JUDGES = ("cpn", "likelihood")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static settings of the rollout programs (hashable: a jit static argument).

  Attributes:
    max_step_tokens: L, tokens per candidate step (its delimiter included).
    temperature: sampling temperature; 0 is greedy.
    delimiter_ids: step-delimiter ids (a candidate ends after one).
    eos_ids: end-of-sequence ids (a candidate ends after one).
    template_ids: the verify template, fed after the candidate.
    pos_ids / neg_ids: the positive / negative verdict token ids.
    tau / min_mass: the TBVM CPN rule (DESIGN.md section 3).
    pad_id: id written past each candidate's end.
    judge: how the target judges a candidate: "cpn" (its verdict after the verify
      template, the TBVM default) or "likelihood" (the mean log-probability of the
      candidate's tokens under the target, accepted at >= `likelihood_threshold`; the
      `likelihood` verifier of the engine). Its acceptance score is CPN or exp(mean log-p).
    likelihood_threshold: see `judge`.
    greedy_candidates: the first this many candidates of each group are the policy's greedy
      step instead of samples, so that the group's advantages also move the greedy mode,
      which is what drafts at test time.
  """
  max_step_tokens: int = 16
  temperature: float = 1.0
  delimiter_ids: tuple[int, ...] = ()
  eos_ids: tuple[int, ...] = ()
  template_ids: tuple[int, ...] = ()
  pos_ids: tuple[int, ...] = ()
  neg_ids: tuple[int, ...] = ()
  tau: float = 0.8
  min_mass: float = 0.5
  pad_id: int = 0
  judge: str = "cpn"
  likelihood_threshold: float = -1.0
  greedy_candidates: int = 0

  def __post_init__(self):
    if self.max_step_tokens < 1:
      raise ValueError(f"max_step_tokens={self.max_step_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if not self.delimiter_ids:
      raise ValueError("delimiter_ids is empty: a candidate step needs a delimiter")
    tbvm.check_tau(self.tau)
    tbvm.check_min_mass(self.min_mass)
    if self.judge not in JUDGES:
      raise ValueError(f"judge={self.judge!r}: choose one of {JUDGES}")
    if self.greedy_candidates < 0:
      raise ValueError(f"greedy_candidates={self.greedy_candidates} must be >= 0")
    if not self.likelihood_threshold <= 0:
      raise ValueError(f"likelihood_threshold={self.likelihood_threshold} must be <= 0 "
                       "(a mean log-probability)")

  @property
  def logp_temperature(self) -> float:
    return self.temperature if self.temperature > 0 else 1.0

  @classmethod
  def for_tokenizer(cls, tokenizer, **kw) -> "RolloutConfig":
    """Delimiter, EOS, template and verdict ids of the bundled task's prompts."""
    from dream_r_jax.evaluation.runner import verify_template_ids  # pylint: disable=g-import-not-at-top
    from dream_r_jax.rl.states import delimiter_ids  # pylint: disable=g-import-not-at-top
    template, pos, neg = verify_template_ids(tokenizer)
    return cls(delimiter_ids=delimiter_ids(tokenizer), eos_ids=(tokenizer.eos_token_id,),
               template_ids=template, pos_ids=(pos,), neg_ids=(neg,),
               pad_id=tokenizer.pad_token_id or 0, **kw)


def prefix_inputs(cfg, prefix_ids: np.ndarray, prefix_lens: np.ndarray,
                  images: Sequence[Optional[np.ndarray]] = ()):
  """Host-side model inputs of S prefixes: (inputs dict, static image grid or None).

  For an image model the M-RoPE positions need the concrete ids (they are computed here,
  on the host) and the vision tower the processed pixels of the S images.
  """
  inputs: Inputs = {"prefix_ids": np.asarray(prefix_ids, np.int32),
                    "prefix_lens": np.asarray(prefix_lens, np.int32),
                    "positions": None, "rope_delta": None, "pixel_values": None}
  present = [im for im in images if im is not None]
  if not present or cfg.vision is None:
    return inputs, None
  if len(present) != len(prefix_ids):
    raise ValueError(f"{len(present)} images for {len(prefix_ids)} prefixes; every state "
                     "of an image task needs its image")
  from dream_r_jax.models import mrope  # pylint: disable=g-import-not-at-top
  pixels, grid = image_processing.preprocess_images(present)
  mask = (np.arange(prefix_ids.shape[1])[None] < prefix_lens[:, None]).astype(np.int32)
  positions, deltas = mrope.get_rope_index(cfg, prefix_ids, grid, mask)
  inputs.update(positions=np.asarray(positions, np.int32),
                rope_delta=np.asarray(deltas, np.int32),
                pixel_values=np.asarray(pixels, np.float32))
  return inputs, tuple(tuple(int(v) for v in row) for row in np.asarray(grid))


def repeat_rows(tree, group: int):
  """Each row of every array in `tree` repeated `group` times, consecutively."""
  return jax.tree.map(lambda x: jnp.repeat(x, group, axis=0), tree)


def _prefilled(graphdef, params, inputs: Inputs, grid, group: int, extra: int):
  """The model, the prefixes' cache (room for `extra` more tokens) and last logits, each
  repeated `group` times: G candidates share one prefill."""
  model = nnx.merge(graphdef, params)
  ids = inputs["prefix_ids"]
  last, cache = prefill_fresh(graphdef, params, ids.shape[1] + extra, ids,
                              inputs["prefix_lens"], inputs["positions"], inputs["rope_delta"],
                              inputs["pixel_values"], None if grid is None else np.asarray(grid))
  return model, repeat_rows(cache, group), repeat_rows(last, group)


def _token_logprobs(logits, tokens, temperature: float):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "rc", "group", "grid"))
def sample_candidates(graphdef, params, inputs: Inputs, rng, *, rc: RolloutConfig,
                      group: int, grid=None) -> dict[str, jax.Array]:
  """G sampled candidate steps per state (the first `rc.greedy_candidates` of each group
  greedy), with their log-probs. Jitted.

  Args:
    graphdef / params: the draft (the rollout policy).
    inputs: `prefix_inputs(...)[0]` for S states (device or host arrays).
    rng: PRNG key.
    rc: rollout settings.
    group: G, candidates per state.
    grid: the static image grid from `prefix_inputs` (None without images).

  Returns:
    dict of `tokens [N, L]` (pad past each length), `lengths [N]` (>= 1), `logp [N, L]`
    (0 past each length), `ended [N]` (the step ended with a delimiter or EOS rather than
    running into L) and `hit_eos [N]`; N = S * G, state-major.
  """
  length = rc.max_step_tokens
  stops = rc.delimiter_ids + rc.eos_ids
  with jax.named_scope("rollout"):
    model, cache, last = _prefilled(graphdef, params, inputs, grid, group, length)
    n = last.shape[0]

    def cond(c):
      return (c["i"] < length) & jnp.any(c["active"])

    def body(c):
      rng, sub = jax.random.split(c["rng"])
      logits = c["logits"].astype(jnp.float32)
      if rc.temperature > 0:
        tok = jax.random.categorical(sub, logits / rc.temperature, axis=-1)
      else:
        tok = jnp.argmax(logits, axis=-1)
      if rc.greedy_candidates:
        greedy_row = jnp.arange(n) % group < rc.greedy_candidates
        tok = jnp.where(greedy_row, jnp.argmax(logits, axis=-1), tok)
      tok = tok.astype(jnp.int32)
      act = c["active"]
      logp = _token_logprobs(logits, tok, rc.logp_temperature)
      # Every live row writes at index i (rows only ever stop), so one column update does.
      tokens = c["tokens"].at[:, c["i"]].set(jnp.where(act, tok, rc.pad_id))
      logps = c["logp"].at[:, c["i"]].set(jnp.where(act, logp, 0.0))
      stop = token_in(tok, stops) & act
      more = act & ~stop & (c["i"] + 1 < length)
      with jax.named_scope("draft_step"):
        out, cache = model(tok[:, None], cache=c["cache"], num_new=more.astype(jnp.int32))
      return dict(i=c["i"] + 1, rng=rng, tokens=tokens, logp=logps,
                  lengths=c["lengths"] + act, ended=c["ended"] | stop,
                  hit_eos=c["hit_eos"] | (token_in(tok, rc.eos_ids) & act), active=more,
                  cache=cache, logits=jnp.where(more[:, None], out[:, 0], c["logits"]))

    init = dict(i=jnp.int32(0), rng=rng, tokens=jnp.full((n, length), rc.pad_id, jnp.int32),
                logp=jnp.zeros((n, length), jnp.float32), lengths=jnp.zeros((n,), jnp.int32),
                ended=jnp.zeros((n,), bool), hit_eos=jnp.zeros((n,), bool),
                active=jnp.ones((n,), bool), cache=cache, logits=last)
    c = jax.lax.while_loop(cond, body, init)
  return {k: c[k] for k in ("tokens", "lengths", "logp", "ended", "hit_eos")}


def candidate_logprobs(graphdef, params, inputs: Inputs, tokens, lengths, *,
                       rc: RolloutConfig, group: int, grid=None) -> jax.Array:
  """Teacher-forced `[N, L]` log-probs of the candidate tokens (0 past each length).

  Differentiable in `params` (the prefix cache included). Not jitted itself: it runs
  inside `reference_logprobs` and the SAPO update step.
  """
  model, cache, last = _prefilled(graphdef, params, inputs, grid, group, tokens.shape[1])
  logits, _ = model(tokens, cache=cache, num_new=lengths)  # [N, L, V]
  before = jnp.concatenate([last[:, None], logits[:, :-1]], axis=1)  # predicts tokens[:, t]
  logp = _token_logprobs(before, tokens, rc.logp_temperature)
  return jnp.where(jnp.arange(tokens.shape[1])[None] < lengths[:, None], logp, 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "rc", "group", "grid"))
def reference_logprobs(graphdef, params, inputs: Inputs, tokens, lengths, *,
                       rc: RolloutConfig, group: int, grid=None) -> jax.Array:
  """`candidate_logprobs` under the frozen reference (jitted, no gradient)."""
  with jax.named_scope("reference"):
    return candidate_logprobs(graphdef, params, inputs, tokens, lengths, rc=rc, group=group,
                              grid=grid)


def verdict_inputs(tokens, lengths, template_ids: Sequence[int], pad_id: int):
  """`[N, L + Lv]` rows `candidate[:length] + template + pad` and their lengths."""
  n, length = tokens.shape
  lv = len(template_ids)
  template = jnp.asarray(template_ids, jnp.int32)
  idx = jnp.arange(length + lv)[None]  # [1, L + Lv]
  cand = jnp.take_along_axis(tokens, jnp.clip(idx, 0, length - 1).repeat(n, 0), axis=1)
  tpl = template[jnp.clip(idx - lengths[:, None], 0, lv - 1)]
  ids = jnp.where(idx < lengths[:, None], cand,
                  jnp.where(idx < (lengths + lv)[:, None], tpl, pad_id))
  return ids.astype(jnp.int32), lengths + lv


@functools.partial(jax.jit, static_argnames=("graphdef", "rc", "group", "grid"))
def score_candidates(graphdef, params, inputs: Inputs, tokens, lengths, *,
                     rc: RolloutConfig, group: int, grid=None) -> dict[str, jax.Array]:
  """The target's verdict on every candidate: `cpn [N]`, `accept [N]`, `mass [N]`. Jitted.

  The verdict query is `prefix + candidate + template` (the candidate keeps its delimiter,
  as in the engine); the verdict logits are the target's next-token logits after it. With
  `rc.judge == "likelihood"` the same pass gives the target's log-probs of the candidate
  tokens instead, and `cpn` holds exp(mean log-prob) (`mass` is then 1).
  """
  if rc.judge == "cpn" and (not rc.template_ids or not rc.pos_ids or not rc.neg_ids):
    raise ValueError("scoring needs template_ids, pos_ids and neg_ids in the RolloutConfig")
  with jax.named_scope("score"):
    # The likelihood judge reads only the candidate's tokens; the template (if any) rides
    # along so that both judges share one program shape.
    ids, n_new = verdict_inputs(tokens, lengths, rc.template_ids or (rc.pad_id,), rc.pad_id)
    model, cache, last = _prefilled(graphdef, params, inputs, grid, group, ids.shape[1])
    logits, _ = model(ids, cache=cache, num_new=n_new)
    if rc.judge == "likelihood":
      length = tokens.shape[1]
      before = jnp.concatenate([last[:, None], logits[:, :length - 1]], axis=1)
      logp = _token_logprobs(before, tokens, 1.0)[:, None]  # [N, 1, L]
      mask = (jnp.arange(length)[None] < lengths[:, None])[:, None]
      accept, _ = tbvm.likelihood_accept(logp, mask, rc.likelihood_threshold)
      mean = jnp.sum(jnp.where(mask, logp, 0.0), -1)[:, 0] / jnp.maximum(lengths, 1)
      return {"cpn": jnp.exp(mean), "accept": accept[:, 0],
              "mass": jnp.ones_like(mean)}
    verdict = jnp.take_along_axis(logits, (n_new - 1)[:, None, None], axis=1)[:, 0]
    stats = tbvm.verdict_stats(verdict, rc.pos_ids, rc.neg_ids)
    accept, _ = tbvm.cpn_accept(verdict[:, None], rc.pos_ids, rc.neg_ids, rc.tau, rc.min_mass)
  return {"cpn": stats.cpn, "accept": accept[:, 0], "mass": stats.mass}
