"""Arithmetic of the bundled task: expressions, step grammar, checking and corruption.

A reasoning trace is a list of one-line steps of three kinds:

  read step:    "a = 3, b = 7, c = 2"   (tile values, in order of first use)
  op step:      "3 + 7 = 10"            (one binary operation on numbers)
  answer step:  "Answer: 20"

This module knows nothing about images or tokenizers, so that rewards, tests and the
dataset can all judge steps the same way. `task.py` re-exports the public names.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Union

import numpy as np

STEP_DELIMITER = "\n"
# Appended after a step and its delimiter to ask the target for a verdict. Two tokens
# ("Correct", "?") in the bundled tokenizer; it never starts a reasoning step, so the
# judge mode and the reasoning mode of the target cannot be confused.
VERIFY_TEMPLATE = "Correct?"
POSITIVE_VERDICT = " yes"
NEGATIVE_VERDICT = " no"
ANSWER_PREFIX = "Answer:"
OPS = ("+", "-", "*")

Values = Union[Sequence[int], Mapping[str, int]]

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_READ_ITEM = re.compile(r"([a-z]) = (-?\d+)")
_READ_STEP = re.compile(r"[a-z] = -?\d+(?:, [a-z] = -?\d+)*")
_OP_STEP = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)")
_ANSWER_STEP = re.compile(re.escape(ANSWER_PREFIX) + r" (-?\d+)")
_ANSWER_ANYWHERE = re.compile(re.escape(ANSWER_PREFIX) + r"\s*(-?\d+)")


def letter(index: int) -> str:
  """The name of tile `index` in reading order: 0 -> 'a'."""
  if not 0 <= index < 26:
    raise ValueError(f"tile index {index} has no letter (at most 26 tiles)")
  return chr(ord("a") + index)


def apply_op(op: str, x: int, y: int) -> int:
  if op == "+":
    return x + y
  if op == "-":
    return x - y
  if op == "*":
    return x * y
  raise ValueError(f"unknown operator {op!r}")


def _as_mapping(values: Values) -> Mapping[str, int]:
  if isinstance(values, Mapping):
    return values
  return {letter(i): int(v) for i, v in enumerate(values)}


# Expression trees: a leaf is a tile index (int); a node is a tuple (op, left, right).


def format_expression(tree) -> str:
  """Infix with the fewest parentheses that keep left-to-right evaluation order.

  A right child of equal precedence is parenthesised too ("a - (b - c)", and also
  "a + (b + c)"), so the text determines the tree and hence the reference steps.
  """
  if isinstance(tree, int):
    return letter(tree)
  op, left, right = tree
  left_text, right_text = format_expression(left), format_expression(right)
  if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
    left_text = f"({left_text})"
  if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
    right_text = f"({right_text})"
  return f"{left_text} {op} {right_text}"


def tree_operations(tree, values: Sequence[int]
                    ) -> tuple[int, list[tuple[int, str, int, int]]]:
  """Post-order evaluation: (value, [(x, op, y, result) per operation in step order])."""
  if isinstance(tree, int):
    return int(values[tree]), []
  op, left, right = tree
  x, left_ops = tree_operations(left, values)
  y, right_ops = tree_operations(right, values)
  z = apply_op(op, x, y)
  return z, left_ops + right_ops + [(x, op, y, z)]


def evaluate_expression(expression: str, values: Values) -> int:
  """Evaluates an infix expression over tile letters and integers (+, -, *, parens)."""
  names = _as_mapping(values)
  tokens = re.findall(r"\d+|[a-z]|[-+*()]|\S", expression)
  pos = 0

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def take():
    nonlocal pos
    tok = peek()
    pos += 1
    return tok

  def atom() -> int:
    tok = take()
    if tok == "(":
      value = sum_expr()
      if take() != ")":
        raise ValueError(f"unbalanced parentheses in {expression!r}")
      return value
    if tok is not None and tok.isdigit():
      return int(tok)
    if tok is not None and tok in names:
      return int(names[tok])
    raise ValueError(f"unexpected token {tok!r} in {expression!r}")

  def product() -> int:
    value = atom()
    while peek() == "*":
      take()
      value *= atom()
    return value

  def sum_expr() -> int:
    value = product()
    while peek() in ("+", "-"):
      value = apply_op(take(), value, product())
    return value

  result = sum_expr()
  if pos != len(tokens):
    raise ValueError(f"trailing tokens in {expression!r}")
  return result


# Steps.


def format_read_step(items: Sequence[tuple[str, int]]) -> str:
  return ", ".join(f"{name} = {value}" for name, value in items)


def format_op_step(x: int, op: str, y: int, z: int) -> str:
  return f"{x} {op} {y} = {z}"


def format_answer_step(answer: int) -> str:
  return f"{ANSWER_PREFIX} {answer}"


def parse_step(step_text: str):
  """Returns ('read', [(name, v)...]) | ('op', (x, op, y, z)) | ('answer', n) | None."""
  if _READ_STEP.fullmatch(step_text):
    return "read", [(n, int(v)) for n, v in _READ_ITEM.findall(step_text)]
  match = _OP_STEP.fullmatch(step_text)
  if match:
    x, op, y, z = match.groups()
    return "op", (int(x), op, int(y), int(z))
  match = _ANSWER_STEP.fullmatch(step_text)
  if match:
    return "answer", int(match.group(1))
  return None


def parse_answer(text: str) -> Optional[int]:
  """The integer after the last "Answer:" in `text`, or None when there is none."""
  matches = _ANSWER_ANYWHERE.findall(text)
  return int(matches[-1]) if matches else None


def check_step(step_text: str, values: Values, reference: Optional[str] = None) -> bool:
  """Whether a step is right.

  Without `reference`, "right" is local: a read step reads every named tile correctly
  (each tile once), an op step's arithmetic is right, an answer step is well formed.
  With `reference` (the reference step at the same position) the step must also do
  the same thing: read the same tiles, apply the same operation to the same operands
  (either order for + and *), or state the same answer.

  Args:
    step_text: one step, without the delimiter.
    values: tile values, in reading order or as {letter: value}.
    reference: the reference step at this position, if known.

  Returns:
    True iff the step is right.
  """
  names = _as_mapping(values)
  parsed = parse_step(step_text)
  if parsed is None:
    return False
  kind, body = parsed
  if kind == "read":
    letters = [n for n, _ in body]
    if len(set(letters)) != len(letters):
      return False
    if any(n not in names or int(names[n]) != v for n, v in body):
      return False
  elif kind == "op":
    x, op, y, z = body
    if apply_op(op, x, y) != z:
      return False
  if reference is None:
    return True
  ref = parse_step(reference)
  if ref is None or ref[0] != kind:
    return False
  if kind == "read":
    return sorted(body) == sorted(ref[1])
  if kind == "op":
    x, op, y, _ = body
    rx, rop, ry, _ = ref[1]
    same = (x, y) == (rx, ry) or (op in ("+", "*") and (y, x) == (rx, ry))
    return op == rop and same
  return body == ref[1]


def _other_int(rng: np.random.Generator, value: int, low: int, high: int) -> int:
  """A uniformly drawn integer in [low, high] that differs from `value`."""
  while True:
    candidate = int(rng.integers(low, high + 1))
    if candidate != value:
      return candidate


def _near_miss(rng: np.random.Generator, value: int) -> int:
  """A plausible slip: off by a small amount or by ten."""
  return value + int(rng.choice([-10, -2, -1, 1, 2, 10]))


CORRUPTIONS = {
    "read": ("value", "tile"),
    "op": ("result", "operand", "operator"),
    "answer": ("answer",),
}


def corrupt_step(step_text: str, values: Values, rng: np.random.Generator,
                 kind: Optional[str] = None, max_value: int = 9) -> str:
  """A wrong version of a correct step, as a weak draft would write it.

  Kinds: read steps 'value' (a tile read as another digit) and 'tile' (another tile
  read); op steps 'result' (wrong arithmetic), 'operand' (a wrong operand, result
  recomputed so the arithmetic itself is right) and 'operator' (another operator,
  recomputed); answer steps 'answer'. The result never passes
  `check_step(result, values, reference=step_text)`; 'value' and 'result' also fail the
  reference-free check.

  Args:
    step_text: a correct step.
    values: the example's tile values.
    rng: the random generator (determinism).
    kind: one of `CORRUPTIONS[step kind]`; random when None.
    max_value: the largest tile value, for replacement digits.

  Returns:
    The corrupted step text.
  """
  names = _as_mapping(values)
  parsed = parse_step(step_text)
  if parsed is None:
    raise ValueError(f"cannot corrupt a malformed step: {step_text!r}")
  step_kind, body = parsed
  if kind is None:
    kind = str(rng.choice(CORRUPTIONS[step_kind]))
  if kind not in CORRUPTIONS[step_kind]:
    raise ValueError(f"corruption {kind!r} does not apply to a {step_kind} step")
  if step_kind == "read":
    items = list(body)
    i = int(rng.integers(len(items)))
    name, value = items[i]
    unused = sorted(set(names) - {n for n, _ in items})
    if kind == "tile" and unused:
      other = str(rng.choice(unused))
      items[i] = (other, int(names[other]))
    else:
      items[i] = (name, _other_int(rng, value, 0, max(max_value, 1)))
    return format_read_step(items)
  if step_kind == "answer":
    return format_answer_step(_near_miss(rng, body))
  x, op, y, z = body
  if kind == "result":
    return format_op_step(x, op, y, _near_miss(rng, z))
  if kind == "operator":
    new_op = str(rng.choice([o for o in OPS if o != op]))
    return format_op_step(x, new_op, y, apply_op(new_op, x, y))
  bound = max(max_value, abs(x), abs(y))
  if rng.integers(2):
    new_x, new_y = _other_int(rng, x, 0, bound), y
  else:
    new_x, new_y = x, _other_int(rng, y, 0, bound)
  return format_op_step(new_x, op, new_y, apply_op(op, new_x, new_y))
