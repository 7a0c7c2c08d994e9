"""The bundled models' tokenizer, and turning examples into token ids.

A word-level `tokenizers` model whose pieces come from a regex: a tile name with its
" =" (as in the read step "b = 5"), a word or a single punctuation mark, each with at
most one leading space, a single digit (with or without a leading space), or a newline.

"b =" is one piece on purpose: the model then predicts a tile's value at the very token
that names the tile, so reading a tile is one attention hop (from that token to the
tile's image token) instead of two (first fetch the name from the previous token). On
the default task this is the difference between learning to read and not: the
quickstart target reads 100% of tile values after 500 steps with it and 36% after 750
without it (teacher-forced, batch 64). The decoder concatenates pieces, so decoding inverts
encoding exactly for any text made of known pieces, and, because "\n" is always a piece
of its own, encode(a + b) == encode(a) + encode(b) whenever `a` ends with the step
delimiter: steps can be tokenized one at a time. The vocabulary is the fixed alphabet
plus every piece of a corpus generated from all task presets, so it is deterministic.

The directory written by `build_tokenizer` is a Hugging Face tokenizer directory that
`transformers.AutoTokenizer.from_pretrained` loads as a fast tokenizer, so bundled and
real checkpoints load the same way.
"""
from __future__ import annotations

import functools
import json
import os
import string
import tempfile
from typing import Any, Optional

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dream_r_jax.data import task as task_lib

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_PAD, VISION_START, VISION_END)  # ids 0..6.
_PIECE_REGEX = r" ?[a-z] =| ?[A-Za-z]+| ?[0-9]|\n| ?[^\sA-Za-z0-9]| +|\s"
_MERGE_PX = 28  # Qwen2.5-VL: patch 14 x spatial merge 2.


def _alphabet() -> list[str]:
  """Pieces that are always in the vocabulary, whatever the corpus."""
  base = list(string.digits) + list(string.ascii_lowercase)
  base += list("+-*/=()<>,.:;?!'\"%")
  return ["\n", " "] + base + [" " + p for p in base]


def _corpus(examples_per_preset: int = 200) -> list[str]:
  texts = [task_lib.VERIFY_TEMPLATE + task_lib.POSITIVE_VERDICT + task_lib.NEGATIVE_VERDICT]
  for name in task_lib.PRESETS:
    cfg = task_lib.get_config(name)
    for i in range(examples_per_preset):
      example = task_lib.example_at(cfg, seed=12345, index=i)
      texts.append(task_lib.prompt_text(example))
      texts.append(task_lib.STEP_DELIMITER.join(example["steps"]))
  return texts


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.Split(tokenizers.Regex(_PIECE_REGEX), behavior="isolated")


def _vocab() -> dict[str, int]:
  split = _pre_tokenizer()
  pieces = set(_alphabet())
  for text in _corpus():
    pieces.update(p for p, _ in split.pre_tokenize_str(text))
  ordered = list(SPECIAL_TOKENS) + sorted(pieces - set(SPECIAL_TOKENS))
  return {piece: i for i, piece in enumerate(ordered)}


def build_tokenizer(out_dir: str) -> str:
  """Writes the tokenizer directory (tokenizer.json + configs); returns `out_dir`."""
  tok = tokenizers.Tokenizer(models.WordLevel(_vocab(), unk_token=UNK))
  tok.pre_tokenizer = _pre_tokenizer()
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  specials = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
              "additional_special_tokens": [IMAGE_PAD, VISION_START, VISION_END]}
  config = dict(specials, tokenizer_class="PreTrainedTokenizerFast",
                model_max_length=4096, clean_up_tokenization_spaces=False,
                add_bos_token=False, add_eos_token=False, padding_side="right")
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(specials, f, indent=2)
  return out_dir


def load_tokenizer(path: str):
  """The transformers fast tokenizer saved at `path` (no network access)."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


@functools.lru_cache(maxsize=None)
def bundled_tokenizer():
  """The bundled tokenizer, built once per process into a temporary directory."""
  return load_tokenizer(build_tokenizer(tempfile.mkdtemp(prefix="dream_r_tokenizer_")))


def num_image_tokens(height: int, width: int) -> int:
  """Image placeholder tokens for an image of this size (one per merged 28x28 patch)."""
  if height <= 0 or width <= 0 or height % _MERGE_PX or width % _MERGE_PX:
    raise ValueError(f"image size {height}x{width} is not a positive multiple of "
                     f"{_MERGE_PX}; resize it first (Qwen2.5-VL smart_resize)")
  return (height // _MERGE_PX) * (width // _MERGE_PX)


def _ids(tokenizer, text: str) -> list[int]:
  return tokenizer.encode(text, add_special_tokens=False)


def _bos(tokenizer) -> list[int]:
  # Qwen tokenizers have no BOS token (bos_token_id is None): their prompts start bare.
  bos = tokenizer.bos_token_id
  return [] if bos is None else [bos]


def _image_ids(tokenizer, example: dict[str, Any], n: Optional[int]) -> list[int]:
  image = example.get("image")
  if image is None:
    return []
  if n is None:
    n = num_image_tokens(image.shape[0], image.shape[1])
  pad, start, end = tokenizer.convert_tokens_to_ids([IMAGE_PAD, VISION_START, VISION_END])
  return [start] + [pad] * n + [end]


# pylint: disable=redefined-outer-name
# (`num_image_tokens` is both a helper and the natural argument name of the encoders.)


def encode_prompt(tokenizer, example: dict[str, Any],
                  num_image_tokens: Optional[int] = None) -> np.ndarray:
  """bos [vision_start image_pad*n vision_end] question delimiter, as int32 ids (no bos
  when the tokenizer has none, as Qwen's).

  Args:
    tokenizer: the tokenizer (bundled or a real checkpoint's).
    example: an example dict; its image (if any) decides whether vision tokens appear.
    num_image_tokens: placeholders for the image; by default from the image size.
  """
  ids = _bos(tokenizer) + _image_ids(tokenizer, example, num_image_tokens)
  ids += _ids(tokenizer, task_lib.prompt_text(example))
  return np.asarray(ids, np.int32)


def encode_sft(tokenizer, example: dict[str, Any], num_image_tokens: Optional[int] = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Reasoning SFT: prompt, steps (each followed by the delimiter) and eos.

  Returns:
    (ids, loss_mask), int32 [T] each; the loss covers the steps and eos only.
  """
  prompt = encode_prompt(tokenizer, example, num_image_tokens)
  steps = "".join(s + task_lib.STEP_DELIMITER for s in example["steps"])
  target = _ids(tokenizer, steps) + [tokenizer.eos_token_id]
  ids = np.concatenate([prompt, np.asarray(target, np.int32)])
  mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(target), np.int32)])
  return ids, mask


def verdict_token_ids(tokenizer) -> tuple[int, int]:
  """(positive, negative) verdict token ids; each verdict must be one token."""
  out = []
  for verdict in (task_lib.POSITIVE_VERDICT, task_lib.NEGATIVE_VERDICT):
    ids = _ids(tokenizer, verdict)
    if len(ids) != 1:
      raise ValueError(f"verdict {verdict!r} is {len(ids)} tokens in this tokenizer")
    out.append(ids[0])
  return out[0], out[1]


def encode_verdict(tokenizer, example: dict[str, Any], prefix_text: str,
                   candidate_step: str, label: bool,
                   num_image_tokens: Optional[int] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """A judge example: bos [image] prefix candidate delimiter template verdict.

  Args:
    tokenizer: the tokenizer.
    example: the example the prefix comes from (for its image).
    prefix_text: prompt text plus the previous steps, from `task.verdict_examples`.
    candidate_step: the judged step, without delimiter.
    label: whether the candidate is right (positive verdict) or not.
    num_image_tokens: placeholders for the image; by default from the image size.

  Returns:
    (ids, loss_mask), int32 [T] each; the loss covers the verdict token only.
  """
  positive, negative = verdict_token_ids(tokenizer)
  ids = _bos(tokenizer) + _image_ids(tokenizer, example, num_image_tokens)
  ids += _ids(tokenizer, task_lib.verdict_query(prefix_text, candidate_step))
  ids.append(positive if label else negative)
  mask = np.zeros(len(ids), np.int32)
  mask[-1] = 1
  return np.asarray(ids, np.int32), mask
