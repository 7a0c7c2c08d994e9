"""Lossless token-level speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

Per round and per batch row: the draft proposes `gamma` tokens autoregressively, sampling
from its own filtered distribution q (or greedily); the target scores all of them in ONE
forward pass over its cache; token i is accepted with probability min(1, p_i / q_i); at the
first rejection the target samples from the residual norm(max(0, p - q)), and when every
drafted token is accepted it samples a bonus token from p. With greedy sampling, a drafted
token is accepted iff it is the target's argmax, and the correction is that argmax. Either
way the committed tokens are distributed exactly as the target's own sampling (or equal to
its greedy decoding).

Three pure, jittable pieces, composed by `TokenSD.run`:

  * `draft_propose` (draft mesh): catches the draft's cache up with the previous round's
    outcome, then drafts up to `gamma` tokens per row;
  * `target_verify` (target mesh): one pass over `[pending, d_1 .. d_gamma]`, the
    acceptance rule, the commit into the per-row output buffer, EOS / budget and rollback;
  * `rejection_sample`: the acceptance rule itself, on logits and probabilities only.

Caches hold every committed token except the newest one(s), which are fed at the start of
the next round ("pending"): the target always has one pending token (the correction or
bonus it just sampled); the draft has two after a fully accepted round (its last drafted
token, which it never fed, and the bonus), otherwise one. Rows keep their own cache lengths
and their own drafted count: a row with `R` tokens of budget left drafts `min(gamma, R - 1)`
tokens, so a round never commits more than the budget and nothing needs truncating except
after an EOS.

Two loop drivers share these functions: `loop="host"` runs one jitted program per role per
round (draft and target on disjoint meshes, arrays moved with `jax.device_put`), and
`loop="device"` runs the whole generation as one `lax.while_loop` program, which needs both
models on the same mesh (colocated placement). Same inputs and key give the same tokens.
Token SD is sequential by nature (the draft waits for the verdict), so disjoint meshes buy
it nothing, and the host loop pays two dispatches, two transfers and a sync per round:
measured with the quickstart sizes on 2 CPU cores (batch 1, gamma 8), about 1.9 ms a round
against 1.1 ms for the device loop. Prefer `loop="device"` wherever both models fit one mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dream_r_jax.decoding import generate as gen
from dream_r_jax.decoding import sampling as sampling_lib
from dream_r_jax.decoding.sampling import SamplingConfig
from dream_r_jax.models.kv_cache import KVCache
from dream_r_jax.speculative import tbvm


def rejection_sample(target_logits: jax.Array,   # [B, G+1, V]
                     draft_tokens: jax.Array,    # [B, G]
                     draft_probs: Optional[jax.Array],  # [B, G, V] (None when greedy)
                     num_drafted: jax.Array,     # [B], tokens actually drafted per row
                     rng: jax.Array,
                     sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """The lossless speculative-sampling rule, vectorized over rows.

  Args:
    target_logits: the target's logits after the pending token and after each drafted
      token; position i scores `draft_tokens[:, i]`, position G the bonus token.
    draft_tokens: the drafted tokens (past `num_drafted` they are ignored).
    draft_probs: q, the filtered distribution each drafted token was sampled from.
    num_drafted: how many leading drafted tokens count for each row (0..G).
    rng: key for the acceptance coins and the correction token.
    sampling: the sampling config that defines p (as it defined q).

  Returns:
    (accepted [B] int32, next_token [B] int32): the number of leading drafted tokens kept,
    and the token sampled after them (from the residual at a rejection, from p otherwise).
  """
  g = draft_tokens.shape[1]
  counts = jnp.arange(g)[None, :] < num_drafted[:, None]  # [B, G]
  if sampling.greedy:
    # Greedy: q and p are one-hot, so min(1, p/q) is "equal to the target argmax" and the
    # residual is the target's argmax itself; no randomness is involved.
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, G+1]
    accepted = tbvm.leading_accepted((draft_tokens == best[:, :g]) & counts)
    return accepted, jnp.take_along_axis(best, accepted[:, None], axis=1)[:, 0]
  if draft_probs is None:
    raise ValueError("rejection_sample: draft_probs is required when sampling")
  k_coin, k_next = jax.random.split(rng)
  p = sampling_lib.probs(target_logits, sampling)  # [B, G+1, V]
  p_tok = jnp.take_along_axis(p[:, :g], draft_tokens[..., None], axis=-1)[..., 0]
  q_tok = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
  coin = jax.random.uniform(k_coin, p_tok.shape)
  # u < p/q without dividing: q_tok > 0 for a token that was sampled from q.
  accepted = tbvm.leading_accepted((coin * q_tok < p_tok) & counts)
  p_at = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
  q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
  rejected = (accepted < num_drafted)[:, None]
  q_at = jnp.where(rejected, jnp.take_along_axis(q_pad, accepted[:, None, None],
                                                 axis=1)[:, 0], 0.0)
  residual = jnp.maximum(p_at - q_at, 0.0)
  # Where p == q at a rejection (probability zero) the residual is empty; p is then the
  # right distribution and avoids sampling from all -inf.
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_at)
  next_token = jax.random.categorical(k_next, jnp.log(residual), axis=-1).astype(jnp.int32)
  return accepted, next_token


AcceptRule = Callable[..., tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class TokenSDConfig:
  """Static settings (hashable: a jit static argument).

  Attributes:
    gamma: tokens drafted per round (>= 1).
    sampling: the target's sampling config; the draft samples with the same one, so p and
      q are filtered (temperature, top-k, top-p) alike.
    eos_ids: a committed EOS token ends its row.
    pad_id: filler in the output past each row's length.
    rule: the acceptance rule (`rejection_sample`); a seam for tests and lossy variants.
  """
  gamma: int = 4
  sampling: SamplingConfig = SamplingConfig()
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  rule: AcceptRule = rejection_sample

  def __post_init__(self):
    if self.gamma < 1:
      raise ValueError(f"gamma={self.gamma} must be >= 1 (tokens drafted per round)")
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))

  @property
  def draft_side(self) -> "TokenSDConfig":
    """Only the fields the draft's round reads: changing the rule or the EOS ids then
    recompiles the target's program alone."""
    return TokenSDConfig(gamma=self.gamma, sampling=self.sampling, pad_id=self.pad_id)

  @property
  def init_side(self) -> "TokenSDConfig":
    """Only the fields the prefill programs read (shared by greedy and sampled runs)."""
    return TokenSDConfig(gamma=self.gamma, pad_id=self.pad_id)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftState:
  cache: KVCache
  pending: jax.Array      # [B, 2] committed tokens the draft has not fed yet
  pending_len: jax.Array  # [B] 1 or 2
  drafts: jax.Array       # [B, G] the last round's drafted tokens
  num_drafted: jax.Array  # [B] the last round's drafted count


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Proposal:
  tokens: jax.Array            # [B, G]
  probs: Optional[jax.Array]   # [B, G, V] q; None when greedy
  num_drafted: jax.Array       # [B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Feedback:
  """What the draft needs from the target's round: the outcome, and who goes on."""
  accepted: jax.Array   # [B]
  token: jax.Array      # [B] the correction or bonus token
  synced: jax.Array     # [B] bool, rows whose draft must catch up (False before round 0)
  active: jax.Array     # [B] bool, rows still generating
  remaining: jax.Array  # [B] token budget left


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TargetState:
  cache: KVCache
  pending: jax.Array  # [B] the newest committed token (not yet fed)
  out: jax.Array      # [B, max_new] committed tokens
  out_len: jax.Array  # [B]
  done: jax.Array     # [B] bool
  stats: dict         # name -> [B] int32 counters


STAT_NAMES = ("rounds", "drafted", "accepted", "target_tokens", "target_forward_passes",
              "draft_forward_passes")


def _pick(logits, rng, sampling: SamplingConfig):
  """A token per row and (when sampling) the distribution it was drawn from."""
  tok = sampling_lib.sample(logits, rng, sampling)
  return tok, (None if sampling.greedy else sampling_lib.probs(logits, sampling))


def draft_propose(graphdef, state, ds: DraftState, fb: Feedback, rng, *,
                  cfg: TokenSDConfig) -> tuple[DraftState, Proposal]:
  """Syncs the draft with the last round's outcome, then drafts up to gamma tokens a row."""
  model = nnx.merge(graphdef, state)
  g, b = cfg.gamma, ds.pending.shape[0]
  with jax.named_scope("draft_sync"):
    # Last round the draft fed `pending` and its first n-1 drafts (not the n-th). Keep the
    # accepted ones, and queue what it has not seen: the n-th draft, if it was accepted,
    # then the target's token.
    n = ds.num_drafted
    all_in = fb.synced & (n > 0) & (fb.accepted >= n)
    last = jnp.take_along_axis(ds.drafts, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    unseen = jnp.maximum(n - 1 - fb.accepted, 0)
    lengths = jnp.where(fb.synced, ds.cache.lengths - unseen, ds.cache.lengths)
    two = jnp.stack([last, fb.token], axis=1)
    one = jnp.stack([fb.token, jnp.full_like(fb.token, cfg.pad_id)], axis=1)
    pending = jnp.where(fb.synced[:, None], jnp.where(all_in[:, None], two, one), ds.pending)
    pending_len = jnp.where(fb.synced, 1 + all_in.astype(jnp.int32), ds.pending_len)
    cache = ds.cache.replace(lengths=lengths)
  # Drafting at most R - 1 tokens leaves room for the target's token within the budget R.
  num = jnp.where(fb.active, jnp.clip(fb.remaining - 1, 0, g), 0).astype(jnp.int32)
  keys = jax.random.split(rng, g)
  with jax.named_scope("draft"):
    logits, cache = model(pending, cache=cache, num_new=jnp.where(num > 0, pending_len, 0))
    logits = jnp.take_along_axis(logits, jnp.maximum(pending_len - 1, 0)[:, None, None],
                                 axis=1)[:, 0]
    tokens = jnp.full((b, g), cfg.pad_id, jnp.int32)
    probs = None if cfg.sampling.greedy else jnp.zeros((b, g, logits.shape[-1]),
                                                       jnp.float32)

    def body(i, c):
      logits, cache, tokens, probs = c
      tok, q = _pick(logits, keys[i], cfg.sampling)
      tokens = tokens.at[:, i].set(tok)
      if q is not None:
        probs = probs.at[:, i].set(q)
      out, cache = model(tok[:, None], cache=cache, num_new=(i + 1 < num).astype(jnp.int32))
      return out[:, 0], cache, tokens, probs

    # gamma - 1 feeds after the pending one: the last draft is sampled but not fed (the
    # target may reject it, and if it doesn't, it is fed next round with the bonus).
    logits, cache, tokens, probs = jax.lax.fori_loop(0, g - 1, body,
                                                     (logits, cache, tokens, probs))
    tok, q = _pick(logits, keys[g - 1], cfg.sampling)
    tokens = tokens.at[:, g - 1].set(tok)
    if q is not None:
      probs = probs.at[:, g - 1].set(q)
  new = DraftState(cache=cache, pending=pending, pending_len=pending_len, drafts=tokens,
                   num_drafted=num)
  return new, Proposal(tokens=tokens, probs=probs, num_drafted=num)


def target_verify(graphdef, state, ts: TargetState, prop: Proposal, rng, *,
                  cfg: TokenSDConfig) -> tuple[TargetState, Feedback]:
  """Scores the proposal in one pass, accepts, commits, and rolls the cache back per row."""
  model = nnx.merge(graphdef, state)
  b, g = prop.tokens.shape
  max_new = ts.out.shape[1]
  active = ~ts.done
  num = jnp.where(active, prop.num_drafted, 0)
  with jax.named_scope("verify"):
    ids = jnp.concatenate([ts.pending[:, None], prop.tokens], axis=1)  # [B, G+1]
    logits, cache = model(ids, cache=ts.cache, num_new=jnp.zeros((b,), jnp.int32))
  with jax.named_scope("accept"):
    accepted, token = cfg.rule(logits, prop.tokens, prop.probs, num, rng, cfg.sampling)
    accepted = jnp.where(active, accepted, 0)
  with jax.named_scope("commit"):
    i = jnp.arange(g + 1)[None, :]
    padded = jnp.concatenate([prop.tokens, jnp.full((b, 1), cfg.pad_id, jnp.int32)], axis=1)
    new = jnp.where(i < accepted[:, None], padded, token[:, None])  # [B, G+1]
    count = jnp.where(active, accepted + 1, 0)
    is_eos = gen.token_in(new, cfg.eos_ids) & (i < count[:, None])
    hit_eos = jnp.any(is_eos, axis=1)
    count = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, count).astype(jnp.int32)
    rows = jnp.arange(b)[:, None]
    pos = jnp.where(i < count[:, None], ts.out_len[:, None] + i, max_new)  # past end: drop
    out = ts.out.at[rows, pos].set(new, mode="drop")
    out_len = ts.out_len + count
    done = ts.done | hit_eos | (out_len >= max_new)
    # The pass wrote all G+1 inputs; keep the pending token and the accepted drafts.
    cache = cache.replace(lengths=ts.cache.lengths + jnp.where(active, accepted + 1, 0))
  act = active.astype(jnp.int32)
  stats = dict(ts.stats)
  stats["rounds"] += act
  stats["drafted"] += num
  stats["accepted"] += accepted
  # The target's own token is committed unless an EOS among the accepted drafts came first.
  stats["target_tokens"] += (active & (count == accepted + 1)).astype(jnp.int32)
  stats["target_forward_passes"] += act
  stats["draft_forward_passes"] += num
  new_ts = TargetState(cache=cache, pending=jnp.where(active, token, ts.pending), out=out,
                       out_len=out_len, done=done, stats=stats)
  fb = Feedback(accepted=accepted, token=token, synced=active & ~done, active=~done,
                remaining=max_new - out_len)
  return new_ts, fb


def _prefill_cache(graphdef, state, ids, lens, cache_len, images):
  """The cache after all but the last prompt token (which becomes the pending token)."""
  pixel_values, grid, positions, rope_delta = images
  _, cache = gen.prefill_fresh(graphdef, state, cache_len, ids, lens - 1, positions,
                               rope_delta, pixel_values,
                               None if grid is None else np.asarray(grid))
  return cache


def _last_prompt_token(ids, lens):
  return jnp.take_along_axis(ids, (lens - 1)[:, None], axis=1)[:, 0]


def init_draft(graphdef, state, ids, lens, *, cfg: TokenSDConfig, cache_len: int,
               images=(None, None, None, None)) -> DraftState:
  """The draft's state after the prompt (`images`: pixel_values, grid, positions, delta)."""
  b = ids.shape[0]
  cache = _prefill_cache(graphdef, state, ids, lens, cache_len, images)
  last = _last_prompt_token(ids, lens)
  pending = jnp.stack([last, jnp.full_like(last, cfg.pad_id)], axis=1)
  return DraftState(cache=cache, pending=pending, pending_len=jnp.ones((b,), jnp.int32),
                    drafts=jnp.full((b, cfg.gamma), cfg.pad_id, jnp.int32),
                    num_drafted=jnp.zeros((b,), jnp.int32))


def init_target(graphdef, state, ids, lens, *, cfg: TokenSDConfig, cache_len: int,
                max_new: int, images=(None, None, None, None)) -> tuple[TargetState, Feedback]:
  """The target's state after the prompt, and the feedback that starts round 0."""
  b = ids.shape[0]
  cache = _prefill_cache(graphdef, state, ids, lens, cache_len, images)
  one = jnp.ones((b,), jnp.int32)
  stats = {name: one if name.endswith("passes") else 0 * one for name in STAT_NAMES}
  ts = TargetState(cache=cache, pending=_last_prompt_token(ids, lens),
                   out=jnp.full((b, max_new), cfg.pad_id, jnp.int32), out_len=0 * one,
                   done=jnp.zeros((b,), bool), stats=stats)
  fb = Feedback(accepted=0 * one, token=0 * one, synced=jnp.zeros((b,), bool),
                active=jnp.ones((b,), bool), remaining=max_new * one)
  return ts, fb


def _round_keys(rng, r):
  return jax.random.split(jax.random.fold_in(rng, r))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "cache_len", "grid"))
def _draft_init_prog(graphdef, state, ids, lens, pv, pos, delta, *, cfg, cache_len, grid):
  return init_draft(graphdef, state, ids, lens, cfg=cfg, cache_len=cache_len,
                    images=(pv, grid, pos, delta))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "cache_len", "max_new",
                                             "grid"))
def _target_init_prog(graphdef, state, ids, lens, pv, pos, delta, *, cfg, cache_len,
                      max_new, grid):
  return init_target(graphdef, state, ids, lens, cfg=cfg, cache_len=cache_len,
                     max_new=max_new, images=(pv, grid, pos, delta))


# Cross-mesh traffic per round is one int array each way (plus q when sampling): one
# transfer costs about as much as a tiny model's forward pass, five would cost five.
def _pack_feedback(fb: Feedback) -> jax.Array:
  return jnp.stack([fb.accepted, fb.token, fb.synced.astype(jnp.int32),
                    fb.active.astype(jnp.int32), fb.remaining], axis=1)  # [B, 5]


def _unpack_feedback(x: jax.Array) -> Feedback:
  return Feedback(accepted=x[:, 0], token=x[:, 1], synced=x[:, 2] > 0, active=x[:, 3] > 0,
                  remaining=x[:, 4])


@functools.lru_cache(maxsize=None)
def _draft_program(graphdef, treedef, cfg: TokenSDConfig):
  """The draft's jitted round for one model and config, built once (not per round).

  Weights come in as a flat list of arrays: flattening an NNX state in Python on every call,
  and hashing the graphdef as a static argument, cost more than a tiny model's round. The
  draft state is donated, so XLA updates its cache in place.
  """

  @functools.partial(jax.jit, donate_argnums=(1,))
  def run(leaves, ds, fb, rng, r):
    state = jax.tree.unflatten(treedef, leaves)
    ds, prop = draft_propose(graphdef, state, ds, _unpack_feedback(fb),
                             _round_keys(rng, r)[0], cfg=cfg)
    ints = jnp.concatenate([prop.tokens, prop.num_drafted[:, None]], axis=1)  # [B, G+1]
    return ds, ints, prop.probs

  return run


@functools.lru_cache(maxsize=None)
def _target_program(graphdef, treedef, cfg: TokenSDConfig):
  """The target's jitted round (see `_draft_program`); the target state is donated."""

  @functools.partial(jax.jit, donate_argnums=(1,))
  def run(leaves, ts, ints, probs, rng, r):
    state = jax.tree.unflatten(treedef, leaves)
    prop = Proposal(tokens=ints[:, :-1], probs=probs, num_drafted=ints[:, -1])
    ts, fb = target_verify(graphdef, state, ts, prop, _round_keys(rng, r)[1], cfg=cfg)
    return ts, _pack_feedback(fb)

  return run


@functools.partial(jax.jit, static_argnames=("dg", "tg", "cfg", "cache_len", "max_new",
                                             "max_rounds", "dgrid", "tgrid"))
def _device_loop(dg, dstate, tg, tstate, ids, lens, rng, dimg, timg, *, cfg, cache_len,
                 max_new, max_rounds, dgrid, tgrid):
  """The whole generation in one program: prefill both, then rounds in a while_loop."""
  ds = init_draft(dg, dstate, ids, lens, cfg=cfg, cache_len=cache_len,
                  images=(dimg[0], dgrid, dimg[1], dimg[2]))
  ts, fb = init_target(tg, tstate, ids, lens, cfg=cfg, cache_len=cache_len,
                       max_new=max_new, images=(timg[0], tgrid, timg[1], timg[2]))

  def cond(c):
    return (c[0] < max_rounds) & jnp.any(~c[2].done)

  def body(c):
    r, ds, ts, fb = c
    ds, prop = draft_propose(dg, dstate, ds, fb, _round_keys(rng, r)[0], cfg=cfg)
    ts, fb = target_verify(tg, tstate, ts, prop, _round_keys(rng, r)[1], cfg=cfg)
    return r + 1, ds, ts, fb

  _, _, ts, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), ds, ts, fb))
  return ts


@dataclasses.dataclass
class TokenSDOutput:
  tokens: list            # per row: generated token ids
  stats: list             # per row: dict of STAT_NAMES counters (+ "tokens")
  wall_s: float


def _images_for(role, images):
  """(pixel_values, positions, rope_delta) on the role's mesh, and the static grid."""
  if images is None or role.cfg.vision is None:
    return (None, None, None), None
  pixel_values, grid, positions, rope_delta = images(role.cfg)
  grid = tuple(tuple(int(x) for x in row) for row in np.asarray(grid))
  put = lambda x: None if x is None else role.replicated(jnp.asarray(x))
  return (put(pixel_values), put(positions), put(rope_delta)), grid


class TokenSD:
  """Token-level speculative decoding with a draft and a target `RoleModel`.

  Args:
    draft: the draft, on its mesh.
    target: the target, on its mesh (disjoint from the draft's for `loop="host"`, the same
      mesh for `loop="device"`).
    cfg: gamma, sampling, EOS.
    loop: "host" (a program per role per round) or "device" (one program).
  """

  def __init__(self, draft, target, cfg: TokenSDConfig, *, loop: str = "host"):
    if draft.cfg.vocab_size != target.cfg.vocab_size:
      raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} != target vocab_size "
                       f"{target.cfg.vocab_size}: draft and target must share a tokenizer")
    if loop not in ("host", "device"):
      raise ValueError(f"loop={loop!r}; expected 'host' or 'device'")
    if loop == "device" and draft.mesh.devices.tolist() != target.mesh.devices.tolist():
      raise ValueError("loop='device' runs both models in one program, so draft and target "
                       "must be placed on the same mesh; use loop='host' for disjoint meshes")
    self.draft, self.target, self.cfg, self.loop = draft, target, cfg, loop

  def run(self, prompt_ids, prompt_lens, *, max_new_tokens: int,
          rng: Optional[jax.Array] = None, images=None) -> TokenSDOutput:
    """Generates up to `max_new_tokens` per row.

    Args:
      prompt_ids: [B, T] right-padded prompts.
      prompt_lens: [B] prompt lengths (>= 1).
      max_new_tokens: token budget per row.
      rng: key for sampling (greedy ignores it).
      images: optional callable cfg -> (pixel_values, grid, positions, rope_delta), as for
        `SpeculativeEngine.run`.
    """
    prompt_ids = np.asarray(prompt_ids, np.int32)
    lens = np.asarray(prompt_lens, np.int32)
    b, t = prompt_ids.shape
    if lens.shape != (b,) or np.any(lens < 1) or np.any(lens > t):
      raise ValueError(f"prompt_lens={lens.tolist()} must be [B={b}] values in [1, {t}]")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    cache_len = t + max_new_tokens + self.cfg.gamma + 2
    for role, name in ((self.draft, "draft"), (self.target, "target")):
      if cache_len > role.cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} + gamma "
            f"{self.cfg.gamma} needs {cache_len} positions, more than the {name}'s "
            f"max_position_embeddings={role.cfg.max_position_embeddings}")
    rng = jax.random.key(0) if rng is None else rng
    t0 = time.perf_counter()
    d, tg = self.draft, self.target
    dimg, dgrid = _images_for(d, images)
    timg, tgrid = _images_for(tg, images)
    if self.loop == "device":
      ts = _device_loop(d.graphdef, d.state, tg.graphdef, tg.state,
                        tg.put_rows(jnp.asarray(prompt_ids), b),
                        tg.put_rows(jnp.asarray(lens), b), tg.replicated(rng), dimg, timg,
                        cfg=self.cfg, cache_len=cache_len, max_new=max_new_tokens,
                        max_rounds=max_new_tokens, dgrid=dgrid, tgrid=tgrid)
    else:
      ts = self._host_loop(prompt_ids, lens, rng, cache_len, max_new_tokens, dimg, dgrid,
                           timg, tgrid)
    out, out_len, stats = jax.device_get((ts.out, ts.out_len, ts.stats))
    wall = time.perf_counter() - t0
    tokens = [[int(x) for x in out[i, :out_len[i]]] for i in range(b)]
    rows = [dict({k: int(v[i]) for k, v in stats.items()}, tokens=len(tokens[i]))
            for i in range(b)]
    return TokenSDOutput(tokens=tokens, stats=rows, wall_s=wall)

  def _host_loop(self, prompt_ids, lens, rng, cache_len, max_new, dimg, dgrid, timg, tgrid):
    d, tg, b = self.draft, self.target, prompt_ids.shape[0]
    ds = _draft_init_prog(d.graphdef, d.state, d.put_rows(jnp.asarray(prompt_ids), b),
                          d.put_rows(jnp.asarray(lens), b), *dimg, cfg=self.cfg.init_side,
                          cache_len=cache_len, grid=dgrid)
    ts, fb = _target_init_prog(tg.graphdef, tg.state, tg.put_rows(jnp.asarray(prompt_ids), b),
                               tg.put_rows(jnp.asarray(lens), b), *timg,
                               cfg=self.cfg.init_side, cache_len=cache_len, max_new=max_new,
                               grid=tgrid)
    key_d, key_t = d.replicated(rng), tg.replicated(rng)
    d_leaves, d_tree = jax.tree.flatten(d.state)
    t_leaves, t_tree = jax.tree.flatten(tg.state)
    draft_prog = _draft_program(d.graphdef, d_tree, self.cfg.draft_side)
    target_prog = _target_program(tg.graphdef, t_tree, self.cfg)
    d_rows, t_rows = d.rows_sharding(b), tg.rows_sharding(b)
    fb = _pack_feedback(fb)
    prev_fb = None
    for r in range(max_new):  # every round commits >= 1 token per active row
      ds, ints, probs = draft_prog(d_leaves, ds, jax.device_put(fb, d_rows), key_d, r)
      ints, probs = jax.device_put((ints, probs), t_rows)
      ts, fb = target_prog(t_leaves, ts, ints, probs, key_t, r)
      # The only host sync: whether any row went on after the PREVIOUS round. Round r is
      # already queued, so the devices never wait for the host's dispatch; when everything
      # was done, round r is a no-op (all rows inactive) and is discarded.
      if prev_fb is not None and not np.any(np.asarray(jax.device_get(prev_fb))[:, 3]):
        break
      prev_fb = fb
    return ts


def speedup_ceiling(acceptance: float, gamma: int, cost_ratio: float) -> float:
  """Leviathan et al.'s expected speedup `(1 - a^(g+1)) / ((1 - a)(g c + 1))`."""
  if acceptance >= 1.0:
    return (gamma + 1) / (gamma * cost_ratio + 1)
  return (1 - acceptance ** (gamma + 1)) / ((1 - acceptance) * (gamma * cost_ratio + 1))

