"""Tests of the TFDS builder: a tiny build read back equals the generator's examples."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dream_r_jax.data import task
from dream_r_jax.data import tfds_builder

_VERSION = str(tfds_builder.DreamRArith.VERSION)

SIZES = {"train": 6, "validation": 3, "test": 4}


def _equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    if key == "image" and a[key] is not None:
      assert np.array_equal(a[key], b[key]) and a[key].dtype == b[key].dtype
    else:
      assert a[key] == b[key], key


@pytest.mark.parametrize("preset", ["default", "text"])
def test_build_and_read_back_equals_generator(tmp_path, preset):
  cfg = task.get_config(preset)
  for split, size in SIZES.items():
    source = tfds_builder.load_task(preset, split, str(tmp_path), split_sizes=SIZES)
    assert len(source) == size
    for i in range(size):
      expected = task.example_at(cfg, tfds_builder.SPLIT_SEEDS[split], i)
      _equal(source[i], expected)
  files = sorted(os.listdir(tmp_path / "dream_r_arith" / f"{preset}-6-3-4" / _VERSION))
  assert sum(".array_record" in f for f in files) == 3


def test_splits_are_disjoint_and_reads_reuse_the_build(tmp_path):
  sources = {s: tfds_builder.load_task("easy", s, str(tmp_path), split_sizes=SIZES)
             for s in SIZES}
  questions = {s: {(src[i]["question"], tuple(src[i]["values"])) for i in range(len(src))}
               for s, src in sources.items()}
  assert not questions["train"] & questions["test"]
  assert not questions["validation"] & questions["test"]
  data = tmp_path / "dream_r_arith" / "easy-6-3-4" / _VERSION
  stamp = os.path.getmtime(data / "dream_r_arith-train.array_record-00000-of-00001")
  again = tfds_builder.load_task("easy", "train", str(tmp_path), split_sizes=SIZES,
                                 num_examples=2)
  assert len(again) == 2 and again[1]["id"] == sources["train"][1]["id"]
  assert os.path.getmtime(data / "dream_r_arith-train.array_record-00000-of-00001") == stamp
  with pytest.raises(IndexError):
    again[2]


def test_tfds_data_source_reads_the_files(tmp_path):
  tfds_builder.load_task("default", "test", str(tmp_path), split_sizes=SIZES)
  raw = tfds.data_source("dream_r_arith/default-6-3-4", split="test", data_dir=str(tmp_path))
  decoded = tfds_builder.decode_record(raw[2])
  seed = tfds_builder.SPLIT_SEEDS["test"]
  _equal(decoded, task.example_at(task.TaskConfig.default(), seed, 2))


def test_config_names_and_errors(tmp_path):
  assert tfds_builder.arith_config("hard").name == "hard"
  assert tfds_builder.arith_config("hard", {"train": 10}).name == "hard-10-500-500"
  assert [c.name for c in tfds_builder.DreamRArith.BUILDER_CONFIGS] == list(task.PRESETS)
  with pytest.raises(ValueError, match="split_sizes"):
    tfds_builder.arith_config("default", {"train": 0})
  with pytest.raises(ValueError, match="split_sizes"):
    tfds_builder.arith_config("default", {"dev": 3})
  with pytest.raises(ValueError, match="unknown split"):
    tfds_builder.load_task("default", "dev", str(tmp_path))
  with pytest.raises(ValueError, match="unknown task preset"):
    tfds_builder.load_task("nope", "train", str(tmp_path))
