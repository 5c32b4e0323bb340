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
from mgjax import metrics

STEPS, CHECKPOINT_EVERY = 6, 3


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def command(workdir: str, data_dir: str, cache: str) -> list[str]:
  # Packed rows are filled from each process's own share of the examples, so packed
  # global batches depend on the process count (see pipeline.train_iterator).
  return cli_args(workdir, data_dir, cache, STEPS, CHECKPOINT_EVERY) + ["--config.data.packing=False"]


def run_processes(workdir: str, data_dir: str, cache: str, num_processes: int, devices_each: int) -> None:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}", "PYTHONUNBUFFERED": "1"}
  args = command(workdir, data_dir, cache)
  if num_processes > 1:
    address = f"localhost:{free_port()}"
    procs = [
        subprocess.Popen(
            args + [
                "--distributed", f"--coordinator_address={address}", f"--num_processes={num_processes}",
                f"--process_id={i}"
            ], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(num_processes)
    ]
  else:
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  try:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} of {num_processes} failed:\n{out[-3000:]}"


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
  val_one = {r["split"]: r["loss"] for r in one if r["split"].startswith("val_")}
  val_two = {r["split"]: r["loss"] for r in two if r["split"].startswith("val_")}
  assert val_one.keys() == val_two.keys() and val_one
  for split in val_one:
    np.testing.assert_allclose(val_two[split], val_one[split], rtol=2e-5)

  params_one, _ = load_params(one_host_run, STEPS)
  params_two, _ = load_params(workdir, STEPS)
  # atol: weights whose gradient is rounding noise (~0) take Adam steps of either sign
  # (m / sqrt(v) normalises noise up to lr-sized steps), so they agree only to ~1e-6.
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
