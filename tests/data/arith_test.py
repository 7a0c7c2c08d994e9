"""Tests of the step grammar, expression evaluation, step checking and corruption."""
import itertools

import numpy as np
import pytest

from dream_r_jax.data import arith

VALUES = [3, 7, 2, 5, 0, 9]  # a=3 b=7 c=2 d=5 e=0 f=9


@pytest.mark.parametrize("expression, expected", [
    ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("8 - 3 - 2", 3), ("8 - (3 - 2)", 7),
    ("a * (b - c)", 15), ("f - a * d + e", -6), ("((a))", 3), ("a*b", 21),
])
def test_evaluate_expression(expression, expected):
  assert arith.evaluate_expression(expression, VALUES) == expected
  names = {arith.letter(i): v for i, v in enumerate(VALUES)}
  assert arith.evaluate_expression(expression, names) == expected


@pytest.mark.parametrize("bad", ["a +", "(a + b", "a + b)", "a ? b", "z + a", ""])
def test_evaluate_expression_rejects_malformed(bad):
  with pytest.raises(ValueError):
    arith.evaluate_expression(bad, VALUES)


def test_format_expression_keeps_tree_order():
  # Same-precedence right children need parentheses; left children do not.
  trees = {
      ("-", 0, ("-", 1, 2)): "a - (b - c)",
      ("-", ("-", 0, 1), 2): "a - b - c",
      ("*", ("+", 0, 1), 2): "(a + b) * c",
      ("+", 0, ("*", 1, 2)): "a + b * c",
      ("+", 0, ("+", 1, 2)): "a + (b + c)",
  }
  for tree, text in trees.items():
    assert arith.format_expression(tree) == text
    value, ops = arith.tree_operations(tree, VALUES)
    assert arith.evaluate_expression(text, VALUES) == value
    assert len(ops) == 2 and ops[-1][3] == value


def test_random_trees_round_trip_through_text():
  rng = np.random.default_rng(0)
  for _ in range(300):
    leaves = [int(i) for i in rng.permutation(6)[:rng.integers(2, 6)]]
    tree = leaves[0]
    for leaf in leaves[1:]:
      op = str(rng.choice(arith.OPS))
      tree = (op, tree, leaf) if rng.random() < 0.5 else (op, leaf, tree)
    text = arith.format_expression(tree)
    substituted = " ".join(str(VALUES[ord(c) - 97]) if c.isalpha() else c for c in text)
    python_value = eval(substituted)  # pylint: disable=eval-used
    assert arith.tree_operations(tree, VALUES)[0] == python_value


def test_parse_step_and_answer():
  assert arith.parse_step("a = 3, f = 9") == ("read", [("a", 3), ("f", 9)])
  assert arith.parse_step("-1 * 12 = -12") == ("op", (-1, "*", 12, -12))
  assert arith.parse_step("Answer: -4") == ("answer", -4)
  for bad in ["a = 3,", "3 + = 4", "3 +4 = 7", "Answer:4", "answer: 4", "", "3 / 1 = 3"]:
    assert arith.parse_step(bad) is None, bad
  assert arith.parse_answer("x\nAnswer: 5\nAnswer: -12\n") == -12
  assert arith.parse_answer("Answer:7") == 7
  assert arith.parse_answer("no answer here: 5") is None


def test_check_step():
  assert arith.check_step("a = 3, b = 7", VALUES)
  assert not arith.check_step("a = 3, b = 8", VALUES)
  assert not arith.check_step("a = 3, a = 3", VALUES)  # A tile read twice.
  assert not arith.check_step("z = 3", VALUES)
  assert arith.check_step("3 * 7 = 21", VALUES)
  assert not arith.check_step("3 * 7 = 20", VALUES)
  assert arith.check_step("-3 - -4 = 1", VALUES)
  assert not arith.check_step("3 * 7 = 21 ", VALUES)
  # With a reference, the step must do the reference's operation.
  assert arith.check_step("7 + 3 = 10", VALUES, reference="3 + 7 = 10")
  assert not arith.check_step("7 - 3 = 4", VALUES, reference="3 - 7 = -4")
  assert not arith.check_step("2 + 8 = 10", VALUES, reference="3 + 7 = 10")
  assert arith.check_step("b = 7, a = 3", VALUES, reference="a = 3, b = 7")
  assert not arith.check_step("a = 3, c = 2", VALUES, reference="a = 3, b = 7")
  assert arith.check_step("Answer: 10", VALUES, reference="Answer: 10")
  assert not arith.check_step("Answer: 11", VALUES, reference="Answer: 10")
  assert not arith.check_step("3 + 7 = 10", VALUES, reference="Answer: 10")


def test_corruptions_are_wrong():
  rng = np.random.default_rng(1)
  steps = ["a = 3, b = 7, c = 2", "3 + 7 = 10", "10 * 2 = 20", "20 - 0 = 20",
           "-4 * -4 = 16", "5 - 5 = 0", "Answer: 20", "Answer: 0"]
  for step, _ in itertools.product(steps, range(50)):
    kind_of_step = arith.parse_step(step)[0]
    for kind in arith.CORRUPTIONS[kind_of_step]:
      bad = arith.corrupt_step(step, VALUES, rng, kind=kind)
      assert arith.parse_step(bad) is not None, bad  # Still looks like a step.
      assert not arith.check_step(bad, VALUES, reference=step), (step, kind, bad)
      if kind in ("value", "result"):
        assert not arith.check_step(bad, VALUES), (step, kind, bad)
      if kind in ("operand", "operator"):  # Right arithmetic, wrong step.
        assert arith.check_step(bad, VALUES), (step, kind, bad)


def test_corrupt_step_rejects_bad_input():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="malformed"):
    arith.corrupt_step("hello", VALUES, rng)
  with pytest.raises(ValueError, match="does not apply"):
    arith.corrupt_step("3 + 7 = 10", VALUES, rng, kind="value")
