"""SIGTERM or Ctrl-C -> finish the step in flight, checkpoint, exit; the same command resumes.

Spot/preemptible TPU and GPU VMs get a SIGTERM shortly before they are taken away, and so
does a job that Batch or Kubernetes stops. The trainer asks `requested(step)` after every
step and, when it says yes, saves a checkpoint and raises `Preempted`; `main` turns that
into exit status 143 (the shell's "terminated by SIGTERM"), so a `stage1 && stage2` chain
does not run stage 2 on a half-trained stage 1.

One process: our own SIGTERM handler sets a flag. Several processes: every host must stop
at the same step or the collective save would hang, so JAX's preemption sync point (set up
by jax.distributed.initialize, which also handles the signal) decides.

Ctrl-C (SIGINT, one process) is handled the same way, with exit status 130; a second
Ctrl-C stops at once (KeyboardInterrupt, which `main` reports in one line), and the last
complete checkpoint resumes.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils


class Preempted(RuntimeError):
  """The run saved a checkpoint and stopped on SIGTERM or Ctrl-C; run the same command to resume."""

  def __init__(self, message: str, *, step: int, checkpoint: str, signal_name: str = "SIGTERM"):
    super().__init__(message)
    self.step = step
    self.checkpoint = checkpoint
    self.signal_name = signal_name

  @property
  def exit_status(self) -> int:
    """The shell's status for death by that signal: 143 (SIGTERM) or 130 (SIGINT)."""
    return 130 if self.signal_name == "SIGINT" else 143


class PreemptionWatch:
  """A context manager that listens for SIGTERM (and Ctrl-C) for the length of a run.

  `signal_name` is the signal that asked the run to stop ("SIGTERM" or "SIGINT")."""

  def __init__(self):
    self._requested = threading.Event()
    self._previous: dict[int, Any] = {}
    self.signal_name = "SIGTERM"

  def _on_sigterm(self, signum, frame) -> None:
    self._requested.set()

  def _on_sigint(self, signum, frame) -> None:
    self.signal_name = "SIGINT"
    self._requested.set()
    # The next Ctrl-C is Python's default: a KeyboardInterrupt that stops at once.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(
        "\ninterrupted (Ctrl-C): finishing the step in flight and saving a checkpoint; "
        "press Ctrl-C again to stop at once without saving", file=sys.stderr, flush=True)

  def __enter__(self) -> "PreemptionWatch":
    # Multi-process runs leave SIGTERM to JAX's coordination service (see module doc);
    # signal handlers can only be installed from the main thread.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {
          signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm),
          signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint)
      }
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def requested(self, step: int) -> bool:
    """True when the run should checkpoint and stop after `step` (the same on every host)."""
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False
    return self._requested.is_set()
