"""Cached decoding == full forward, for every text family.

The reference is always the cache-free causal forward of one row alone; the cache path must
reproduce it under chunked extension, rollback, and rows that move independently. Every
cache call uses batch B and a width from a small set, so that each family compiles a handful
of shapes only (compilation, not compute, is what these tests spend their time on).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.models import KVCache
from dream_r_jax.testing.models import TEXT_MODEL_TYPES, Jitted, random_ids, tiny_model

ATOL = 1e-5
B = 3
SEQ = 16
CAPACITY = 24  # > SEQ, so stale entries past each row's length exist and must be masked.
REF_LEN = 24


@pytest.fixture(scope="module", params=TEXT_MODEL_TYPES)
def model(request):
  return Jitted(tiny_model(request.param, seed=1))


def full_logits(model, ids):
  """Cache-free logits of one sequence [T] -> [T, V], run alone (batch 1).

  The sequence is right-padded to a fixed length so that every call shares one compiled
  shape; padding after the last real token cannot change a causal forward's logits there.
  """
  padded = np.zeros((1, REF_LEN), np.int32)
  padded[0, :len(ids)] = ids
  return np.asarray(model(padded))[0, :len(ids)]


def right_pad(seqs, width):
  out = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  return out


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_prefill_then_extend_in_chunks_equals_full_forward(model, chunk):
  ids = random_ids(0, (B, SEQ), model.cfg.vocab_size)
  cache = KVCache.init(model.cfg, B, CAPACITY)
  prefill = 4
  out, cache = model(ids[:, :prefill], cache=cache)
  pieces = [np.asarray(out)]
  for start in range(prefill, SEQ, chunk):
    # The last chunk may be short: pad it to the chunk size and pass num_new, as callers do.
    n = min(chunk, SEQ - start)
    piece = right_pad(ids[:, start:start + n], chunk)
    out, cache = model(piece, cache=cache, num_new=np.full((B,), n))
    pieces.append(np.asarray(out)[:, :n])
  got = np.concatenate(pieces, axis=1)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [SEQ] * B)
  for row in range(B):
    np.testing.assert_allclose(got[row], full_logits(model, ids[row]), atol=ATOL, rtol=0)


def test_rollback_then_reextend_equals_never_extended(model):
  """Rows roll back to different lengths; the re-extension must not see dropped tokens."""
  v = model.cfg.vocab_size
  prefix = random_ids(1, (B, 5), v)
  first = random_ids(2, (B, 3), v)   # extended, then partly rolled back
  second = random_ids(3, (B, 4), v)  # the extension after the rollback
  # Row 0 drops into its prefix, row 1 drops all of `first`, row 2 keeps 2 of its tokens.
  keep = np.array([2, 5, 7])

  cache = KVCache.init(model.cfg, B, CAPACITY)
  _, cache = model(prefix, cache=cache)
  _, cache = model(first, cache=cache)
  cache = cache.rollback(jnp.asarray(keep))
  np.testing.assert_array_equal(np.asarray(cache.lengths), keep)
  got, _ = model(second, cache=cache)

  heads = [np.concatenate([prefix[r], first[r]])[:keep[r]] for r in range(B)]
  # A fresh cache fed the same final sequences.
  fresh = KVCache.init(model.cfg, B, CAPACITY)
  _, fresh = model(right_pad(heads, 8), cache=fresh, num_new=keep)
  fresh_out, _ = model(second, cache=fresh)
  np.testing.assert_allclose(np.asarray(got), np.asarray(fresh_out), atol=ATOL, rtol=0)
  for row in range(B):
    seq = np.concatenate([heads[row], second[row]])
    np.testing.assert_allclose(np.asarray(got[row]), full_logits(model, seq)[-4:],
                               atol=ATOL, rtol=0)


def test_rollback_never_moves_a_row_forward(model):
  cache = KVCache.init(model.cfg, B, CAPACITY)
  _, cache = model(random_ids(4, (B, 5), model.cfg.vocab_size), cache=cache,
                   num_new=[5, 3, 4])
  cache = cache.rollback(jnp.asarray([2, 5, 4]))
  np.testing.assert_array_equal(np.asarray(cache.lengths), [2, 3, 4])


def test_rows_of_different_lengths_match_unbatched_forwards(model):
  """Right-padded prompts of different lengths, then per-row extension amounts (one 0)."""
  v = model.cfg.vocab_size
  prompt_lens = np.array([5, 8, 3])
  prompts = random_ids(5, (B, 8), v)
  prompts[np.arange(8)[None] >= prompt_lens[:, None]] = 0  # padding
  ext = random_ids(6, (B, 4), v)
  ext_lens = np.array([2, 0, 4])
  ext2 = random_ids(7, (B, 3), v)

  cache = KVCache.init(model.cfg, B, CAPACITY)
  out1, cache = model(prompts, cache=cache, num_new=prompt_lens)
  np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens)
  out2, cache = model(ext, cache=cache, num_new=ext_lens)
  # Row 1 took num_new=0: its length must not move, and the padded writes past its length
  # must not leak into the next extension.
  np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens + ext_lens)
  out3, cache = model(ext2, cache=cache)
  np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens + ext_lens + 3)

  for row in range(B):
    p, e = prompt_lens[row], ext_lens[row]
    want = full_logits(model, np.concatenate([prompts[row, :p], ext[row, :e], ext2[row]]))
    np.testing.assert_allclose(np.asarray(out1[row, :p]), want[:p], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out2[row, :e]), want[p:p + e], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out3[row]), want[p + e:], atol=ATOL, rtol=0)


def test_zero_new_tokens_leaves_row_unchanged(model):
  """A num_new=0 call must leave a row's length and its valid cache entries untouched."""
  ids = random_ids(8, (B, 5), model.cfg.vocab_size)
  cache = KVCache.init(model.cfg, B, CAPACITY)
  _, cache = model(ids, cache=cache)
  _, after = model(random_ids(9, (B, 3), model.cfg.vocab_size), cache=cache,
                   num_new=[0, 3, 0])
  np.testing.assert_array_equal(np.asarray(after.lengths), [5, 8, 5])
  for layer in range(model.cfg.num_layers):
    for before_kv, after_kv in ((cache.k, after.k), (cache.v, after.v)):
      np.testing.assert_array_equal(np.asarray(after_kv[layer][:, :5]),
                                    np.asarray(before_kv[layer][:, :5]))
      # Row 1 did advance: its new entries were written.
      assert not np.array_equal(np.asarray(after_kv[layer][1, 5:8]),
                                np.asarray(before_kv[layer][1, 5:8]))


def test_bf16_is_close_to_fp32(model):
  """The same weights in bf16 (params, activations and cache) track the fp32 model."""
  cfg = model.cfg
  bf16 = Jitted(tiny_model(cfg.model_type, seed=1, dtype="bfloat16", param_dtype="bfloat16"))
  assert bf16.model.embedding_vd[...].dtype == jnp.bfloat16
  ids = random_ids(10, (B, 12), cfg.vocab_size)
  cache = KVCache.init(bf16.cfg, B, CAPACITY)
  assert cache.k[0].dtype == jnp.bfloat16
  out_a, cache = bf16(right_pad(ids[:, :8], 8), cache=cache)
  out_b, _ = bf16(ids[:, 8:], cache=cache)
  cached = np.concatenate([np.asarray(out_a), np.asarray(out_b)], axis=1)
  assert cached.dtype == np.float32  # logits are float32 whatever the activation dtype
  full = np.asarray(bf16(right_pad(ids[:1], REF_LEN)))[0, :12]
  for row in range(B):
    want = full_logits(model, ids[row])
    scale = np.abs(want).max()
    assert scale > 0.1
    # bf16 keeps ~3 significant digits; a few percent of the logit range is the expected
    # drift through 2 layers. A wrong bf16 path (e.g. ignoring the cache) is off by O(scale).
    np.testing.assert_allclose(cached[row], want, atol=0.03 * scale, rtol=0)
    if row == 0:
      np.testing.assert_allclose(full, want, atol=0.03 * scale, rtol=0)
      assert np.abs(full - want).max() > 1e-4  # really ran in reduced precision
