"""One SAPO iteration: roll out, score, reward, update (DESIGN.md section 5).

    trainer = SapoTrainer(sft_draft, target, tokenizer, scfg, mesh=mesh, prefix_width=P)
    state, metrics = trainer.iteration(state, states, rng)

The train state is the SFT pipeline's pytree `{"step", "params", "opt_state"}` with the
draft's pure-dict params; the rollout policy is `state["params"]` itself, so it is the
latest policy at every iteration. Rewards are computed on the host side of the loop (they
need decoded text for the format check), advantages are group-relative, and groups whose
rewards are all equal are dropped by masking their tokens out of the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dream_r_jax.data import task as task_lib
from dream_r_jax.rl import rollout as rollout_lib
from dream_r_jax.rl import sapo
from dream_r_jax.rl.config import SapoConfig
from dream_r_jax.rl.rewards import RewardConfig, RewardInputs, compute_rewards
from dream_r_jax.rl.states import StateSet, images_for, pad_rows
from dream_r_jax.train import step as step_lib

REWARD_TERMS = ("acceptance", "faithfulness", "concision", "format")


def task_step_ok(text: str) -> bool:
  """The bundled task's format check: a read, operation or answer step."""
  return task_lib.parse_step(text) is not None


@dataclasses.dataclass
class Rollout:
  """One rollout on the host: N = S * G candidates, state-major."""
  tokens: np.ndarray      # [N, L] int32
  lengths: np.ndarray     # [N] tokens sampled (the delimiter / EOS included)
  logp_old: np.ndarray    # [N, L]
  content: np.ndarray     # [N, L] bool, the step's content (no delimiter, no EOS)
  cpn: np.ndarray         # [N]
  accept: np.ndarray      # [N] bool, the TBVM decision
  rewards: np.ndarray     # [N] weighted total
  parts: dict[str, np.ndarray]  # term -> [N] unweighted
  malformed: np.ndarray   # [N] bool

  def take(self, idx) -> "Rollout":
    """The candidates `idx` (an index array or a slice)."""
    return Rollout(**{f.name: ({k: v[idx] for k, v in self.parts.items()}
                               if f.name == "parts" else getattr(self, f.name)[idx])
                      for f in dataclasses.fields(self)})

  def head(self, n: int) -> "Rollout":
    """The first n candidates."""
    return self.take(slice(None, n))

  @staticmethod
  def concat(rolls: list["Rollout"]) -> "Rollout":
    def cat(name):
      if name == "parts":
        return {k: np.concatenate([r.parts[k] for r in rolls]) for k in rolls[0].parts}
      return np.concatenate([getattr(r, name) for r in rolls])
    return Rollout(**{f.name: cat(f.name) for f in dataclasses.fields(Rollout)})


_combined_rewards = jax.jit(compute_rewards, static_argnums=0)


def candidate_rewards(reward_cfg: RewardConfig, states: StateSet, group: int, *,
                      tokens: np.ndarray, lengths: np.ndarray, ended: np.ndarray,
                      cpn: np.ndarray, accept: np.ndarray, stop_ids, decode: Callable,
                      step_ok: Optional[Callable[[str], bool]] = task_step_ok):
  """Rewards of N = len(states) * group candidates (host arrays in, host arrays out).

  A candidate is malformed when it ran into `max_step_tokens` without ending, or when
  `step_ok` rejects its decoded content; empty and repeated steps are caught by the
  `format` term itself (it compares with the previous step).

  Returns:
    (total [N], parts {term: [N]}, content mask [N, L], malformed [N]).
  """
  n, length = tokens.shape
  stop = np.isin(tokens, np.asarray(stop_ids))
  content = (np.arange(length)[None] < lengths[:, None]) & ~stop
  malformed = ~np.asarray(ended, bool)
  if step_ok is not None:
    for i in np.flatnonzero(content.any(axis=1) & ~malformed):
      malformed[i] = not step_ok(decode(tokens[i][content[i]]))
  # One width per run (so the reward program compiles once): L + 1 tokens of the target's
  # steps. A longer previous step still differs from every candidate after the cut, and
  # `cut_states` keeps next steps shorter than L.
  width = length + 1
  nxt, nxt_len = pad_rows([s[:width] for s in states.next_step], width)
  prev, prev_len = pad_rows([s[:width] for s in states.prev_step], width)
  rep = lambda x: np.repeat(x, group, axis=0)
  mask_of = lambda lens: np.arange(width)[None] < rep(lens)[:, None]
  inputs = RewardInputs(
      cpn=jnp.asarray(cpn, jnp.float32), accepted=jnp.asarray(accept),
      cand_tokens=jnp.asarray(tokens), cand_mask=jnp.asarray(content),
      target_tokens=jnp.asarray(rep(nxt)), target_mask=jnp.asarray(mask_of(nxt_len)),
      malformed=jnp.asarray(malformed), prev_tokens=jnp.asarray(rep(prev)),
      prev_mask=jnp.asarray(mask_of(prev_len)))
  total, parts = jax.device_get(_combined_rewards(reward_cfg, inputs))
  return (np.asarray(total), {k: np.asarray(v) for k, v in parts.items()}, content,
          malformed)


def choose_groups(signal: np.ndarray, count: int) -> np.ndarray:
  """Indices (ascending) of `count` groups: those with signal first, in order, then as many
  without as it takes to fill `count` (they are masked out of the loss); all groups when
  there are no more than `count`."""
  signal = np.asarray(signal, bool)
  if len(signal) <= count:
    return np.arange(len(signal))
  ranked = np.concatenate([np.flatnonzero(signal), np.flatnonzero(~signal)])
  return np.sort(ranked[:count])


def make_update_step(graphdef, tx: optax.GradientTransformation, scfg: SapoConfig, *,
                     rc: rollout_lib.RolloutConfig, grid, state_sharding, mesh: Mesh):
  """The jitted SAPO update `(state, batch) -> (state, metrics)`; `state` is donated.

  `batch` holds the prefix `inputs`, the candidates (`tokens`, `lengths`), `logp_old`,
  `logp_ref`, per-row `advantages` and the token `mask` (zero on dropped groups). A step
  whose loss or gradient is not finite leaves the state as it was.
  """
  loss_impl = sapo.get_loss(scfg.loss)
  lr_fn = step_lib.schedule(scfg.optim)

  def step_fn(state, batch):
    with jax.named_scope("sapo_update"):

      def loss_fn(params):
        logp_new = rollout_lib.candidate_logprobs(
            graphdef, params, batch["inputs"], batch["tokens"], batch["lengths"], rc=rc,
            group=scfg.group_size, grid=grid)
        return loss_impl(logp_new, batch["logp_old"], batch["logp_ref"],
                         batch["advantages"], batch["mask"], eps_low=scfg.eps_low,
                         eps_high=scfg.eps_high, beta=scfg.beta)

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      new_state, grad_norm, finite = step_lib.apply_if_finite(tx, state, grads, loss)
      metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_fn(state["step"]),
                     finite=finite)
      return new_state, metrics

  return jax.jit(step_fn, out_shardings=(state_sharding, NamedSharding(mesh, P())),
                 donate_argnums=(0,))


def place_rows(tree, mesh: Mesh):
  """Host arrays onto `mesh`, rows split over "data" where they divide (else replicated).

  Rows are axis 0, except M-RoPE `positions` [3, S, T] (axis 1).
  """
  data = mesh.shape.get("data", 1)

  def one(path, x):
    if x is None:
      return None
    x = np.asarray(x)
    axis = 1 if any(getattr(k, "key", None) == "positions" for k in path) else 0
    spec = [None] * x.ndim
    if x.ndim > axis and x.shape[axis] % data == 0:
      spec[axis] = "data"
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: x is None)


class SapoTrainer:
  """Rollout, scoring, rewards and the update of one SAPO run (models fixed at init).

  Args:
    reference: the frozen reference, the SFT draft (a `Transformer`); the policy shares its
      graphdef, and its params travel in the train state.
    target: the target (a `Transformer`).
    tokenizer: the shared tokenizer.
    scfg: the run's settings.
    mesh: where the draft (policy and reference) runs; rows split over its "data" axis.
    target_mesh: where the target runs (default `mesh`: colocated).
    image_fn: source record -> image, for image tasks.
    prefix_width: padded prefix length (fixed per run, so every program compiles once).
    step_ok: the format check of a step's decoded text (None: only empty, repeated and
      unfinished steps are malformed).
  """

  def __init__(self, reference, target, tokenizer, scfg: SapoConfig, *, mesh: Mesh,
               target_mesh: Optional[Mesh] = None,
               image_fn: Optional[Callable[[int], Any]] = None, prefix_width: int,
               step_ok: Optional[Callable[[str], bool]] = task_step_ok):
    self.graphdef, ref_state = nnx.split(reference)
    self.ref_params = nnx.to_pure_dict(ref_state)
    self.target_graphdef, self.target_params = nnx.split(target)
    self.draft_cfg, self.target_cfg = reference.cfg, target.cfg
    self.tokenizer, self.scfg = tokenizer, scfg
    self.mesh, self.target_mesh = mesh, target_mesh or mesh
    self.image_fn, self.prefix_width, self.step_ok = image_fn, prefix_width, step_ok
    self.rc = scfg.rollout_config(tokenizer)
    self.reward_cfg = scfg.reward_config
    self._update = None

  def init_state(self, tx: optax.GradientTransformation, state_sharding):
    """A fresh train state starting at the reference, in buffers of its own (the update
    donates the state, and the reference must survive it)."""
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), self.ref_params)
    init = lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)}
    return jax.jit(init, out_shardings=state_sharding)(params)

  # -- inputs -------------------------------------------------------------------------------
  def _inputs(self, cfg, states: StateSet, mesh: Mesh, image_fn=None):
    ids, lens = pad_rows(states.prefix, self.prefix_width, self.rc.pad_id)
    images = images_for(states, image_fn or self.image_fn)
    inputs, grid = rollout_lib.prefix_inputs(cfg, ids, lens, images)
    return place_rows(inputs, mesh), grid

  def _score(self, states: StateSet, tokens, lengths, *, group: int, rc, image_fn=None):
    t_inputs, grid = self._inputs(self.target_cfg, states, self.target_mesh, image_fn)
    if self.target_mesh is not self.mesh:
      tokens, lengths = place_rows((tokens, lengths), self.target_mesh)
    return rollout_lib.score_candidates(self.target_graphdef, self.target_params, t_inputs,
                                        tokens, lengths, rc=rc, group=group, grid=grid)

  def score_steps(self, states: StateSet, steps, *, chunk: int, image_fn=None):
    """The target's verdict on given steps, one per state: host `cpn`, `accept`, `mass`.

    `steps` are token lists (their delimiter included), cut to `max_step_tokens`. Chunked
    like `evaluate`, so it runs the held-out evaluation's compiled scoring program.
    """
    out = []
    for start in range(0, len(states), chunk):
      idx = list(range(start, min(start + chunk, len(states))))
      real = len(idx)
      idx += [idx[-1]] * (chunk - real)
      tokens, lengths = pad_rows([np.asarray(steps[i])[:self.rc.max_step_tokens]
                                  for i in idx], self.rc.max_step_tokens, self.rc.pad_id)
      rc = dataclasses.replace(self.rc, temperature=0.0)
      got = jax.device_get(self._score(states.take(idx), tokens, lengths, group=1, rc=rc,
                                       image_fn=image_fn))
      out.append({k: v[:real] for k, v in got.items()})
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

  # -- rollout ------------------------------------------------------------------------------
  def rollout(self, params, states: StateSet, rng, *, group: Optional[int] = None,
              greedy: bool = False):
    """Samples, scores and rewards `group` candidates per state with the draft `params`.

    Returns:
      (Rollout, device batch for the update: inputs, tokens, lengths, logp_old; the update
      adds the reference's log-probs of the groups it keeps).
    """
    group = group or self.scfg.group_size
    rc = dataclasses.replace(self.rc, temperature=0.0) if greedy else self.rc
    d_inputs, grid = self._inputs(self.draft_cfg, states, self.mesh)
    out = rollout_lib.sample_candidates(self.graphdef, params, d_inputs, rng, rc=rc,
                                        group=group, grid=grid)
    scores = self._score(states, out["tokens"], out["lengths"], group=group, rc=rc)
    host, sc = jax.device_get((out, scores))
    total, parts, content, malformed = candidate_rewards(
        self.reward_cfg, states, group, tokens=host["tokens"], lengths=host["lengths"],
        ended=host["ended"], cpn=sc["cpn"], accept=sc["accept"],
        stop_ids=rc.delimiter_ids + rc.eos_ids, decode=self._decode, step_ok=self.step_ok)
    roll = Rollout(tokens=host["tokens"], lengths=host["lengths"], logp_old=host["logp"],
                   content=content, cpn=sc["cpn"], accept=sc["accept"], rewards=total,
                   parts=parts, malformed=malformed)
    batch = {"inputs": d_inputs, "tokens": out["tokens"], "lengths": out["lengths"],
             "logp_old": out["logp"]}
    return roll, batch, grid

  def _decode(self, ids) -> str:
    return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)

  # -- update -------------------------------------------------------------------------------
  def update_fn(self, tx, grid, state_sharding):
    if self._update is None:
      self._update = make_update_step(self.graphdef, tx, self.scfg, rc=self.rc, grid=grid,
                                      state_sharding=state_sharding, mesh=self.mesh)
    return self._update

  def group_signal(self, roll: Rollout) -> np.ndarray:
    """bool `[groups]`: the groups an update learns from (`--sapo_signal`).

    `reward`: rewards not all equal. `acceptance`: in addition, the target accepts some
    candidates and rejects others; groups that are all accepted (or all rejected) then
    differ only in small reward terms, and group normalization would blow those up into
    full-size advantages.
    """
    g = self.scfg.group_size
    signal = np.asarray(sapo.group_has_signal(jnp.asarray(roll.rewards), g))
    if self.scfg.signal == "acceptance":
      accept = np.asarray(roll.accept, bool).reshape(-1, g)
      signal = signal & accept.any(axis=1) & ~accept.all(axis=1)
    return signal

  def iteration(self, state, states: StateSet, rng, *, tx, state_sharding):
    """One rollout and `ppo_epochs` updates. Returns (state, host metrics dict).

    All `states` are rolled out; the update takes `states_per_iteration` groups of them,
    those with signal first (all of them when there are no more states than that).
    """
    g = self.scfg.group_size
    roll, batch, grid = self.rollout(state["params"], states, rng)
    sapo.validate_rewards(roll.rewards, g)
    signal = self.group_signal(roll)
    chosen = choose_groups(signal, self.scfg.states_per_iteration)
    metrics = rollout_metrics(roll, "rollout")
    metrics["rollout/signal_fraction"] = float(signal.mean())
    metrics["update/signal_fraction"] = float(signal[chosen].mean())
    if not signal[chosen].any():
      return state, metrics
    if len(chosen) < len(states):
      roll = roll.take((chosen[:, None] * g + np.arange(g)).ravel())
      batch["inputs"], grid = self._inputs(self.draft_cfg, states.take(chosen), self.mesh)
      batch.update(place_rows({"tokens": roll.tokens, "lengths": roll.lengths,
                               "logp_old": roll.logp_old}, self.mesh))
    batch["logp_ref"] = rollout_lib.reference_logprobs(
        self.graphdef, self.ref_params, batch["inputs"], batch["tokens"], batch["lengths"],
        rc=self.rc, group=g, grid=grid)
    adv = sapo.group_advantages(jnp.asarray(roll.rewards), g)
    keep = np.repeat(signal[chosen], g)
    mask = (np.arange(roll.tokens.shape[1])[None] < roll.lengths[:, None]) & keep[:, None]
    batch.update(place_rows({"advantages": np.asarray(adv, np.float32),
                             "mask": mask.astype(np.float32)}, self.mesh))
    update = self.update_fn(tx, grid, state_sharding)
    for _ in range(self.scfg.ppo_epochs):
      state, m = update(state, batch)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    metrics.update({f"update/{k}": v for k, v in m.items() if k != "num_tokens"})
    return state, metrics

  def evaluate(self, params, states: StateSet, *, chunk: int) -> dict[str, float]:
    """The draft's greedy step on each state, judged by the target: acceptance and more.

    Besides `rollout_metrics`: `heldout/acceptance_step{j}`, the acceptance of the states
    whose next step is step j (0-based; where a task's rejections fall), and
    `heldout/false_accept`, the fraction of states whose greedy step the target accepts
    although it is not the target's own next step (a draft that games a lenient judge
    raises it).

    States go in chunks of `chunk` (the last one padded by repeating its last state), so
    the programs compile once whatever the number of states.
    """
    if not len(states):
      return {}
    rolls = []
    for start in range(0, len(states), chunk):
      idx = list(range(start, min(start + chunk, len(states))))
      real = len(idx)
      idx += [idx[-1]] * (chunk - real)
      roll, _, _ = self.rollout(params, states.take(idx), jax.random.key(0), group=1,
                                greedy=True)
      rolls.append(roll.head(real))
    roll = Rollout.concat(rolls)
    out = rollout_metrics(roll, "heldout")
    for j, value in mean_by_step(roll.accept, states.step_index).items():
      out[f"heldout/acceptance_step{j}"] = value
    out["heldout/false_accept"] = float(np.mean(false_accepts(roll)))
    return out


def mean_by_step(values, step_index) -> dict[int, float]:
  """`{j: mean of values[i] over the states i whose next step is step j}`, j ascending."""
  values, step_index = np.asarray(values, np.float64), np.asarray(step_index)
  return {int(j): float(np.mean(values[step_index == j])) for j in np.unique(step_index)}


def false_accepts(roll: Rollout) -> np.ndarray:
  """bool `[N]`: the target accepted the candidate although it is not its own next step."""
  return np.asarray(roll.accept, bool) & (roll.parts["exact_match"] < 1)


def rollout_metrics(roll: Rollout, prefix: str) -> dict[str, float]:
  """Means of a rollout: reward and its parts, CPN, TBVM acceptance, step length."""
  out = {f"{prefix}/reward": float(np.mean(roll.rewards)),
         f"{prefix}/cpn": float(np.mean(roll.cpn)),
         f"{prefix}/acceptance": float(np.mean(roll.accept)),
         f"{prefix}/step_length": float(np.mean(roll.content.sum(axis=1))),
         f"{prefix}/malformed": float(np.mean(roll.malformed))}
  out.update({f"{prefix}/reward_{k}": float(np.mean(v)) for k, v in roll.parts.items()})
  return out
