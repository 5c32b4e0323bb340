"""The trainer end to end on the tiny sample: sharding, resume after SIGKILL, stage 2, errors.

Runs are tiny (a 1.5M-parameter model, a few dozen steps); most of the time is XLA
compiling, which the persistent compilation cache set in conftest.py shares across tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from conftest import REPO, cli_args, load_params, tiny_config
from mgjax import checkpoint, metrics, train


def test_stage1_learns_every_capability(stage1):
  records = metrics.read(stage1.workdir)
  start = {r["split"]: r["loss"] for r in records if r["step"] == 0 and "loss" in r}
  end = {r["split"]: r["loss"] for r in records if r["step"] == 60 and r["split"] != "train" and "loss" in r}
  assert set(end) == {"val_understanding", "val_generation", "val_text"}
  for split, loss in end.items():
    assert loss < 0.6 * start[split], f"{split}: {start[split]:.3f} -> {loss:.3f}"
  train_lines = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_lines] == list(range(1, 61))
  assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in train_lines)
  assert os.listdir(os.path.join(stage1.workdir, "tensorboard"))


def test_stage2_starts_from_stage1_params(stage1, data_dir, tmp_path):
  config = tiny_config(2, data_dir, steps=6, eval_every=6, checkpoint_every=6)
  config.init_from = stage1.workdir
  summary = train.run(config, str(tmp_path))
  # The weights carried over: before any update, stage 2 scores what stage 1 ended with.
  for split, loss in stage1.val_loss_end.items():
    assert summary.val_loss_start[split] == pytest.approx(loss, rel=1e-5), split
  meta = checkpoint.Checkpoints(str(tmp_path), read_only=True).meta(6)
  assert meta["stage"] == 2
  assert meta["init_from"]["step"] == 60
  assert meta["init_from"]["checkpoint"].endswith(os.path.join("checkpoints", "60"))
  assert meta["config"]["data"]["train_split"] == "train_generation"


def test_sharded_step_equals_single_device(data_dir, tmp_path):
  assert jax.device_count() == 8, "conftest.py sets 8 virtual CPU devices"
  sharded = tiny_config(1, data_dir, steps=3, eval_every=3, checkpoint_every=3)
  sharded.mesh.update(data=2, fsdp=2, tensor=2, num_devices=0)
  single = tiny_config(1, data_dir, steps=3, eval_every=3, checkpoint_every=3)
  single.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
  runs = {name: str(tmp_path / name) for name in ("sharded", "single")}
  train.run(sharded, runs["sharded"])
  train.run(single, runs["single"])

  losses = {name: [r["loss"] for r in metrics.read(w)] for name, w in runs.items()}
  np.testing.assert_allclose(losses["sharded"], losses["single"], rtol=2e-5)
  params = {name: load_params(w, 3) for name, w in runs.items()}
  # Adam scales every update to about lr whatever the gradient's size, so where a gradient
  # is ~0, float summation order alone can flip an update's sign: a weight may differ by up
  # to the lr summed over the 3 steps (warmup: 1e-3 * (1+2+3)/50 = 1.2e-4), but on average
  # the two runs must agree far more closely than that.
  flat_sharded = jax.tree_util.tree_leaves_with_path(params["sharded"][0])
  diffs = []
  for (path, a), b in zip(flat_sharded, jax.tree.leaves(params["single"][0])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1.3e-4, err_msg=checkpoint.path_str(path))
    diffs.append(np.abs(a - b).ravel())
  assert np.concatenate(diffs).mean() < 2e-6

  # The weights really were split across the mesh, by the logical-axis rules.
  specs = {
      checkpoint.path_str(p): tuple(m.sharding.partition_spec)
      for p, m in jax.tree_util.tree_leaves_with_path(params["sharded"][1], is_leaf=lambda x: hasattr(x, "shape"))
  }
  assert specs["llm/embed_tokens/embedding"] == ("tensor", "fsdp")
  assert specs["llm/layers/0/mlp/gate_proj/kernel"] == ("fsdp", "tensor")
  assert sum(any(axis is not None for axis in s) for s in specs.values()) > len(specs) // 2


RESUME_STEPS, RESUME_EVERY = 40, 10


@pytest.fixture(scope="module")
def reference_runs(data_dir, tmp_path_factory):
  """Two uninterrupted CLI runs of the same command, started at once (each loads the machine
  for the other), to compare interrupted-and-resumed runs and each other with."""
  root = tmp_path_factory.mktemp("reference")
  cache, workdirs = str(root / "xla"), [str(root / "run"), str(root / "twin")]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  procs = [
      subprocess.Popen(cli_args(w, data_dir, cache, RESUME_STEPS, RESUME_EVERY), cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for w in workdirs
  ]
  for proc in procs:
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
  return workdirs, cache


@pytest.fixture(scope="module")
def reference_run(reference_runs):
  (workdir, _), cache = reference_runs
  return workdir, cache


def assert_same_run(resumed: str, reference: str) -> None:
  ref_lines, resumed_lines = metrics.read(reference), metrics.read(resumed)
  assert [(r["step"], r["split"]) for r in resumed_lines] == [(r["step"], r["split"]) for r in ref_lines]
  np.testing.assert_allclose([r["loss"] for r in resumed_lines if "loss" in r],
                             [r["loss"] for r in ref_lines if "loss" in r], rtol=1e-6)
  ref_params, _ = load_params(reference, RESUME_STEPS)
  resumed_params, _ = load_params(resumed, RESUME_STEPS)
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(resumed_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def start_and_wait_for(workdir: str, data_dir: str, cache: str, ready) -> subprocess.Popen:
  """Starts the CLI run and returns once `ready()` holds (or the run ended)."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cli_args(workdir, data_dir, cache, RESUME_STEPS, RESUME_EVERY), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not ready() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  return proc


def test_two_runs_at_once_log_bit_identical_losses(reference_runs):
  # Each run loaded the machine for the other: thread timing must not change a bit.
  (one, two), _ = reference_runs
  losses = lambda workdir: [(r["step"], r["split"], r["loss"]) for r in metrics.read(workdir) if "loss" in r]
  assert len(losses(one)) > RESUME_STEPS
  assert losses(one) == losses(two)  # exact: the same floats, not merely close


def test_resume_after_sigkill_matches_uninterrupted_run(reference_run, data_dir, tmp_path):
  reference, cache = reference_run
  killed = str(tmp_path / "killed")
  first = os.path.join(killed, "checkpoints", str(RESUME_EVERY))
  proc = start_and_wait_for(killed, data_dir, cache, lambda: os.path.isdir(first))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  steps_at_kill = checkpoint.Checkpoints(killed, read_only=True).all_steps()
  assert steps_at_kill and max(steps_at_kill) < RESUME_STEPS

  # The same command again: resumes from the latest checkpoint and finishes.
  subprocess.run(cli_args(killed, data_dir, cache, RESUME_STEPS, RESUME_EVERY), cwd=REPO, env={
      **os.environ, "PYTHONUNBUFFERED": "1"
  }, check=True, capture_output=True)
  assert_same_run(killed, reference)


def test_sigterm_checkpoints_exits_and_resumes(reference_run, data_dir, tmp_path):
  reference, cache = reference_run
  stopped = str(tmp_path / "stopped")
  # Mid-interval (no regular checkpoint due), once training is under way.
  started = lambda: any(r["split"] == "train" and r["step"] >= 13 for r in metrics.read(stopped))
  proc = start_and_wait_for(stopped, data_dir, cache, started)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 143, stderr[-2000:]
  assert "stopped by SIGTERM after step" in stderr and "run the same command again to resume" in stderr
  # The step in flight was finished, logged and saved: the checkpoint is the last logged step.
  last_logged = max(r["step"] for r in metrics.read(stopped) if r["split"] == "train")
  saved = checkpoint.Checkpoints(stopped, read_only=True).all_steps()
  assert max(saved) == last_logged and RESUME_EVERY < last_logged < RESUME_STEPS
  assert last_logged % RESUME_EVERY, "expected a SIGTERM checkpoint between the regular ones"
  assert not os.path.exists(os.path.join(stopped, "report.json"))

  result = subprocess.run(cli_args(stopped, data_dir, cache, RESUME_STEPS, RESUME_EVERY), cwd=REPO, env={
      **os.environ, "PYTHONUNBUFFERED": "1"
  }, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert_same_run(stopped, reference)


def test_stage2_without_stage1_checkpoint_says_what_to_run(tmp_path):
  # Said before any data work: nothing is built into the (new) data_dir first.
  config = tiny_config(2, str(tmp_path / "data"), steps=2)
  config.init_from = str(tmp_path / "no_stage1_here")
  with pytest.raises(checkpoint.CheckpointError, match=r"python -m mgjax\.main --config=configs/stage1\.py"):
    train.run(config, str(tmp_path / "stage2"))
  assert not (tmp_path / "data").exists()


def test_checkpoint_that_does_not_fit_lists_the_mismatched_paths(stage1, data_dir, tmp_path):
  config = tiny_config(2, data_dir, steps=2)
  config.init_from = stage1.workdir
  config.model.llm.mlp = 256  # stage 1 trained mlp=384
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.run(config, str(tmp_path / "stage2"))
  message = str(error.value)
  for layer in range(config.model.llm.layers):
    assert f"llm/layers/{layer}/mlp/gate_proj/kernel: checkpoint (128, 384) vs model (128, 256)" in message
  assert "llm/layers/0/self_attn/q_proj/kernel" not in message  # only what differs


def test_unknown_config_key_is_an_error_naming_it():
  result = subprocess.run([sys.executable, "-m", "mgjax.main", "--config=configs/stage1.py", "--config.train.stpes=3"],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert "stpes" in result.stderr and 'Did you mean "steps"' in result.stderr


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  # The README's quickstart passes a relative workdir (runs/sample); orbax wants absolute paths.
  monkeypatch.chdir(tmp_path)
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  ckpts = checkpoint.Checkpoints("runs/relative")
  data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
  ckpts.save(1, params=params, opt_state={"count": np.int32(1)}, data_iter=data_iter, meta={"step": 1})
  ckpts.wait()
  assert (tmp_path / "runs/relative/checkpoints/1").is_dir()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"w": jax.ShapeDtypeStruct((2, 3), np.float32, sharding=one)}
  restored, meta = checkpoint.Checkpoints("runs/relative", read_only=True).restore_params(1, target)
  np.testing.assert_array_equal(restored["w"], params["w"])
  assert meta["step"] == 1


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_ends_as_if_uninterrupted(
    reference_run, data_dir, tmp_path):
  """A run killed after its last checkpoint, which then got damaged (a bit flipped on disk):
  the same command resumes from the checkpoint before and finishes bit-equal."""
  reference, cache = reference_run
  damaged = str(tmp_path / "damaged")
  shutil.copytree(reference, damaged)
  os.remove(os.path.join(damaged, "report.json"))  # killed before it reported
  last = max(checkpoint.Checkpoints(damaged, read_only=True).all_steps())
  folder = os.path.join(damaged, "checkpoints", str(last), "params")
  biggest = max((os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs), key=os.path.getsize)
  data = bytearray(open(biggest, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(biggest, "wb").write(bytes(data))

  result = subprocess.run(cli_args(damaged, data_dir, cache, RESUME_STEPS, RESUME_EVERY), cwd=REPO, env={
      **os.environ, "PYTHONUNBUFFERED": "1"
  }, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"checkpoints/{last}: params reads back changed" in result.stdout
  assert os.path.isdir(os.path.join(damaged, "corrupt_checkpoints", str(last)))
  assert_same_run(damaged, reference)
