"""The bundled multimodal arithmetic reasoning task (DESIGN.md section 8).

An image shows a grid of coloured tiles; each colour stands for a digit (a fixed
10-colour palette) and tiles are named a, b, c, ... in reading order. The question asks
for an arithmetic expression over the tiles; the reference solution reads the needed
values, does one operation a step and ends with "Answer: N". Each tile is exactly one
28x28 merged patch of Qwen2.5-VL, so one image token carries one digit.

Everything is pure Python/NumPy and deterministic given the `np.random.Generator`;
`example_at(cfg, seed, index)` derives the generator from (seed, index), so any example
can be regenerated on its own.

Example schema (shared with `benchmarks.py`): `id` (str), `question` (str), `image`
(uint8 [H, W, 3] or None), `steps` (list[str], no delimiters), `answer` (str), and for
this task `values` (int list, tile values in reading order) and `expression` (str).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from dream_r_jax.data.arith import (  # pylint: disable=unused-import
    ANSWER_PREFIX, CORRUPTIONS, NEGATIVE_VERDICT, OPS, POSITIVE_VERDICT, STEP_DELIMITER,
    VERIFY_TEMPLATE, apply_op, check_step, corrupt_step, evaluate_expression,
    format_answer_step, format_expression, format_op_step, format_read_step, letter,
    parse_answer, parse_step, tree_operations)

# Digit -> RGB. Chosen far apart in RGB so that mild noise never makes two digits alike.
PALETTE = np.array([
    (0, 0, 0), (255, 255, 255), (230, 25, 75), (60, 180, 75), (0, 130, 200),
    (255, 225, 25), (145, 30, 180), (245, 130, 48), (70, 240, 240), (128, 128, 128),
], dtype=np.uint8)
PATCH_PX = 28  # Qwen2.5-VL: patch 14, 2x2 merge.
LABEL_PX = 14  # The tile label fills one 14x14 patch.
# Label box colour of tiles a..i: each letter's label has its own colour as well as its
# glyph, so that a tile's name is as easy to see as its value.
LABEL_PALETTE = np.array([
    (128, 0, 0), (170, 110, 40), (128, 128, 0), (0, 128, 128), (0, 0, 128),
    (250, 190, 212), (255, 215, 180), (170, 255, 195), (220, 190, 255),
], dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Difficulty knobs of the task.

  The default is sized so that the quickstart target (4 layers, width 128) learns it to
  ~98% in about 1000 steps on 2 CPU cores while the 14x cheaper draft does not: six tiles,
  three operands, + and -, so four steps (read, two operations, answer). `hard` adds *,
  a 3x3 grid and longer expressions.

  Attributes:
    name: preset name; also the TFDS builder config name.
    grid_rows: tile rows in the image.
    grid_cols: tile columns.
    num_operands: inclusive (min, max) number of distinct tiles in the expression; the
      expression has one operation fewer.
    max_value: tile values are digits in [0, max_value] (at most 9: one colour each).
    ops: operators the expression may use.
    max_abs_result: bound on |value| of every intermediate result (keeps numbers, and
      so sequences, short); expressions beyond it are redrawn.
    noise: standard deviation of the Gaussian pixel noise, in 0..255 units.
    multimodal: True: values only in the image; False: no image, values in the text.
    tile_px: tile side in pixels, a multiple of 28 so that tiles align with patches.
  """
  name: str = "default"
  grid_rows: int = 2
  grid_cols: int = 3
  num_operands: tuple[int, int] = (3, 3)
  max_value: int = 9
  ops: tuple[str, ...] = ("+", "-")
  max_abs_result: int = 99
  noise: float = 8.0
  multimodal: bool = True
  tile_px: int = PATCH_PX

  def __post_init__(self):
    lo, hi = self.num_operands
    if not 2 <= lo <= hi <= self.num_tiles:
      raise ValueError(f"num_operands {self.num_operands} must satisfy "
                       f"2 <= min <= max <= tiles ({self.num_tiles})")
    if self.num_tiles > 26:
      raise ValueError("at most 26 tiles (one letter each)")
    if not 1 <= self.max_value <= 9:
      raise ValueError(f"max_value must be in [1, 9], got {self.max_value}")
    if not self.ops or any(op not in OPS for op in self.ops):
      raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")
    if self.tile_px <= 0 or self.tile_px % PATCH_PX:
      raise ValueError(f"tile_px must be a positive multiple of {PATCH_PX}")
    if self.max_abs_result < self.max_value:
      raise ValueError("max_abs_result must be at least max_value")

  @property
  def num_tiles(self) -> int:
    return self.grid_rows * self.grid_cols

  @property
  def image_shape(self) -> Optional[tuple[int, int, int]]:
    if not self.multimodal:
      return None
    return (self.grid_rows * self.tile_px, self.grid_cols * self.tile_px, 3)

  @classmethod
  def default(cls) -> "TaskConfig":
    return cls()

  @classmethod
  def text(cls) -> "TaskConfig":
    return cls(name="text", multimodal=False)

  @classmethod
  def easy(cls) -> "TaskConfig":
    return cls(name="easy", grid_rows=2, grid_cols=2, num_operands=(2, 3),
               ops=("+", "-"), noise=4.0)

  @classmethod
  def hard(cls) -> "TaskConfig":
    return cls(name="hard", grid_rows=3, grid_cols=3, num_operands=(4, 5), ops=OPS,
               max_abs_result=999, noise=16.0)


PRESETS = ("default", "text", "easy", "hard")


def get_config(name: str) -> TaskConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown task preset {name!r}; choose from {PRESETS}")
  return getattr(TaskConfig, name)()


# 5x7 bitmaps of the tile letters (up to 9 tiles: a..i), one string per row.
_GLYPHS = {
    "a": ("     ", "     ", " ### ", "    #", " ####", "#   #", " ####"),
    "b": ("#    ", "#    ", "#### ", "#   #", "#   #", "#   #", "#### "),
    "c": ("     ", "     ", " ### ", "#    ", "#    ", "#    ", " ### "),
    "d": ("    #", "    #", " ####", "#   #", "#   #", "#   #", " ####"),
    "e": ("     ", "     ", " ### ", "#   #", "#####", "#    ", " ### "),
    "f": ("  ## ", " #   ", "#### ", " #   ", " #   ", " #   ", " #   "),
    "g": ("     ", " ####", "#   #", "#   #", " ####", "    #", " ### "),
    "h": ("#    ", "#    ", "#### ", "#   #", "#   #", "#   #", "#   #"),
    "i": ("  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### "),
}


def _glyph_mask(ch: str, scale: int = 2) -> np.ndarray:
  rows = _GLYPHS[ch]
  mask = np.array([[c == "#" for c in row] for row in rows], bool)
  return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)  # [14, 10]


def render_image(cfg: TaskConfig, values, rng: np.random.Generator) -> np.ndarray:
  """The tile grid as uint8 [rows * tile_px, cols * tile_px, 3], with pixel noise.

  Each tile carries a label in its top-left 14x14 corner (exactly one Qwen2.5-VL patch):
  its letter on a box of the letter's own colour (`LABEL_PALETTE`). The question names
  tiles by letter, and the language model cannot find a tile by position (M-RoPE gives
  it relative positions only), so the label, always drawn the same way whatever the
  tile's value, is what lets it find a tile's image token by content.
  """
  colours = PALETTE[np.asarray(values, np.int64)].reshape(cfg.grid_rows, cfg.grid_cols, 3)
  image = np.repeat(np.repeat(colours, cfg.tile_px, axis=0), cfg.tile_px, axis=1)
  image = image.astype(np.float32)
  box = LABEL_PX
  for t in range(cfg.grid_rows * cfg.grid_cols):
    r, c = divmod(t, cfg.grid_cols)
    if letter(t) not in _GLYPHS:
      continue  # Grids beyond 9 tiles stay unlabelled.
    y, x = r * cfg.tile_px, c * cfg.tile_px
    label = np.broadcast_to(LABEL_PALETTE[t].astype(np.float32), (box, box, 3)).copy()
    ink = 0.0 if LABEL_PALETTE[t].astype(float) @ (0.299, 0.587, 0.114) > 128 else 255.0
    mask = _glyph_mask(letter(t))
    label[:mask.shape[0], 2:2 + mask.shape[1]][mask] = ink
    image[y:y + box, x:x + box] = label
  if cfg.noise > 0:
    image += rng.normal(0.0, cfg.noise, size=image.shape).astype(np.float32)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _random_tree(operands: list[int], ops: tuple[str, ...], rng: np.random.Generator):
  if len(operands) == 1:
    return operands[0]
  split = int(rng.integers(1, len(operands)))
  op = str(rng.choice(ops))
  return (op, _random_tree(operands[:split], ops, rng),
          _random_tree(operands[split:], ops, rng))


def make_example(cfg: TaskConfig, rng: np.random.Generator,
                 example_id: str = "") -> dict[str, Any]:
  """Draws one example (see the module docstring for the schema)."""
  values = [int(v) for v in rng.integers(0, cfg.max_value + 1, size=cfg.num_tiles)]
  lo, hi = cfg.num_operands
  while True:  # Rejection keeps every intermediate result within max_abs_result.
    n = int(rng.integers(lo, hi + 1))
    operands = [int(i) for i in rng.choice(cfg.num_tiles, size=n, replace=False)]
    tree = _random_tree(operands, cfg.ops, rng)
    answer, operations = tree_operations(tree, values)
    if all(abs(z) <= cfg.max_abs_result for *_, z in operations):
      break
  expression = format_expression(tree)
  used = sorted(operands, key=lambda i: expression.index(letter(i)))  # Text order.
  steps = [format_read_step([(letter(i), values[i]) for i in used])]
  steps += [format_op_step(*op) for op in operations]
  steps.append(format_answer_step(answer))
  if cfg.multimodal:
    image = render_image(cfg, values, rng)
    question = f"Compute {expression}."
  else:
    image = None
    listing = " ".join(f"{letter(i)}={v}" for i, v in enumerate(values))
    question = f"{listing}. Compute {expression}."
  return {"id": example_id, "question": question, "image": image, "steps": steps,
          "answer": str(answer), "values": values, "expression": expression}


def example_at(cfg: TaskConfig, seed: int, index: int) -> dict[str, Any]:
  """Example `index` of the stream `seed`: independent of every other index."""
  rng = np.random.default_rng([seed, index])
  return make_example(cfg, rng, example_id=f"{cfg.name}-{seed}-{index}")


def prompt_text(example: dict[str, Any]) -> str:
  """The text part of the prompt: the question and the delimiter."""
  return example["question"] + STEP_DELIMITER


def verdict_query(prefix_text: str, candidate_step: str) -> str:
  """The text after which the target emits its verdict token.

  In token space this is P + d_j + delimiter + VERIFY_TEMPLATE: a drafted step keeps
  its delimiter token and the template's tokens follow it.
  """
  return prefix_text + candidate_step + STEP_DELIMITER + VERIFY_TEMPLATE


def verdict_examples(example: dict[str, Any], rng: np.random.Generator,
                     swap_prob: float = 0.25, max_value: int = 9
                     ) -> list[tuple[str, str, bool]]:
  """Judge training data: per step position, one right and one corrupted candidate.

  Args:
    example: a task example.
    rng: the random generator.
    swap_prob: chance that a right op step with + or * is shown with its operands
      swapped, so that the judge accepts a correct step that is not verbatim.
    max_value: largest tile value (for corrupted reads).

  Returns:
    [(prefix_text, candidate_step, label)], prefix_text = prompt text + the previous
    reference steps, each followed by the delimiter; label True for a right step.
  """
  out = []
  prefix = prompt_text(example)
  for step in example["steps"]:
    positive = step
    parsed = parse_step(step)
    commutes = parsed and parsed[0] == "op" and parsed[1][1] in ("+", "*")
    if commutes and rng.random() < swap_prob:
      x, op, y, z = parsed[1]
      positive = format_op_step(y, op, x, z)
    out.append((prefix, positive, True))
    out.append((prefix, corrupt_step(step, example["values"], rng, max_value=max_value),
                False))
    prefix += step + STEP_DELIMITER
  return out
