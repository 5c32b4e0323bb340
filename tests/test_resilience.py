"""Faults a run recovers from, or stops at with one clear message: a second run on the same
workdir, an unfinished stage to start from, a result checkpoint gone, a torn report, lost
metrics, step counts that cannot run, a read-only workdir, Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, tiny_config
from mgjax import base_config, checkpoint, decode, locks, preemption, reports, stages, train

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


def test_init_from_a_run_whose_result_checkpoint_is_gone_is_refused(stage1, tmp_path):
  """report.json names checkpoints/60 as the result; it was deleted. Starting from the latest
  one left would silently start stage 2 elsewhere: refused, naming both ways on."""
  run = str(tmp_path / "stage1")
  shutil.copytree(stage1.workdir, run)
  shutil.rmtree(os.path.join(run, "checkpoints", "60"))
  config = tiny_config(2, str(tmp_path / "data"), steps=2)
  config.init_from = run
  gone = os.path.join(run, "checkpoints", "60")
  with pytest.raises(checkpoint.ResultMissing) as refused:
    train.run(config, str(tmp_path / "stage2"))
  message = str(refused.value)
  assert f"names {gone} as the run's result, but that checkpoint is gone (its checkpoints: steps 30)" in message
  assert "--config.init_from_step=30" in message
  assert not (tmp_path / "data").exists()  # said before any data work
  with pytest.raises(checkpoint.ResultMissing, match="--config.init_from_step=30"):
    decode.load_workdir(run)  # predict and export say the same, not "nothing trained"
  # Named, the checkpoint left is taken.
  assert stages.init_checkpoint(run, 30) == os.path.join(run, "checkpoints", "30")


@pytest.mark.parametrize("overrides, named", [
    (dict(steps=0), "train.steps=0 must be at least 1"),
    (dict(steps=-5), "train.steps=-5 must be at least 1"),
    (dict(steps=4, eval_every=0), "train.eval_every=0 must be at least 1"),
    (dict(steps=4, checkpoint_every=0, log_every=0), "train.checkpoint_every=0 must be at least 1 (checkpoints also "
     "come with every evaluation); train.log_every=0 must be at least 1"),
])
def test_step_counts_that_cannot_run_are_refused_before_any_work(tmp_path, overrides, named):
  config = tiny_config(1, str(tmp_path / "data"), **overrides)
  with pytest.raises(base_config.ConfigError, match=f"^config cannot run: {__import__('re').escape(named)}"):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_step_counts_that_cannot_run_end_the_command_in_one_line(tmp_path):
  result = subprocess.run([
      sys.executable, "-m", "mgjax.main", "--config=configs/stage1.py:data=sample:tiny", f"--workdir={tmp_path}/run",
      f"--config.data.data_dir={tmp_path}/data", "--config.train.steps=0", "--config.train.eval_every=0"
  ], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config cannot run: train.steps=0 must be at least 1 (or set train.epochs); train.eval_every=0 must "
      "be at least 1 (to evaluate only at the end, set it to train.steps). Fix them with --config.<field>=VALUE.")
  assert "Traceback" not in result.stderr


def test_a_torn_report_is_set_aside_and_written_again_from_the_checkpoints(stage1, data_dir, tmp_path, capsys):
  """A kill or a full disk while report.json was written (before writes were atomic), or a
  hand edit: the next stage says which file and what to run; the stage's own command
  finishes the run again from its last checkpoint and writes the same report."""
  run = str(tmp_path / "stage1")
  shutil.copytree(stage1.workdir, run)
  whole = open(os.path.join(run, "report.json")).read()
  open(os.path.join(run, "report.json"), "w").write(whole[:len(whole) // 2])

  with pytest.raises(
      reports.ReportDamaged, match=rf"{run}/report.json is damaged \(JSONDecodeError: .*"
      rf"Run that stage's command again with --workdir={run}: it rebuilds the report"):
    stages.init_checkpoint(run)
  again = train.run(tiny_config(1, data_dir, steps=60, eval_every=30, decode=True), run)
  assert f"warning: {run}/report.json is damaged: moved to {run}/report.json.damaged" in capsys.readouterr().out
  assert json.loads(open(os.path.join(run, "report.json")).read()) == json.loads(whole) == again.report
  assert open(os.path.join(run, "report.json.damaged")).read() == whole[:len(whole) // 2]
  assert stages.init_checkpoint(run) == os.path.join(run, "checkpoints", "60")


def _read_only(workdir: str, command: list[str]) -> subprocess.CompletedProcess:
  """`command` with `workdir` mounted read-only (a private mount namespace: nothing else sees
  it), as on a read-only disk; root ignores file permissions, so chmod would not do."""
  script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
  return subprocess.run(["unshare", "-rm", "sh", "-c", script, workdir, *command], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def test_a_read_only_workdir_prints_a_finished_runs_summary_and_refuses_an_unfinished_one(stage1, tmp_path):
  if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
    pytest.skip("no unshare -rm (user and mount namespaces) on this machine to mount a folder read-only")
  finished = str(tmp_path / "finished")
  shutil.copytree(stage1.workdir, finished)
  command = [sys.executable, "-m", "mgjax.main", "--config=configs/stage1.py:data=sample:tiny", "--workdir=WORKDIR"]
  asked = _read_only(finished, [c.replace("WORKDIR", finished) for c in command])
  assert asked.returncode == 0, asked.stderr[-2000:]
  # What it trained, as the run itself said it (not "0 of 0 params trained").
  assert "stage 1: 60 steps in " in asked.stdout
  assert f", {stage1.num_trainable:,} of {stage1.num_params:,} params trained" in asked.stdout
  assert f"result     {stage1.checkpoint.replace(stage1.workdir, finished)}" in asked.stdout

  unfinished = str(tmp_path / "unfinished")
  shutil.copytree(stage1.workdir, unfinished)
  os.remove(os.path.join(unfinished, "report.json"))
  refused = _read_only(unfinished, [c.replace("WORKDIR", unfinished) for c in command])
  assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
  assert refused.stderr.strip().splitlines()[-1].startswith(f"error: workdir {unfinished} cannot be written "
                                                            "(Read-only file system: ")
