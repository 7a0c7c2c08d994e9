"""Cached decoding == full forward, for every text family.

The reference is always the cache-free causal forward of the whole sequence; the cache path
must reproduce it under chunked extension, rollback, and rows that move independently.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from dream_r_jax.models import KVCache
from dream_r_jax.testing.models import TEXT_MODEL_TYPES, Jitted, random_ids, tiny_model

ATOL = 1e-5
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


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_prefill_then_extend_in_chunks_equals_full_forward(model, chunk):
  ids = random_ids(0, (2, SEQ), model.cfg.vocab_size)
  want = np.asarray(model(jnp.asarray(ids)))
  cache = KVCache.init(model.cfg, 2, CAPACITY)
  prefill = 4
  out, cache = model(jnp.asarray(ids[:, :prefill]), cache=cache)
  pieces = [np.asarray(out)]
  for start in range(prefill, SEQ, chunk):
    # The last chunk may be short: pad it to the chunk size and pass num_new, as callers do.
    n = min(chunk, SEQ - start)
    piece = np.zeros((2, chunk), np.int32)
    piece[:, :n] = ids[:, start:start + n]
    out, cache = model(piece, cache=cache, num_new=np.full((2,), n))
    pieces.append(np.asarray(out)[:, :n])
  got = np.concatenate(pieces, axis=1)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [SEQ, SEQ])
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_rollback_then_reextend_equals_never_extended(model):
  """Rows roll back to different lengths; the re-extension must not see the dropped tokens."""
  v = model.cfg.vocab_size
  prefix = random_ids(1, (2, 8), v)
  first = random_ids(2, (2, 5), v)   # extended, then partly rolled back
  second = random_ids(3, (2, 4), v)  # extension after the rollback
  keep = np.array([8, 10])           # row 0 drops all of `first`, row 1 keeps 2 tokens

  cache = KVCache.init(model.cfg, 2, CAPACITY)
  _, cache = model(jnp.asarray(prefix), cache=cache)
  _, cache = model(jnp.asarray(first), cache=cache)
  cache = cache.rollback(jnp.asarray(keep))
  np.testing.assert_array_equal(np.asarray(cache.lengths), keep)
  got, cache = model(jnp.asarray(second), cache=cache)

  for row in range(2):
    seq = np.concatenate([prefix[row], first[row]])[:keep[row]]
    seq = np.concatenate([seq, second[row]])
    # A fresh cache fed the same final sequence.
    fresh = KVCache.init(model.cfg, 1, CAPACITY)
    head = np.zeros((1, 12), np.int32)
    head[0, :len(seq) - 4] = seq[:-4]
    _, fresh = model(head, cache=fresh, num_new=[len(seq) - 4])
    fresh_out, _ = model(seq[-4:][None], cache=fresh)
    np.testing.assert_allclose(np.asarray(got[row]), np.asarray(fresh_out[0]), atol=ATOL,
                               rtol=0)
    np.testing.assert_allclose(np.asarray(got[row]), full_logits(model, seq)[-4:], atol=ATOL,
                               rtol=0)


def test_rollback_never_moves_a_row_forward(model):
  cache = KVCache.init(model.cfg, 2, CAPACITY)
  _, cache = model(jnp.asarray(random_ids(4, (2, 6), model.cfg.vocab_size)), cache=cache,
                   num_new=jnp.asarray([6, 3]))
  cache = cache.rollback(jnp.asarray([2, 5]))
  np.testing.assert_array_equal(np.asarray(cache.lengths), [2, 3])


def test_rows_of_different_lengths_match_unbatched_forwards(model):
  """Right-padded prompts of different lengths, then per-row extension amounts (one 0)."""
  v = model.cfg.vocab_size
  prompt_lens = np.array([5, 9, 3])
  prompts = random_ids(5, (3, 9), v)
  prompts[np.arange(9)[None] >= prompt_lens[:, None]] = 0  # padding
  ext = random_ids(6, (3, 4), v)
  ext_lens = np.array([2, 0, 4])
  ext2 = random_ids(7, (3, 3), v)

  cache = KVCache.init(model.cfg, 3, CAPACITY)
  out1, cache = model(jnp.asarray(prompts), cache=cache, num_new=jnp.asarray(prompt_lens))
  np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens)
  out2, cache = model(jnp.asarray(ext), cache=cache, num_new=jnp.asarray(ext_lens))
  # Row 1 took num_new=0: its length must not move, and its padded writes past the length
  # must not leak into the next extension.
  np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens + ext_lens)
  out3, cache = model(jnp.asarray(ext2), cache=cache)
  np.testing.assert_array_equal(np.asarray(cache.lengths), prompt_lens + ext_lens + 3)

  for row in range(3):
    p, e = prompt_lens[row], ext_lens[row]
    seq = np.concatenate([prompts[row, :p], ext[row, :e], ext2[row]])
    want = full_logits(model, seq)
    np.testing.assert_allclose(np.asarray(out1[row, :p]), want[:p], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out2[row, :e]), want[p:p + e], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out3[row]), want[p + e:], atol=ATOL, rtol=0)


def test_zero_new_tokens_leaves_row_unchanged(model):
  """A num_new=0 call must leave a row's length and its valid cache entries untouched."""
  ids = random_ids(8, (2, 6), model.cfg.vocab_size)
  cache = KVCache.init(model.cfg, 2, CAPACITY)
  _, cache = model(jnp.asarray(ids), cache=cache)
  _, after = model(jnp.asarray(random_ids(9, (2, 3), model.cfg.vocab_size)), cache=cache,
                   num_new=jnp.asarray([0, 3]))
  np.testing.assert_array_equal(np.asarray(after.lengths), [6, 9])
  for layer in range(model.cfg.num_layers):
    for before_kv, after_kv in ((cache.k, after.k), (cache.v, after.v)):
      np.testing.assert_array_equal(np.asarray(after_kv[layer][0, :6]),
                                    np.asarray(before_kv[layer][0, :6]))
      # Row 1 did advance: its new entries were written.
      assert not np.array_equal(np.asarray(after_kv[layer][1, 6:9]),
                                np.asarray(before_kv[layer][1, 6:9]))


def test_bf16_is_close_to_fp32(model):
  """The same weights in bf16 (params, activations and cache) track the fp32 model."""
  cfg = model.cfg
  bf16 = Jitted(tiny_model(cfg.model_type, seed=1, dtype="bfloat16", param_dtype="bfloat16"))
  assert bf16.model.embedding_vd[...].dtype == jnp.bfloat16
  ids = random_ids(10, (2, 12), cfg.vocab_size)
  want = np.asarray(model(jnp.asarray(ids)))
  full = np.asarray(bf16(jnp.asarray(ids)))
  cache = KVCache.init(bf16.cfg, 2, CAPACITY)
  assert cache.k[0].dtype == jnp.bfloat16
  out_a, cache = bf16(jnp.asarray(ids[:, :7]), cache=cache)
  out_b, _ = bf16(jnp.asarray(ids[:, 7:]), cache=cache)
  cached = np.concatenate([np.asarray(out_a), np.asarray(out_b)], axis=1)
  assert full.dtype == np.float32  # logits are always float32
  scale = np.abs(want).max()
  assert scale > 0.1
  # bf16 keeps ~3 significant digits; a few percent of the logit range is the expected
  # drift through 2 layers. A wrong bf16 path (e.g. ignoring the cache) is off by O(scale).
  np.testing.assert_allclose(full, want, atol=0.03 * scale, rtol=0)
  np.testing.assert_allclose(cached, want, atol=0.03 * scale, rtol=0)
  assert np.abs(full - want).max() > 0  # really ran in reduced precision
