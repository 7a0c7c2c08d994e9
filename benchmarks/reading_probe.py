r"""Where does the bundled target fail? Teacher-forced accuracy by kind of token.

    .venv/bin/python benchmarks/reading_probe.py --steps=750
    .venv/bin/python benchmarks/reading_probe.py --steps=750 --two_hop_names

Trains the quickstart target preset (`tiny_vl_target`) from scratch on the default task for
`--steps` steps (batch 64, 10% verdict rows, as the quickstart) and, every `--eval_every`
steps, prints teacher-forced accuracy on 256 test examples, split into the digits of the read
step (the tile values: reading the image), the other read-step tokens (tile names, copied
from the question) and the remaining steps (arithmetic and answer), plus whole rows.

`--two_hop_names` rebuilds the tokenizer without its `c =` piece ("c" and " =" become two
tokens, as before dataset v1.2.0), so that a tile's value is predicted one token after its
name. `--same_values` gives every tile of an image the same value, which takes finding the
named tile out of reading. Prints figures; asserts nothing.
"""
import dataclasses
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dream_r_jax.data import pipeline
from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.models import Transformer
from dream_r_jax.sharding import mesh as mesh_lib
from dream_r_jax.train import batches as batches_lib
from dream_r_jax.train import presets
from dream_r_jax.train import step as step_lib
from dream_r_jax.train.config import OptimConfig

STEPS = flags.DEFINE_integer("steps", 750, "Training steps.")
EVAL_EVERY = flags.DEFINE_integer("eval_every", 250, "Evaluation interval (steps).")
BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
LR = flags.DEFINE_float("lr", 4e-3, "Peak learning rate.")
MAX_LEN = flags.DEFINE_integer("max_len", 64, "Tokens per training row.")
TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", 40000, "Training examples.")
VERDICT_RATIO = flags.DEFINE_float("verdict_ratio", 0.1, "Share of verdict rows.")
TWO_HOP = flags.DEFINE_bool("two_hop_names", False, "Tokenize 'c =' as two tokens.")
SAME = flags.DEFINE_bool("same_values", False, "Every tile of an image has one value.")
_OLD_REGEX = r" ?[A-Za-z]+| ?[0-9]|\n| ?[^\sA-Za-z0-9]| +|\s"


def _example(cfg, seed, index):
  ex = task_lib.example_at(cfg, seed, index)
  if not SAME.value:
    return ex
  # Redraw with all tiles equal to the first tile's value (same expression shape).
  rng = np.random.default_rng([seed, index, 1])
  value = int(rng.integers(0, cfg.max_value + 1))
  values = [value] * cfg.num_tiles
  while True:
    n = int(rng.integers(cfg.num_operands[0], cfg.num_operands[1] + 1))
    operands = [int(i) for i in rng.choice(cfg.num_tiles, size=n, replace=False)]
    tree = task_lib._random_tree(operands, cfg.ops, rng)  # pylint: disable=protected-access
    answer, operations = task_lib.tree_operations(tree, values)
    if all(abs(z) <= cfg.max_abs_result for *_, z in operations):
      break
  expression = task_lib.format_expression(tree)
  used = sorted(operands, key=lambda i: expression.index(task_lib.letter(i)))
  steps = [task_lib.format_read_step([(task_lib.letter(i), value) for i in used])]
  steps += [task_lib.format_op_step(*op) for op in operations]
  steps.append(task_lib.format_answer_step(answer))
  return dict(ex, image=task_lib.render_image(cfg, values, rng), steps=steps,
              answer=str(answer), values=values, expression=expression,
              question=f"Compute {expression}.")


def main(_):
  if TWO_HOP.value:
    tok_lib._PIECE_REGEX = _OLD_REGEX  # pylint: disable=protected-access
  tok = tok_lib.bundled_tokenizer()
  cfg = task_lib.get_config("default")
  train = [_example(cfg, 1, i) for i in range(TRAIN_EXAMPLES.value)]
  test = [_example(cfg, 2, i) for i in range(256)]
  model_cfg = presets.model_config("tiny_vl_target", tok)
  ds = pipeline.make_dataset(train, tok, batch_size=BATCH.value, max_len=MAX_LEN.value,
                             seed=0, verdict_ratio=VERDICT_RATIO.value)
  optim = OptimConfig(steps=STEPS.value, learning_rate=LR.value,
                      warmup_steps=min(100, STEPS.value // 10))
  tx = step_lib.optimizer(optim)
  mesh = mesh_lib.make_mesh((1, 1), ("data", "model"), jax.devices()[:1])
  model = Transformer(model_cfg, rngs=nnx.Rngs(0))
  graphdef = nnx.split(model)[0]
  state = step_lib.init_state(model, tx)
  rep = NamedSharding(mesh, P())
  featurize = batches_lib.Featurizer(model_cfg)
  first = ds[0]
  grid = batches_lib.image_grid(first["images"][0], BATCH.value)
  train_step = step_lib.make_train_step(
      graphdef, tx, optim, mesh=mesh, state_sharding=jax.tree.map(lambda _: rep, state),
      batch_sharding={k: rep for k in featurize(first)}, image_grid_thw=grid)

  # Teacher-forced test rows; token kinds: 1 read-step digit, 2 other read-step token,
  # 3 the rest of the solution.
  rows = [tok_lib.encode_sft(tok, ex) for ex in test]
  ids = np.zeros((len(rows), MAX_LEN.value), np.int32)
  kind = np.zeros_like(ids)
  newline = tok.convert_tokens_to_ids("\n")
  digits = {tok.convert_tokens_to_ids(d) for i in range(10) for d in (str(i), f" {i}")}
  for r, (row, mask) in enumerate(rows):
    ids[r, :len(row)] = row
    in_read = True
    for t in range(int(np.argmax(mask)), len(row)):
      kind[r, t] = (1 if row[t] in digits else 2) if in_read else 3
      in_read = in_read and row[t] != newline
  test_batch = featurize({"input_ids": ids, "loss_mask": (kind > 0).astype(np.float32),
                          "lengths": np.asarray([len(r) for r, _ in rows]),
                          "images": np.stack([ex["image"] for ex in test])})
  test_grid = batches_lib.image_grid(test[0]["image"], len(test))

  @jax.jit
  def predict(params, batch):
    return jnp.argmax(step_lib.forward(graphdef, params, batch, test_grid), -1)

  def evaluate(params):
    right = np.asarray(predict(params, test_batch))[:, :-1] == ids[:, 1:]
    k = kind[:, 1:]
    out = {name: float(right[k == c].mean())
           for c, name in ((1, "read_digits"), (2, "read_names"), (3, "rest"))}
    out["rows"] = float(np.all(right | (k == 0), axis=1).mean())
    return out

  t0 = time.time()
  for s in range(STEPS.value):
    state, m = train_step(state, {k: jnp.asarray(v) for k, v in featurize(ds[s]).items()})
    if (s + 1) % EVAL_EVERY.value == 0 or s + 1 == STEPS.value:
      acc = evaluate(state["params"])
      print(f"step {s + 1} ({time.time() - t0:.0f} s) loss {float(m['loss']):.3f} "
            + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)


if __name__ == "__main__":
  app.run(main)
