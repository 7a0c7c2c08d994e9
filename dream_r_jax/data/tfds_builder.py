"""The bundled task as a TFDS dataset (`dream_r_arith`), built and read without TensorFlow.

How it avoids TensorFlow (tensorflow-datasets 4.9.10):
- `code_path` is overridden: TFDS's own lookup needs `importlib_resources`, which is
  not installed (and not needed on Python >= 3.9).
- `DatasetInfo` is constructed directly: `dataset_info_from_configs` would look for
  metadata files next to this module.
- Images are handed to `tfds.features.Image` as PNG bytes encoded with PIL. Given a numpy
  array it would call `tf.image.encode_png`; given bytes it stores them as they are.
- Files are written with `file_format='array_record'` and read with `as_data_source`
  (`tfds.data_source`), whose decoding is NumPy/PIL only (`decode_example_np`).
- `disable_shuffling=True` with integer keys, so that record i of a split is
  `task.example_at(cfg, split_seed, i)`: the files can be checked against the generator,
  and a smaller build is a prefix of a larger one.

Split sizes are part of the builder config: the registered configs (one per task preset)
have the default sizes; other sizes get their own config named e.g.
`default-100-10-10`, so their files never collide with the full dataset's.
"""
from __future__ import annotations

import dataclasses
import fcntl
import io
import os
from typing import Any, Mapping, Optional

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from dream_r_jax.data import task as task_lib

SPLIT_SEEDS = {"train": 1_000, "validation": 2_000, "test": 3_000}
DEFAULT_SPLIT_SIZES = {"train": 20_000, "validation": 500, "test": 500}


# repr=False keeps TFDS's log line about custom configs to the base fields.
@dataclasses.dataclass(eq=False, repr=False)
class ArithConfig(tfds.core.BuilderConfig):
  """A task preset and the number of examples in each split."""
  task: task_lib.TaskConfig = dataclasses.field(default_factory=task_lib.TaskConfig)
  split_sizes: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))


def arith_config(preset: str = "default",
                 split_sizes: Optional[Mapping[str, int]] = None) -> ArithConfig:
  """The builder config for a task preset with the given split sizes."""
  cfg = task_lib.get_config(preset)
  sizes = dict(DEFAULT_SPLIT_SIZES)
  sizes.update(split_sizes or {})
  if set(sizes) != set(SPLIT_SEEDS) or any(int(n) <= 0 for n in sizes.values()):
    raise ValueError(f"split_sizes must give a positive size for each of "
                     f"{sorted(SPLIT_SEEDS)}, got {dict(split_sizes or {})}")
  name = preset
  if sizes != DEFAULT_SPLIT_SIZES:
    name += "-" + "-".join(str(sizes[s]) for s in SPLIT_SEEDS)
  return ArithConfig(name=name, task=cfg, split_sizes=sizes,
                     description=f"task preset {preset!r}, split sizes {sizes}")


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(image).save(buffer, format="png")
  return buffer.getvalue()


class DreamRArith(tfds.core.GeneratorBasedBuilder):
  """Procedurally generated multimodal arithmetic reasoning (DESIGN.md section 8)."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Each tile shows its letter (the question names tiles by letter).",
                   "1.2.0": "Tile labels on a per-letter colour; default config: three "
                            "operands, + and - (learnable by the quickstart target)."}
  BUILDER_CONFIGS = [arith_config(p) for p in task_lib.PRESETS]
  DEFAULT_CONFIG_NAME = "default"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 derives this from the package and, on Python >= 3.9, touches the
    # optional `importlib_resources` module on the way; the answer is just this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config.task
    features = {
        "id": tfds.features.Text(),
        "question": tfds.features.Text(),
        "steps": tfds.features.Text(),  # Joined by the step delimiter.
        "answer": tfds.features.Text(),
        "expression": tfds.features.Text(),
        "values": tfds.features.Tensor(shape=(cfg.num_tiles,), dtype=np.int32),
    }
    if cfg.multimodal:
      features["image"] = tfds.features.Image(shape=cfg.image_shape, encoding_format="png")
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedurally generated multimodal arithmetic reasoning: coloured "
                    "tiles carry digits, the solution is one operation a step.",
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,
        homepage="https://arxiv.org/abs/2605.28678",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLIT_SEEDS}

  def _generate_examples(self, split: str):
    cfg = self.builder_config.task
    for index in range(int(self.builder_config.split_sizes[split])):
      example = task_lib.example_at(cfg, SPLIT_SEEDS[split], index)
      record = {k: example[k] for k in ("id", "question", "answer", "expression")}
      record["steps"] = task_lib.STEP_DELIMITER.join(example["steps"])
      record["values"] = np.asarray(example["values"], np.int32)
      if cfg.multimodal:
        record["image"] = _png(example["image"])
      yield index, record


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A stored record back in the example schema (str fields, step list, image or None)."""
  steps = _text(record["steps"])
  return {
      "id": _text(record["id"]),
      "question": _text(record["question"]),
      "image": np.asarray(record["image"], np.uint8) if "image" in record else None,
      "steps": steps.split(task_lib.STEP_DELIMITER) if steps else [],
      "answer": _text(record["answer"]),
      "values": [int(v) for v in record["values"]],
      "expression": _text(record["expression"]),
  }


class TaskSource:
  """Random access to decoded examples of one split (grain `RandomAccessDataSource`)."""

  def __init__(self, data_source, num_examples: Optional[int] = None):
    self._source = data_source
    total = len(data_source)
    self._len = total if num_examples is None else min(int(num_examples), total)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -self._len <= index < self._len:
      raise IndexError(f"index {index} out of range for {self._len} examples")
    return decode_record(self._source[index % self._len])

  def __repr__(self) -> str:
    return f"TaskSource({self._source!r}, len={self._len})"


def builder(preset: str = "default", data_dir: Optional[str] = None,
            split_sizes: Optional[Mapping[str, int]] = None) -> DreamRArith:
  """The builder of a preset; registered configs are passed by name (no TFDS warning)."""
  config = arith_config(preset, split_sizes)
  if config.name in DreamRArith.builder_configs:
    return DreamRArith(config=config.name, data_dir=data_dir)
  return DreamRArith(config=config, data_dir=data_dir)


def load_task(config_name: str, split: str, data_dir: str,
              num_examples: Optional[int] = None,
              split_sizes: Optional[Mapping[str, int]] = None) -> TaskSource:
  """A split of the bundled task, generated into `data_dir` on first use.

  Args:
    config_name: a task preset ("default", "text", "easy", "hard").
    split: "train", "validation" or "test".
    data_dir: the TFDS data directory (files go to
      `data_dir/dream_r_arith/<config>/<version>/`).
    num_examples: if set, only the first `num_examples` records are exposed.
    split_sizes: per-split sizes to build (default `DEFAULT_SPLIT_SIZES`); e.g.
      {"train": 256, "validation": 32, "test": 32} for tests and smoke runs.

  Returns:
    A random-access source of example dicts with numpy images.
  """
  if split not in SPLIT_SEEDS:
    raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_SEEDS)}")
  os.makedirs(data_dir, exist_ok=True)
  config = arith_config(config_name, split_sizes)
  lock_path = os.path.join(data_dir, f".dream_r_arith-{config.name}.lock")
  # Processes sharing a data_dir (several hosts' processes on one machine) would race to
  # rename their finished builds onto the same directory; one builds, the rest wait.
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      ds_builder = builder(config_name, data_dir, split_sizes)
      ds_builder.download_and_prepare(file_format="array_record")
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return TaskSource(ds_builder.as_data_source(split), num_examples)
