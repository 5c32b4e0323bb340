"""mgjax.flops: the train step's hardware FLOPs (XLA's count, every loop's trips included) and
model FLOPs (analytic, MaxText's convention), and the train log's hfu and mfu."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO
from mgjax import config_files, flops, metrics, plan, throughput, train_step
from mgjax.models import vlm


def sample_config(stage: str = "stage2", model: str = ""):
  c = config_files.load_config_file(os.path.join(REPO, "configs", f"{stage}.py"),
                                    f"model={model},data=sample:tiny" if model else "data=sample:tiny")
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c


def test_compiled_flops_are_per_device_under_sharding():
  n = 256
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  assert flops.compiled_costs(matmul.lower(a, a).compile())["flops"] == 2 * n**3
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  rows_split = jax.device_put(a, NamedSharding(mesh, P("d")))
  # HFU divides by one device's peak: the SPMD program's count must be one device's share.
  assert flops.compiled_costs(matmul.lower(rows_split, a).compile())["flops"] == 2 * n**3 / 8


def looping_config():
  """The sample's text-only stage 2 with all three loops of a train step: a scanned decoder
  with remat, the chunked loss (4 chunks) and 2 micro-batches."""
  c = sample_config()
  c.data.max_images = 0  # text only: shorter compiles, and the towers have no loop
  c.model.llm.scan_layers, c.model.llm.remat = True, "full"
  c.train.loss_chunk, c.train.grad_accum_steps = 32, 2
  return c


@pytest.fixture(scope="module")
def looping_step():
  """(StepSetup, batch spec, hardware costs) of `looping_config` on 2 devices (FSDP)."""
  setup, batch = plan.step_setup(looping_config(), jax.devices()[:2])
  return setup, batch, setup.hardware_costs(batch)


def test_hardware_flops_of_a_looping_step_are_those_of_its_unrolled_compile(looping_step):
  setup, batch, costs = looping_step
  frozen = setup.abstract_params if setup.trainable.lora else None
  lowered = setup.train_step.lower(setup.trainable.abstract, setup.abstract_opt_state, frozen, batch)
  assert "stablehlo.while" in lowered.as_text()  # the step as it runs loops
  # The same step compiled with every loop unrolled, at the full depth: XLA's count of it.
  unrolled_config = looping_config()
  unrolled_config.model.llm.scan_layers = False
  unrolled = plan.compile_train_step(unrolled_config, jax.devices()[:2], unroll_loops=True)
  assert " while(" not in unrolled.compiled.as_text()
  assert costs["flops"] == pytest.approx(flops.compiled_costs(unrolled.compiled)["flops"], rel=1e-5)


def maxtext_flops_per_token(model_cfg, seq_len: int) -> float:
  """MaxText's calculate_tflops_training_per_device per token, everything trained: 3 x (2 x
  matmul weights, the vocabulary projection included) + 3 x causal attention (half of 4 T
  heads head_dim) per layer."""
  llm = model_cfg.llm
  d, h, k, hd, m, layers = llm.hidden, llm.heads, llm.kv_heads, llm.head_dim, llm.mlp, llm.layers
  if llm.get("family") == "mixtral":
    ffn = d * llm.num_experts + llm.experts_per_token * 3 * d * m
  else:
    ffn = 3 * d * m
  weights = layers * (d * (h + 2 * k) * hd + h * hd * d + ffn) + d * model_cfg.vocab_size
  return 3 * 2 * weights + 3 * layers * 4 * seq_len * h * hd / 2


def model_flops(config, trained=lambda path: True, seq_len: int = 128) -> flops.ModelFlops:
  _, state = nnx.split(vlm.abstract_model(config.model))
  return flops.model_flops(state.to_pure_dict(), config.model, seq_len, trained)


def test_model_flops_are_maxtexts_count_and_below_the_hardware_flops_with_remat(looping_step):
  setup, batch, costs = looping_step
  b, t = batch["input_ids"].shape
  model = setup.model_flops(t)
  assert model.per_token == maxtext_flops_per_token(setup.model_cfg, t)
  # Remat recomputes the forward pass, and XLA counts what the model FLOPs leave out (norms,
  # softmax, the loss, the optimizer): the hardware does more than the model needs.
  per_device = model(b * t) / setup.mesh.size
  assert per_device < costs["flops"] < 1.6 * per_device
  # Each preset's decoder (a scanned, tied-embedding Gemma with HD image crops; experts).
  for name in ("mgm_2b_hd", "mgm_8x7b"):
    config = sample_config(model=name)
    assert model_flops(config, seq_len=2048).per_token == maxtext_flops_per_token(config.model, 2048), name


def test_model_flops_count_forward_and_backward_as_trained():
  config = sample_config()
  forward = model_flops(config, trained=lambda path: False)  # nothing trains: one forward pass
  everything = model_flops(config)
  assert (everything.per_token, everything.per_image) == (3 * forward.per_token, 3 * forward.per_image)
  # Frozen towers run forward only; what follows them still trains.
  towers_frozen = model_flops(config, trained=lambda path: not path.startswith("vision_"))
  assert towers_frozen.per_token == everything.per_token
  assert forward.per_image < towers_frozen.per_image < everything.per_image
  # Pretraining trains the projector and mining alone: the frozen decoder's weights cost their
  # forward pass and the input gradient the backward pass carries down to the projector (2 + 2
  # per weight), its attention forward and backward (3 x).
  pretrain = sample_config("pretrain")
  assert set(pretrain.optim.freeze) == {"llm/.*", "vision_lowres/.*", "vision_highres/.*"}
  pretraining = model_flops(pretrain, trained=train_step.FullWeights(pretrain, None, None).trains)
  llm = pretrain.model.llm
  attention = llm.layers * 4 * 128 * llm.heads * llm.head_dim / 2
  assert pretraining.per_token == 2 * (forward.per_token - attention) + 3 * attention


def test_model_forward_flops_are_the_matmuls_xla_counts():
  # One image through the towers, mining and projector, and 128 tokens through the decoder,
  # forward: XLA's count adds what the model FLOPs leave out (norms, activations, softmax;
  # the decoder's masked half of the causal scores), and nothing more.
  config = sample_config()
  graphdef, state = nnx.split(vlm.abstract_model(config.model))
  params = state.to_pure_dict()
  forward = flops.model_flops(params, config.model, 128, lambda path: False)
  lowres = jax.ShapeDtypeStruct((1, *vlm.lowres_image_shape(config.model)), jnp.float32)
  size = config.model.vision_highres.image_size
  highres = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  encode = jax.jit(lambda params, lo, hi: nnx.merge(graphdef, params).encode_images(lo, hi))
  image = flops.compiled_costs(encode.lower(params, lowres, highres).compile())["flops"]
  assert forward.per_image < image < 1.25 * forward.per_image
  ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  decode = jax.jit(lambda params, ids: nnx.merge(graphdef, params).llm(ids))
  tokens = flops.compiled_costs(decode.lower(params, ids).compile())["flops"]
  assert 128 * forward.per_token < tokens < 1.25 * 128 * forward.per_token


def test_model_flops_leave_out_padding_and_empty_image_slots():
  model = flops.ModelFlops(per_token=10.0, per_image=1000.0, image_token_id=5, image_tokens=2)
  window = throughput.Window()
  # Two rows of 6 slots: 7 real tokens (segment id > 0), one image (two image tokens) in a
  # row that has a second, empty image slot.
  window.add_batch({
      "segment_ids": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 2, 0, 0, 0]]),
      "input_ids": np.array([[7, 5, 5, 8, 0, 0], [9, 9, 9, 0, 0, 0]]),
  })
  window.add_metrics({"loss": 1.0})
  logged = window.close(flops=flops.StepFlops(hardware_per_device=500.0, model=model), peak_tflops=1.0, num_devices=2)
  # One step: per device, the model FLOPs of 7 tokens and 1 image against the hardware's count.
  model_per_device = (7 * 10.0 + 1000.0) / 2
  np.testing.assert_allclose(logged["model_tflops_per_device"] / logged["hardware_tflops_per_device"],
                             model_per_device / 500.0)
  np.testing.assert_allclose(logged["mfu"] / logged["hfu"], model_per_device / 500.0)


def test_every_train_log_line_has_mfu_and_hfu(stage1):
  train_lines = [r for r in metrics.read(stage1.workdir) if r["split"] == "train"]
  assert train_lines
  for r in train_lines:
    assert 0 < r["mfu"] < r["hfu"] and 0 < r["model_tflops_per_device"] < r["hardware_tflops_per_device"]
    # Both against the same peak.
    np.testing.assert_allclose(r["mfu"] / r["hfu"], r["model_tflops_per_device"] / r["hardware_tflops_per_device"],
                               rtol=1e-6)
