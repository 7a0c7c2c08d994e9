"""Executes notebooks/quickstart.ipynb on the smoke preset and checks what it shows."""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_notebook_runs_and_reports(tmp_path, monkeypatch):
  monkeypatch.setenv("DREAM_R_NOTEBOOK_PRESET", "smoke")
  monkeypatch.setenv("DREAM_R_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("DREAM_R_NOTEBOOK_EXAMPLES", "3")
  nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": REPO}}).execute()
  texts, images = [], 0
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      texts.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
      images += "image/png" in out.get("data", {})
  joined = "\n".join(texts)
  line = next(l for l in joined.splitlines() if l.startswith("NOTEBOOK_SUMMARY "))
  summary = json.loads(line[len("NOTEBOOK_SUMMARY "):])
  assert summary["preset"] == "smoke" and summary["examples"] == 3
  assert summary["trace_files"] >= 1
  assert summary["plots"] == ["nb_acceptance.png", "nb_timeline.png"]
  assert 0.0 <= summary["fpsr_step_acceptance"] <= 1.0
  assert summary["fpsr_speedup"] > 0
  assert images == 2  # both plots were displayed inline
  assert "| fpsr |" in joined and "| target |" in joined
  assert joined.count("rounds:") == 3  # the acceptance of every example was shown
