"""mgjax.plan: the train step compiled ahead of time for a topology, on abstract values."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from mgjax import config as mgjax_config, plan


def sample_config(**mesh):
  c = mgjax_config.load_config_file(os.path.join(REPO, "configs", "stage2.py"), "data=sample:tiny")
  for axis, size in mesh.items():
    c.mesh[axis] = size
  return c


def test_fsdp_splits_weights_and_optimizer_state_over_the_devices():
  replicated = plan.plan(sample_config(data=-1), 8)
  split = plan.plan(sample_config(data=1, fsdp=-1), 8)
  total_bytes = 4 * replicated["num_params"]  # float32 weights
  assert replicated["params_bytes"] == total_bytes
  # Weights whose sharded dimension does not divide by 8 stay whole; nearly all divide.
  assert total_bytes / 8 <= split["params_bytes"] < 1.05 * total_bytes / 8
  # Adam: two moments per trainable weight (stage 2 freezes nothing), split the same way.
  np.testing.assert_allclose(split["opt_state_bytes"], 2 * split["params_bytes"], rtol=0.01)
  assert split["peak_bytes"] < replicated["peak_bytes"]
  # The same work either way: the per-device FLOPs of the two layouts add up alike.
  np.testing.assert_allclose(split["flops_per_device"], replicated["flops_per_device"], rtol=0.15)
  # A train step's FLOPs are at least 6 per parameter per token slot of the LLM part.
  tokens = split["batch"]["tokens"]
  assert split["flops_per_device"] * 8 > 2 * tokens * replicated["num_params"]


def test_cli_sets_up_its_own_devices_and_prints_the_fit():
  env = {**os.environ, "XLA_FLAGS": ""}  # the CLI asks for its own device count
  result = subprocess.run(
      [sys.executable, "-m", "mgjax.plan", "--config=configs/stage2.py:data=sample:tiny", "--devices=2",
       "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--compilation_cache="],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "'fsdp': 2" in out and "= 2 devices" in out
  for line in ("weights", "optimizer state", "temporaries", "peak", "FLOPs per step"):
    assert line in out
  assert "H100 80GB" in out and "fits" in out


def test_an_image_that_cannot_fit_the_sequence_is_named():
  c = sample_config()
  c.data.seq_len = 8
  with pytest.raises(ValueError, match=r"data.seq_len=8 cannot hold one image"):
    plan.plan(c, len(jax.devices()))
