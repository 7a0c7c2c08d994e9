"""Writes notebooks/quickstart.ipynb (the notebook is generated so that it diffs cleanly)."""
import os

import nbformat
from nbformat import v4

CELLS = [
    ("md", """# dream-r-jax quickstart: FPSR against target-only decoding

Runs on Colab, a TPU VM or a CPU box. It trains (or reuses) the bundled target and draft,
runs **FPSR** (fully parallel speculative reasoning) against **target-only** greedy decoding
on a few examples of the bundled multimodal task, shows the acceptance of each drafted step,
the plots, and takes a short `jax.profiler` trace.

Run it from the repository root (on Colab: clone the repository first and `%cd` into it).
`DREAM_R_NOTEBOOK_PRESET=smoke` selects the tiny preset that CI executes; the default,
`quickstart`, is the README's main job."""),
    ("code", """import os, subprocess, sys
# On a CPU-only host, expose two host devices: one for the draft mesh, one for the target's
# (the flag only affects the CPU platform; TPUs and GPUs are used as they are).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# Install cell: on Colab (or with DREAM_R_INSTALL=1) install the pinned requirements.
if "google.colab" in sys.modules or os.environ.get("DREAM_R_INSTALL"):
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"],
                 check=True)
if os.path.basename(os.getcwd()) == "notebooks":
  os.chdir("..")  # the notebook runs from the repository root
sys.path.insert(0, os.getcwd())
PRESET = os.environ.get("DREAM_R_NOTEBOOK_PRESET", "quickstart")
WORKDIR = os.environ.get("DREAM_R_NOTEBOOK_WORKDIR", f"runs/notebook_{PRESET}")
NUM_EXAMPLES = int(os.environ.get("DREAM_R_NOTEBOOK_EXAMPLES", "8"))
print(PRESET, WORKDIR)"""),
    ("code", """import jax
print(jax.__version__, jax.devices())"""),
    ("md", """## Train (or reuse) the bundled target and draft

The pipeline resumes from what the work directory already holds, so rerunning this cell is
cheap."""),
    ("code", """flagfile = f"experiments/flags/{PRESET}.flags"
cmd = [sys.executable, "-m", "experiments.train", f"--flagfile={flagfile}",
       f"--workdir={WORKDIR}", "--stages=target_sft,draft_sft"]
proc = subprocess.run(cmd, capture_output=True, text=True)
print(proc.stderr[-2000:])
assert proc.returncode == 0, proc.returncode"""),
    ("code", """from dream_r_jax.evaluation import evaluate
target_dir = os.path.join(WORKDIR, "target_sft", "export")
draft_dir = os.path.join(WORKDIR, "sapo", "export")
if not os.path.exists(os.path.join(draft_dir, "config.json")):
  draft_dir = os.path.join(WORKDIR, "draft_sft", "export")
draft, target, tokenizer = evaluate.load_pair(draft_dir, target_dir)
print("target:", target.cfg.model_type, f"{target.cfg.num_params() / 1e6:.2f}M params")
print("draft: ", draft.cfg.model_type, f"{draft.cfg.num_params() / 1e6:.3f}M params")"""),
    ("md", """## FPSR against target-only, side by side"""),
    ("code", """from dream_r_jax.data import task
from dream_r_jax.evaluation.runner import EvalConfig, Evaluator
examples = [task.example_at(task.get_config("default"), 123, i) for i in range(NUM_EXAMPLES)]
# Half the devices draft, half verify (1 + 1 on a CPU host, 4 + 4 on a v5e-8).
n_draft = max(1, len(jax.devices()) // 2)
# The quickstart's verifier: the target's likelihood of each drafted step (its CPN verdicts
# are not trained enough to judge; see the README). verifier="cpn" is the TBVM default.
ec = EvalConfig(methods=("target", "fpsr"), max_new_tokens=80, num_steps=4,
                max_step_tokens=16, verifier="likelihood", likelihood_threshold=-0.3,
                num_draft_devices=n_draft,
                num_target_devices=len(jax.devices()) - n_draft)
evaluator = Evaluator(draft, target, tokenizer, ec)
results = evaluator.run(examples)
from dream_r_jax.evaluation import report as report_lib
cost = evaluate.per_token_cost(evaluator)
rep = report_lib.build_report(results, examples, {}, cost)
print(report_lib.markdown_table(rep))"""),
    ("code", """# Acceptance of each drafted step, per example (1 accepted, 0 rejected, - not drafted).
for ex, stats, text in zip(examples, results["fpsr"].stats, results["fpsr"].outputs):
  rounds = [" ".join("-" if a < 0 else str(a) for a in rnd) for rnd in stats["accept_by_position"]]
  print(f"{ex['expression']:>24} -> {text.strip().splitlines()[-1] if text.strip() else '':<12} rounds: {' | '.join(rounds)}")"""),
    ("code", """from IPython.display import Image, display
from dream_r_jax.evaluation import plots
os.makedirs(WORKDIR, exist_ok=True)
paths = [plots.plot_acceptance(rep, os.path.join(WORKDIR, "nb_acceptance.png"))]
timeline = next(t for t in results["fpsr"].timelines if t)
paths.append(plots.plot_timeline(timeline, os.path.join(WORKDIR, "nb_timeline.png")))
for p in paths:
  display(Image(filename=p))"""),
    ("md", """## A short profile

The trace holds the named scopes `draft`, `verify`, `rollback`, `fallback` on the two
meshes. Open it with `tensorboard --logdir <trace dir>` or in https://ui.perfetto.dev."""),
    ("code", """import glob, json
trace_dir = os.path.join(WORKDIR, "nb_profile")
with jax.profiler.trace(trace_dir):
  evaluator.run(examples[:1], methods=["fpsr"])
traces = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
summary = dict(preset=PRESET, examples=len(examples),
               target_accuracy=rep["methods"]["target"]["accuracy"],
               fpsr_accuracy=rep["methods"]["fpsr"]["accuracy"],
               fpsr_speedup=rep["methods"]["fpsr"]["speedup_vs_target"],
               fpsr_step_acceptance=rep["methods"]["fpsr"]["step_acceptance"],
               same_outputs=sum(a == b for a, b in zip(results["fpsr"].outputs,
                                                       results["target"].outputs)),
               trace_files=len(traces), plots=[os.path.basename(p) for p in paths])
print("NOTEBOOK_SUMMARY " + json.dumps(summary))"""),
]


def main():
  nb = v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  for i, (kind, src) in enumerate(CELLS):
    cell = v4.new_markdown_cell(src) if kind == "md" else v4.new_code_cell(src)
    cell.id = f"cell-{i:02d}"  # Stable ids: a regenerated notebook diffs only where it changed.
    nb.cells.append(cell)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.ipynb")
  nbformat.write(nb, path)
  print(path)


if __name__ == "__main__":
  main()
