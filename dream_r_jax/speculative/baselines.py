"""The baseline methods behind one signature, registered by name.

    out = run_method("token_sd", draft=draft, target=target, prompt_ids=ids,
                     prompt_lens=lens, max_new_tokens=256, eos_ids=(eos,), gamma=4)

Every runner takes the same keyword arguments (plus its own options) and returns a
`MethodOutput`: generated tokens per row, a stats dict per row with the same keys for every
method (`STAT_KEYS`), and the wall time of the whole batch. Methods:

  * `target`: target-only decoding (`decoding.generate` on the target's placement; the
    caller decides that placement, e.g. all devices of both meshes for a resource-matched
    comparison);
  * `token_sd`: lossless token-level speculative decoding (`token_sd.py`);
  * `specreason`: SpecReason-style step speculation with score verification
    (`specreason.py`).

Stats keys: `tokens` (generated), `rounds`, `drafted` / `accepted` (in `unit`s: tokens for
`token_sd`, steps for `specreason`, none for `target`), `target_forward_passes` and
`draft_forward_passes` (model calls the row took part in, prefill included), `draft_tokens` /
`target_tokens` (committed tokens that each model wrote).
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from dream_r_jax.decoding import generate as gen
from dream_r_jax.decoding.sampling import SamplingConfig
from dream_r_jax.speculative import specreason
from dream_r_jax.speculative import token_sd
from dream_r_jax.speculative.engine import RoleModel
from dream_r_jax.speculative.programs import RoundConfig

STAT_KEYS = ("tokens", "rounds", "drafted", "accepted", "target_forward_passes",
             "draft_forward_passes", "draft_tokens", "target_tokens", "unit")


@dataclasses.dataclass
class MethodOutput:
  tokens: list   # per row: list[int] generated ids (EOS included when hit)
  stats: list    # per row: dict with STAT_KEYS
  wall_s: float  # the whole batch, compile excluded only if the caller warmed up


Runner = Callable[..., MethodOutput]
METHODS: dict[str, Runner] = {}
BASELINES = METHODS  # the same registry under the name the evaluate script may prefer


def register_method(name: str):
  """Decorator: registers a runner `fn(*, draft, target, prompt_ids, ..., **options)`."""

  def decorator(fn: Runner) -> Runner:
    if name in METHODS:
      raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = fn
    return fn

  return decorator


def run_method(name: str, *, draft: Optional[RoleModel], target: RoleModel, prompt_ids,
               prompt_lens, max_new_tokens: int, eos_ids: Optional[Sequence[int]] = None,
               rng: Optional[jax.Array] = None, images=None,
               rc: Optional[RoundConfig] = None, **options) -> MethodOutput:
  """Runs the method `name` on a batch of right-padded prompts.

  Args:
    name: a registered method (`target`, `token_sd`, `specreason`, ...).
    draft: the draft on its mesh (None for `target`).
    target: the target on its mesh.
    prompt_ids: [B, T] int prompts; prompt_lens: [B] their lengths.
    max_new_tokens: token budget per row.
    eos_ids: tokens that end a row (default: `rc.eos_ids`, else none).
    rng: PRNG key (sampling only).
    images: optional callable cfg -> (pixel_values, grid, positions, rope_delta).
    rc: optional speculative-reasoning round config of the same run; runners take their
      defaults from it (EOS, pad, step delimiter, max_step_tokens), so the baselines and
      the engine see the same task settings.
    **options: method options (see each runner). One set can drive every method: an
      option that only other methods take is ignored here, and one that no registered
      method takes is a TypeError (a typo is not silently dropped).
  """
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
  unknown = sorted(set(options) - set().union(*map(_options_of, METHODS.values())))
  if unknown:
    raise TypeError(f"no method takes the options {unknown}; options by method: "
                    f"{ {m: sorted(_options_of(f)) for m, f in METHODS.items()} }")
  fn = METHODS[name]
  if eos_ids is None:
    eos_ids = rc.eos_ids if rc is not None else ()
  own = {k: v for k, v in options.items() if k in _options_of(fn)}
  return fn(draft=draft, target=target, prompt_ids=prompt_ids, prompt_lens=prompt_lens,
            max_new_tokens=max_new_tokens, eos_ids=tuple(int(i) for i in eos_ids), rng=rng,
            images=images, rc=rc, **own)


_COMMON = frozenset(("draft", "target", "prompt_ids", "prompt_lens", "max_new_tokens",
                     "eos_ids", "rng", "images", "rc"))


def _options_of(fn: Runner) -> frozenset:
  """The method-specific keyword options a runner takes."""
  return frozenset(inspect.signature(fn).parameters) - _COMMON


def _default(value, rc, field: str, fallback):
  """`value` if given, else `rc.<field>` if there is an rc, else `fallback`."""
  if value is not None:
    return value
  return getattr(rc, field) if rc is not None else fallback


def _need_draft(name: str, draft):
  if draft is None:
    raise ValueError(f"method {name!r} needs a draft model (draft=None)")


@register_method("target")
def run_target(*, draft, target: RoleModel, prompt_ids, prompt_lens, max_new_tokens, eos_ids,
               rng, images, rc, sampling: SamplingConfig = SamplingConfig(),
               pad_id: Optional[int] = None) -> MethodOutput:
  """Target-only decoding (greedy unless `sampling` says otherwise)."""
  del draft  # The target decodes alone.
  pad_id = _default(pad_id, rc, "pad_id", 0)
  pixel_values = grid = None
  if images is not None and target.cfg.vision is not None:
    pixel_values, grid, _, _ = images(target.cfg)
  model = nnx.merge(target.graphdef, target.state)
  b = np.asarray(prompt_ids).shape[0]
  t0 = time.perf_counter()
  out = gen.generate(model, target.put_rows(np.asarray(prompt_ids, np.int32), b),
                     np.asarray(prompt_lens, np.int32), max_new_tokens=max_new_tokens,
                     eos_ids=eos_ids, sampling=sampling, rng=rng, pixel_values=pixel_values,
                     image_grid_thw=grid, pad_id=pad_id)
  toks, lens = jax.device_get((out.tokens, out.lengths))
  wall = time.perf_counter() - t0
  tokens = [[int(x) for x in toks[i, :lens[i]]] for i in range(b)]
  # The decode loop feeds every token it samples, so a row takes part in one pass per token
  # (plus the prefill).
  stats = [dict(tokens=len(t), rounds=len(t), drafted=0, accepted=0,
                target_forward_passes=1 + len(t), draft_forward_passes=0, draft_tokens=0,
                target_tokens=len(t), unit=None) for t in tokens]
  return MethodOutput(tokens=tokens, stats=stats, wall_s=wall)


@register_method("token_sd")
def run_token_sd(*, draft, target, prompt_ids, prompt_lens, max_new_tokens, eos_ids, rng,
                 images, rc, gamma: int = 4, sampling: SamplingConfig = SamplingConfig(),
                 loop: str = "host", pad_id: Optional[int] = None) -> MethodOutput:
  """Lossless token-level speculative decoding; `loop="device"` needs one shared mesh."""
  _need_draft("token_sd", draft)
  pad_id = _default(pad_id, rc, "pad_id", 0)
  cfg = token_sd.TokenSDConfig(gamma=gamma, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)
  out = token_sd.TokenSD(draft, target, cfg, loop=loop).run(
      prompt_ids, prompt_lens, max_new_tokens=max_new_tokens, rng=rng, images=images)
  stats = []
  for s in out.stats:
    target_tokens = s["target_tokens"]
    stats.append(dict(tokens=s["tokens"], rounds=s["rounds"], drafted=s["drafted"],
                      accepted=s["accepted"],
                      target_forward_passes=s["target_forward_passes"],
                      draft_forward_passes=s["draft_forward_passes"],
                      draft_tokens=s["tokens"] - target_tokens, target_tokens=target_tokens,
                      unit="token"))
  return MethodOutput(tokens=out.tokens, stats=stats, wall_s=out.wall_s)


@register_method("specreason")
def run_specreason(*, draft, target, prompt_ids, prompt_lens, max_new_tokens, eos_ids, rng,
                   images, rc, score_threshold: float = specreason.DEFAULT_THRESHOLD,
                   template_ids: Optional[Sequence[int]] = None,
                   score_ids: Optional[Sequence[int]] = None, tokenizer=None,
                   score_template: Optional[str] = None, digit_prefix: str = "",
                   max_step_tokens: Optional[int] = None,
                   delimiter_ids: Optional[Sequence[int]] = None,
                   draft_sampling: Optional[SamplingConfig] = None,
                   pad_id: Optional[int] = None) -> MethodOutput:
  """SpecReason: one drafted step per round, kept iff its expected score >= score_threshold.

  The judge, by the first that applies: `template_ids` + `score_ids` (a 0..9 score);
  `tokenizer` + `score_template` (the same, encoded by `specreason.score_prompt_ids`); or
  the yes/no verdict of `rc`'s `cpn` verifier read as a score (9 * CPN), with `rc`'s verify
  template. The step settings default to those of `rc`.
  """
  _need_draft("specreason", draft)
  if rc is None and (max_step_tokens is None or delimiter_ids is None):
    raise ValueError("specreason needs max_step_tokens and delimiter_ids (or an rc)")
  verdict = None
  if template_ids is None and score_template is not None:
    if tokenizer is None:
      raise ValueError("score_template needs the tokenizer to encode it")
    template_ids, score_ids = specreason.score_prompt_ids(tokenizer, score_template,
                                                          digit_prefix)
  if template_ids is None:
    if rc is None or rc.verifier.name != "cpn":
      raise ValueError("specreason needs a judge: template_ids + score_ids, tokenizer + "
                       "score_template, or an rc with a 'cpn' verifier")
    template_ids, verdict = rc.template_ids, rc.verifier
  elif score_ids is None:
    raise ValueError("template_ids given without score_ids (the ten score tokens)")
  round_cfg = specreason.round_config(
      max_step_tokens=_default(max_step_tokens, rc, "max_step_tokens", None),
      delimiter_ids=_default(delimiter_ids, rc, "delimiter_ids", None),
      template_ids=template_ids, score_ids=score_ids, verdict=verdict, eos_ids=eos_ids,
      threshold=score_threshold,
      draft_sampling=_default(draft_sampling, rc, "draft_sampling", SamplingConfig()),
      pad_id=_default(pad_id, rc, "pad_id", 0))
  out = specreason.run(draft, target, prompt_ids, prompt_lens, max_new_tokens=max_new_tokens,
                       rc=round_cfg, rng=rng, images=images)
  stats = [dict(tokens=len(t), rounds=s.rounds, drafted=s.steps_drafted,
                accepted=s.steps_accepted, target_forward_passes=s.target_forward_passes,
                draft_forward_passes=s.draft_forward_passes, draft_tokens=s.draft_tokens,
                target_tokens=s.target_tokens, unit="step")
           for t, s in zip(out.tokens, out.stats)]
  return MethodOutput(tokens=out.tokens, stats=stats, wall_s=out.wall_s)
