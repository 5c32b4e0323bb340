"""Faults a run recovers from, or stops at with one clear message: a second run on the same
workdir, an unfinished stage to start from, lost metrics, Ctrl-C."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import tiny_config
from mgjax import checkpoint, locks, preemption, stages, train

HOLD = """
import sys, time
from mgjax import locks
with locks.exclusive(sys.argv[1], "mgjax_run", "workdir " + sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


def test_a_second_run_on_one_workdir_is_refused_naming_the_first(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  first = subprocess.Popen([sys.executable, "-c", HOLD, workdir], stdout=subprocess.PIPE, text=True)
  try:
    assert first.stdout.readline().strip() == "held"
    with pytest.raises(locks.LockHeld, match=rf"workdir {workdir} is in use by another process: pid {first.pid} "):
      train.run(tiny_config(1, data_dir, steps=2), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # refused before anything else
  finally:
    first.kill()
    first.wait()


def test_an_unfinished_stage_is_not_started_from_unless_a_step_is_named(stage1, tmp_path):
  unfinished = str(tmp_path / "stage1")
  shutil.copytree(stage1.workdir, unfinished)
  os.remove(os.path.join(unfinished, "report.json"))
  config = tiny_config(2, str(tmp_path / "data"), steps=2)
  config.init_from = unfinished
  with pytest.raises(checkpoint.CheckpointError, match=r"has not finished .* --config\.init_from_step=60"):
    train.run(config, str(tmp_path / "stage2"))
  assert not (tmp_path / "data").exists()  # said before any data work
  assert stages.init_checkpoint(unfinished, 30) == os.path.join(unfinished, "checkpoints", "30")
  # A finished run hands on its result, wherever its workdir was moved with its siblings.
  assert stages.init_checkpoint(stage1.workdir) == stage1.checkpoint


def test_drift_guard_survives_a_resume_without_metrics(stage1, data_dir, tmp_path):

  def config():
    c = tiny_config(2, data_dir, steps=4, eval_every=2, checkpoint_every=2)
    c.init_from = stage1.workdir
    c.guard.drift_action = "warn"
    c.guard.drift_threshold = -1.0  # every evaluation is out of bounds: each one is logged
    return c

  whole = str(tmp_path / "whole")
  reference = train.run(config(), whole)
  assert [d["step"] for d in reference.report["drift"]] == [2, 4]

  resumed = str(tmp_path / "resumed")
  shutil.copytree(whole, resumed)
  for name in ("report.json", "metrics.jsonl"):  # killed after step 2's checkpoint, metrics lost
    os.remove(os.path.join(resumed, name))
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  again = train.run(config(), resumed)
  assert again.report["drift"] == reference.report["drift"]
  assert again.val_loss_start == reference.val_loss_start


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_stops_at_once():
  with preemption.PreemptionWatch() as watch:
    assert not watch.requested(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.requested(1) and watch.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  stopped = preemption.Preempted("stopped", step=3, checkpoint="c", signal_name=watch.signal_name)
  assert stopped.exit_status == 130
  assert preemption.Preempted("stopped", step=3, checkpoint="c").exit_status == 143


def test_a_full_disk_ends_in_one_line_saying_what_to_do(data_dir, tmp_path):
  """/dev/full answers every write with ENOSPC, as a full disk does."""
  from conftest import REPO, cli_args

  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").symlink_to("/dev/full")
  result = subprocess.run(cli_args(str(workdir), data_dir, str(tmp_path / "xla"), 2, 2), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no space left on the disk holding ") and "run the same command again" in last
  assert "Traceback" not in result.stderr
