"""The train step compiled by the TPU compiler (libtpu, a test dependency) for TPU slices on
this CPU: a change that breaks the TPU path fails here before any user meets it."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from conftest import REPO
from mgjax import config_files, decoding_plan, flops, plan, tpu_flags


@pytest.mark.parametrize("name, topology, chips", [
    ("v5p-8", "v5p:2x2x1", 4),
    ("v5p-16", "v5p:2x2x2", 8),
    ("v5p-32", "v5p:2x2x4", 16),
    ("v5p-128", "v5p:4x4x4", 64),
    ("v4-8", "v4:2x2x1", 4),
    ("v5litepod-8", "v5e:2x4", 8),
    ("v5e-4", "v5e:2x2", 4),
    ("v5e-1", "v5e:1x1", 1),
    ("v6e-16", "v6e:4x4", 16),
    ("v6e-256", "v6e:16x16", 256),
])
def test_gcloud_accelerator_types_map_to_their_topologies(name, topology, chips):
  _, got, n = plan.tpu_topology(name)
  assert (got, n) == (topology, chips)


@pytest.mark.parametrize("name, message", [
    ("v5p-6", "powers of two"),
    ("v5p-4", "smallest v5p slice is v5p-8"),
    ("v7-8", "expected a TPU accelerator type"),
])
def test_a_target_that_is_no_tpu_slice_is_named(name, message):
  with pytest.raises(ValueError, match=message):
    plan.tpu_topology(name)


def test_sample_compiles_for_v5p_with_splash_attention(tmp_path):
  # The CLI as a user runs it: the sample model with FSDP over a v5p-8 slice (4 chips), its
  # optimizer state in host memory.
  out = tmp_path / "plan.json"
  result = subprocess.run([
      sys.executable, "-m", "mgjax.plan", "--config=configs/stage2.py:data=sample:tiny", "--target=v5p-8",
      f"--json={out}", "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--decoding", "--config.optim.offload=True"
  ], cwd=REPO, env={
      **{
          k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"
      }, "XLA_FLAGS": ""
  }, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "TPU compiler, v5p-8 = v5p:2x2x1" in result.stdout and "modelled step" in result.stdout
  figures = json.loads(out.read_text())
  assert figures["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and figures["device_kind"] == "TPU v5"
  # Splash's forward, dq and dkv kernels in each of the 4 decoder layers.
  assert figures["attention"] == "splash" and figures["pallas_kernels"] == 3 * 4
  # Compiled with the trainer's TPU compiler flags (mgjax.tpu_flags), which fuse FSDP's weight
  # all-gathers with the compute they overlap.
  assert figures["tpu_flags"] == [f"--{name}={value}" for name, value in tpu_flags.TPU_FLAGS.items()]
  assert figures["async_collective_fusions"] > 0
  assert f"compiler flags    {len(tpu_flags.TPU_FLAGS)} in LIBTPU_INIT_ARGS" in result.stdout
  assert figures["params_bytes"] + figures["opt_state_bytes"] < figures["peak_bytes"] < 0.01 * 95 * 2**30
  # The compiler's own peak (what it has live at once) is at most the sum of arguments and temporaries.
  assert figures["params_bytes"] < figures["compiler_peak_bytes"] <= figures["peak_bytes"]
  assert "compiler's peak" in result.stdout and "fits: the compiler's peak" in result.stdout
  # The optimizer state is the compiler's host memory (its small moments padded to the TPU's
  # tiles), not among the device's arguments: those are the weights and the batch.
  assert figures["opt_state_bytes"] <= figures["host_argument_bytes"] < 2 * figures["opt_state_bytes"]
  assert figures["params_bytes"] < figures["argument_bytes"] < figures["params_bytes"] + figures["opt_state_bytes"]
  assert "(in host memory between steps: optim.offload)" in result.stdout
  levers = {lever["key"]: lever for lever in figures["levers"]}
  assert levers["optim.offload"]["on"] and levers["optim.offload"]["saves_bytes"] == figures["opt_state_bytes"]
  assert not levers["train.loss_vocab_sharded"]["on"] and not levers["optim.mu_dtype"]["on"]
  assert "memory levers (device memory each saves per device, estimated from shapes):" in result.stdout
  # Both FLOP counts and both utilisations of the modelled step. Splash's kernels are custom calls
  # whose FLOPs XLA's cost analysis leaves out, so here the hardware count has no attention.
  assert figures["model_flops_per_device"] > 0 and figures["hardware_flops_per_device"] > 0
  assert 0 < figures["modelled_mfu"] < 1 and 0 < figures["modelled_hfu"] < 1
  # --decoding: evaluation's decoding on the same slice, weights split as the trainer splits them.
  decoding = figures["decoding"]
  assert "decoding (evaluation: 32 prompts of 128 tokens" in result.stdout
  # Its arguments are the weights in their training layout (split 4 ways) and the prompts (the
  # TPU's tiled layout pads the images' 3 channels): less than one whole copy of the weights.
  assert figures["params_bytes"] < decoding["whole"]["argument_bytes"] < 4 * figures["params_bytes"]
  assert decoding["whole"]["peak_bytes"] > decoding["whole"]["argument_bytes"]
  assert decoding["modelled_tokens_per_second"] > 0 and decoding["modelled_batch_seconds"] > 0


def test_scanned_decoder_and_chunked_loss_cost_the_same_as_the_unrolled_program():
  # A scanned decoder with remat and a chunked loss: loops whose bodies the TPU compiler's cost
  # analysis counts once. plan's figures (from loop-free twins, mgjax.flops) must equal those of
  # the same model compiled without loops. Text only (no image slot) keeps the compiles short.
  config = config_files.load_config_file(os.path.join(REPO, "configs", "stage2.py"), "data=sample:tiny")
  config.mesh.data, config.mesh.fsdp, config.data.max_images = 1, -1, 0
  config.model.llm.remat, config.train.loss_chunk = "full", 32
  devices = plan.tpu_devices("v5e-4")
  unrolled_step = plan.compile_train_step(config, devices, unroll_loops=True,
                                          compiler_options=flops.COST_COMPILER_OPTIONS)
  unrolled = flops.compiled_costs(unrolled_step.compiled)
  unrolled_decoding = decoding_plan.plan_decoding(config, unrolled_step.setup, unrolled_step.batch)
  config.model.llm.scan_layers = True
  looped = plan.plan(config, target="v5e-4", decoding=True)
  # Forward, recomputed forward, dq and dkv: 4 splash kernels per layer, once per loop body.
  kernels = unrolled_step.compiled.as_text().count('custom_call_target="tpu_custom_call"')
  assert (looped["pallas_kernels"], kernels) == (4, 4 * config.model.llm.layers)
  for key, unrolled_key in (("hardware_flops_per_device", "flops"), ("modelled_step_seconds", "modelled_seconds")):
    assert looped[key] == pytest.approx(unrolled[unrolled_key], rel=0.02), key
  # Evaluation's decoding (plan --decoding): its prefill and decode step cost the same, and
  # one new token for the batch costs less than the whole prompt's prefill.
  for part in ("prefill", "step"):
    for key in ("hardware_flops", "modelled_seconds"):
      assert looped["decoding"][part][key] == pytest.approx(unrolled_decoding[part][key], rel=0.02), (part, key)
  assert 0 < looped["decoding"]["step"]["modelled_seconds"] < looped["decoding"]["prefill"]["modelled_seconds"]


def test_a_scanned_decoder_casts_its_weights_to_bf16_a_layer_at_a_time():
  # bf16 compute over float32 weights in a scanned decoder. With the compiler's bf16 propagation
  # (libtpu's default) the whole weight stack enters the decoder's loops as one bf16 copy, held
  # through the forward and backward passes; mgjax's TPU flags turn it off, so each layer's
  # weights are cast as that layer runs.
  config = config_files.load_config_file(os.path.join(REPO, "configs", "stage2.py"), "data=sample:tiny")
  config.mesh.data, config.mesh.fsdp, config.data.max_images = 1, -1, 0
  config.model.dtype, config.model.llm.scan_layers, config.model.llm.remat = "bfloat16", True, "full"
  devices = plan.tpu_devices("v5p-8")
  setup, batch = plan.step_setup(config, devices)
  # Per-device shapes of the stacked matrices ([layers, ...], FSDP-split), as the program spells them.
  layers = zip(jax.tree.leaves(setup.abstract_params["llm"]["layers"]),
               jax.tree.leaves(setup.param_shardings["llm"]["layers"]))
  stacked = {
      "bf16[" + ",".join(map(str, sharding.shard_shape(leaf.shape))) + "]"
      for leaf, sharding in layers
      if leaf.ndim >= 3
  }
  assert stacked

  def bf16_stacks_in_loops(bf16_propagation: bool) -> set[str]:
    option = {"xla_jf_bf16_propagation": bf16_propagation}
    hlo = setup.compile_train_step(batch, compiler_options=option).as_text()
    loops = " ".join(line for line in hlo.splitlines() if " while(" in line)
    return {shape for shape in set(re.findall(r"bf16\[[\d,]+\]", loops)) if shape in stacked}

  assert tpu_flags.TPU_FLAGS["xla_jf_bf16_propagation"] == "false"
  assert bf16_stacks_in_loops(False) == set()
  assert bf16_stacks_in_loops(True) == stacked  # libtpu's default: the copy this flag removes
