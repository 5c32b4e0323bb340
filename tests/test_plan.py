"""mgjax.plan: the train step compiled ahead of time for a topology, on abstract values."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from flax import nnx

from mgjax import config as mgjax_config, fit, optim, plan, sharding
from mgjax.models import abstract_model


def sample_config(**mesh):
  c = mgjax_config.load_config_file(os.path.join(REPO, "configs", "stage2.py"), "data=sample:tiny")
  for axis, size in mesh.items():
    c.mesh[axis] = size
  return c


def test_fsdp_splits_weights_and_optimizer_state_over_the_devices():
  split = plan.plan(sample_config(data=1, fsdp=-1), 8)
  total_bytes = 4 * split["num_params"]  # float32 weights
  # Weights whose sharded dimension does not divide by 8 stay whole; nearly all divide.
  assert total_bytes / 8 <= split["params_bytes"] < 1.05 * total_bytes / 8
  # Adam: two moments per trainable weight (stage 2 freezes nothing), split the same way.
  np.testing.assert_allclose(split["opt_state_bytes"], 2 * split["params_bytes"], rtol=0.01)
  assert split["peak_bytes"] > split["params_bytes"] + split["opt_state_bytes"]
  # Frozen towers: their gradients are never computed (not merely discarded).
  towers_frozen = sample_config(data=1, fsdp=-1)
  towers_frozen.optim.freeze = ("vision_lowres/.*", "vision_highres/.*")
  frozen = plan.plan(towers_frozen, 8)
  assert frozen["flops_per_device"] < 0.985 * split["flops_per_device"]  # the towers are small here
  assert frozen["opt_state_bytes"] < split["opt_state_bytes"]
  # A train step's FLOPs are at least 6 per parameter per token slot of the LLM part.
  tokens = split["batch"]["tokens"]
  assert split["flops_per_device"] * 8 > 2 * tokens * split["num_params"]

  # The default mesh keeps a whole copy per device: plan's advice names FSDP first, and
  # its estimate of the state per device is what the FSDP plan above measured.
  whole = plan.plan(sample_config(data=-1, fsdp=1), 8)
  advice = fit.advice(sample_config(data=-1, fsdp=1), 8, whole)
  estimate = (whole["params_bytes"] + whole["opt_state_bytes"]) / 8
  assert advice[0] == ("shard weights and optimizer state over all 8 devices (FSDP): --config.mesh.fsdp=-1 "
                       f"--config.mesh.data=1: weights and optimizer state "
                       f"{fit.size(8 * estimate)} -> about {fit.size(estimate)}")
  np.testing.assert_allclose(split["params_bytes"] + split["opt_state_bytes"], estimate, rtol=0.05)
  rows = whole["batch"]["global"] // 8
  assert any(f"--config.train.grad_accum_steps=2 keeps the global batch of {whole['batch']['global']} but puts "
             f"{math.ceil(rows / 2)} row(s) per device at a time instead of {rows}" in line for line in advice)
  # Already sharded over everything: FSDP is not advised again.
  assert not any("FSDP" in line for line in fit.advice(sample_config(data=1, fsdp=-1), 8, split))


def test_a_lora_run_is_planned_with_the_adapters_alone_in_the_optimizer():
  # The step train.run would run (mgjax.step.setup): frozen weights in, adapters trained.
  config = sample_config(data=1, fsdp=-1)
  config.lora.rank = 4
  lora_plan = plan.plan(config, 8)
  # Full fine-tuning keeps two moments of every weight (2x params_bytes); rank-4 adapters of
  # the sample's small kernels, a small fraction of that.
  assert 0 < lora_plan["opt_state_bytes"] < 0.5 * lora_plan["params_bytes"]
  assert lora_plan["peak_bytes"] > lora_plan["params_bytes"] + lora_plan["opt_state_bytes"]


def test_cli_sets_up_its_own_devices_and_prints_the_fit():
  env = {**os.environ, "XLA_FLAGS": ""}  # the CLI asks for its own device count
  result = subprocess.run([
      sys.executable, "-m", "mgjax.plan", "--config=configs/stage2.py:data=sample:tiny", "--devices=2",
      "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--compilation_cache="
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
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


def test_optimizer_moments_are_laid_out_like_their_weights_also_when_some_are_frozen():
  c = sample_config(data=1, fsdp=-1)
  c.optim.freeze = ("vision_.*",)
  mesh = sharding.make_mesh(c.mesh)
  _, state = nnx.split(abstract_model(c.model))
  shardings = sharding.state_shardings(state, mesh, sharding.logical_rules(c.mesh)).to_pure_dict()
  params = sharding.abstract_like(state.to_pure_dict(), shardings)
  tx, _ = optim.make(c.optim, 10, params)
  opt_state = sharding.abstract_optimizer_state(tx, params, mesh)
  moments = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0] if x.ndim
            ]
  trainable = sum(x.size
                  for name, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if not jax.tree_util.keystr(name).startswith("['vision_"))
  # Two moments (Adam) per trainable weight, none for the frozen towers...
  assert sum(x.size for _, x in moments) == 2 * trainable
  # ...each split over the 8 fsdp devices like its weight (a few small ones stay whole).
  per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) for _, x in moments)
  assert per_device < 1.05 * 2 * trainable / 8
  embedding = [x for name, x in moments if "embed_tokens" in name]
  assert embedding and all(x.sharding == params["llm"]["embed_tokens"]["embedding"].sharding for x in embedding)
