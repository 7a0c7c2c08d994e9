"""Prefill / decode primitives and a jitted `generate` whose token loop runs on device.

The model enters jitted code as `(graphdef, state)` (the NNX split): the graphdef is static,
so each model structure compiles once, and the state is an ordinary pytree of arrays.

Stopping, per row: an EOS token; `max_stops` step delimiters (`stop_ids`), where a step that
reaches `max_step_tokens` tokens without a delimiter also ends; or the token budget. Rows
stop independently; a stopped row no longer advances its cache.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dream_r_jax.decoding.sampling import SamplingConfig, sample
from dream_r_jax.models.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class StopConfig:
  """When a row stops decoding (hashable: it is a static jit argument)."""
  eos_ids: tuple[int, ...] = ()
  stop_ids: tuple[int, ...] = ()   # step delimiters
  max_stops: int = 0               # 0 = delimiters don't stop decoding
  max_step_tokens: int = 0         # 0 = no per-step limit

  @classmethod
  def make(cls, eos_ids=(), stop_ids=(), max_stops=0, max_step_tokens=0) -> "StopConfig":
    as_tuple = lambda x: tuple(int(i) for i in (np.atleast_1d(x) if x is not None else ()))
    return cls(as_tuple(eos_ids), as_tuple(stop_ids), int(max_stops), int(max_step_tokens))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
  """Tokens generated per row and the state to continue from.

  Attributes:
    tokens: [B, N] generated ids, `pad` past each row's length.
    lengths: [B] number of generated tokens.
    step_lens: [B, max(max_stops, 1)] tokens in each completed or partial step.
    hit_eos: [B] whether the row ended with an EOS token.
    cache: the cache after feeding every generated token.
    last_logits: [B, V] next-token logits after the last generated token.
    forward_passes: number of model calls the loop made (batched).
  """
  tokens: jax.Array
  lengths: jax.Array
  step_lens: jax.Array
  hit_eos: jax.Array
  cache: KVCache
  last_logits: jax.Array
  forward_passes: jax.Array


def token_in(tok, ids: tuple[int, ...]):
  """Whether each token of `tok` is one of `ids` (a static tuple; none -> all False)."""
  if not ids:
    return jnp.zeros(tok.shape, bool)
  return jnp.any(tok[..., None] == jnp.asarray(ids, tok.dtype), axis=-1)


def prefill(graphdef, state, cache: KVCache, input_ids, num_new, positions=None,
            rope_delta=None, pixel_values=None, image_grid_thw=None):
  """Writes right-padded `input_ids` [B, T] (row b has `num_new[b]` real tokens).

  Returns (logits at each row's last real token [B, V], cache). Jittable.
  """
  model = nnx.merge(graphdef, state)
  with jax.named_scope("prefill"):
    logits, cache = model(input_ids, cache=cache, num_new=num_new, positions=positions,
                          rope_delta=rope_delta, pixel_values=pixel_values,
                          image_grid_thw=image_grid_thw)
  idx = jnp.maximum(num_new - 1, 0)
  last = jnp.take_along_axis(logits, idx[:, None, None], axis=1)[:, 0]
  return last, cache


def prefill_fresh(graphdef, state, cache_len: int, input_ids, num_new, positions=None,
                  rope_delta=None, pixel_values=None, image_grid_thw=None):
  """`prefill` into a new cache of `cache_len` positions, allocated inside the program.

  Returns (last logits [B, V], cache). Building the cache under jit costs nothing to copy,
  where a cache made on the host would be copied to the devices first.
  """
  cfg = nnx.merge(graphdef, state).cfg
  cache = KVCache.init(cfg, input_ids.shape[0], cache_len)
  return prefill(graphdef, state, cache, input_ids, num_new, positions, rope_delta,
                 pixel_values, image_grid_thw)


def decode_loop(graphdef, state, cache: KVCache, last_logits, rng, active, *,
                max_new: int, stop: StopConfig, sampling: SamplingConfig,
                budget: Optional[jax.Array] = None, pad_id: int = 0,
                forced: Optional[jax.Array] = None) -> DecodeOutput:
  """Samples up to `max_new` tokens per row with a `lax.while_loop`. Jittable.

  Args:
    active: [B] bool, rows that decode at all.
    budget: optional [B] per-row token budget (<= max_new).
    forced: optional [B, max_new] tokens to feed instead of sampling (-1 = sample); lets a
      caller replay known tokens through the same loop.
  """
  b = last_logits.shape[0]
  n_steps = max(stop.max_stops, 1)
  budget = jnp.full((b,), max_new, jnp.int32) if budget is None else budget.astype(jnp.int32)

  def cond(c):
    return (c["i"] < max_new) & jnp.any(c["active"])

  def body(c):
    rng, sub = jax.random.split(c["rng"])
    tok = sample(c["logits"], sub, sampling)
    if forced is not None:
      f = jax.lax.dynamic_index_in_dim(forced, c["i"], axis=1, keepdims=False)
      tok = jnp.where(f >= 0, f, tok)
    act = c["active"]
    tok = jnp.where(act, tok, pad_id)
    rows = jnp.arange(b)
    tokens = c["tokens"].at[rows, c["lengths"]].set(jnp.where(act, tok, c["tokens"][rows, c[
        "lengths"]]), mode="drop")
    lengths = c["lengths"] + act
    step_idx = jnp.minimum(c["steps"], n_steps - 1)
    step_lens = c["step_lens"].at[rows, step_idx].add(act.astype(jnp.int32))
    is_eos = token_in(tok, stop.eos_ids) & act
    ends_step = token_in(tok, stop.stop_ids) & act
    if stop.max_step_tokens:
      ends_step |= act & (step_lens[rows, step_idx] >= stop.max_step_tokens)
    steps = c["steps"] + ends_step
    done = is_eos | (lengths >= budget)
    if stop.max_stops:
      done |= steps >= stop.max_stops
    with jax.named_scope("decode_step"):
      model = nnx.merge(graphdef, state)
      logits, cache = model(tok[:, None], cache=c["cache"], num_new=act.astype(jnp.int32))
    new_logits = jnp.where(act[:, None], logits[:, 0], c["logits"])
    return dict(i=c["i"] + 1, rng=rng, tokens=tokens, lengths=lengths, steps=steps,
                step_lens=step_lens, hit_eos=c["hit_eos"] | is_eos, active=act & ~done,
                cache=cache, logits=new_logits, passes=c["passes"] + 1)

  init = dict(i=jnp.int32(0), rng=rng, tokens=jnp.full((b, max_new), pad_id, jnp.int32),
              lengths=jnp.zeros((b,), jnp.int32), steps=jnp.zeros((b,), jnp.int32),
              step_lens=jnp.zeros((b, n_steps), jnp.int32), hit_eos=jnp.zeros((b,), bool),
              active=active & (budget > 0), cache=cache, logits=last_logits,
              passes=jnp.int32(0))
  c = jax.lax.while_loop(cond, body, init)
  return DecodeOutput(tokens=c["tokens"], lengths=c["lengths"], step_lens=c["step_lens"],
                      hit_eos=c["hit_eos"], cache=c["cache"], last_logits=c["logits"],
                      forward_passes=c["passes"])


def _generate(graphdef, treedef, leaves, prompt_ids, prompt_lens, rng, positions, rope_delta,
              pixel_values, *, max_new, stop, sampling, cache_len, image_grid_thw, pad_id):
  state = jax.tree.unflatten(treedef, leaves)
  grid = None if image_grid_thw is None else np.asarray(image_grid_thw)
  last, cache = prefill_fresh(graphdef, state, cache_len, prompt_ids, prompt_lens, positions,
                              rope_delta, pixel_values, grid)
  active = jnp.ones((prompt_ids.shape[0],), bool)
  return decode_loop(graphdef, state, cache, last, rng, active, max_new=max_new, stop=stop,
                     sampling=sampling, pad_id=pad_id)


_STATIC = ("max_new", "stop", "sampling", "cache_len", "image_grid_thw", "pad_id")
# Shared by `generate` calls: the structure is static, so calls with equal models and settings
# reuse one compilation (at the price of hashing the graphdef on every call).
_generate_shared = jax.jit(_generate, static_argnums=(0, 1), static_argnames=_STATIC)


class Generator:
  """`generate` for one model, reusable: the model is split and flattened once.

  Each call then costs one jitted dispatch (one compilation per generator and distinct shape
  and settings; `share_compilation=True` shares compilations between generators instead, at
  the price of hashing the model structure on every call).
  Host inputs stay NumPy until that dispatch, so they are copied once, straight to the
  devices that hold the model. The state is captured when the generator is built: build a
  new one after the parameters change.
  """

  def __init__(self, model=None, *, split=None, share_compilation: bool = False):
    if (model is None) == (split is None):
      raise ValueError("Generator needs exactly one of model= or split=(cfg, graphdef, state)")
    if model is not None:
      graphdef, state = nnx.split(model)
      self.cfg = model.cfg
    else:
      self.cfg, graphdef, state = split
    self.graphdef = graphdef
    self.leaves, self.treedef = jax.tree.flatten(state)
    self._share = share_compilation
    self._key = None
    self._fns: dict = {}

  def _default_key(self):
    """Key 0, made once and placed beside the model (making a key is a dispatch of its own)."""
    if self._key is None:
      key = jax.random.key(0)
      where = getattr(self.leaves[0], "sharding", None) if self.leaves else None
      if isinstance(where, jax.sharding.NamedSharding):
        where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
      self._key = key if where is None else jax.device_put(key, where)
    return self._key

  def _fn(self, **static):
    if self._share:
      return functools.partial(_generate_shared, self.graphdef, self.treedef, **static)
    key = tuple(sorted(static.items()))
    if key not in self._fns:
      self._fns[key] = jax.jit(functools.partial(_generate, self.graphdef, self.treedef,
                                                 **static))
    return self._fns[key]

  def __call__(self, prompt_ids, prompt_lens=None, *, max_new_tokens: int,
               eos_ids: Sequence[int] = (), stop_ids: Sequence[int] = (), max_stops: int = 0,
               max_step_tokens: int = 0, sampling: SamplingConfig = SamplingConfig(),
               rng: Optional[jax.Array] = None, pixel_values=None, image_grid_thw=None,
               pad_id: int = 0) -> DecodeOutput:
    """See `generate`."""
    cfg = self.cfg
    if not isinstance(prompt_ids, jax.Array):
      prompt_ids = np.asarray(prompt_ids, np.int32)
    b, t = prompt_ids.shape
    prompt_lens = (np.full((b,), t, np.int32) if prompt_lens is None
                   else np.asarray(prompt_lens, np.int32))
    if np.any(prompt_lens < 1) or np.any(prompt_lens > t):
      raise ValueError(f"prompt_lens={prompt_lens.tolist()} must be in [1, {t}]")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    # The loop feeds every generated token, so the longest row fills exactly t + max_new.
    cache_len = t + max_new_tokens
    if cache_len > cfg.max_position_embeddings:
      raise ValueError(
          f"prompt length {t} + max_new_tokens {max_new_tokens} exceeds the model's position "
          f"limit max_position_embeddings={cfg.max_position_embeddings}")
    positions = rope_delta = None
    grid = None
    if pixel_values is not None:
      from dream_r_jax.models import mrope  # pylint: disable=g-import-not-at-top
      grid = tuple(tuple(int(x) for x in row) for row in np.asarray(image_grid_thw))
      mask = (np.arange(t)[None] < prompt_lens[:, None]).astype(np.int32)
      positions, rope_delta = mrope.get_rope_index(cfg, np.asarray(prompt_ids),
                                                   np.asarray(grid), mask, host=True)
    rng = self._default_key() if rng is None else rng
    stop = StopConfig.make(eos_ids, stop_ids, max_stops, max_step_tokens)
    fn = self._fn(max_new=max_new_tokens, stop=stop, sampling=sampling, cache_len=cache_len,
                  image_grid_thw=grid, pad_id=pad_id)
    return fn(self.leaves, prompt_ids, prompt_lens, rng, positions, rope_delta, pixel_values)


def generate(model, prompt_ids, prompt_lens=None, *, max_new_tokens: int,
             eos_ids: Sequence[int] = (), stop_ids: Sequence[int] = (), max_stops: int = 0,
             max_step_tokens: int = 0, sampling: SamplingConfig = SamplingConfig(),
             rng: Optional[jax.Array] = None, pixel_values=None, image_grid_thw=None,
             pad_id: int = 0) -> DecodeOutput:
  """Generates continuations of right-padded prompts [B, T] on device.

  Args:
    model: a `Transformer`.
    prompt_ids: [B, T] int, right-padded.
    prompt_lens: [B] real prompt lengths (default: T for every row).
    max_new_tokens: token budget per row.
    eos_ids / stop_ids / max_stops / max_step_tokens: see `StopConfig`.
    sampling: greedy by default.
    rng: PRNG key for sampling.
    pixel_values / image_grid_thw: Qwen2.5-VL image inputs, processor layout.

  Returns:
    A `DecodeOutput` (tokens, lengths, ...). For repeated calls with one model, build a
    `Generator` once instead: this function splits the model and hashes its structure on
    every call.
  """
  gen = Generator(model, share_compilation=True)
  return gen(prompt_ids, prompt_lens, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
             stop_ids=stop_ids, max_stops=max_stops, max_step_tokens=max_step_tokens,
             sampling=sampling, rng=rng, pixel_values=pixel_values,
             image_grid_thw=image_grid_thw, pad_id=pad_id)
