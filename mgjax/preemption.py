"""SIGTERM -> finish the step in flight, checkpoint, exit; the same command resumes.

Spot/preemptible TPU and GPU VMs get a SIGTERM shortly before they are taken away, and so
does a job that Batch or Kubernetes stops. The trainer asks `requested(step)` after every
step and, when it says yes, saves a checkpoint and raises `Preempted`; `main` turns that
into exit status 143 (the shell's "terminated by SIGTERM"), so a `stage1 && stage2` chain
does not run stage 2 on a half-trained stage 1.

One process: our own SIGTERM handler sets a flag. Several processes: every host must stop
at the same step or the collective save would hang, so JAX's preemption sync point (set up
by jax.distributed.initialize, which also handles the signal) decides.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils


class Preempted(RuntimeError):
  """The run saved a checkpoint and stopped on SIGTERM; run the same command to resume."""

  def __init__(self, message: str, *, step: int, checkpoint: str):
    super().__init__(message)
    self.step = step
    self.checkpoint = checkpoint


class PreemptionWatch:
  """A context manager that listens for SIGTERM for the length of a run."""

  def __init__(self):
    self._requested = threading.Event()
    self._previous: Any = None
    self._installed = False

  def __enter__(self) -> "PreemptionWatch":
    # Multi-process runs leave SIGTERM to JAX's coordination service (see module doc);
    # signal handlers can only be installed from the main thread.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._requested.set())
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def requested(self, step: int) -> bool:
    """True when the run should checkpoint and stop after `step` (the same on every host)."""
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False
    return self._requested.is_set()
