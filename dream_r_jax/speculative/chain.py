"""Pure helpers for one drafted chain: layout conversions and the one-pass verify input.

A chain is stored packed, as the draft produced it: `chain [B, C]` with `step_lens [B, K]`
(step j of row b occupies `chain[b, start_j : start_j + step_lens[b, j]]`). The target checks
all K steps in ONE forward pass over

    chain tokens (C) | verify segment 1 (Lv) | ... | verify segment K (Lv)

where verify segment j (the verify template) attends to the committed prefix, to the chain up
to the end of step j, and causally to itself, and sits at the positions that directly follow
step j. Its last token's logits are the verdict on step j.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def step_bounds(step_lens: jax.Array):
  """(start [B, K], end [B, K]) packed offsets of each step."""
  end = jnp.cumsum(step_lens, axis=-1)
  return end - step_lens, end


def unpack_steps(chain: jax.Array, step_lens: jax.Array, max_step_tokens: int):
  """Packed chain [B, C] -> (tokens [B, K, L], mask [B, K, L]) with L = max_step_tokens."""
  start, _ = step_bounds(step_lens)
  offs = jnp.arange(max_step_tokens)
  idx = start[..., None] + offs  # [B, K, L]
  mask = offs < step_lens[..., None]
  b, k = step_lens.shape
  flat = jnp.take_along_axis(chain, jnp.clip(idx, 0, chain.shape[1] - 1).reshape(b, -1),
                             axis=1).reshape(b, k, max_step_tokens)
  return jnp.where(mask, flat, 0), mask


def verify_inputs(chain: jax.Array, step_lens: jax.Array, template: jax.Array):
  """Builds the one-pass verification input.

  Args:
    chain: [B, C] packed drafted tokens.
    step_lens: [B, K] tokens per step (0 for steps that were not drafted).
    template: [Lv] verify template token ids.

  Returns:
    ids [B, T], rel_pos [B, T] (position relative to the committed prefix),
    new_mask [B, T, T] (which new token may attend to which), verdict_idx [B, K] (the
    index in T of each segment's last token, or None when the template is empty); T = C + K *
    Lv.
  """
  b, c = chain.shape
  k = step_lens.shape[1]
  lv = template.shape[0]
  if lv == 0:  # verifiers that read no verdict only need the chain, causally
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((c, c), bool)), (b, c, c))
    return chain, jnp.broadcast_to(jnp.arange(c), (b, c)), causal, None
  _, end = step_bounds(step_lens)  # [B, K]
  seg_ids = jnp.broadcast_to(template, (b, k, lv)).reshape(b, k * lv)
  ids = jnp.concatenate([chain, seg_ids], axis=1)
  seg_pos = end[..., None] + jnp.arange(lv)  # [B, K, Lv]
  rel_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(c), (b, c)),
                             seg_pos.reshape(b, k * lv)], axis=1)
  t = c + k * lv
  q = jnp.arange(t)
  is_seg = q >= c
  seg_of = jnp.where(is_seg, (q - c) // lv, -1)  # [T]
  # Chain tokens: causal among chain tokens.
  chain_rows = (q[:, None] >= q[None, :]) & (~is_seg)[:, None] & (~is_seg)[None, :]
  chain_rows = jnp.broadcast_to(chain_rows, (b, t, t))
  # Segment j: chain tokens before end_j, and its own earlier segment tokens.
  seg_end = jnp.where(is_seg[None, :], jnp.take_along_axis(
      end, jnp.clip(seg_of, 0, k - 1)[None, :].repeat(b, 0), axis=1), 0)  # [B, T]
  sees_chain = (q[None, None, :] < seg_end[:, :, None]) & (~is_seg)[None, None, :]
  same_seg = (seg_of[:, None] == seg_of[None, :]) & (q[:, None] >= q[None, :])
  seg_rows = (sees_chain | (same_seg & is_seg[None, :])[None]) & is_seg[None, :, None]
  new_mask = chain_rows | seg_rows
  verdict_idx = c + jnp.arange(k) * lv + (lv - 1)
  return ids, rel_pos, new_mask, jnp.broadcast_to(verdict_idx, (b, k))


def chain_predictions(logits: jax.Array, last_logits: jax.Array, chain: jax.Array):
  """Target greedy predictions and log-probs for every chain token (teacher forcing).

  Args:
    logits: [B, T, V] target logits of the verify pass (first C positions are the chain).
    last_logits: [B, V] target logits after the committed prefix (predicts chain[:, 0]).
    chain: [B, C] drafted tokens.

  Returns:
    pred [B, C] the target's argmax for each chain position, logp [B, C] the target's
    log-probability of each drafted token.
  """
  c = chain.shape[1]
  before = jnp.concatenate([last_logits[:, None], logits[:, :c - 1]], axis=1)  # [B, C, V]
  logp_all = jax.nn.log_softmax(before.astype(jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logp_all, chain[..., None], axis=-1)[..., 0]
  return jnp.argmax(before, axis=-1).astype(jnp.int32), logp
