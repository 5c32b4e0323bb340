"""mgjax.plan: the train step compiled ahead of time for a topology, on abstract values."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from flax import nnx

from mgjax import config_files, fit, optim, plan, sharding, throughput
from mgjax.models import abstract_model


def sample_config(**mesh):
  c = config_files.load_config_file(os.path.join(REPO, "configs", "stage2.py"), "data=sample:tiny")
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
  assert frozen["hardware_flops_per_device"] < 0.985 * split["hardware_flops_per_device"]  # the towers are small here
  # Frozen towers' model FLOPs are their forward pass alone (a third of training them).
  assert frozen["model_flops_per_device"] < split["model_flops_per_device"] < frozen["hardware_flops_per_device"]
  assert frozen["opt_state_bytes"] < split["opt_state_bytes"]
  # A train step costs 6 FLOPs per weight of the LLM's matmuls per token slot (2 forward, 2
  # for the activations' gradients, 2 for the weights'), and more: attention's scores and the
  # vision towers, which on the sample add about 30% (the embedding table is a lookup, no matmul).
  tokens = split["batch"]["tokens"]
  _, state = nnx.split(abstract_model(sample_config().model))
  llm = state.to_pure_dict()["llm"]
  matmul_weights = sum(x.size for x in jax.tree.leaves(llm["layers"]) if x.ndim > 1) + llm["lm_head"]["kernel"].size
  assert 6 * tokens * matmul_weights < split["hardware_flops_per_device"] * 8 < 1.5 * 6 * tokens * matmul_weights

  # The default mesh keeps a whole copy per device: plan's advice says so first, then names
  # FSDP, and its estimate of the state per device is what the FSDP plan above measured.
  whole = plan.plan(sample_config(data=-1, fsdp=1), 8)
  advice = fit.advice(sample_config(data=-1, fsdp=1), 8, whole)
  assert advice[0].startswith(f"weights {fit.size(whole['params_bytes'])} and optimizer state "
                              f"{fit.size(whole['opt_state_bytes'])} per device")
  estimate = (whole["params_bytes"] + whole["opt_state_bytes"]) / 8
  assert advice[1] == ("shard weights and optimizer state over all 8 devices (FSDP): --config.mesh.fsdp=-1 "
                       f"--config.mesh.data=1: weights and optimizer state "
                       f"{fit.size(8 * estimate)} -> about {fit.size(estimate)}")
  np.testing.assert_allclose(split["params_bytes"] + split["opt_state_bytes"], estimate, rtol=0.05)
  # The abstract state (what the advice works from when a refused compile gives no sizes) is
  # the plan's whole copy on each device of the data-parallel mesh.
  state = fit.state_bytes(sample_config())
  assert (state["params"], state["opt_state"]) == (whole["params_bytes"], whole["opt_state_bytes"])
  # Already sharded over everything: FSDP is not advised again.
  assert not any("FSDP" in line for line in fit.advice(sample_config(data=1, fsdp=-1), 8, split))


def test_a_lora_run_is_planned_with_the_adapters_alone_in_the_optimizer():
  # The step train.run would run (mgjax.train_step.setup): frozen weights in, adapters trained.
  config = sample_config(data=1, fsdp=-1)
  config.lora.rank = 4
  lora_plan = plan.plan(config, 8)
  # Full fine-tuning keeps two moments of every weight (2x params_bytes); rank-4 adapters of
  # the sample's small kernels, a small fraction of that.
  assert 0 < lora_plan["opt_state_bytes"] < 0.5 * lora_plan["params_bytes"]
  assert lora_plan["peak_bytes"] > lora_plan["params_bytes"] + lora_plan["opt_state_bytes"]


def test_cli_sets_up_its_own_devices_and_prints_the_fit(tmp_path):
  env = {**os.environ, "XLA_FLAGS": ""}  # the CLI asks for its own device count
  figures = tmp_path / "plan.json"
  result = subprocess.run([
      sys.executable, "-m", "mgjax.plan", "--config=configs/stage2.py:data=sample:tiny", "--devices=2",
      "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--compilation_cache=", f"--json={figures}"
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout.splitlines()
  p = json.loads(figures.read_text())
  # The mesh asked for, on the 2 devices the CLI made for itself (the test has 8).
  assert p["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert out[1].startswith("mesh {'data': 1, 'fsdp': 2, 'tensor': 1} = 2 devices; global batch 16 x 128 tokens")
  # FSDP over 2: each device holds half of the float32 weights (a few odd-sized stay whole)
  # and two Adam moments of its half.
  assert 4 * p["num_params"] / 2 <= p["params_bytes"] < 1.05 * 4 * p["num_params"] / 2
  np.testing.assert_allclose(p["opt_state_bytes"], 2 * p["params_bytes"], rtol=0.01)
  assert p["peak_bytes"] == p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
  # What it prints is what it planned.
  for name, key in (("weights", "params_bytes"), ("optimizer state", "opt_state_bytes"), ("temporaries", "temp_bytes"),
                    ("peak", "peak_bytes")):
    assert any(line.split("  (")[0] == f"  {name:<17} {plan._bytes(p[key])}" for line in out), (name, out)
  model, hardware = p["model_flops_per_device"], p["hardware_flops_per_device"]
  assert f"  model FLOPs       {plan._count(model, 'FLOP')} per step ({plan._count(2 * model, 'FLOP')} on all " \
         f"devices, {plan._count(2 * model / (16 * 128), 'FLOP')} per token): what MFU divides, every token and " \
         "image slot real" in out
  assert f"  hardware FLOPs    {plan._count(hardware, 'FLOP')} per step ({plan._count(2 * hardware, 'FLOP')} on " \
         f"all devices, {plan._count(2 * hardware / (16 * 128), 'FLOP')} per token slot): what HFU divides, " \
         "XLA's count" in out
  # Each device's verdict follows the planned peak against 90% of its memory: a few MiB fit
  # every one, and the step times are the planned hardware FLOPs at its peak rate and the
  # model FLOPs at 40% of it.
  assert p["peak_bytes"] < 0.9 * min(hbm for _, _, hbm in plan.ACCELERATORS) * plan.GiB
  h100 = [line for line in out if line.startswith("  H100 80GB")]
  peak = throughput.vendor_peak_tflops("H100") * 1e12
  assert h100 == [f"  H100 80GB    80 GiB  fits           {hardware / peak:.3g} s, {model / (0.4 * peak):.3g} s"]
  assert sum(" fits " in line for line in out) == len(plan.ACCELERATORS)
  assert not any("does NOT fit" in line for line in out)


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


def _flags_exist(config, lines):
  """Every --config.X=... an advice line names is a field of the config: no invented levers."""
  for line in lines:
    for flag in re.findall(r"--config\.([\w.]+)=", line):
      *sections, key = flag.split(".")
      node = config
      for section in sections:
        node = node[section]
      assert key in node, (flag, line)


def test_advice_starts_with_the_state_and_the_smallest_slice_that_holds_it():
  # Shapes only (the abstract model), plan figures made up: nothing is compiled.
  c = sample_config(data=1, fsdp=-1)
  state = fit.state_bytes(c)
  # Stage 2 trains every weight: two Adam moments of each (and a few step counters).
  assert state["gradients"] == state["params"] and 0 <= state["opt_state"] - 2 * state["gradients"] < 1024
  # The sample computes in float32 (no weight copy): weights, moments and gradients split over n.
  sharded = state["params"] + state["opt_state"] + state["gradients"]
  figures = {"mesh": {"data": 1, "fsdp": 2, "tensor": 1}, "temp_bytes": state["gradients"] / 2}
  # A device that holds an eighth of it, and nothing in the temporaries but the gradients.
  device = sharded / 8 / fit.FIT_SHARE * 1.01
  lines = fit.advice(c, 2, figures, device_bytes=device, slice_name=lambda n: plan.slice_name("v5p-8", 4, n))
  assert lines[0].startswith(f"weights {fit.size(state['params'] / 2)} and optimizer state "
                             f"{fit.size(state['opt_state'] / 2)} per device")
  assert f"the smallest slice that holds the run: 8 devices of {fit.size(device)}, v5p-16 (" in lines[0]
  # Enough already with FSDP over this slice; a refused compile with no figures: a lower bound.
  lines = fit.advice(sample_config(data=-1, fsdp=1), 8, {}, device_bytes=device)
  assert "alone need at least 8 devices" in lines[0] and "so this slice does with FSDP over all of it" in lines[0]
  assert "FSDP" in lines[1]
  # A refused compile that says what it needed: the temporaries are what the state leaves
  # (here three times the gradients: a smaller batch halves the two that are activations).
  grads = state["gradients"] / 2
  needed = {"required_bytes": (state["params"] + state["opt_state"]) / 2 + 3 * grads, "mesh": figures["mesh"]}
  lines = fit.advice(c, 2, needed)
  assert any(f"temporaries {fit.size(3 * grads)} -> roughly {fit.size(2 * grads)}" in line for line in lines)


def test_advice_names_only_levers_that_exist_and_lower_memory():
  c = sample_config(data=1, fsdp=-1)  # stage 2 of the sample: batch 16, the whole LLM trains
  state = fit.state_bytes(c)
  grads = state["gradients"] / 8
  mesh = {"mesh": {"data": 1, "fsdp": 8, "tensor": 1}}
  # Temporaries mostly activations (2 rows per device): one micro-batch to two halves them,
  # and the estimate, accumulator included, falls.
  big = fit.advice(c, 8, {**mesh, "temp_bytes": grads + 10 * grads})
  accumulate = [line for line in big if "--config.train.grad_accum_steps=2" in line]
  assert accumulate and f"temporaries {fit.size(11 * grads)} -> roughly {fit.size(7 * grads)}" in accumulate[0]
  assert any("--config.data.batch_size=8, 1 row(s) per device" in line for line in big)
  # Temporaries mostly the gradients: a second micro-batch would add more than it saves.
  small = fit.advice(c, 8, {**mesh, "temp_bytes": grads + grads})
  assert not any("grad_accum_steps" in line for line in small)
  # Already accumulating: neither more micro-batches nor fewer rows in each (a smaller batch).
  c.train.grad_accum_steps = 2
  lines = fit.advice(c, 8, {**mesh, "temp_bytes": grads + 10 * grads})
  assert not any("--config.train.grad_accum_steps" in line or "--config.data.batch_size" in line for line in lines)
  assert lines[-1].startswith("not advised: fewer rows per micro-batch than 1")
  # The optimizer-state levers the config has: a bf16 first moment and LoRA; no host offload.
  lora = [line for line in big if "--config.lora.rank=16" in line]
  assert lora and "changes the recipe" in lora[0]
  moment = [line for line in big if "--config.optim.mu_dtype=bfloat16" in line]
  opt_state = state["opt_state"] / 8
  assert moment and f"{fit.size(opt_state)} -> about {fit.size(opt_state * 0.75)}" in moment[0]
  assert not any("offload" in line for line in big)
  for lines_ in (big, small, lines):
    _flags_exist(c, lines_)
  # Pretraining trains no LLM weight: no LoRA there.
  pretrain = config_files.load_config_file(os.path.join(REPO, "configs", "pretrain.py"), "data=sample:tiny")
  assert not any("lora" in line for line in fit.advice(pretrain, 8, mesh))


def test_tpu_slice_names_and_refusals():
  assert plan.slice_name("v5p-8", 4, 16) == "v5p-32" and plan.slice_name("v5p-8", 4, 1) == "v5p-8"
  assert plan.slice_name("v5e-4", 4, 16) == "v5e-16" and plan.slice_name("v5litepod-8", 8, 64) == "v5litepod-64"
  # The TPU compiler's refusals, as it words them (both count the arguments too).
  assert plan._required_bytes("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                              "temporaries (32.58G) exceeds available HBM (15.75G).") == round(32.58 * 2**30)
  assert plan._required_bytes("Used 15.80G of 15.75G hbm. Exceeded hbm capacity by 52.5M.") == round(15.8 * 2**30)
  assert plan._required_bytes("out of memory") == 0
