"""Tests of the bundled tokenizer and of example -> token id encoding."""
import json
import os

import numpy as np
import pytest
import transformers

from dream_r_jax.data import task
from dream_r_jax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return tok_lib.build_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
  return tok_lib.load_tokenizer(tok_dir)


def _texts(n=100):
  for preset in task.PRESETS:
    for i in range(n):
      ex = task.example_at(task.get_config(preset), 77, i)
      yield task.prompt_text(ex)
      yield "".join(s + task.STEP_DELIMITER for s in ex["steps"])
      for prefix, candidate, _ in task.verdict_examples(ex, np.random.default_rng(i)):
        yield task.verdict_query(prefix, candidate)


def test_directory_loads_with_auto_tokenizer(tok_dir):
  assert sorted(os.listdir(tok_dir)) == [
      "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
  loaded = transformers.AutoTokenizer.from_pretrained(tok_dir)
  assert loaded.is_fast
  with open(os.path.join(tok_dir, "special_tokens_map.json")) as f:
    assert json.load(f)["additional_special_tokens"] == [
        tok_lib.IMAGE_PAD, tok_lib.VISION_START, tok_lib.VISION_END]
  ids = loaded.convert_tokens_to_ids(list(tok_lib.SPECIAL_TOKENS))
  assert ids == list(range(len(tok_lib.SPECIAL_TOKENS)))
  assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
  assert len(loaded) <= 256


def test_round_trip_is_exact(tok):
  unknown = tok.unk_token_id
  for text in _texts():
    ids = tok.encode(text, add_special_tokens=False)
    assert unknown not in ids, text
    assert tok.decode(ids) == text


def test_single_tokens(tok):
  singles = [task.POSITIVE_VERDICT, task.NEGATIVE_VERDICT, task.STEP_DELIMITER, "Answer",
             " +", " -", " *", " =", "+", "-", "*", "="]
  singles += [str(d) for d in range(10)] + [f" {d}" for d in range(10)]
  for text in singles:
    assert len(tok.encode(text, add_special_tokens=False)) == 1, repr(text)
  # Numbers are spelled digit by digit.
  assert tok.convert_ids_to_tokens(tok.encode(" 1024", add_special_tokens=False)) == [
      " 1", "0", "2", "4"]
  assert len(tok.encode(task.VERIFY_TEMPLATE, add_special_tokens=False)) <= 2
  pos, neg = tok_lib.verdict_token_ids(tok)
  assert pos != neg and tok.decode([pos]) == " yes" and tok.decode([neg]) == " no"


def test_steps_tokenize_one_at_a_time(tok):
  # The engine appends steps token by token; text concatenation must agree.
  ex = task.example_at(task.TaskConfig.default(), 2, 3)
  pieces = [task.prompt_text(ex)] + [s + "\n" for s in ex["steps"]] + [task.VERIFY_TEMPLATE]
  joined = tok.encode("".join(pieces), add_special_tokens=False)
  assert joined == sum((tok.encode(p, add_special_tokens=False) for p in pieces), [])


def test_build_is_deterministic(tok_dir, tmp_path):
  other = tok_lib.build_tokenizer(str(tmp_path / "again"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(tok_dir, name)) as a, open(os.path.join(other, name)) as b:
      assert a.read() == b.read()


def test_encode_prompt_layout(tok):
  ex = task.example_at(task.TaskConfig.default(), 0, 0)
  ids = tok_lib.encode_prompt(tok, ex).tolist()
  special = tok.convert_tokens_to_ids(
      [tok_lib.BOS, tok_lib.VISION_START, tok_lib.IMAGE_PAD, tok_lib.VISION_END])
  assert ids[:9] == [special[0], special[1]] + [special[2]] * 6 + [special[3]]
  assert tok.decode(ids[9:]) == ex["question"] + "\n"
  assert tok_lib.encode_prompt(tok, ex, num_image_tokens=3).tolist().count(special[2]) == 3
  text_ex = task.example_at(task.TaskConfig.text(), 0, 0)
  text_ids = tok_lib.encode_prompt(tok, text_ex).tolist()
  assert text_ids[0] == special[0] and not set(special[1:]) & set(text_ids)


class _NoBos:
  """A tokenizer like Qwen's: no BOS token."""

  def __init__(self, tok):
    self._tok = tok

  bos_token_id = None

  def __getattr__(self, name):
    return getattr(self._tok, name)


def test_prompts_of_a_tokenizer_without_bos_start_bare(tok):
  ex = task.example_at(task.TaskConfig.default(), 0, 0)
  with_bos = tok_lib.encode_prompt(tok, ex).tolist()
  assert tok_lib.encode_prompt(_NoBos(tok), ex).tolist() == with_bos[1:]
  prefix, cand, label = task.verdict_examples(ex, np.random.default_rng(0))[0]
  ids, mask = tok_lib.encode_verdict(_NoBos(tok), ex, prefix, cand, label)
  want, want_mask = tok_lib.encode_verdict(tok, ex, prefix, cand, label)
  assert ids.tolist() == want.tolist()[1:] and mask.tolist() == want_mask.tolist()[1:]


def test_encode_sft_masks_only_steps_and_eos(tok):
  for i in range(20):
    ex = task.example_at(task.TaskConfig.default(), 0, i)
    ids, mask = tok_lib.encode_sft(tok, ex)
    prompt_len = len(tok_lib.encode_prompt(tok, ex))
    assert ids.dtype == np.int32 and ids.shape == mask.shape
    assert not mask[:prompt_len].any() and mask[prompt_len:].all()
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[prompt_len:-1]) == "".join(s + "\n" for s in ex["steps"])


def test_encode_verdict_masks_only_the_verdict(tok):
  pos, neg = tok_lib.verdict_token_ids(tok)
  ex = task.example_at(task.TaskConfig.default(), 0, 1)
  for prefix, candidate, label in task.verdict_examples(ex, np.random.default_rng(0)):
    ids, mask = tok_lib.encode_verdict(tok, ex, prefix, candidate, label)
    assert mask.sum() == 1 and mask[-1] == 1
    assert ids[-1] == (pos if label else neg)
    assert tok.decode(ids[:-1], skip_special_tokens=True) == task.verdict_query(
        prefix, candidate)


def test_num_image_tokens():
  assert tok_lib.num_image_tokens(56, 84) == 6
  assert tok_lib.num_image_tokens(28 * 3, 28 * 3) == 9
  for bad in [(30, 28), (28, 0), (14, 28)]:
    with pytest.raises(ValueError, match="multiple of 28"):
      tok_lib.num_image_tokens(*bad)


def test_sequences_are_short(tok):
  lengths = []
  for i in range(200):
    ex = task.example_at(task.TaskConfig.default(), 0, i)
    ids, _ = tok_lib.encode_sft(tok, ex, num_image_tokens=0)
    lengths.append(len(ids) - 2)  # Minus the empty vision start/end pair.
  assert np.mean(lengths) < 55 and max(lengths) <= 70
