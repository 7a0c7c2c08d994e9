"""Local benchmark files (MathVista / MMMU style JSONL) in the task's example schema.

One JSON object a line. Accepted keys, first match wins:

  id:        "pid" (MathVista), "id" (MMMU); else "<file stem>-<line>"
  question:  "query" (MathVista's prepared prompt, used verbatim), "question"
  choices:   "choices" (MathVista), "options" (MMMU; a list or its Python/JSON repr)
  image:     "image" (MathVista), "image_1" .. "image_7" (MMMU; the first present)
  answer:    "answer"

Image paths are relative to the JSONL file (or absolute). The records are validated and
every image's existence checked when the file is opened, so that a bad file fails before
any model work; images are decoded (PIL -> uint8 RGB) when an example is read. Examples
have `steps == []` and keep `choices` (list[str], possibly empty).
"""
from __future__ import annotations

import ast
import json
import os
from typing import Any, Optional

import numpy as np
import PIL.Image

_IMAGE_KEYS = ("image",) + tuple(f"image_{i}" for i in range(1, 8))


class BenchmarkError(ValueError):
  """A malformed benchmark record, or one whose image is missing."""


def _choices(value, where: str) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    text = value.strip()
    if not text:
      return []
    try:
      value = ast.literal_eval(text)  # MMMU stores options as "['a', 'b']".
    except (ValueError, SyntaxError) as e:
      raise BenchmarkError(f"{where}: options {value!r} is not a list") from e
  if not isinstance(value, (list, tuple)):
    raise BenchmarkError(f"{where}: choices must be a list, got {type(value).__name__}")
  return [str(c) for c in value]


def _question(record: dict[str, Any], choices: list[str], where: str) -> str:
  if isinstance(record.get("query"), str) and record["query"].strip():
    return record["query"]  # MathVista's query already lists hint and choices.
  question = record.get("question")
  if not isinstance(question, str) or not question.strip():
    raise BenchmarkError(f"{where}: no question (expected a non-empty 'query' or "
                         f"'question' string)")
  if choices:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    listed = " ".join(f"({letters[i]}) {c}" for i, c in enumerate(choices))
    question += "\nChoices: " + listed
  return question


def parse_record(record: Any, base_dir: str, where: str) -> dict[str, Any]:
  """One decoded JSON value -> an example whose `image` is still a path (or None)."""
  if not isinstance(record, dict):
    raise BenchmarkError(f"{where}: a record must be a JSON object, got "
                         f"{type(record).__name__}")
  answer = record.get("answer")
  if answer is None or isinstance(answer, (dict, list)) or str(answer).strip() == "":
    raise BenchmarkError(f"{where}: missing or empty 'answer'")
  choices = _choices(record.get("choices", record.get("options")), where)
  image_path = None
  for key in _IMAGE_KEYS:
    value = record.get(key)
    if value:
      if not isinstance(value, str):
        raise BenchmarkError(f"{where}: {key!r} must be a path string")
      image_path = value if os.path.isabs(value) else os.path.join(base_dir, value)
      if not os.path.isfile(image_path):
        raise BenchmarkError(f"{where}: image {value!r} not found at {image_path}")
      break
  example_id = record.get("pid", record.get("id"))
  return {
      "id": None if example_id is None else str(example_id),
      "question": _question(record, choices, where),
      "image": image_path,
      "steps": [],
      "answer": str(answer),
      "choices": choices,
  }


def load_image(path: str) -> np.ndarray:
  """An image file as uint8 [H, W, 3] RGB."""
  with PIL.Image.open(path) as image:
    return np.asarray(image.convert("RGB"), np.uint8)


class BenchmarkSource:
  """Random access to the examples of one JSONL benchmark file."""

  def __init__(self, path: str, max_examples: Optional[int] = None):
    self.path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(self.path))
    stem = os.path.splitext(os.path.basename(self.path))[0]
    self._records = []
    try:
      f = open(self.path, encoding="utf-8")
    except OSError as e:
      raise BenchmarkError(f"cannot open benchmark file {self.path}: {e}") from e
    with f:
      for lineno, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{self.path}:{lineno}"
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise BenchmarkError(f"{where}: invalid JSON ({e.msg})") from e
        example = parse_record(record, base_dir, where)
        if example["id"] is None:
          example["id"] = f"{stem}-{lineno}"
        self._records.append(example)
        if max_examples is not None and len(self._records) >= max_examples:
          break
    if not self._records:
      raise BenchmarkError(f"{self.path}: no records")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = dict(self._records[index])
    if example["image"] is not None:
      example["image"] = load_image(example["image"])
    return example


def load_benchmark(path: str, max_examples: Optional[int] = None) -> BenchmarkSource:
  """Opens a MathVista/MMMU-style JSONL file; raises `BenchmarkError` naming file:line."""
  return BenchmarkSource(path, max_examples)
