"""A toy SAPO world for tests and notebooks: random smoke-preset models on the text task.

The target's weights are drawn large (std 0.3), so its verdict depends strongly on the
drafted step: it prefers some candidates over others, and a draft can learn, within a few
dozen iterations, to write what it prefers. Every test that builds the world with the same
arguments compiles the rollout programs once per process.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import nnx

from dream_r_jax.data import task as task_lib
from dream_r_jax.data import tokenizer as tok_lib
from dream_r_jax.models import Transformer
from dream_r_jax.rl import states as states_lib
from dream_r_jax.rl.config import SapoConfig
from dream_r_jax.testing.models import random_state


def random_preset_model(preset: str, seed: int, std: float = 0.02) -> Transformer:
  """A bundled preset's model (bundled tokenizer) with seeded random weights."""
  from dream_r_jax.train import presets  # pylint: disable=g-import-not-at-top
  cfg = presets.model_config(preset, tok_lib.bundled_tokenizer())
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, random_state(state, seed, std=std))


@dataclasses.dataclass
class ToyWorld:
  tokenizer: Any
  states: states_lib.StateSet
  draft: Transformer
  target: Transformer
  scfg: SapoConfig

  @property
  def prefix_width(self) -> int:
    return -(-self.states.max_prefix_len // 16) * 16


def toy_world(num_states: int = 8, **sapo_kw) -> ToyWorld:
  """8 states of the text task (reference steps), a random draft and a picky target."""
  tok = tok_lib.bundled_tokenizer()
  examples = [task_lib.example_at(task_lib.get_config("text"), 0, i) for i in range(8)]
  delim = states_lib.delimiter_ids(tok)
  kw = dict(group_size=8, states_per_iteration=8, max_step_tokens=8, learning_rate=3e-2,
            warmup_steps=0, beta=0.0)
  kw.update(sapo_kw)
  scfg = SapoConfig(**kw)
  states = states_lib.cut_states(*states_lib.reference_trajectories(tok, examples),
                                 delimiter_ids=delim, eos_ids=(tok.eos_token_id,),
                                 max_step_tokens=scfg.max_step_tokens)
  return ToyWorld(tokenizer=tok, states=states.take(np.arange(num_states)),
                  draft=random_preset_model("smoke_draft", 1),
                  target=random_preset_model("smoke_target", 2, std=0.3), scfg=scfg)
