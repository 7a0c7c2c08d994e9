"""Greedy generation over task examples: answer accuracy and target trajectories.

Prompts are batched at a fixed batch size and prompt length (the last batch is padded by
repeating its last example), so one compiled `generate` serves every batch. In a
multi-process run each process generates for its share of the examples with a local copy
of the model, and the results are gathered, so every process ends with all of them.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.decoding.generate import generate
from dream_r_jax.models import Transformer, image_processing


@dataclasses.dataclass
class Generations:
  """Prompts and greedy continuations, in example order.

  Attributes:
    prompts: list of int32 prompt ids (unpadded).
    outputs: list of int32 generated ids (up to and including EOS if one was produced).
    hit_eos: [N] bool.
    tokens_per_second: generated tokens per second (all processes together).
  """
  prompts: list[np.ndarray]
  outputs: list[np.ndarray]
  hit_eos: np.ndarray
  tokens_per_second: float


def local_model(model: nnx.Module) -> nnx.Module:
  """`model` itself in a one-process run; else a full copy on this process's devices."""
  if jax.process_count() == 1:
    return model
  graphdef, state = nnx.split(model)
  host = multihost_utils.process_allgather(state, tiled=True)
  device = jax.local_devices()[0]
  return nnx.merge(graphdef, jax.device_put(host, device))


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _images(model: Transformer, examples):
  """Per example: (pixel_values, grid row) of its image, or None (text-only)."""
  if model.cfg.vision is None:
    return [None] * len(examples)
  out = []
  for e in examples:
    if e.get("image") is None:
      out.append(None)
    else:
      pixels, grid = image_processing.preprocess_images([e["image"]])
      out.append((pixels, tuple(int(v) for v in grid[0])))
  return out


def _generate_local(model: Transformer, tokenizer, examples: Sequence[dict[str, Any]], *,
                    batch_size: int, max_new_tokens: int):
  images = _images(model, examples)
  # Placeholders follow the processor's grid, so images of any size (benchmark files)
  # get as many image tokens as the vision tower makes features.
  prompts = [tok_lib.encode_prompt(
      tokenizer, e, None if im is None else int(image_processing.num_image_tokens(im[1])[0]))
             for e, im in zip(examples, images)]
  if not prompts:
    return [], [], np.zeros((0,), bool), 0
  prompt_len = _round_up(max(len(p) for p in prompts), 8)
  outputs, hit_eos, generated = [], [], 0
  for start in range(0, len(examples), batch_size):
    chunk = list(range(start, min(start + batch_size, len(examples))))
    rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
    ids = np.zeros((batch_size, prompt_len), np.int32)
    lens = np.zeros((batch_size,), np.int32)
    for r, i in enumerate(rows):
      ids[r, :len(prompts[i])] = prompts[i]
      lens[r] = len(prompts[i])
    pixel_values = grid = None
    with_image = [images[i] for i in rows if images[i] is not None]
    if with_image:
      pixel_values = np.concatenate([p for p, _ in with_image])
      grid = np.asarray([g for _, g in with_image], np.int64)
    with jax.named_scope("eval_generate"):
      out = generate(model, ids, lens, max_new_tokens=max_new_tokens,
                     eos_ids=(tokenizer.eos_token_id,), pixel_values=pixel_values,
                     image_grid_thw=grid, pad_id=tokenizer.pad_token_id or 0)
    tokens, lengths, eos = jax.device_get((out.tokens, out.lengths, out.hit_eos))
    for r in range(len(chunk)):
      outputs.append(np.asarray(tokens[r, :lengths[r]], np.int32))
      hit_eos.append(bool(eos[r]))
      generated += int(lengths[r])
  return prompts, outputs, np.asarray(hit_eos, bool), generated


def greedy_generations(model: Transformer, tokenizer, examples: Sequence[dict[str, Any]], *,
                       batch_size: int, max_new_tokens: int) -> Generations:
  """Greedy continuations of every example's prompt (all processes get all of them)."""
  t0 = time.time()
  n_proc, me = jax.process_count(), jax.process_index()
  model = local_model(model)
  mine = list(range(me, len(examples), n_proc))
  prompts, outputs, hit_eos, generated = _generate_local(
      model, tokenizer, [examples[i] for i in mine], batch_size=batch_size,
      max_new_tokens=max_new_tokens)
  if n_proc > 1:
    prompts, outputs, hit_eos, generated = _gather(mine, prompts, outputs, hit_eos,
                                                   generated, len(examples))
  dt = time.time() - t0
  return Generations(prompts=prompts, outputs=outputs, hit_eos=hit_eos,
                     tokens_per_second=generated / dt if dt > 0 else 0.0)


def _gather(mine, prompts, outputs, hit_eos, generated, total):
  """Every process's generations, back in example order."""
  width = max([len(p) + len(o) for p, o in zip(prompts, outputs)] + [1])
  width = int(np.max(multihost_utils.process_allgather(np.asarray(width))))
  per = -(-total // jax.process_count())
  rows = np.full((per, 3 + width), -1, np.int64)
  for r, (i, p, o, e) in enumerate(zip(mine, prompts, outputs, hit_eos)):
    rows[r, :3] = (i, len(p), e)
    rows[r, 3:3 + len(p) + len(o)] = np.concatenate([p, o])
  rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1, 3 + width)
  rows = rows[rows[:, 0] >= 0]
  rows = rows[np.argsort(rows[:, 0])]
  all_prompts, all_outputs = [], []
  for row in rows:
    n = int(row[1])
    seq = row[3:]
    seq = seq[seq >= 0]
    all_prompts.append(seq[:n].astype(np.int32))
    all_outputs.append(seq[n:].astype(np.int32))
  total_generated = int(np.sum(multihost_utils.process_allgather(np.asarray(generated))))
  return all_prompts, all_outputs, rows[:, 2].astype(bool), total_generated


def answer_correct(tokenizer, output_ids: np.ndarray, answer: str) -> bool:
  """Whether the output's final "Answer: ..." matches the reference answer."""
  text = tokenizer.decode(output_ids, skip_special_tokens=True)
  got = task_lib.parse_answer(text)
  if got is not None:
    return str(got) == str(answer).strip()
  # Non-numeric references (benchmark files): compare the text after the last prefix.
  _, sep, tail = text.rpartition(task_lib.ANSWER_PREFIX)
  return bool(sep) and tail.strip().splitlines()[0:1] == [str(answer).strip()]


def answer_accuracy(model: Transformer, tokenizer, examples: Sequence[dict[str, Any]], *,
                    batch_size: int, max_new_tokens: int,
                    generations: Optional[Generations] = None) -> dict[str, float]:
  """Fraction of examples whose greedy answer equals the reference answer."""
  gens = generations or greedy_generations(model, tokenizer, examples,
                                           batch_size=batch_size,
                                           max_new_tokens=max_new_tokens)
  correct = [answer_correct(tokenizer, o, e["answer"]) for o, e in zip(gens.outputs, examples)]
  acc = float(np.mean(correct)) if correct else 0.0
  logging.info("greedy answer accuracy %.4f on %d examples (%.0f generated tokens/s)", acc,
               len(correct), gens.tokens_per_second)
  return {"accuracy": acc, "num_examples": float(len(correct)),
          "eos_rate": float(np.mean(gens.hit_eos)) if len(gens.hit_eos) else 0.0,
          "generate_tokens_per_second": gens.tokens_per_second}
