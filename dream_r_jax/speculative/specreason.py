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
from the caller (they depend on the tokenizer and on how the target was prompted/trained).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax

from dream_r_jax.decoding.sampling import SamplingConfig
from dream_r_jax.speculative.engine import EngineOutput, RoleModel, SpeculativeEngine
from dream_r_jax.speculative.programs import RoundConfig
from dream_r_jax.speculative.verifiers import VerifierConfig

DEFAULT_THRESHOLD = 7.0


def round_config(*, max_step_tokens: int, delimiter_ids: Sequence[int],
                 template_ids: Sequence[int], score_ids: Sequence[int],
                 eos_ids: Sequence[int] = (), threshold: float = DEFAULT_THRESHOLD,
                 draft_sampling: SamplingConfig = SamplingConfig(),
                 pad_id: int = 0) -> RoundConfig:
  """SpecReason's round: one drafted step, judged by its expected 0..9 score.

  Args:
    max_step_tokens: a step without a delimiter ends after this many tokens.
    delimiter_ids: step-delimiter token ids.
    template_ids: the score prompt appended after the step (e.g. the tokens of
      "\\nRate this step from 0 to 9. Score:"); the target's next token is the score.
    score_ids: token ids of the scores 0, 1, ..., in value order (SpecReason: "0".."9").
    eos_ids: a committed EOS token ends its row.
    threshold: accept iff the expected score >= threshold (SpecReason: 7).
    draft_sampling: how the draft writes its step (greedy by default).
    pad_id: filler token.
  """
  if not template_ids:
    raise ValueError("template_ids (the score prompt) is empty: the target needs a prompt "
                     "after the step to answer with a score")
  verifier = VerifierConfig(name="score", score_ids=tuple(score_ids),
                            threshold=float(threshold))
  return RoundConfig(num_steps=1, max_step_tokens=max_step_tokens,
                     delimiter_ids=tuple(int(i) for i in delimiter_ids),
                     eos_ids=tuple(int(i) for i in eos_ids),
                     template_ids=tuple(int(i) for i in template_ids), verifier=verifier,
                     draft_sampling=draft_sampling, pad_id=pad_id)


@functools.lru_cache(maxsize=16)
def _engine(draft: RoleModel, target: RoleModel, rc: RoundConfig) -> SpeculativeEngine:
  # The engine compiles its programs once per instance; reusing it across calls (same
  # models, same config) keeps repeated runs, e.g. over batches, from recompiling.
  return SpeculativeEngine(draft, target, rc, overlap="none")


def run(draft: RoleModel, target: RoleModel, prompt_ids, prompt_lens, *,
        max_new_tokens: int, rc: RoundConfig, rng: Optional[jax.Array] = None,
        images=None) -> EngineOutput:
  """Runs SpecReason over a batch of right-padded prompts.

  Args:
    draft: the draft on its mesh.
    target: the target on its mesh.
    prompt_ids: [B, T] prompts; prompt_lens: [B] their lengths.
    max_new_tokens: token budget per row.
    rc: from `round_config` (K must be 1 and the verifier `score`).
    rng: key for draft sampling (greedy drafts ignore it).
    images: optional callable cfg -> (pixel_values, grid, positions, rope_delta).

  Returns:
    The engine's output: tokens per row, `RowStats` per row (steps drafted / accepted,
    forward passes, tokens from each model, scores), timeline and wall time.
  """
  if rc.num_steps != 1 or rc.verifier.name != "score":
    raise ValueError(f"SpecReason drafts one step judged by the 'score' verifier; got "
                     f"num_steps={rc.num_steps}, verifier={rc.verifier.name!r} (use "
                     "specreason.round_config)")
  return _engine(draft, target, rc).run(prompt_ids, prompt_lens,
                                        max_new_tokens=max_new_tokens, schedule="sequential",
                                        rng=rng, images=images)
