"""A build worker process killed mid-build (the out-of-memory killer, an operator) stops
the build with one message naming the records it may have been preparing, instead of
leaving the build waiting forever for the dead worker's results."""

import json
import multiprocessing
import os
import pathlib
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mgjax.data import dedup, filters, prepare

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_hang():
  """Fails the test instead of blocking the suite, were the build to wait forever."""

  def alarm(*_):
    raise TimeoutError("the build hung after its worker was killed")

  previous = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(300)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def _lima(path: pathlib.Path, n: int) -> None:
  path.write_text("".join(
      json.dumps({"conversations": [f"Question number {k}: what is {k} plus {k}?", f"It is {2 * k}."]}) + "\n"
      for k in range(n)))


def test_a_killed_worker_fails_the_prepared_records_naming_them(tmp_path):
  _lima(tmp_path / "train.jsonl", 4000)  # 16 batches, more than are ever in flight
  specs = [dict(name="src", format="lima", path=str(tmp_path / "train.jsonl"), image_root=None)]
  args = (None, dedup.DedupConfig(), {"src": filters.QualityConfig(languages=None)}, str(tmp_path), None)
  before = set(multiprocessing.active_children())
  items = prepare.prepare_locally(specs, args, workers=2)
  next(items)  # the pool is up and working
  workers = [p for p in multiprocessing.active_children() if p not in before]
  assert len(workers) == 2
  os.kill(workers[0].pid, signal.SIGKILL)
  start = time.time()
  with pytest.raises(prepare.WorkerDied) as died:
    for _ in items:
      pass
  assert time.time() - start < 30
  message = str(died.value)
  assert "a build worker process died (killed, most often by the out-of-memory killer" in message
  assert f"while preparing the records from {tmp_path / 'train.jsonl'}: line " in message
  assert "fewer workers (the data config's num_workers) or more memory" in message


def test_a_workers_result_crosses_the_pipe_in_one_write(tmp_path):
  """A result the pool reads in several pieces hangs the build for good when its worker is
  killed between two of them: the pool's reader waits for the rest. Pipe writes up to
  PIPE_BUF bytes are whole, so what a worker sends back must stay under it."""
  _lima(tmp_path / "train.jsonl", 300)
  specs = [dict(name="src", format="lima", path=str(tmp_path / "train.jsonl"), image_root=None)]
  prepare._init_worker(None, dedup.DedupConfig(), {"src": filters.QualityConfig(languages=None)}, str(tmp_path), None)
  batch = next(prepare._batches(specs))
  sent = prepare._prepare_batch_to_file(batch)
  assert len(pickle.dumps(sent)) < select.PIPE_BUF
  prepared = prepare._load_prepared(sent)
  assert len(prepared) == len(batch) == 256
  assert [entry.origin for entry, _ in prepared] == [record.origin for record in batch]
  assert all(signature is not None for _, signature in prepared)


_CONFIG = """
import ml_collections

def get_config():
  c = ml_collections.ConfigDict()
  c.name = "killed"
  c.version = "1.0.0"
  c.seed = 0
  c.val_per_category = {{"text": 1}}
  c.sources_root = {root!r}
  c.sources = [dict(name="src", format="lima", path="train.jsonl", filters=dict(languages=None))]
  c.tokenizer = ml_collections.ConfigDict(dict(train=False, path=""))
  c.num_workers = 2
  return c
"""


def _pool_workers(pid: int) -> list[int]:
  """The build's worker processes: its children, but for multiprocessing's resource tracker."""
  children = []
  for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
    children += (task / "children").read_text().split()
  cmdlines = {}
  for child in children:
    try:
      cmdlines[int(child)] = pathlib.Path(f"/proc/{child}/cmdline").read_bytes()
    except OSError:
      pass  # gone already
  return [p for p, cmd in cmdlines.items() if b"resource_tracker" not in cmd]


def test_the_build_command_stops_with_one_line_when_a_worker_is_killed(tmp_path):
  _lima(tmp_path / "train.jsonl", 60_000)  # long enough to be killed while cleaning
  (tmp_path / "killed.py").write_text(textwrap.dedent(_CONFIG.format(root=str(tmp_path))))
  proc = subprocess.Popen(
      [sys.executable, "-m", "mgjax.data.build", f"--config={tmp_path / 'killed.py'}", f"--data_dir={tmp_path}/data"],
      cwd=REPO, env={
          **os.environ, "HF_HUB_OFFLINE": "1"
      }, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 60
    while len(workers := _pool_workers(proc.pid)) < 2:
      assert proc.poll() is None and time.time() < deadline, "the build never started its workers"
      time.sleep(0.2)
    time.sleep(0.5)
    os.kill(workers[0], signal.SIGKILL)
    # Seconds here; minutes allowed for a loaded machine (the suite's other worker), while a
    # build that waits forever still fails, with what it had printed.
    try:
      _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      proc.kill()
      pytest.fail(f"the build still ran 240 s after its worker was killed:\n{proc.communicate()[1][-3000:]}")
  finally:
    proc.kill()
  assert proc.returncode == 1
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: a build worker process died (killed, most often by the out-of-memory killer")
  assert f"{tmp_path / 'train.jsonl'}: line " in last
