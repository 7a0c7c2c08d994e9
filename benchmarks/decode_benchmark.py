r"""Decode speed: our jitted `generate` vs transformers' PyTorch `generate`, same CPU.

    .venv/bin/python benchmarks/decode_benchmark.py --json=/tmp/decode_benchmark.json

Both sides decode the same random-weight config (`ModelConfig.qwen2_100m`, fp32, greedy,
KV cache) from prompts of `--prompt_len` tokens for exactly `--new_tokens` tokens, at each
batch size, after a warm-up call (which compiles on our side). transformers runs in the
PyTorch reference environment (`.venv-ref`) as a subprocess, with `torch.set_num_threads`
set to `--threads`. The weights are random on each side (same shapes, not the same values):
speed does not depend on them, and no EOS is configured, so every row decodes in full.

The memory-bandwidth bound: a decode step reads every weight once (fp32: 4 bytes per
parameter) and yields one token per row, so tokens/s <= batch * bandwidth / weight bytes,
with the bandwidth measured here as a large NumPy copy (bytes read + written per second,
the STREAM "copy" convention; the best of 1 and `--threads` threads). At batch 8 the
activations and KV cache add little, so the same bound applies.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to decode at.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per batch size.")
_THREADS = flags.DEFINE_integer(
    "threads", 2, "torch threads and copy-test threads; 1 also makes XLA single-threaded.")
_JSON = flags.DEFINE_string("json", "decode_benchmark.json", "Where to write the results.")
_REF_PYTHON = flags.DEFINE_string(
    "ref_python", None, "Python of the PyTorch reference environment (default: .venv-ref, "
    "or $DREAM_R_JAX_REF_PYTHON).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Only time our side.")
_TIMER = flags.DEFINE_enum(
    "timer", "wall", ["wall", "cpu"],
    "wall: elapsed time. cpu: each process's CPU time; with --threads=1 this is the "
    "comparison that other jobs on a shared machine disturb least.")
_SEED = flags.DEFINE_integer("seed", 0, "Weight and prompt seed.")

_HERE = os.path.dirname(os.path.abspath(__file__))


def copy_bandwidth(threads: int, nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
  """Best observed copy bandwidth in bytes/s (read + write), over 1 and `threads` threads."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  src = np.ones(nbytes // 8, np.float64)
  dst = np.empty_like(src)
  best = 0.0
  for n in sorted({1, threads}):
    parts = np.array_split(np.arange(src.size), n)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
      for _ in range(repeats):
        start = time.perf_counter()
        # np.copyto releases the GIL, so the threads copy their halves concurrently.
        list(pool.map(lambda ab: np.copyto(dst[ab[0]:ab[1]], src[ab[0]:ab[1]]), bounds))
        best = max(best, 2 * nbytes / (time.perf_counter() - start))
  return best


def run_ours(cfg, batch_sizes, prompt_len, new_tokens, repeats, seed, clock):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dream_r_jax.decoding.generate import generate  # pylint: disable=g-import-not-at-top
  from dream_r_jax.testing.models import tiny_model  # pylint: disable=g-import-not-at-top

  model = tiny_model(cfg=cfg, seed=seed)
  results = []
  for b in batch_sizes:
    ids = np.random.default_rng(seed + b).integers(1, cfg.vocab_size, (b, prompt_len))
    start = time.perf_counter()
    out = generate(model, ids, max_new_tokens=new_tokens)
    jax.block_until_ready(out.tokens)
    compile_s = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
      start = clock()
      out = generate(model, ids, max_new_tokens=new_tokens)
      jax.block_until_ready(out.tokens)
      seconds.append(clock() - start)
    assert int(np.min(out.lengths)) == new_tokens  # no EOS in this config: full length
    results.append(dict(batch=b, seconds=seconds, new_tokens=new_tokens,
                        warmup_seconds=compile_s))
  return dict(jax=jax.__version__, backend=jax.default_backend(),
              devices=len(jax.devices()), results=results)


def run_torch(cfg, batch_sizes, prompt_len, new_tokens, repeats, threads, seed, timer):
  from dream_r_jax.models import config_to_hf  # pylint: disable=g-import-not-at-top
  from dream_r_jax.testing import reference  # pylint: disable=g-import-not-at-top
  py = _REF_PYTHON.value or reference.reference_python()
  if not os.path.exists(py):
    raise FileNotFoundError(f"{py}: no PyTorch reference environment (scripts/setup_env.sh), "
                            "or pass --skip_torch")
  spec = dict(config=config_to_hf(cfg), batch_sizes=batch_sizes, prompt_len=prompt_len,
              new_tokens=new_tokens, repeats=repeats, threads=threads, seed=seed, timer=timer)
  with tempfile.TemporaryDirectory() as d:
    spec_path, out_path = os.path.join(d, "spec.json"), os.path.join(d, "out.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([py, os.path.join(_HERE, "hf_generate.py"), spec_path, out_path],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
      raise RuntimeError(f"transformers benchmark failed:\n{proc.stderr[-4000:]}")
    with open(out_path) as f:
      return json.load(f)


def _stats(b, n, seconds):
  """Tokens/s at the median and at the fastest run (the one other jobs disturbed least)."""
  xs = sorted(seconds)
  return b * n / xs[len(xs) // 2], b * n / xs[0]


def main(argv):
  del argv
  if _THREADS.value == 1:
    # XLA reads its flags when the backend starts: set them before anything imports JAX.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
  from dream_r_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top

  cfg = ModelConfig.qwen2_100m()
  batch_sizes = [int(b) for b in _BATCH_SIZES.value]
  n, p = _NEW_TOKENS.value, _PROMPT_LEN.value
  bandwidth = copy_bandwidth(_THREADS.value)
  weight_bytes = cfg.num_params() * 4
  # transformers first: our process holds no compiled state yet and the CPU is cold for both.
  torch_out = None if _SKIP_TORCH.value else run_torch(
      cfg, batch_sizes, p, n, _REPEATS.value, _THREADS.value, _SEED.value, _TIMER.value)
  clock = time.process_time if _TIMER.value == "cpu" else time.perf_counter
  ours = run_ours(cfg, batch_sizes, p, n, _REPEATS.value, _SEED.value, clock)

  rows = []
  for i, b in enumerate(batch_sizes):
    bound = b * bandwidth / weight_bytes
    med, best = _stats(b, n, ours["results"][i]["seconds"])
    row = dict(batch=b, bound_tokens_per_s=bound, ours_tokens_per_s=med,
               ours_best_tokens_per_s=best, ours_fraction_of_bound=med / bound,
               ours_warmup_s=ours["results"][i]["warmup_seconds"])
    if torch_out:
      hf_med, hf_best = _stats(b, n, torch_out["results"][i]["seconds"])
      row.update(hf_tokens_per_s=hf_med, hf_best_tokens_per_s=hf_best,
                 hf_fraction_of_bound=hf_med / bound, ratio_ours_over_hf=med / hf_med,
                 ratio_best_ours_over_hf=best / hf_best)
    rows.append(row)

  timer = "CPU time" if _TIMER.value == "cpu" else "wall time"
  print(f"model: qwen2_100m, {cfg.num_params() / 1e6:.1f}M params, fp32 "
        f"({weight_bytes / 2**20:.0f} MiB of weights per decode step); prompt {p}, "
        f"{n} new tokens, greedy; {os.cpu_count()} CPUs, {_THREADS.value} thread(s), {timer}; "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s (read + write); "
        f"bound = batch x {bandwidth / weight_bytes:.1f} tokens/s")
  print("tokens/s: median of runs (best run in brackets)")
  print(f"{'batch':>5} {'ours':>15} {'transformers':>15} {'ours/hf':>12} {'bound':>7} "
        f"{'ours %bound':>11} {'hf %bound':>9}")
  for r in rows:
    ours_s = f"{r['ours_tokens_per_s']:.1f} ({r['ours_best_tokens_per_s']:.1f})"
    if "hf_tokens_per_s" in r:
      hf_s = f"{r['hf_tokens_per_s']:.1f} ({r['hf_best_tokens_per_s']:.1f})"
      ratio = f"{r['ratio_ours_over_hf']:.2f} ({r['ratio_best_ours_over_hf']:.2f})"
      hf_frac = f"{100 * r['hf_fraction_of_bound']:.1f}%"
    else:
      hf_s = ratio = hf_frac = "-"
    print(f"{r['batch']:>5} {ours_s:>15} {hf_s:>15} {ratio:>12} "
          f"{r['bound_tokens_per_s']:>7.1f} {100 * r['ours_fraction_of_bound']:>10.1f}% "
          f"{hf_frac:>9}")
  report = dict(model="qwen2_100m", num_params=cfg.num_params(), dtype="float32",
                prompt_len=p, new_tokens=n, repeats=_REPEATS.value, cpus=os.cpu_count(),
                threads=_THREADS.value, timer=_TIMER.value,
                load_average=os.getloadavg(), copy_bandwidth_bytes_per_s=bandwidth,
                weight_bytes_per_step=weight_bytes, rows=rows, ours=ours, hf=torch_out)
  os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
  with open(_JSON.value, "w") as f:
    json.dump(report, f, indent=2)
  print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(_HERE))
  app.run(main)
