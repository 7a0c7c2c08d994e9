"""Matplotlib figures of an evaluation: tau sweep, acceptance per position, FPSR timeline."""
from __future__ import annotations

import os
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


_SWEEP_LABELS = {"tau": "tau (CPN acceptance threshold)",
                 "likelihood_threshold": "minimum mean log-prob (likelihood verifier)"}


def plot_tau_sweep(sweep: dict, path: str, parameter: str = "tau") -> str:
  """Speedup and accuracy of `fpsr` against the verifier's threshold (tau for cpn)."""
  taus = sorted(float(t) for t in sweep)
  speed = [sweep[str(t)]["speedup_vs_target"] for t in taus]
  acc = [sweep[str(t)]["accuracy"] for t in taus]
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(taus, speed, "o-", color="tab:blue", label="speedup vs target")
  ax.set_xlabel(_SWEEP_LABELS.get(parameter, parameter))
  ax.set_ylabel("median speedup (x)", color="tab:blue")
  ax2 = ax.twinx()
  ax2.plot(taus, acc, "s--", color="tab:red", label="accuracy")
  ax2.set_ylabel("accuracy", color="tab:red")
  ax2.set_ylim(0, 1.05)
  ax.set_title("FPSR: speed and accuracy against the threshold")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_acceptance(report: dict, path: str) -> str:
  """Acceptance rate per step position (bars) and the verdict-score histogram."""
  methods = {k: v for k, v in report["methods"].items() if v.get("acceptance_by_position")}
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
  width = 0.8 / max(1, len(methods))
  for i, (name, m) in enumerate(methods.items()):
    rates = [r if r is not None else 0.0 for r in m["acceptance_by_position"]]
    ax1.bar([j + i * width for j in range(len(rates))], rates, width=width, label=name)
    if m.get("verdict_scores"):
      ax2.hist(m["verdict_scores"], bins=20, range=(0, 1), alpha=0.6, label=name)
  ax1.set_xlabel("step position in chain")
  ax1.set_ylabel("acceptance rate")
  ax1.set_ylim(0, 1.05)
  ax1.legend(fontsize=8)
  ax1.set_title("acceptance per step position")
  ax2.set_xlabel("CPN = P(yes) / (P(yes) + P(no))")
  ax2.set_ylabel("drafted steps")
  ax2.set_title("verdict histogram")
  if methods:
    ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_timeline(timeline: list, path: str, title: Optional[str] = None) -> str:
  """Gantt chart of one FPSR run: (phase, role, start_s, end_s) on the two meshes."""
  colors = {"prefill": "tab:gray", "draft": "tab:green", "draft (speculative)": "tab:olive",
            "verify+fallback": "tab:blue", "sync": "tab:orange"}
  fig, ax = plt.subplots(figsize=(8, 2.4))
  rows = {"target": 1, "draft": 0}
  seen = set()
  for phase, role, start, end in timeline:
    label = phase if phase not in seen else None
    seen.add(phase)
    ax.barh(rows[role], (end - start) * 1e3, left=start * 1e3, height=0.6,
            color=colors.get(phase, "tab:purple"), label=label, edgecolor="black", lw=0.3)
  ax.set_yticks([0, 1])
  ax.set_yticklabels(["draft mesh", "target mesh"])
  ax.set_xlabel("time (ms)")
  ax.set_title(title or "FPSR rounds")
  ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.35))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_plots(report: dict, timeline: Optional[list], workdir: str) -> list[str]:
  os.makedirs(workdir, exist_ok=True)
  paths = [plot_acceptance(report, os.path.join(workdir, "acceptance.png"))]
  if report.get("tau_sweep"):
    paths.append(plot_tau_sweep(report["tau_sweep"], os.path.join(workdir, "tau_sweep.png"),
                                report.get("tau_sweep_parameter", "tau")))
  if timeline:
    paths.append(plot_timeline(timeline, os.path.join(workdir, "fpsr_timeline.png")))
  return paths
