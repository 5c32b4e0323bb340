"""Multi-host: 2 processes x 4 CPU devices on localhost compute what 1 process x 8 devices does.

Each process is a real `python -m mgjax.main --distributed` with its own id, talking to the
other through jax.distributed's coordinator (gloo collectives on CPU), reading its own share
of every global batch, and saving/restoring its share of the checkpoint with orbax.
"""

import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest

from conftest import REPO, cli_args, load_params
from mgjax import metrics, reports

STEPS, CHECKPOINT_EVERY = 6, 3
NEW_TOKENS = 8  # decoded per answer: enough to score, few steps to run


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def command(workdir: str, data_dir: str, cache: str) -> list[str]:
  # Packed rows are filled from each process's own share of the examples, so packed
  # global batches depend on the process count (see pipeline.train_iterator).
  # Decoding (the report's scores) runs too: on two hosts it is one program over both.
  return cli_args(workdir, data_dir, cache, STEPS, CHECKPOINT_EVERY) + [
      "--config.data.packing=False", "--config.eval.decode=True", f"--config.eval.max_new_tokens={NEW_TOKENS}",
      "--config.eval.batch_size=8"
  ]


def start_processes(workdir: str, data_dirs: list[str], cache: str, devices_each: int) -> list[tuple[int, str]]:
  """(exit status, output) of each process; process i reads data_dirs[i]."""
  num_processes = len(data_dirs)
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}", "PYTHONUNBUFFERED": "1"}
  if num_processes > 1:
    address = f"localhost:{free_port()}"
    procs = [
        subprocess.Popen(
            command(workdir, data_dir, cache) + [
                "--distributed", f"--coordinator_address={address}", f"--num_processes={num_processes}",
                f"--process_id={i}"
            ], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, data_dir in enumerate(data_dirs)
    ]
  else:
    procs = [
        subprocess.Popen(command(workdir, data_dirs[0], cache), cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    ]
  try:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  # Whole outputs beside the workdir (a failure message shows only their ends).
  for i, out in enumerate(outputs):
    with open(f"{workdir}.process{i}.log", "a") as f:
      f.write(out)
  return [(p.returncode, out) for p, out in zip(procs, outputs)]


def run_processes(workdir: str, data_dir: str, cache: str, num_processes: int, devices_each: int) -> None:
  results = start_processes(workdir, [data_dir] * num_processes, cache, devices_each)
  # Every process's output: the first to fail may be another than the first listed (one
  # process's error ends the others at their next collective or at shutdown).
  assert all(status == 0 for status, _ in results), "\n".join(
      f"process {i} of {num_processes}: exit status {status}\n{out[-3000:]}" for i, (status, out) in enumerate(results))


@pytest.fixture(scope="module")
def one_host_run(data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("one_host")
  workdir = str(root / "run")
  run_processes(workdir, data_dir, str(root / "xla"), num_processes=1, devices_each=8)
  return workdir


def test_two_processes_equal_one_process_with_the_same_devices(one_host_run, data_dir, tmp_path):
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "xla")
  run_processes(workdir, data_dir, cache, num_processes=2, devices_each=4)
  # Both hosts wrote one checkpoint between them (each its own shards and data position).
  data_files = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(STEPS), "data")))
  assert len([f for f in data_files if "process" in f]) == 2, data_files

  # A crash after the step-3 checkpoint: the same 2-process command resumes from it,
  # restoring every host's params, optimizer and data position.
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  os.remove(os.path.join(workdir, "report.json"))
  run_processes(workdir, data_dir, cache, num_processes=2, devices_each=4)

  one, two = metrics.read(one_host_run), metrics.read(workdir)
  assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
  train_one = [r["loss"] for r in one if r["split"] == "train"]
  train_two = [r["loss"] for r in two if r["split"] == "train"]
  assert len(train_one) == STEPS
  np.testing.assert_allclose(train_two, train_one, rtol=2e-5)
  val_one = {r["split"]: r["loss"] for r in one if r["split"].startswith("val_") and "loss" in r}
  val_two = {r["split"]: r["loss"] for r in two if r["split"].startswith("val_") and "loss" in r}
  assert val_one.keys() == val_two.keys() and val_one
  for split in val_one:
    np.testing.assert_allclose(val_two[split], val_one[split], rtol=2e-5)

  # Both hosts decoded the validation sets as one program: every answer gets the score the
  # one-host run gave it (greedy decoding of weights equal to ~1e-5 picks the same tokens).
  scores_one, scores_two = reports.read(one_host_run)["stage1"], reports.read(workdir)["stage1"]
  for split, names in (("val_understanding", ("accuracy", "spurious_prompt_rate")),
                       ("val_generation", ("format_rate", "prompt_f1", "prompt_exact"))):
    assert scores_two[split]["num_answers"] == scores_one[split]["num_answers"] > 0
    assert scores_two[split]["per_answer"] == scores_one[split]["per_answer"], split
    for name in names:
      assert scores_two[split][name] == scores_one[split][name], (split, name)

  params_one, _ = load_params(one_host_run, STEPS)
  params_two, _ = load_params(workdir, STEPS)
  # atol: weights whose gradient is rounding noise (~0) take Adam steps of either sign
  # (m / sqrt(v) normalises noise up to lr-sized steps), so they agree only to ~1e-6.
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_processes_that_do_not_share_the_data_dir_are_refused(data_dir, tmp_path):
  """Each host's own local disk as data.data_dir: process 0 finds (or builds) the dataset,
  process 1 finds nothing there; both stop with what to mount where, not a traceback."""
  own = [str(tmp_path / f"host{i}" / "data") for i in range(2)]
  shutil.copytree(data_dir, own[0])  # process 0's disk holds the build; process 1's is empty
  results = start_processes(str(tmp_path / "run"), own, str(tmp_path / "xla"), devices_each=1)
  for i, (status, out) in enumerate(results):
    assert status == 1, f"process {i}: exit status {status}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    assert "is not one folder shared by the 2 processes" in out and "process(es) [1] find no finished build" in out
    assert "gcsfuse" in out and "--config.data.data_dir=/mnt/BUCKET/data" in out
