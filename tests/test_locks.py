"""Workdir and build locks: a second holder is refused with the first named; a killed holder
leaves nothing stale."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mgjax import locks

HOLD = """
import sys, time
from mgjax import locks
with locks.exclusive(sys.argv[1], "run", "workdir " + sys.argv[1]):
  print("held", flush=True)
  time.sleep(60)
"""


def _hold(directory):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, directory], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_holder_is_refused_naming_the_first_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
  directory = str(tmp_path / "w")
  proc = _hold(directory)
  try:
    with pytest.raises(locks.LockHeld, match=rf"workdir {directory} is in use by another process: pid {proc.pid} on "):
      with locks.exclusive(directory, "run", f"workdir {directory}"):
        pass
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # The kernel dropped the dead holder's lock: the next run goes ahead at once.
  start = time.monotonic()
  with locks.exclusive(directory, "run", f"workdir {directory}"):
    assert os.path.exists(os.path.join(directory, "run.lock"))
  assert time.monotonic() - start < 1.0


def test_the_lock_is_released_after_the_body_even_when_it_raises(tmp_path):
  directory = str(tmp_path)
  with pytest.raises(ValueError):
    with locks.exclusive(directory, "run", "workdir"):
      raise ValueError("boom")
  with locks.exclusive(directory, "run", "workdir"):
    pass
