"""SpecReason-style sequential step speculation (Pan et al. 2025), as a baseline.

Per round and per batch row: the draft writes ONE step (up to the step delimiter or
`max_step_tokens`); the target reads it followed by a score prompt and, in the same single
pass, gives its next-token distribution over the score tokens "0".."9"; the step is accepted
when the expected score reaches the threshold (7 by default). An accepted step is committed;
a rejected one is replaced by the target's own greedy step. Nothing overlaps: draft, then
score, then fallback.

This is the speculative engine's sequential schedule with K = 1 and the `score` verifier, so
it reuses `programs.draft_chain` / `programs.target_round` / `programs.draft_sync` as they are;
only the round configuration is SpecReason's. The score template and score token ids come
from the caller (they depend on the tokenizer and on how the target was prompted/trained);
a target trained to answer yes/no instead (the bundled task's judge) gives the score
9 * P(yes) / (P(yes) + P(no)), see `round_config(verdict=...)`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax

from dream_r_jax.decoding.sampling import SamplingConfig
from dream_r_jax.speculative.engine import EngineOutput, RoleModel, SpeculativeEngine
from dream_r_jax.speculative.programs import RoundConfig
from dream_r_jax.speculative.verifiers import VerifierConfig

DEFAULT_THRESHOLD = 7.0


def round_config(*, max_step_tokens: int, delimiter_ids: Sequence[int],
                 template_ids: Sequence[int], score_ids: Optional[Sequence[int]] = None,
                 verdict: Optional[VerifierConfig] = None, eos_ids: Sequence[int] = (),
                 threshold: float = DEFAULT_THRESHOLD,
                 draft_sampling: SamplingConfig = SamplingConfig(),
                 pad_id: int = 0) -> RoundConfig:
  """SpecReason's round: one drafted step, judged by its expected 0..9 score.

  Args:
    max_step_tokens: a step without a delimiter ends after this many tokens.
    delimiter_ids: step-delimiter token ids.
    template_ids: the prompt appended after the step (e.g. the tokens of
      "\nRate this step from 0 to 9:"); the target's next token is the judgement.
    score_ids: token ids of the scores 0, 1, ..., in value order (SpecReason: "0".."9").
    verdict: instead of `score_ids`, a `cpn` config whose pos/neg ids are the yes/no
      verdict tokens of a target trained to judge steps that way (the bundled task's). The
      score is then 9 * P(pos) / (P(pos) + P(neg)), so `score >= threshold` is the CPN test
      with tau = threshold / 9 (and the config's min_mass).
    eos_ids: a committed EOS token ends its row.
    threshold: accept iff the expected score >= threshold (SpecReason: 7).
    draft_sampling: how the draft writes its step (greedy by default).
    pad_id: filler token.
  """
  if not template_ids:
    raise ValueError("template_ids (the score prompt) is empty: the target needs a prompt "
                     "after the step to answer with a score")
  if (score_ids is None) == (verdict is None):
    raise ValueError("give exactly one of score_ids (a 0..9 score) and verdict (yes/no "
                     "verdict tokens read as a score)")
  if score_ids is not None:
    verifier = VerifierConfig(name="score", score_ids=tuple(score_ids),
                              threshold=float(threshold))
  else:
    if not 4.5 < threshold < 9.0:
      raise ValueError(f"score threshold {threshold} must lie in (4.5, 9) with a verdict "
                       "judge (it becomes tau = threshold / 9, which must be in (0.5, 1))")
    verifier = dataclasses.replace(verdict, name="cpn", tau=threshold / 9.0)
  return RoundConfig(num_steps=1, max_step_tokens=max_step_tokens,
                     delimiter_ids=tuple(int(i) for i in delimiter_ids),
                     eos_ids=tuple(int(i) for i in eos_ids),
                     template_ids=tuple(int(i) for i in template_ids), verifier=verifier,
                     draft_sampling=draft_sampling, pad_id=pad_id)


def score_prompt_ids(tokenizer, template: str, digit_prefix: str = ""
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Token ids of a score prompt and of the ten score tokens, checked.

  Args:
    tokenizer: a Hugging Face tokenizer (the bundled one or a checkpoint's).
    template: the text after the step that asks for the score, e.g.
      "\nRate the step from 0 to 9:".
    digit_prefix: what precedes the digit in the score token (" " when the tokenizer
      writes " 7" as one token after the template).

  Returns:
    (template_ids, score_ids): score_ids[k] is the token meaning score k.

  Raises:
    ValueError: the template holds unknown pieces, or a score is not a single token.
  """
  unk = tokenizer.unk_token_id
  template_ids = tuple(tokenizer.encode(template, add_special_tokens=False))
  if not template_ids or (unk is not None and unk in template_ids):
    raise ValueError(f"score template {template!r} encodes to {list(template_ids)} with the "
                     "unknown token; use words the tokenizer knows")
  score_ids = []
  for k in range(10):
    ids = tokenizer.encode(digit_prefix + str(k), add_special_tokens=False)
    if len(ids) != 1 or ids[0] == unk:
      raise ValueError(f"score {digit_prefix + str(k)!r} is not a single known token "
                       f"({ids}); pick another digit_prefix")
    score_ids.append(int(ids[0]))
  return template_ids, tuple(score_ids)


def run(draft: RoleModel, target: RoleModel, prompt_ids, prompt_lens, *,
        max_new_tokens: int, rc: RoundConfig, rng: Optional[jax.Array] = None,
        images=None) -> EngineOutput:
  """Runs SpecReason over a batch of right-padded prompts.

  Args:
    draft: the draft on its mesh.
    target: the target on its mesh.
    prompt_ids: [B, T] prompts; prompt_lens: [B] their lengths.
    max_new_tokens: token budget per row.
    rc: from `round_config` (K = 1, a `score` verifier or a verdict read as a score).
    rng: key for draft sampling (greedy drafts ignore it).
    images: optional callable cfg -> (pixel_values, grid, positions, rope_delta).

  Returns:
    The engine's output: tokens per row, `RowStats` per row (steps drafted / accepted,
    forward passes, tokens from each model, scores), timeline and wall time.
  """
  if rc.num_steps != 1 or rc.verifier.name not in ("score", "cpn"):
    raise ValueError(f"SpecReason drafts one step judged by a score; got "
                     f"num_steps={rc.num_steps}, verifier={rc.verifier.name!r} (use "
                     "specreason.round_config)")
  # Sequential, so nothing overlaps; the engine caches its compiled programs by (model,
  # mesh, config, batch), so a fresh engine per call does not recompile.
  engine = SpeculativeEngine(draft, target, rc, overlap="none")
  return engine.run(prompt_ids, prompt_lens, max_new_tokens=max_new_tokens,
                    schedule="sequential", rng=rng, images=images)
