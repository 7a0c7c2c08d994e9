"""Tests of the grain batching pipeline: padding, determinism, mixing, sharding."""
import numpy as np
import pytest

from dream_r_jax.data import pipeline
from dream_r_jax.data import task
from dream_r_jax.data import tfds_builder
from dream_r_jax.data import tokenizer as tok_lib

MAX_LEN = 96


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tok_lib.load_tokenizer(tok_lib.build_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def source():
  return [task.example_at(task.TaskConfig.default(), 11, i) for i in range(48)]


def _make(source, tok, **kwargs):
  kwargs.setdefault("batch_size", 8)
  kwargs.setdefault("max_len", MAX_LEN)
  return pipeline.make_dataset(source, tok, **kwargs)


def test_batch_shapes_and_padding(source, tok):
  batch = _make(source, tok, seed=0)[0]
  assert batch["input_ids"].shape == (8, MAX_LEN) and batch["input_ids"].dtype == np.int32
  assert batch["loss_mask"].shape == (8, MAX_LEN) and batch["loss_mask"].dtype == np.float32
  assert batch["images"].shape == (8, 56, 84, 3) and batch["images"].dtype == np.uint8
  lengths = batch["lengths"]
  # No real token is <pad> (id 0), so the padding is exactly the tail past `lengths`.
  assert ((batch["input_ids"] != 0).sum(axis=1) == lengths).all()
  for row in range(8):
    assert (batch["input_ids"][row, lengths[row]:] == 0).all()
    assert (batch["loss_mask"][row, lengths[row]:] == 0).all()
    example = source[batch["record"][row]]
    ids, mask = tok_lib.encode_sft(tok, example)
    assert np.array_equal(batch["input_ids"][row, :lengths[row]], ids)
    assert np.array_equal(batch["loss_mask"][row, :lengths[row]], mask)
    assert np.array_equal(batch["images"][row], example["image"])


def test_deterministic_per_seed(source, tok):
  a = [_make(source, tok, seed=5, verdict_ratio=0.5)[i] for i in range(3)]
  b = [_make(source, tok, seed=5, verdict_ratio=0.5)[i] for i in range(3)]
  c = [_make(source, tok, seed=6, verdict_ratio=0.5)[i] for i in range(3)]
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert any(not np.array_equal(x["record"], y["record"]) for x, y in zip(a, c))


def test_epochs_cover_each_record_once_and_reshuffle(source, tok):
  ds = _make(source, tok, seed=1, num_epochs=2)
  assert len(ds) == 2 * len(source) // 8
  records = np.concatenate([ds[i]["record"] for i in range(len(ds))])
  first, second = records[:len(source)], records[len(source):]
  assert sorted(first) == list(range(len(source))) == sorted(second)
  assert not np.array_equal(first, second)


def test_sharding_is_disjoint_and_reassembles_the_global_batch(source, tok):
  kwargs = dict(seed=3, verdict_ratio=0.5, num_epochs=1, batch_size=8)
  whole = _make(source, tok, **kwargs)
  shards = [_make(source, tok, shard_index=p, shard_count=4, **kwargs) for p in range(4)]
  assert all(len(s) == len(whole) for s in shards)
  seen = []
  for step in range(len(whole)):
    parts = [s[step] for s in shards]
    assert all(p["input_ids"].shape == (2, MAX_LEN) for p in parts)
    for key, value in whole[step].items():
      assert np.array_equal(value, np.concatenate([p[key] for p in parts])), key
    seen += [r for p in parts for r in p["record"]]
  assert len(seen) == len(set(seen)) == len(source)


def test_uneven_shards_get_equal_batch_counts(tok):
  src = [task.example_at(task.TaskConfig.easy(), 0, i) for i in range(9)]
  shards = [pipeline.make_dataset(src, tok, batch_size=2, max_len=64, num_epochs=1,
                                  shard_index=p, shard_count=2) for p in range(2)]
  # 9 records = 9 chunks of 1 row; the ninth would give process 0 a batch more.
  assert [len(s) for s in shards] == [4, 4]


def test_verdict_mixing(source, tok):
  pos, neg = tok_lib.verdict_token_ids(tok)
  ds = _make(source, tok, seed=2, verdict_ratio=1.0)
  for i in range(3):
    batch = ds[i]
    assert (batch["kind"] == pipeline.KIND_VERDICT).all()
    assert (batch["loss_mask"].sum(axis=1) == 1).all()
    last = batch["input_ids"][np.arange(8), batch["lengths"] - 1]
    assert np.array_equal(last, np.where(batch["verdict_label"], pos, neg))
    assert (np.argmax(batch["loss_mask"], axis=1) == batch["lengths"] - 1).all()
  assert (_make(source, tok, seed=2, verdict_ratio=0.0)[0]["kind"] == pipeline.KIND_SFT).all()
  mixed = _make(source, tok, seed=2, verdict_ratio=0.3)
  kinds = np.concatenate([mixed[i]["kind"] for i in range(32)])
  labels = np.concatenate([b["verdict_label"][b["kind"] == 1]
                           for b in (mixed[i] for i in range(32))])
  assert 0.2 < kinds.mean() < 0.4
  assert 0.3 < labels.mean() < 0.7


def test_text_source_from_tfds_has_no_images(tmp_path, tok):
  src = tfds_builder.load_task("text", "train", str(tmp_path),
                               split_sizes={"train": 8, "validation": 1, "test": 1})
  batch = pipeline.make_dataset(src, tok, batch_size=4, max_len=MAX_LEN)[0]
  assert "images" not in batch
  vision = tok.convert_tokens_to_ids([tok_lib.VISION_START, tok_lib.IMAGE_PAD])
  assert not np.isin(batch["input_ids"], vision).any()


def test_bad_arguments(source, tok):
  with pytest.raises(ValueError, match="max_len"):
    _make(source, tok, max_len=20)[0]
  with pytest.raises(ValueError, match="divisible"):
    _make(source, tok, shard_count=3)
  with pytest.raises(ValueError, match="shard"):
    _make(source, tok, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="verdict_ratio"):
    _make(source, tok, verdict_ratio=1.5)
  with pytest.raises(ValueError, match="positive"):
    _make(source, tok, batch_size=0)
