"""Orbax checkpoints of one stage: async saves, the last N kept, strict restores.

Each step directory holds two items: `state` (the train state pytree, restored onto an
abstract target that carries the *current* mesh's shardings, so a checkpoint written on
one mesh loads onto another) and `meta` (JSON: step, data position and seed, the model
config). A checkpoint that cannot be read, or that belongs to a different model, is an
error that names it; the run stops before writing anything, so it is never overwritten.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dream_r_jax.models.params import path_keys


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir is unreadable or does not fit this run."""


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  # Orbax's metadata tree spells every key as a dict key string (named tuple fields and
  # integer layer indices included), so paths are compared in that spelling.
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(path_keys(p)): (tuple(x.shape), str(np.dtype(x.dtype))) for p, x in flat}


def _diff(saved, want, prefix: str = "") -> str:
  """The first few differences between two JSON values, as 'path: saved -> wanted'."""
  if isinstance(saved, dict) and isinstance(want, dict):
    parts = [_diff(saved.get(k), want.get(k), f"{prefix}{k}.")
             for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
    return "; ".join(parts[:5])
  return f"{prefix.rstrip('.') or 'value'}: {saved!r} in the checkpoint, {want!r} now"


class StageCheckpoints:
  """The checkpoints of one stage under `directory` (`<workdir>/<stage>/checkpoints`)."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True,
        # Unfinished saves of an interrupted run are left for the user to look at; the
        # committed steps are what `latest_step` sees either way.
        cleanup_tmp_directories=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers={
                                              "state": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()})

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore(self, step: int, abstract_state, expected_meta: dict[str, Any]):
    """Restores `step` onto `abstract_state` (ShapeDtypeStructs with shardings).

    Args:
      step: the step to restore.
      abstract_state: the target pytree; its shardings decide where arrays land.
      expected_meta: fields of `meta` that must match (e.g. the model config).

    Returns:
      (state, meta).

    Raises:
      CheckpointError: unreadable, or saved by a run with a different model or layout.
    """
    path = self.step_dir(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). It was left "
          "untouched; move it away (or delete it) to continue from an earlier "
          "checkpoint or from scratch, or use another --workdir.") from e
    for key, want in json.loads(json.dumps(expected_meta)).items():
      if meta.get(key) != want:
        diff = _diff(meta.get(key), want)
        raise CheckpointError(
            f"checkpoint {path} does not fit this run: its {key} differs ({diff}). It was "
            "left untouched; use another --workdir or the settings it was written with.")
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved_shapes = _shapes(saved)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {path} has unreadable metadata ({type(e).__name__}: {e}). It was "
          "left untouched; move it away to continue, or use another --workdir.") from e
    want_shapes = _shapes(abstract_state)
    if set(saved_shapes) != set(want_shapes):
      missing = sorted(set(want_shapes) - set(saved_shapes))[:5]
      extra = sorted(set(saved_shapes) - set(want_shapes))[:5]
      raise CheckpointError(
          f"checkpoint {path} does not fit this run's train state (missing {missing}, "
          f"unexpected {extra}). It was left untouched; use another --workdir.")
    bad = [k for k in want_shapes if saved_shapes[k][0] != want_shapes[k][0]]
    if bad:
      k = bad[0]
      raise CheckpointError(
          f"checkpoint {path} does not fit this run: {k} has shape {saved_shapes[k][0]}, "
          f"this run needs {want_shapes[k][0]} ({len(bad)} arrays differ). It was left "
          "untouched; use another --workdir.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {path} could not be restored ({type(e).__name__}: {e}). It was "
          "left untouched; move it away to continue, or use another --workdir.") from e
    logging.info("restored %s", path)
    return restored["state"], meta

  def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> bool:
    """Starts an (async) save of `state` at `step`; returns whether one was started."""
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      logging.info("saving checkpoint %s", self.step_dir(step))
    return saved

  def reached_preemption(self, step: int) -> bool:
    """Whether the JAX preemption service (multi-process runs) saw a SIGTERM."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
