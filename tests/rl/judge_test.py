"""The judge check asks the target exactly what target_sft taught it to answer."""
import numpy as np

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.evaluation.runner import verify_template_ids
from dream_r_jax.rl import judge


def test_verdict_states_are_target_sft_verdict_rows():
  tok = tok_lib.bundled_tokenizer()
  examples = [task_lib.example_at(task_lib.get_config("default"), 5, i) for i in range(3)]
  states, steps, labels = judge.verdict_states(tok, examples, seed=1)
  template, pos, neg = verify_template_ids(tok)
  rng = np.random.default_rng(1)
  want = [(ex, *v) for ex in examples for v in task_lib.verdict_examples(ex, rng)]
  assert len(states) == len(want) and labels.any() and not labels.all()
  for i, (ex, prefix_text, step, label) in enumerate(want):
    ids, _ = tok_lib.encode_verdict(tok, ex, prefix_text, step, label)
    query = np.concatenate([states.prefix[i], steps[i], template])
    np.testing.assert_array_equal(query, ids[:-1])  # the query, then the verdict token
    assert ids[-1] == (pos if labels[i] else neg) and labels[i] == label
