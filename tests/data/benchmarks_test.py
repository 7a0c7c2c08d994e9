"""Tests of the MathVista / MMMU JSONL adapter on the bundled fixture."""
import json
import os

import numpy as np
import pytest

from dream_r_jax.data import benchmarks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bench")


def test_mathvista_records():
  source = benchmarks.load_benchmark(os.path.join(FIXTURES, "mathvista.jsonl"))
  assert len(source) == 2
  first, second = source[0], source[1]
  assert first["id"] == "1" and first["answer"] == "red" and first["steps"] == []
  assert first["question"].startswith("Hint:") and "(B) blue" in first["question"]
  assert first["choices"] == ["red", "blue"]
  image = first["image"]
  assert image.dtype == np.uint8 and image.shape == (28, 56, 3)
  assert image[0, 0].tolist() == [230, 25, 75] and image[0, 40].tolist() == [0, 130, 200]
  assert second["answer"] == "1" and second["choices"] == []  # JSON int -> str.
  assert second["image"].shape == (30, 20, 3) and second["image"][0, 0].tolist() == [1, 2, 3]


def test_mmmu_record():
  (example,) = list(benchmarks.load_benchmark(os.path.join(FIXTURES, "mmmu.jsonl")))
  assert example["id"] == "validation_Math_1" and example["answer"] == "B"
  assert example["choices"] == ["100", "200", "250"]
  assert example["question"].endswith("Choices: (A) 100 (B) 200 (C) 250")
  # A grayscale PNG comes back as RGB.
  assert example["image"].shape == (28, 28, 3) and (example["image"] == 200).all()


def _write(tmp_path, records, name="bench.jsonl"):
  path = tmp_path / name
  with open(path, "w") as f:
    for record in records:
      f.write(record if isinstance(record, str) else json.dumps(record))
      f.write("\n")
  return str(path)


def test_text_only_record_and_default_id(tmp_path):
  path = _write(tmp_path, [{"question": "1 + 1?", "answer": 2}, ""])
  (example,) = list(benchmarks.load_benchmark(path))
  assert example["image"] is None and example["id"] == "bench-1" and example["answer"] == "2"


def test_max_examples(tmp_path):
  path = _write(tmp_path, [{"question": f"q{i}", "answer": i} for i in range(5)])
  assert len(benchmarks.load_benchmark(path, max_examples=3)) == 3


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"question": "q"}', "answer"),
    ('{"answer": "A"}', "no question"),
    ('{"question": "q", "answer": "A", "options": "not a list"}', "not a list"),
    ('{"question": "q", "answer": "A", "image": "images/missing.png"}', "not found"),
    ('{"question": "q", "answer": "A", "image_1": "nope.png"}', "nope.png"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
  path = _write(tmp_path, [{"question": "fine", "answer": "1"}, line])
  with pytest.raises(benchmarks.BenchmarkError, match=message) as info:
    benchmarks.load_benchmark(path)
  assert f"{path}:2" in str(info.value)


def test_missing_or_empty_file(tmp_path):
  with pytest.raises(benchmarks.BenchmarkError, match="cannot open"):
    benchmarks.load_benchmark(str(tmp_path / "absent.jsonl"))
  with pytest.raises(benchmarks.BenchmarkError, match="no records"):
    benchmarks.load_benchmark(_write(tmp_path, ["", "  "]))
