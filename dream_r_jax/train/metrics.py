"""Run telemetry: TensorBoard scalars (no TensorFlow), a console line with ETA, traces.

TensorBoard event files are written with `tensorboard`'s own pure-Python record writer,
so nothing here needs TensorFlow; `tensorboard --logdir <workdir>` shows every stage.
"""
from __future__ import annotations

import os
import time
from typing import Mapping, Optional

import jax
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class ScalarWriter:
  """Scalars to a TensorBoard event file under `logdir` (process 0 only writes)."""

  def __init__(self, logdir: str, *, enabled: bool = True):
    self.logdir = logdir
    self._writer = EventFileWriter(logdir) if enabled else None

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """A periodic console line: step, loss, lr, grad norm, tokens/s and ETA.

  Throughput and ETA use the steps since the first logged step, so compilation of the
  first step does not distort them.
  """

  def __init__(self, stage: str, total_steps: int, start_step: int):
    self.stage = stage
    self.total = total_steps
    self._t0: Optional[float] = None
    self._s0 = start_step
    self._tokens = 0.0

  def update(self, step: int, tokens: float) -> None:
    if self._t0 is None:
      self._t0, self._s0, self._tokens = time.time(), step, 0.0
    else:
      self._tokens += tokens

  def tokens_per_second(self) -> float:
    if self._t0 is None:
      return 0.0
    dt = time.time() - self._t0
    return self._tokens / dt if dt > 0 else 0.0

  def line(self, step: int, metrics: Mapping[str, float]) -> str:
    done = step - self._s0
    dt = time.time() - (self._t0 or time.time())
    eta = (self.total - step) * dt / done if done > 0 else float("nan")
    eta_text = _duration(eta) if done > 0 else "?"
    return (f"[{self.stage}] step {step}/{self.total} ({100.0 * step / self.total:.0f}%) "
            f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"grad_norm {metrics['grad_norm']:.3f} tokens/s {self.tokens_per_second():.0f} "
            f"eta {eta_text}")


class ProfileWindow:
  """A `jax.profiler` trace of steps [start, stop) into `logdir` (start == stop: off)."""

  def __init__(self, logdir: str, start: int, stop: int):
    self.logdir, self.start, self.stop = logdir, start, stop
    self._active = False

  def before_step(self, step: int) -> None:
    """`step` is the 1-based index of the step about to run."""
    if self.start < self.stop and step == max(self.start, 1) and not self._active:
      os.makedirs(self.logdir, exist_ok=True)
      jax.profiler.start_trace(self.logdir)
      self._active = True
      logging.info("profiling steps [%d, %d) into %s", self.start, self.stop, self.logdir)

  def after_step(self, step: int, outputs) -> None:
    if self._active and step + 1 >= self.stop:
      self.close(outputs)

  def close(self, outputs=None) -> None:
    if self._active:
      if outputs is not None:
        jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self._active = False


class _DropLibraryInfo:
  """absl log filter: INFO records from chatty libraries (Orbax, TFDS) are dropped."""

  def __init__(self, prefixes):
    self.prefixes = tuple(prefixes)

  def filter(self, record) -> bool:
    if record.levelno > 20:  # logging.INFO
      return True
    return not any(p in record.pathname for p in self.prefixes)


def quiet_library_logs(prefixes=("/orbax/", "/tensorflow_datasets/", "/etils/")) -> None:
  """Keeps the console to this project's progress lines; warnings still pass."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.get_absl_handler().addFilter(_DropLibraryInfo(prefixes))
