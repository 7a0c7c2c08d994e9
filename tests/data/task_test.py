"""Tests of the bundled task: determinism, correctness of every reference step, images."""
import ast
import operator
import re

import numpy as np
import pytest

from dream_r_jax.data import task

_PY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _python_value(expression, values):
  """Independent evaluation: Python's own parser over the expression text."""
  def walk(node):
    if isinstance(node, ast.BinOp):
      return _PY_OPS[type(node.op)](walk(node.left), walk(node.right))
    if isinstance(node, ast.Name):
      return values[ord(node.id) - ord("a")]
    raise AssertionError(f"unexpected node {ast.dump(node)}")
  return walk(ast.parse(expression, mode="eval").body)


def _same(a, b):
  return a.keys() == b.keys() and all(
      np.array_equal(a[k], b[k]) if k == "image" and a[k] is not None else a[k] == b[k]
      for k in a)


@pytest.mark.parametrize("preset", task.PRESETS)
def test_every_step_is_right_and_answer_is_the_expression(preset):
  cfg = task.get_config(preset)
  for i in range(500):
    ex = task.example_at(cfg, 0, i)
    values, steps = ex["values"], ex["steps"]
    expected = _python_value(ex["expression"], values)
    assert ex["answer"] == str(expected)
    assert steps[-1] == f"Answer: {expected}"
    assert task.parse_answer("\n".join(steps)) == expected
    assert all(task.STEP_DELIMITER not in s for s in steps)
    # Read step: exactly the tiles of the expression, each with its value.
    names = sorted(set(re.findall(r"[a-z]", ex["expression"])))
    reads = dict(re.fullmatch(r"([a-z]) = (\d+)", item).groups()
                 for item in steps[0].split(", "))
    assert sorted(reads) == names
    assert all(int(v) == values[ord(n) - 97] for n, v in reads.items())
    # One operation a step, each arithmetically right; the last one gives the answer.
    ops = steps[1:-1]
    assert len(ops) == len(re.findall(r"[-+*]", ex["expression"]))
    lo, hi = cfg.num_operands
    assert lo - 1 <= len(ops) <= hi - 1
    for step in ops:
      x, op, y, z = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)", step).groups()
      assert _PY_OPS[{"+": ast.Add, "-": ast.Sub, "*": ast.Mult}[op]](int(x), int(y)) == int(z)
      assert abs(int(z)) <= cfg.max_abs_result
    assert int(ops[-1].split(" = ")[1]) == expected
    assert all(task.check_step(s, values) for s in steps)


def test_op_steps_only_use_tiles_and_earlier_results():
  # Replaying the op steps in order must take each operand from a tile read or an
  # earlier result, each used once: no number comes from nowhere.
  cfg = task.TaskConfig.default()
  for i in range(200):
    ex = task.example_at(cfg, 5, i)
    available = [v for _, v in task.parse_step(ex["steps"][0])[1]]
    for step in ex["steps"][1:-1]:
      x, _, y, z = task.parse_step(step)[1]
      for operand in (x, y):
        assert operand in available, (ex["expression"], ex["steps"])
        available.remove(operand)
      available.append(z)
    assert available == [int(ex["answer"])]


@pytest.mark.parametrize("preset", task.PRESETS)
def test_deterministic_by_seed(preset):
  cfg = task.get_config(preset)
  first = [task.example_at(cfg, 3, i) for i in range(20)]
  again = [task.example_at(cfg, 3, i) for i in range(20)]
  other = [task.example_at(cfg, 4, i) for i in range(20)]
  assert all(_same(a, b) for a, b in zip(first, again))
  differing = sum(a["question"] != b["question"] or a["values"] != b["values"]
                  for a, b in zip(first, other))
  assert differing >= 18
  assert len({e["expression"] + str(e["values"]) for e in first}) == 20
  rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
  assert _same(task.make_example(cfg, rng_a), task.make_example(cfg, rng_b))


def test_image_encodes_the_values():
  cfg = task.TaskConfig.hard()  # Most noise.
  for i in range(50):
    ex = task.example_at(cfg, 0, i)
    image = ex["image"]
    assert image.dtype == np.uint8 and image.shape == cfg.image_shape
    assert image.shape[0] % 28 == 0 and image.shape[1] % 28 == 0
    # The colour of a tile: its bottom-right quadrant (the letter sits top-left).
    tiles = image.reshape(cfg.grid_rows, 28, cfg.grid_cols, 28, 3)[:, 14:, :, 14:].mean(
        axis=(1, 3))
    dist = np.linalg.norm(tiles.reshape(-1, 1, 3) - task.PALETTE[None].astype(float), axis=-1)
    assert dist.argmin(axis=1).tolist() == ex["values"]
    # Noise is present: pixels are not all exactly palette colours.
    clean = np.repeat(np.repeat(task.PALETTE[ex["values"]].reshape(
        cfg.grid_rows, cfg.grid_cols, 3), 28, 0), 28, 1)
    assert np.mean(image != clean) > 0.5


def test_tiles_show_their_letters():
  cfg = task.TaskConfig.default()
  ex = task.example_at(cfg, 0, 3)
  clean = task.TaskConfig(**{**cfg.__dict__, "noise": 0})
  image = task.render_image(clean, ex["values"], np.random.default_rng(0))
  labels = []
  for t in range(cfg.num_tiles):
    r, c = divmod(t, cfg.grid_cols)
    tile = image[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28].astype(int)
    label = tile[:task.LABEL_PX, :task.LABEL_PX]
    # The label box has the letter's colour, with the glyph in contrasting ink ...
    box = np.all(label == task.LABEL_PALETTE[t], axis=-1)
    ink = ~box
    assert box.sum() > 100 and ink.sum() > 10
    labels.append(ink)
    # ... and the rest of the tile shows the value's colour.
    rest = np.concatenate([tile[task.LABEL_PX:].reshape(-1, 3),
                           tile[:task.LABEL_PX, task.LABEL_PX:].reshape(-1, 3)])
    assert np.all(rest == task.PALETTE[ex["values"][t]])
  # The six letters' glyphs all differ.
  assert len({g.tobytes() for g in labels}) == cfg.num_tiles


def test_text_variant_states_values_in_the_question():
  for i in range(50):
    ex = task.example_at(task.TaskConfig.text(), 0, i)
    assert ex["image"] is None
    listed = dict(re.findall(r"([a-z])=(\d)", ex["question"]))
    assert [int(listed[task.letter(j)]) for j in range(6)] == ex["values"]
    mm = task.example_at(task.TaskConfig.default(), 0, i)
    assert mm["steps"] == ex["steps"]  # Same draw, different presentation.
    assert "=" not in mm["question"]


def test_verdict_examples():
  rng = np.random.default_rng(0)
  swapped = 0
  for i in range(200):
    ex = task.example_at(task.TaskConfig.default(), 1, i)
    verdicts = task.verdict_examples(ex, rng)
    assert len(verdicts) == 2 * len(ex["steps"])
    for j, (prefix, candidate, label) in enumerate(verdicts):
      step = ex["steps"][j // 2]
      expected_prefix = ex["question"] + "\n" + "".join(s + "\n" for s in ex["steps"][:j // 2])
      assert prefix == expected_prefix
      assert label == (j % 2 == 0)
      assert task.check_step(candidate, ex["values"], reference=step) == label
      swapped += label and candidate != step
    query = task.verdict_query(*verdicts[0][:2])
    assert query.endswith(ex["steps"][0] + "\n" + task.VERIFY_TEMPLATE)
  assert swapped > 20  # Commuted right steps are shown too.


def test_config_validation():
  with pytest.raises(ValueError, match="num_operands"):
    task.TaskConfig(num_operands=(3, 7))
  with pytest.raises(ValueError, match="tile_px"):
    task.TaskConfig(tile_px=30)
  with pytest.raises(ValueError, match="ops"):
    task.TaskConfig(ops=("/",))
  with pytest.raises(ValueError, match="unknown task preset"):
    task.get_config("medium")
