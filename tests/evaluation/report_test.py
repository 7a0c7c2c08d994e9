"""Report arithmetic: confidence intervals, answer checking, per-method summaries."""
import json
import os

import numpy as np
import pytest

from dream_r_jax.evaluation import report
from dream_r_jax.evaluation.runner import MethodResult


def test_wilson_interval_known_values():
  lo, hi = report.wilson_ci95(8, 10)
  # Reference values of the Wilson score interval for 8/10 at 95%.
  assert lo == pytest.approx(0.4902, abs=1e-4)
  assert hi == pytest.approx(0.9433, abs=1e-4)
  assert report.wilson_ci95(0, 0) == (0.0, 0.0)
  lo, hi = report.wilson_ci95(10, 10)
  assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)


@pytest.mark.parametrize("output,answer,ok", [
    ("a = 3\n3 + 4 = 7\nAnswer: 7\n", "7", True),
    ("Answer: -12\n", "-12", True),
    ("Answer: 8\n", "7", False),
    ("3 + 4 = 7\n", "7", False),
])
def test_is_correct(output, answer, ok):
  assert report.is_correct(output, answer) is ok


def _result(name, latencies, outputs, stats):
  return MethodResult(name=name, outputs=outputs, tokens=[[1] * 5 for _ in outputs],
                      latency_s=latencies, stats=stats, placement="p")


def test_summary_speedup_is_median_of_per_example_ratios():
  t = _result("target", [1.0, 2.0, 4.0], ["Answer: 1"] * 3, [{}] * 3)
  stats = [dict(steps_drafted=4, steps_accepted=3, target_forward_passes=3,
                accept_by_position=[[1, 1, 1, 0]]),
           dict(steps_drafted=4, steps_accepted=1, target_forward_passes=5,
                accept_by_position=[[1, 0, -1, -1]]),
           dict(steps_drafted=2, steps_accepted=2, target_forward_passes=1,
                accept_by_position=[[1, 1, -1, -1]])]
  f = _result("fpsr", [0.5, 0.5, 4.0], ["Answer: 1", "Answer: 2", "Answer: 1"], stats)
  s = report.method_summary(f, t.latency_s, ["1", "1", "1"])
  # Ratios 2, 4, 1: the median is 2 (a mean of latencies would give 7/5).
  assert s["speedup_vs_target"] == pytest.approx(2.0)
  assert s["accuracy"] == pytest.approx(2 / 3)
  assert s["step_acceptance"] == pytest.approx(6 / 10)
  assert s["target_forward_passes"] == pytest.approx(3.0)
  # Position j averages only the rounds that drafted a step j (-1 = not drafted).
  assert s["acceptance_by_position"] == [1.0, 2 / 3, 1.0, 0.0]


def test_report_needs_target_and_writes_atomically(tmp_path):
  t = _result("target", [1.0], ["Answer: 1"], [{}])
  with pytest.raises(ValueError, match="target"):
    report.build_report({"fpsr": t}, [{"answer": "1"}], {}, {"ratio": 0.1})
  rep = report.build_report({"target": t}, [{"answer": "1"}], {"k": 4}, {"ratio": 0.1})
  report.write_report(rep, str(tmp_path))
  with open(tmp_path / "report.json") as f:
    back = json.load(f)
  assert back["methods"]["target"]["outputs"] == ["Answer: 1"]
  assert "| target | 1.000 |" in (tmp_path / "report.md").read_text()
  # A failed write leaves the previous report intact.
  bad = dict(rep, methods={"target": dict(rep["methods"]["target"], x=object())})
  with pytest.raises(TypeError):
    report.write_report(bad, str(tmp_path))
  assert json.loads((tmp_path / "report.json").read_text()) == back
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]
