"""The memory levers of a big run change where things live, not what trains: the train step with
the optimizer state in host memory (optim.offload) and with the output projection split over
the vocabulary in the loss (train.loss_vocab_sharded) gives the plain step's loss, gradients
and weights, on 8 devices under FSDP. (The bf16 first moment, optim.mu_dtype, is held to bf16's
precision in test_pretrain.py.)"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_params, tiny_config
from test_flops import sample_config
from mgjax import metrics, plan, train


def random_batch(spec: dict, vocab: int) -> dict:
  """A batch of `spec`'s shapes and shardings: random tokens, a loss on 3 tokens in 4, one
  conversation per row, random images."""
  keys = iter(jax.random.split(jax.random.key(7), 8))
  b, t = spec["input_ids"].shape
  batch = {
      "input_ids": jax.random.randint(next(keys), (b, t), 0, vocab, jnp.int32),
      "targets": jax.random.randint(next(keys), (b, t), 0, vocab, jnp.int32),
      "loss_mask": (jax.random.uniform(next(keys), (b, t)) < 0.75).astype(jnp.float32),
      "segment_ids": jnp.ones((b, t), jnp.int32),
      "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
      "images_lowres": jax.random.normal(next(keys), spec["images_lowres"].shape),
      "images_highres": jax.random.normal(next(keys), spec["images_highres"].shape),
  }
  return {k: jax.device_put(v, spec[k].sharding) for k, v in batch.items()}


def train_steps(config, steps: int = 2):
  """(per-step metrics, final weights, final optimizer state) of `steps` train steps of the
  sample model from the same start on the same batch, and the setup."""
  setup, spec = plan.step_setup(config, jax.devices())
  params = setup.init_params()
  trainable, frozen = setup.trainable.start(params)
  opt_state = setup.init_opt_state(trainable)
  batch = random_batch(spec, config.model.vocab_size)
  history = []
  with jax.set_mesh(setup.mesh):
    for _ in range(steps):
      trainable, opt_state, metrics = setup.train_step(trainable, opt_state, frozen, batch)
      history.append({k: float(v) for k, v in metrics.items()})
  return history, trainable, opt_state, setup


def fsdp_config(**overrides):
  config = sample_config()
  config.data.max_images = 0  # text only: the levers act on the decoder and the loss; shorter compiles
  config.train.loss_chunk = 32  # the chunked loss's loop, as big runs have it
  config.train.loss_vocab_sharded = False
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def plain():
  return train_steps(fsdp_config())


def assert_same_training(got, want, *, rtol, atol=0.0):
  (got_history, got_weights, got_state, _), (want_history, want_weights, want_state, _) = got, want
  for g, w in zip(got_history, want_history):
    assert g.keys() == w.keys()
    for k in g:
      np.testing.assert_allclose(g[k], w[k], rtol=rtol, err_msg=k)
  for tree_got, tree_want in ((got_weights, want_weights), (got_state, want_state)):
    for g, w in zip(jax.tree.leaves(tree_got), jax.tree.leaves(tree_want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=str(g.shape))


def test_optimizer_state_in_host_memory_trains_as_on_the_device(plain):
  offloaded = train_steps(fsdp_config(optim__offload=True))
  # Created and kept between steps in host memory; the weights stay on the device.
  _, weights, opt_state, setup = offloaded
  assert {x.sharding.memory_kind for x in jax.tree.leaves(opt_state)} == {"pinned_host"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(weights)} == {"device"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(setup.abstract_opt_state)} == {"pinned_host"}
  # Moved, not changed: the same arithmetic on the same values.
  assert_same_training(offloaded, plain, rtol=1e-6)


def test_vocabulary_split_loss_trains_as_the_gathered_one(plain):
  split = train_steps(fsdp_config(train__loss_vocab_sharded=True))
  # The loss sums its reductions in another order: float32 rounding apart, the same run (Adam
  # divides by the gradients' scale, so where a gradient is near 0 its rounding moves a weight
  # by up to ~1e-7, a ten-thousandth of a step at the learning rate of 1e-3).
  assert_same_training(split, plain, rtol=2e-5, atol=1e-6)
  # The sample's vocabulary splits over the 8 devices: the step's program holds no unsharded
  # [hidden, vocab] gradient of the output projection.
  setup = split[3]
  hidden, vocab = setup.abstract_params["llm"]["lm_head"]["kernel"].shape
  compiled = setup.compile_train_step(random_batch(plan.step_setup(fsdp_config(), jax.devices())[1], vocab))
  assert f"f32[{hidden},{vocab}]" not in compiled.as_text()
  assert f"f32[{hidden},{vocab // 8}]" in compiled.as_text()


def test_a_run_with_its_optimizer_state_in_host_memory_checkpoints_and_resumes(data_dir, tmp_path):
  """train.run with optim.offload over 4 devices (FSDP), resumed from its step-2 checkpoint (the
  optimizer state saved from and restored into host memory), ends where a run with the state on
  the devices ends."""

  def config(offload):
    c = tiny_config(1, data_dir, steps=4, eval_every=2, checkpoint_every=2)
    c.mesh.update(data=1, fsdp=-1, num_devices=4)
    c.optim.offload = offload
    return c

  on_device, offloaded = str(tmp_path / "on_device"), str(tmp_path / "offloaded")
  train.run(config(False), on_device)
  train.run(config(True), offloaded)
  # As if killed after its step-2 checkpoint: the last checkpoint and the report gone.
  shutil.rmtree(os.path.join(offloaded, "checkpoints", "4"))
  os.remove(os.path.join(offloaded, "report.json"))
  train.run(config(True), offloaded)
  losses = {w: [r["loss"] for r in metrics.read(w) if r["split"] == "train"] for w in (on_device, offloaded)}
  assert len(losses[on_device]) == 4
  np.testing.assert_allclose(losses[offloaded], losses[on_device], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(load_params(offloaded, 4)[0]), jax.tree.leaves(load_params(on_device, 4)[0])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
