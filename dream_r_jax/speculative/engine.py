"""The speculative-reasoning engine: FPSR and the sequential reference loop.

Draft and target each live on their own mesh (`RoleModel`). A round is three device programs
(`programs.py`); the engine only decides, per row, what to commit. Two schedules share them:

  * `sequential`: draft chain r, then verify it, then sync the draft (the reference);
  * `fpsr`: while the target verifies chain r on its mesh, the draft already drafts chain
    r+1 on its own mesh, assuming chain r is accepted whole. Rows that accepted everything
    keep that chain; the others discard it, sync, and draft again. Outputs are identical to
    `sequential`; only timing changes.

Overlap (`overlap=`): "async" (default) dispatches programs for both meshes before awaiting
either and relies on JAX's asynchronous dispatch, so the host only blocks when it needs a
value (the drafted chain, the target's decision); "threads" runs each mesh's program from its
own host thread; "none" runs them one after the other (for timing comparisons).

Each program runs under `jax.shard_map` over its mesh's "data" axis (rows are independent, so
each data shard runs its own token loop and stops when its own rows are done); the "model"
axis stays automatic (tensor parallelism via the sharding rules).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import time
from typing import Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dream_r_jax.decoding import generate as gen
from dream_r_jax.sharding import rules as sharding_rules
from dream_r_jax.speculative import programs
from dream_r_jax.speculative.programs import RoundConfig


class RoleModel:
  """A model placed on its role's mesh, split into (graphdef, state) for the programs.

  The model's arrays are moved in place: one model object cannot serve two roles (pass
  `nnx.clone(model)` for the second).
  """

  def __init__(self, model, mesh, rules=sharding_rules.DEFAULT_RULES):
    self.cfg = model.cfg
    self.mesh = mesh
    sharding_rules.shard_model(model, mesh, rules)
    self.graphdef, self.state = nnx.split(model)
    # Jitted programs take the state as a flat list: flattening an `nnx.State` on every call
    # walks it in Python, which costs more than the device work of a small model's step.
    self.leaves, self.treedef = jax.tree.flatten(self.state)
    self.devices = set(mesh.devices.flat)

  @property
  def data_size(self) -> int:
    return int(self.mesh.shape.get("data", 1))

  def rows_sharding(self, batch: int) -> NamedSharding:
    spec = P("data") if batch % self.data_size == 0 else P()
    return NamedSharding(self.mesh, spec)

  def put_rows(self, tree, batch: int):
    return jax.device_put(tree, self.rows_sharding(batch))

  def replicated(self, tree):
    return jax.device_put(tree, NamedSharding(self.mesh, P()))


@dataclasses.dataclass
class RowStats:
  """Per-example statistics of one engine run."""
  rounds: int = 0
  steps_drafted: int = 0
  steps_accepted: int = 0
  target_forward_passes: int = 0
  draft_forward_passes: int = 0
  draft_tokens: int = 0      # committed tokens that came from the draft
  target_tokens: int = 0     # committed tokens the target decoded itself
  accept_by_position: list = dataclasses.field(default_factory=list)  # per round: [K] 0/1/-1
  scores: list = dataclasses.field(default_factory=list)              # per round: [K] floats


@dataclasses.dataclass
class EngineOutput:
  tokens: list              # per row: committed generated token ids
  stats: list               # per row: RowStats
  timeline: list            # (phase, role, start_s, end_s) from the engine's own clock
  wall_s: float


def _row_specs(tree, data: bool):
  spec = P("data") if data else P()
  return jax.tree.map(lambda _: spec, tree)


class SpeculativeEngine:
  """Runs speculative reasoning over batches of prompts with draft and target models."""

  def __init__(self, draft: RoleModel, target: RoleModel, rc: RoundConfig, *,
               overlap: str = "async"):
    if draft.devices & target.devices and overlap != "none":
      # Disjoint meshes are what lets the two programs run at the same time.
      raise ValueError("draft and target meshes share devices: "
                       f"{sorted(d.id for d in draft.devices & target.devices)}")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
      raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} != target vocab_size "
                       f"{target.cfg.vocab_size}: draft and target must share a tokenizer")
    if overlap not in ("threads", "async", "none"):
      raise ValueError(f"overlap={overlap!r}; expected 'threads', 'async' or 'none'")
    self.draft, self.target, self.rc, self.overlap = draft, target, rc, overlap
    self._pool = cf.ThreadPoolExecutor(max_workers=2)
    self._mrope_t = target.cfg.mrope_section is not None
    self._mrope_d = draft.cfg.mrope_section is not None
    self._programs: dict = {}

  # Jitted programs are cached at module level by (graphdef, mesh, config, batch), so engines
  # built with the same models and settings share compiled code. Hashing a graphdef walks the
  # whole module tree, so each engine also keeps the programs it has looked up.
  def _memo(self, key, make):
    if key not in self._programs:
      self._programs[key] = make()
    return self._programs[key]

  def _draft_prog(self, batch):
    return self._memo(("draft", batch), lambda: _program(
        "draft", self.draft.graphdef, self.draft.treedef, self.draft.mesh, self.rc, batch,
        False))

  def _target_prog(self, batch):
    return self._memo(("target", batch), lambda: _program(
        "target", self.target.graphdef, self.target.treedef, self.target.mesh, self.rc, batch,
        self._mrope_t))

  # ---------------------------------------------------------------------------------------
  def _prefill(self, role: RoleModel, ids, lens, cache_len, images):
    # One program builds the cache and writes the prompt: allocating the cache on the host
    # and copying it over cost more than the prefill itself for small models.
    b = ids.shape[0]
    positions = rope_delta = pixel_values = grid = None
    if images is not None and role.cfg.vision is not None:
      pixel_values, grid, positions, rope_delta = images(role.cfg)
    fn = self._memo(("prefill", id(role), grid, cache_len, b), lambda: _prefill_jit(
        role.graphdef, role.treedef, grid, cache_len, role.rows_sharding(b)))
    return fn(role.leaves, ids, lens, positions, rope_delta, pixel_values)

  def _run(self, role: str, fn, timeline, phase, t0):
    start = time.perf_counter() - t0
    out = jax.block_until_ready(fn())
    timeline.append((phase, role, start, time.perf_counter() - t0))
    return out

  def _both(self, target_fn, draft_fn, timeline, t0, draft_phase,
            target_phase="verify+fallback"):
    """Runs a target program and a draft program, overlapped per `self.overlap`."""
    if self.overlap == "threads":
      ft = self._pool.submit(self._run, "target", target_fn, timeline, target_phase, t0)
      fd = self._pool.submit(self._run, "draft", draft_fn, timeline, draft_phase, t0)
      return ft.result(), fd.result()
    if self.overlap == "async":
      start = time.perf_counter() - t0
      t_out, d_out = target_fn(), draft_fn()  # both dispatched before either is awaited
      jax.block_until_ready(t_out)
      timeline.append((target_phase, "target", start, time.perf_counter() - t0))
      jax.block_until_ready(d_out)
      timeline.append((draft_phase, "draft", start, time.perf_counter() - t0))
      return t_out, d_out
    t_out = self._run("target", target_fn, timeline, target_phase, t0)
    d_out = self._run("draft", draft_fn, timeline, draft_phase, t0)
    return t_out, d_out

  def _start(self, target_prefill, draft_prefill, first_chain, timeline, t0):
    """Prefills both caches and drafts the first chain.

    The draft's prefill and first chain follow each other on the draft mesh while the target
    prefills on its own mesh. Returns (target prefill output, first chain).
    """
    if self.overlap == "async":
      # Everything is dispatched before anything is awaited; an end time is when the host
      # saw the program done (an upper bound when an earlier wait covered it).
      start = time.perf_counter() - t0
      pt = target_prefill()
      pd = draft_prefill()
      d = first_chain(pd)
      for phase, role, out in (("prefill", "draft", pd), ("draft", "draft", d),
                               ("prefill", "target", pt)):
        jax.block_until_ready(out)
        end = time.perf_counter() - t0
        timeline.append((phase, role, start, end))
        start = end if role == "draft" else start
      return pt, d

    def draft_side():
      pd = self._run("draft", draft_prefill, timeline, "prefill", t0)
      return self._run("draft", lambda: first_chain(pd), timeline, "draft", t0)

    if self.overlap == "threads":
      ft = self._pool.submit(self._run, "target", target_prefill, timeline, "prefill", t0)
      fd = self._pool.submit(draft_side)
      return ft.result(), fd.result()
    return self._run("target", target_prefill, timeline, "prefill", t0), draft_side()

  def _compile_widths(self, target_prog, cache, last, budget, rng, batch):
    """Compiles the verify pass for every chain width before the first round needs it.

    Widths differ from round to round, so without this a timed run would include
    compilations. Each width runs once with no active row (its outputs are dropped).
    """
    def compile_all():
      idle = np.zeros((batch,), bool)
      for width in self.rc.chain_widths():
        packed = np.zeros((batch, width + self.rc.num_steps), np.int32)
        jax.block_until_ready(target_prog(self.target.leaves, cache, last,
                                          self.target.put_rows(packed, batch), idle, budget,
                                          rng))
      return True

    self._memo(("widths", batch, cache.max_len), compile_all)

  def run(self, prompt_ids, prompt_lens, *, max_new_tokens: int, schedule: str = "fpsr",
          rng: Optional[jax.Array] = None, images=None, max_rounds: Optional[int] = None
          ) -> EngineOutput:
    """Generates up to `max_new_tokens` per row with speculative reasoning.

    Args:
      prompt_ids: [B, T] right-padded prompts (numpy).
      prompt_lens: [B] prompt lengths.
      max_new_tokens: token budget per row.
      schedule: "fpsr" (parallel) or "sequential" (reference).
      rng: key for draft sampling (greedy drafts ignore it).
      images: optional callable cfg -> (pixel_values, grid, positions, rope_delta) for
        multimodal prompts (see `dream_r_jax.evaluation.inputs.engine_images`).
      max_rounds: optional cap on rounds (default: enough for the budget).
    """
    if schedule not in ("fpsr", "sequential"):
      raise ValueError(f"schedule={schedule!r}; expected 'fpsr' or 'sequential'")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    prompt_ids = np.asarray(prompt_ids, np.int32)
    lens = np.asarray(prompt_lens, np.int32)
    b, t = prompt_ids.shape
    rc = self.rc
    cache_len = t + max_new_tokens + 2 * rc.chain_len + rc.num_steps * len(
        rc.verify_template) + 2
    for cfg, name in ((self.draft.cfg, "draft"), (self.target.cfg, "target")):
      if cache_len > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {t} + max_new_tokens {max_new_tokens} + chain room needs "
            f"{cache_len} positions, more than the {name}'s max_position_embeddings="
            f"{cfg.max_position_embeddings}")
    fpsr = schedule == "fpsr"
    draft_prog, target_prog = self._draft_prog(b), self._target_prog(b)
    if rng is None:  # the default key, placed on both meshes once per engine
      rng_d, rng_t = self._memo("rng", lambda: (self.draft.replicated(jax.random.key(0)),
                                                self.target.replicated(jax.random.key(0))))
    else:
      rng_d, rng_t = self.draft.replicated(rng), self.target.replicated(rng)
    to_target = lambda x: jax.device_put(x, self.target.rows_sharding(b))
    to_draft = lambda x: jax.device_put(x, self.draft.rows_sharding(b))

    stats = [RowStats(target_forward_passes=1, draft_forward_passes=1) for _ in range(b)]
    out_tokens = [[] for _ in range(b)]
    committed = lens.copy()  # absolute committed length of each row, in both caches
    budget = np.full((b,), max_new_tokens, np.int32)
    done = np.zeros((b,), bool)
    no_rows = np.zeros((b,), bool)
    zeros_i = np.zeros((b,), np.int32)
    empty_chain = np.zeros((b, rc.chain_len + rc.num_steps), np.int32)
    empty_fb = self._memo(("empty_fb", b), lambda: to_draft(
        np.zeros((b, rc.max_step_tokens + 1), np.int32)))

    def draft_call(base, prev, fb, new_len, sync, keep, active, bud, r):
      return lambda: draft_prog(self.draft.leaves, base["cache"], base["last_logits"], prev, fb,
                                new_len, sync, keep, active, bud, rng_d, np.int32(r))

    def first_chain(prefilled):
      last, cache = prefilled
      return draft_call(dict(cache=cache, last_logits=last), empty_chain, empty_fb, zeros_i,
                        no_rows, no_rows, ~done, budget, 0)()

    timeline: list = []
    t0 = time.perf_counter()
    (last_t, cache_t), d = self._start(
        lambda: self._prefill(self.target, prompt_ids, lens, cache_len, images),
        lambda: self._prefill(self.draft, prompt_ids, lens, cache_len, images),
        first_chain, timeline, t0)
    max_rounds = max_rounds or (max_new_tokens + 1)
    self._compile_widths(target_prog, cache_t, last_t, budget, rng_t, b)
    r = 0
    pending = None  # dispatch time of a sync+draft not yet awaited ("async" overlap)
    while not done.all() and r < max_rounds:
      active = ~done
      packed_h, draft_eos_next = jax.device_get((d["packed"], d["eos_next"]))
      if pending is not None:
        timeline.append(("sync+draft", "draft", pending, time.perf_counter() - t0))
        pending = None
      chain_h, step_lens_h = packed_h[:, :rc.chain_len], packed_h[:, rc.chain_len:]
      chain_lens = step_lens_h.sum(-1).astype(np.int32)
      # The target verifies only the width the longest chain of the batch needs.
      width = rc.chain_width(int(chain_lens[active].max()))
      packed_t = to_target(np.concatenate([chain_h[:, :width], step_lens_h], axis=1))
      target_fn = lambda: target_prog(self.target.leaves, cache_t, last_t, packed_t, active,
                                      budget, rng_t)
      # FPSR speculates that chain r is accepted whole, so chain r+1 starts where it ends;
      # not for rows whose answer the draft expects to end there (EOS in the chain or next).
      spec_rows = no_rows
      if fpsr:
        in_chain = np.arange(rc.chain_len) < chain_lens[:, None]
        ends = draft_eos_next | (np.isin(chain_h, rc.eos_ids) & in_chain).any(-1)
        spec_rows = active & ~ends
      if spec_rows.any():
        spec_fn = draft_call(d, d["packed"], empty_fb, zeros_i, no_rows, no_rows, spec_rows,
                             budget - chain_lens, r + 1)
        tr, spec = self._both(target_fn, spec_fn, timeline, t0, "draft (speculative)")
      else:
        tr, spec = self._run("target", target_fn, timeline, "verify+fallback", t0), d
      h = jax.device_get(tr["decision"])
      cache_t, last_t = tr["cache"], tr["last_logits"]
      acc_tokens, fb_lens = h["acc_tokens"], h["fb_lens"]
      new_tokens = [list(map(int, chain_h[i, :acc_tokens[i]])) +
                    list(map(int, h["fb_tokens"][i, :fb_lens[i]])) for i in range(b)]
      finished = np.asarray([any(x in rc.eos_ids for x in new) for new in new_tokens])
      new_budget = budget - np.where(active, acc_tokens + fb_lens, 0).astype(np.int32)
      new_done = done | (active & ((new_budget <= 0) | finished))
      synced = active & h["need_fb"] & ~new_done
      # Rows that go on without a usable speculative chain draft afresh (after their sync).
      fresh = ~new_done & (synced | (active & ~spec_rows)) if fpsr else ~new_done
      new_len = (committed + acc_tokens).astype(np.int32)
      r += 1
      # Start the next chain before the bookkeeping below, so the host work overlaps it.
      if not new_done.all() and r < max_rounds:
        if fpsr and not fresh.any():
          d = spec
        else:
          base = spec if fpsr else d
          keep = (~fresh) if fpsr else no_rows
          todo = fresh
          sync_fn = draft_call(base, base["packed"], to_draft(tr["fb_packed"]), new_len,
                               synced, keep, todo, new_budget, r)
          if self.overlap == "async":  # awaited at the top of the next round
            pending, d = time.perf_counter() - t0, sync_fn()
          else:
            d = self._run("draft", sync_fn, timeline, "sync+draft", t0)
      for i in np.nonzero(active)[0]:
        st = stats[i]
        out_tokens[i].extend(new_tokens[i])
        st.rounds += 1
        st.steps_drafted += int(h["n_drafted"][i])
        st.steps_accepted += int(h["acc"][i])
        # One draft pass per drafted token of the verified chain, plus the sync pass.
        st.draft_forward_passes += int(step_lens_h[i].sum()) + int(synced[i])
        # The verify pass, then one pass per fallback token (an EOS read off the verify
        # pass costs none).
        st.target_forward_passes += 1 + int(fb_lens[i]) - int(h["eos_next"][i])
        st.draft_tokens += int(acc_tokens[i])
        st.target_tokens += int(fb_lens[i])
        nd = int(h["n_drafted"][i])
        st.accept_by_position.append(
            [int(h["accept"][i, j]) if j < nd else -1 for j in range(rc.num_steps)])
        st.scores.append([float(x) for x in h["scores"][i]])
      committed = (committed + np.where(active, acc_tokens + fb_lens, 0)).astype(np.int32)
      budget, done = new_budget, new_done
    return EngineOutput(tokens=out_tokens, stats=stats, timeline=timeline,
                        wall_s=time.perf_counter() - t0)


@functools.lru_cache(maxsize=None)
def _program(kind: str, graphdef, treedef, mesh, rc: RoundConfig, batch: int, mrope: bool):
  """A jitted round program, split over the mesh's data axis with shard_map when it can."""
  if kind == "draft":
    n_rows = 9
    fn = lambda g, s, *a: programs.draft_round(g, s, *a, rc=rc)
  else:
    n_rows = 5
    fn = lambda g, s, *a: programs.target_round(g, s, *a, rc=rc, mrope=mrope)

  def wrapped(leaves, *args):
    return fn(graphdef, jax.tree.unflatten(treedef, leaves), *args)

  data_size = int(mesh.shape.get("data", 1))
  if data_size == 1 or batch % data_size:
    return jax.jit(wrapped)

  def call(state, *args):
    # Rows are independent: each data shard runs its own token loop and stops as soon as
    # its own rows are done. "model" stays an automatic axis (tensor parallelism).
    row_args, rep_args = args[:n_rows], args[n_rows:]
    in_specs = (jax.tree.map(lambda _: P(), state),) + tuple(
        _row_specs(a, True) for a in row_args) + tuple(
            jax.tree.map(lambda _: P(), a) for a in rep_args)
    out_shape = jax.eval_shape(wrapped, state, *args)
    return jax.shard_map(wrapped, mesh=mesh, in_specs=in_specs,
                         out_specs=_row_specs(out_shape, True), axis_names={"data"},
                         check_vma=False)(state, *args)

  return jax.jit(call)


@functools.lru_cache(maxsize=None)
def _prefill_jit(graphdef, treedef, grid, cache_len: int, rows: NamedSharding):
  """Jitted prefill into a new cache, on `rows`' mesh (rows split over data)."""

  def fn(leaves, ids, lens, positions, rope_delta, pixel_values):
    return gen.prefill_fresh(graphdef, jax.tree.unflatten(treedef, leaves), cache_len, ids,
                             lens, positions, rope_delta, pixel_values,
                             None if grid is None else np.asarray(grid))

  return jax.jit(fn, out_shardings=rows)
