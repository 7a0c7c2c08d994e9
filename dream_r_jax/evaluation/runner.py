"""Side-by-side evaluation: every method on the same examples, in one run, one at a time.

Latency is measured per example (batch 1, the interactive setting the speedups refer to),
after a warm-up that compiles every program, and `speedup_vs_target` is the median over
examples of target-only latency / method latency, both from this run.

Placement (resource matching): the speculative methods use the draft mesh and the target
mesh; `target` may use every device of both. It is timed on the target mesh alone and on the
union of both meshes during warm-up and runs on whichever was faster; the report says which.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from dream_r_jax.data import task as task_lib
from dream_r_jax.decoding.generate import Generator
from dream_r_jax.evaluation import inputs as inputs_lib
from dream_r_jax.sharding import mesh as mesh_lib
from dream_r_jax.speculative.engine import RoleModel, SpeculativeEngine
from dream_r_jax.speculative.programs import RoundConfig
from dream_r_jax.speculative.verifiers import VerifierConfig

METHODS = ("target", "token_sd", "specreason", "sequential", "fpsr")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  methods: tuple[str, ...] = METHODS
  num_steps: int = 4                 # K, steps per drafted chain
  max_step_tokens: int = 16
  max_new_tokens: int = 96
  verifier: str = "cpn"
  tau: float = 0.8
  min_mass: float = 0.5
  score_threshold: float = 7.0
  likelihood_threshold: float = -1.0  # `likelihood`: minimum mean target log-prob
  gamma: int = 4                     # token_sd draft length
  overlap: str = "async"
  chain_bucket: int = -1             # verify width granularity: -1 = L (K widths), 0 = K * L
  num_draft_devices: int = 1
  num_target_devices: int = 1
  warmup_examples: int = 1

  def __post_init__(self):
    bad = sorted(set(self.methods) - set(METHODS))
    if bad:
      raise ValueError(f"unknown methods {bad}; choose from {METHODS}")
    if not 0.5 < self.tau < 1.0:
      raise ValueError(f"tau={self.tau} must be in (0.5, 1)")
    if self.num_steps < 1:
      raise ValueError(f"num_steps (K) = {self.num_steps} must be >= 1")
    if self.chain_bucket < -1:
      raise ValueError(f"chain_bucket={self.chain_bucket}: expected -1 (one width per step), "
                       "0 (always the full chain) or a positive number of tokens")


@dataclasses.dataclass
class MethodResult:
  name: str
  outputs: list = dataclasses.field(default_factory=list)      # decoded text per example
  tokens: list = dataclasses.field(default_factory=list)       # token ids per example
  latency_s: list = dataclasses.field(default_factory=list)
  stats: list = dataclasses.field(default_factory=list)        # dict per example
  timelines: list = dataclasses.field(default_factory=list)
  placement: str = ""


def verify_template_ids(tokenizer) -> tuple[tuple[int, ...], int, int]:
  """Token ids of the verify template and the (single-token) verdicts."""
  template = tuple(tokenizer.encode(task_lib.STEP_DELIMITER + task_lib.VERIFY_TEMPLATE,
                                    add_special_tokens=False)[1:])
  ids = {}
  for name, text in (("positive", task_lib.POSITIVE_VERDICT),
                     ("negative", task_lib.NEGATIVE_VERDICT)):
    toks = tokenizer.encode(text, add_special_tokens=False)
    if len(toks) != 1:
      raise ValueError(f"{name} verdict {text!r} is {len(toks)} tokens {toks}; the verdicts "
                       "must be single tokens of the tokenizer")
    ids[name] = toks[0]
  return template, ids["positive"], ids["negative"]


def round_config(tokenizer, ec: EvalConfig, *, verifier: Optional[str] = None,
                 tau: Optional[float] = None,
                 likelihood_threshold: Optional[float] = None) -> RoundConfig:
  template, pos, neg = verify_template_ids(tokenizer)
  name = verifier or ec.verifier
  kw: dict[str, Any] = dict(name=name)
  if name == "cpn":
    kw.update(tau=tau or ec.tau, min_mass=ec.min_mass, pos_ids=(pos,), neg_ids=(neg,))
  elif name == "likelihood":
    kw.update(threshold=ec.likelihood_threshold if likelihood_threshold is None
              else likelihood_threshold)
  delim = tokenizer.encode(task_lib.STEP_DELIMITER, add_special_tokens=False)
  return RoundConfig(num_steps=ec.num_steps, max_step_tokens=ec.max_step_tokens,
                     delimiter_ids=tuple(delim), eos_ids=(tokenizer.eos_token_id,),
                     template_ids=template, verifier=VerifierConfig(**kw),
                     pad_id=tokenizer.pad_token_id or 0,
                     chain_bucket=ec.max_step_tokens if ec.chain_bucket < 0 else ec.chain_bucket)


def check_same_tokenizer(draft_tok, target_tok) -> None:
  if draft_tok.get_vocab() != target_tok.get_vocab():
    raise ValueError("draft and target tokenizers differ (vocabularies are not identical); "
                     "speculative reasoning needs a shared tokenizer")


class Evaluator:
  """Holds the placed models and runs methods example by example."""

  def __init__(self, draft_model, target_model, tokenizer, ec: EvalConfig,
               devices: Optional[Sequence[jax.Device]] = None):
    devices = list(devices or jax.devices())
    nd, nt = ec.num_draft_devices, ec.num_target_devices
    if nd + nt > len(devices):
      raise ValueError(f"num_draft_devices={nd} + num_target_devices={nt} exceed the "
                       f"{len(devices)} devices")
    self.meshes = mesh_lib.role_meshes(nd, nt, devices=devices)
    self.union = mesh_lib.make_mesh((1, nd + nt), ("data", "model"), devices[:nd + nt])
    self.ec, self.tokenizer = ec, tokenizer
    self.draft = RoleModel(draft_model, self.meshes[mesh_lib.Role.DRAFT])
    self.target = RoleModel(target_model, self.meshes[mesh_lib.Role.TARGET])
    self._target_union = None
    self._generators: dict = {}
    self._target_model_cfg = target_model.cfg
    self.rc = round_config(tokenizer, ec)

  def with_draft(self, draft_model) -> "Evaluator":
    """The same target, placement and settings with another draft (e.g. SFT vs SAPO)."""
    other = copy.copy(self)
    other.draft = RoleModel(draft_model, self.meshes[mesh_lib.Role.DRAFT])
    return other

  # -- methods ------------------------------------------------------------------------------
  def _target_only(self, role: RoleModel, prompts):
    if id(role) not in self._generators:  # built once per placement: one dispatch per call
      self._generators[id(role)] = Generator(split=(role.cfg, role.graphdef, role.state))
    pv, grid = inputs_lib.vision_inputs(prompts)
    out = self._generators[id(role)](
        prompts.ids, prompts.lens, max_new_tokens=self.ec.max_new_tokens,
        eos_ids=self.rc.eos_ids, pixel_values=pv, image_grid_thw=grid, pad_id=self.rc.pad_id)
    toks = np.asarray(jax.device_get(out.tokens))
    lens = np.asarray(jax.device_get(out.lengths))
    rows = [list(map(int, toks[i, :lens[i]])) for i in range(len(lens))]
    stats = [dict(target_forward_passes=1 + int(n), draft_forward_passes=0,
                  steps_drafted=0, steps_accepted=0) for n in lens]
    return rows, stats, None

  def _engine(self, schedule: str, rc: Optional[RoundConfig] = None):
    engine = SpeculativeEngine(self.draft, self.target, rc or self.rc, overlap=self.ec.overlap)

    def run(prompts):
      out = engine.run(prompts.ids, prompts.lens, max_new_tokens=self.ec.max_new_tokens,
                       schedule=schedule, images=inputs_lib.engine_images(prompts))
      stats = [dataclasses.asdict(s) for s in out.stats]
      return out.tokens, stats, out.timeline

    return run

  def _baseline(self, name: str):
    from dream_r_jax.speculative import baselines  # pylint: disable=g-import-not-at-top

    def run(prompts):
      out = baselines.run_method(
          name, draft=self.draft, target=self.target, prompt_ids=prompts.ids,
          prompt_lens=prompts.lens, max_new_tokens=self.ec.max_new_tokens,
          # SpecReason judges with the target's verdict (CPN), whatever the step verifier.
          rc=self.rc if name != "specreason" else round_config(self.tokenizer, self.ec,
                                                               verifier="cpn"),
          gamma=self.ec.gamma, score_threshold=self.ec.score_threshold,
          tokenizer=self.tokenizer, images=inputs_lib.engine_images(prompts))
      return out.tokens, out.stats, None

    return run

  def method(self, name: str, **kw) -> Callable:
    if name == "target":
      return lambda prompts: self._target_only(self._target_placement, prompts)
    if name in ("fpsr", "sequential"):
      rc = round_config(self.tokenizer, self.ec, **kw) if kw else None
      return self._engine(name, rc)
    return self._baseline(name)

  # -- placement of the target-only baseline ------------------------------------------------
  def choose_target_placement(self, prompts) -> str:
    """Times target-only decoding on the target mesh and on the union mesh; keeps the faster."""
    nd, nt = self.ec.num_draft_devices, self.ec.num_target_devices
    union_model = nnx.merge(self.target.graphdef,
                            jax.tree.map(lambda x: np.asarray(x), self.target.state))
    self._target_union = RoleModel(union_model, self.union)
    timings = {}
    for label, role in (("target mesh", self.target), ("draft+target meshes",
                                                       self._target_union)):
      self._target_only(role, prompts)  # compile
      start = time.perf_counter()
      for _ in range(2):
        self._target_only(role, prompts)
      timings[label] = (time.perf_counter() - start) / 2
    best = min(timings, key=timings.get)
    self._target_placement = self.target if best == "target mesh" else self._target_union
    return (f"{best} ({nt if best == 'target mesh' else nd + nt} devices); timings "
            + ", ".join(f"{k}: {v * 1e3:.1f} ms" for k, v in timings.items()))

  # -- the run ------------------------------------------------------------------------------
  def run(self, examples: Sequence[dict], methods: Optional[Sequence[str]] = None,
          progress: Optional[Callable[[str], None]] = None, **method_kw
          ) -> dict[str, MethodResult]:
    methods = list(methods or self.ec.methods)
    # One padded prompt length for all examples: every method compiles once, and no
    # example's latency includes a compilation.
    longest = max(len(inputs_lib.encode_prompts(self.tokenizer, [ex]).ids[0])
                  for ex in examples)
    pad_to = -(-longest // 16) * 16
    prompts = [inputs_lib.encode_prompts(self.tokenizer, [ex], pad_to=pad_to)
               for ex in examples]
    if not hasattr(self, "_target_placement"):
      placement = self.choose_target_placement(prompts[0])
    else:
      placement = getattr(self, "_placement_note", "")
    self._placement_note = placement
    results = {}
    for name in methods:
      fn = self.method(name, **method_kw)
      for p in prompts[:self.ec.warmup_examples]:
        fn(p)  # compile every program this method uses
      res = MethodResult(name=name)
      res.placement = placement if name == "target" else "draft mesh + target mesh"
      for i, p in enumerate(prompts):
        start = time.perf_counter()
        toks, stats, timeline = fn(p)
        res.latency_s.append(time.perf_counter() - start)
        res.tokens.append(toks[0])
        res.outputs.append(self.tokenizer.decode(toks[0], skip_special_tokens=True))
        res.stats.append(stats[0])
        res.timelines.append(timeline)
        if progress and (i + 1) % max(1, len(prompts) // 4) == 0:
          progress(f"{name}: {i + 1}/{len(prompts)} examples")
      results[name] = res
    return results
