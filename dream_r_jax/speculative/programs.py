"""The three device programs of a speculative-reasoning round, as pure jittable functions.

  * `draft_chain`: the draft proposes up to K steps (on the draft mesh);
  * `target_round`: the target verifies all K steps in one pass, applies the verifier, finds
    the first rejection, rolls its cache back and decodes its own fallback step (on the
    target mesh);
  * `draft_sync`: the draft's cache is rolled back to the committed prefix and fed the
    target's fallback step.

Each takes the model as `(graphdef, state)` and a static `RoundConfig`, and treats batch
rows independently, so the engine can split rows over a mesh's data axis with `shard_map`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dream_r_jax.decoding.generate import StopConfig, decode_loop, token_in
from dream_r_jax.decoding.sampling import SamplingConfig
from dream_r_jax.models.kv_cache import KVCache
from dream_r_jax.speculative import chain as chain_lib
from dream_r_jax.speculative import tbvm
from dream_r_jax.speculative.verifiers import (VerifierConfig, VerifierInputs, get_verifier,
                                               verify)


@dataclasses.dataclass(frozen=True)
class RoundConfig:
  """Static settings of a round (hashable, a jit static argument)."""
  num_steps: int                      # K
  max_step_tokens: int                # L
  delimiter_ids: tuple[int, ...]
  eos_ids: tuple[int, ...]
  template_ids: tuple[int, ...]       # verify template appended after each step
  verifier: VerifierConfig
  draft_sampling: SamplingConfig = SamplingConfig()
  pad_id: int = 0
  # The target verifies only as many chain tokens as the longest drafted chain of the batch
  # needs, rounded up to a multiple of `chain_bucket` (one compiled verify pass per width);
  # 0 verifies the full K * L width every round.
  chain_bucket: int = 0

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"num_steps (K) = {self.num_steps} must be >= 1")
    if self.max_step_tokens < 1:
      raise ValueError(f"max_step_tokens = {self.max_step_tokens} must be >= 1")
    if not self.delimiter_ids:
      raise ValueError("delimiter_ids must name at least one step-delimiter token")
    if self.reads_verdicts and not self.template_ids:
      raise ValueError(f"verifier {self.verifier.name!r} needs a verify template "
                       "(template_ids is empty)")
    if self.chain_bucket < 0:
      raise ValueError(f"chain_bucket = {self.chain_bucket} must be >= 0 (0 = no buckets)")

  @property
  def chain_len(self) -> int:
    return self.num_steps * self.max_step_tokens

  @property
  def reads_verdicts(self) -> bool:
    """Whether the verifier reads the target's verdict after a verify template."""
    return "verdict_logits" in get_verifier(self.verifier.name).requires

  @property
  def verify_template(self) -> tuple[int, ...]:
    """The template the verify pass appends after each step (none if no verdict is read)."""
    return self.template_ids if self.reads_verdicts else ()

  def chain_widths(self) -> tuple[int, ...]:
    """Every chain width the verify pass can be compiled for."""
    if not self.chain_bucket:
      return (self.chain_len,)
    return tuple(sorted({min(w, self.chain_len) for w in range(
        self.chain_bucket, self.chain_len + self.chain_bucket, self.chain_bucket)}))

  def chain_width(self, longest: int) -> int:
    """The verify width for a batch whose longest drafted chain has `longest` tokens."""
    return next(w for w in self.chain_widths() if w >= min(longest, self.chain_len))

  def step_stop(self, max_stops: int) -> StopConfig:
    return StopConfig(eos_ids=self.eos_ids, stop_ids=self.delimiter_ids, max_stops=max_stops,
                      max_step_tokens=self.max_step_tokens)


def draft_chain(graphdef, state, cache: KVCache, last_logits, rng, active, budget, *,
                rc: RoundConfig):
  """Drafts up to K steps per active row.

  Returns a dict: `packed` [B, C + K] (chain and step lengths), the draft's `cache` and
  `last_logits`, and `eos_next` [B] (the draft's greedy next token is EOS; for a row that
  did not draft, this still reads its unchanged last logits).
  """
  with jax.named_scope("draft"):
    out = decode_loop(graphdef, state, cache, last_logits, rng, active,
                      max_new=rc.chain_len, stop=rc.step_stop(rc.num_steps),
                      sampling=rc.draft_sampling, budget=budget, pad_id=rc.pad_id)
  # Chain and step lengths travel to the target mesh as one packed array [B, C + K].
  packed = jnp.concatenate([out.tokens, out.step_lens], axis=1)
  # Whether the draft's own next token would be EOS: FPSR does not speculate past it.
  eos_next = token_in(jnp.argmax(out.last_logits, axis=-1), rc.eos_ids)
  return dict(packed=packed, cache=out.cache, last_logits=out.last_logits, eos_next=eos_next)


def unpack_chain(packed, rc: RoundConfig):
  """packed [B, W + K] -> (chain [B, W], step_lens [B, K]); W may be under K * L."""
  width = packed.shape[1] - rc.num_steps
  return packed[:, :width], packed[:, width:]


def _verifier_inputs(rc: RoundConfig, logits, last_logits, chain, step_lens, verdict_logits):
  pred, logp = chain_lib.chain_predictions(logits, last_logits, chain)
  draft_tokens, mask = chain_lib.unpack_steps(chain, step_lens, rc.max_step_tokens)
  target_tokens, _ = chain_lib.unpack_steps(pred, step_lens, rc.max_step_tokens)
  step_logp, _ = chain_lib.unpack_steps(logp, step_lens, rc.max_step_tokens)
  return VerifierInputs(verdict_logits=verdict_logits, step_logprobs=step_logp,
                        step_mask=mask, draft_tokens=draft_tokens,
                        target_tokens=target_tokens)


def target_round(graphdef, state, cache: KVCache, last_logits, packed, active, budget, rng,
                 *, rc: RoundConfig, mrope: bool = False):
  """Verifies a chain in one pass, then decodes the fallback step where one was rejected."""
  model = nnx.merge(graphdef, state)
  chain, step_lens = unpack_chain(packed, rc)
  b, k = step_lens.shape
  template = jnp.asarray(rc.verify_template, jnp.int32)
  with jax.named_scope("verify"):
    ids, rel_pos, new_mask, vidx = chain_lib.verify_inputs(chain, step_lens, template)
    positions = cache.lengths[:, None] + rel_pos + cache.rope_delta[:, None]
    if mrope:
      positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
    logits, written = model(ids, cache=cache, num_new=jnp.zeros((b,), jnp.int32),
                            positions=positions, new_mask=new_mask)
    verdict_logits = None if vidx is None else jnp.take_along_axis(
        logits, vidx[..., None], axis=1)  # [B, K, V]
    inputs = _verifier_inputs(rc, logits, last_logits, chain, step_lens, verdict_logits)
    accept, _ = verify(rc.verifier, inputs)
    drafted = step_lens > 0
    accept = accept & drafted & active[:, None]
    acc = tbvm.leading_accepted(accept)
    n_drafted = jnp.sum(drafted, axis=-1).astype(jnp.int32)
    acc_tokens = jnp.sum(jnp.where(jnp.arange(k) < acc[:, None], step_lens, 0), axis=-1)
    if rc.verifier.name == "cpn":
      scores = tbvm.cpn_scores(verdict_logits, rc.verifier.pos_ids, rc.verifier.neg_ids)
    else:
      scores = accept.astype(jnp.float32)
  with jax.named_scope("rollback"):
    cache = written.replace(lengths=cache.lengths + acc_tokens)
    at = jnp.take_along_axis(logits, jnp.maximum(acc_tokens - 1, 0)[:, None, None],
                             axis=1)[:, 0]
    last = jnp.where((acc_tokens > 0)[:, None], at, last_logits)
  need_fb = active & ((acc < n_drafted) | (n_drafted == 0))
  # A chain accepted whole after which the target's own (greedy) next token is EOS ends the
  # answer in this round: the verify pass already holds the logits that predict it, so the
  # EOS costs neither a decode step nor another round.
  last_tok = jnp.take_along_axis(chain, jnp.maximum(acc_tokens - 1, 0)[:, None], axis=1)[:, 0]
  eos_next = (active & ~need_fb & (acc_tokens > 0) & (budget - acc_tokens > 0)
              & ~token_in(last_tok, rc.eos_ids) & token_in(jnp.argmax(last, axis=-1), rc.eos_ids))
  with jax.named_scope("fallback"):
    fb = decode_loop(graphdef, state, cache, last, rng, need_fb, max_new=rc.max_step_tokens,
                     stop=rc.step_stop(1), sampling=SamplingConfig(),
                     budget=budget - acc_tokens, pad_id=rc.pad_id)
  first = jnp.arange(rc.max_step_tokens)[None] == 0
  fb_tokens = jnp.where(eos_next[:, None] & first,
                        jnp.argmax(last, axis=-1).astype(jnp.int32)[:, None], fb.tokens)
  fb_lens = jnp.where(eos_next, 1, fb.lengths)
  decision = dict(accept=accept, acc=acc, n_drafted=n_drafted, acc_tokens=acc_tokens,
                  scores=scores, need_fb=need_fb, fb_tokens=fb_tokens, fb_lens=fb_lens,
                  eos_next=eos_next)
  # The fallback step travels to the draft mesh as one packed array [B, L + 1].
  fb_packed = jnp.concatenate([fb_tokens, fb_lens[:, None]], axis=1)
  return dict(decision=decision, fb_packed=fb_packed, cache=fb.cache,
              last_logits=fb.last_logits)


def draft_sync(graphdef, state, cache: KVCache, last_logits, new_len, tokens, num, sync):
  """Rolls rows in `sync` back to `new_len` and feeds them `tokens[:, :num]`."""
  model = nnx.merge(graphdef, state)
  with jax.named_scope("draft_sync"):
    lengths = jnp.where(sync, new_len, cache.lengths)
    cache = cache.replace(lengths=jnp.minimum(lengths, cache.lengths))
    n = jnp.where(sync, num, 0)
    logits, cache = model(tokens, cache=cache, num_new=n)
    at = jnp.take_along_axis(logits, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
    last = jnp.where((n > 0)[:, None], at, last_logits)
  return cache, last


def draft_round(graphdef, state, cache: KVCache, last_logits, prev_packed, fb_packed,
                new_len, sync, keep, active, budget, rng, r, *, rc: RoundConfig):
  """Syncs the rows in `sync` to the target's fallback, then drafts a chain for `active`.

  Rows in `keep` take their chain from `prev_packed` instead (FPSR: their speculative chain
  was right). One program instead of three keeps host round trips off the critical path.
  """
  tokens, num = fb_packed[:, :-1], fb_packed[:, -1]
  cache, last_logits = jax.lax.cond(
      jnp.any(sync),
      lambda c, l: draft_sync(graphdef, state, c, l, new_len, tokens, num, sync),
      lambda c, l: (c, l), cache, last_logits)
  out = draft_chain(graphdef, state, cache, last_logits, jax.random.fold_in(rng, r), active,
                    budget, rc=rc)
  out["packed"] = jnp.where(keep[:, None], prev_packed, out["packed"])
  return out
