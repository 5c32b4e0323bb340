"""LoRA as a weight delta: starts at zero, stays low-rank, shards like its kernels."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mgjax import lora

TARGETS = (r"llm/layers/(\d+/)?(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel",)


def lora_cfg(rank=4, alpha=8.0, targets=TARGETS):
  return ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, targets=targets))


def params():
  """A Llama-shaped slice of a param tree: per-head attention kernels and a plain MLP."""
  rng = np.random.default_rng(0)
  layer = {
      "self_attn": {
          "q_proj": {
              "kernel": rng.normal(size=(16, 4, 8))
          },
          "o_proj": {
              "kernel": rng.normal(size=(4, 8, 16))
          }
      },
      "mlp": {
          "gate_proj": {
              "kernel": rng.normal(size=(16, 32))
          }
      },
      "input_layernorm": {
          "scale": np.ones(16)
      }
  }
  return jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float32), {
          "llm": {
              "layers": {
                  0: layer,
                  1: jax.tree.map(lambda x: x + 1, layer)
              }
          },
          "projector": {
              "kernel": rng.normal(size=(16, 16))
          }
      })


def test_adapters_start_at_zero_and_only_targets_get_them():
  p = params()
  adapters = lora.init(p, lora_cfg(), jax.random.key(0))
  assert sorted(adapters["llm"]["layers"][0]["self_attn"]) == ["o_proj", "q_proj"]
  assert "projector" not in adapters and "input_layernorm" not in adapters["llm"]["layers"][0]
  q = adapters["llm"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  o = adapters["llm"]["layers"][0]["self_attn"]["o_proj"]["kernel"]
  assert q["a"].shape == (16, 4) and q["b"].shape == (4, 4, 8)
  assert o["a"].shape == (4, 8, 4) and o["b"].shape == (4, 16)
  merged = lora.merge(p, adapters, lora_cfg())
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(p)):
    np.testing.assert_array_equal(a, b)


def test_merged_delta_is_low_rank_and_scaled():
  p = params()
  cfg = lora_cfg(rank=2, alpha=6.0)
  adapters = lora.init(p, cfg, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), adapters)
  merged = lora.merge(p, adapters, cfg)
  w = p["llm"]["layers"][1]["self_attn"]["o_proj"]["kernel"]
  d = np.asarray(merged["llm"]["layers"][1]["self_attn"]["o_proj"]["kernel"] - w).reshape(32, 16)
  assert np.linalg.matrix_rank(d, tol=1e-4) == 2
  ab = adapters["llm"]["layers"][1]["self_attn"]["o_proj"]["kernel"]
  expected = 3.0 * np.asarray(ab["a"]).reshape(32, 2) @ np.asarray(ab["b"])
  np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["projector"]["kernel"], p["projector"]["kernel"])


def test_a_scanned_stack_gets_one_adapter_per_layer_with_the_same_merge():
  # The per-layer tree and its scan_layers stacking ([layers, ...] kernels) merge to the same
  # weights when each layer's adapters are stacked the same way.
  from mgjax.models.llm import stack_layers
  p = params()
  stacked = {**p, "llm": stack_layers(p["llm"])}
  cfg = lora_cfg(rank=2)
  adapters = lora.init(p, cfg, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), adapters)
  stacked_adapters = {"llm": stack_layers(adapters["llm"])}
  fresh = lora.init(stacked, cfg, jax.random.key(1))["llm"]["layers"]["self_attn"]["o_proj"]["kernel"]
  assert fresh["a"].shape == (2, 4, 8, 2) and fresh["b"].shape == (2, 2, 16)
  assert jax.tree.structure(fresh) == jax.tree.structure(
      stacked_adapters["llm"]["layers"]["self_attn"]["o_proj"]["kernel"])
  merged = lora.merge(stacked, stacked_adapters, cfg)
  expected = stack_layers(lora.merge(p, adapters, cfg)["llm"])
  for a, b in zip(jax.tree.leaves(merged["llm"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = jax.sharding.PartitionSpec
  shardings = jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, spec()), stacked)
  shardings["llm"]["layers"]["self_attn"]["o_proj"]["kernel"] = jax.sharding.NamedSharding(
      mesh, spec(None, "tensor", None, "fsdp"))
  out = lora.shardings(stacked_adapters, shardings)["llm"]["layers"]["self_attn"]["o_proj"]["kernel"]
  assert out["a"].spec == spec(None, "tensor", None, None) and out["b"].spec == spec(None, None, "fsdp")


def test_adapters_shard_along_their_kernels_axes():
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = jax.sharding.PartitionSpec
  p = params()
  shardings = jax.tree.map(lambda x: jax.sharding.NamedSharding(mesh, spec()), p)
  layer = shardings["llm"]["layers"][0]
  layer["self_attn"]["q_proj"]["kernel"] = jax.sharding.NamedSharding(mesh, spec("fsdp", "tensor", None))
  layer["self_attn"]["o_proj"]["kernel"] = jax.sharding.NamedSharding(mesh, spec("tensor", None, "fsdp"))
  adapters = lora.init(p, lora_cfg(), jax.random.key(0))
  out = lora.shardings(adapters, shardings)["llm"]["layers"][0]["self_attn"]
  q, o = out["q_proj"]["kernel"], out["o_proj"]["kernel"]
  assert q["a"].spec == spec("fsdp", None)
  assert q["b"].spec == spec(None, "tensor", None)
  assert o["a"].spec == spec("tensor", None, None)
  assert o["b"].spec == spec(None, "fsdp")


def test_targets_that_match_nothing_are_an_error():
  with pytest.raises(ValueError, match="match no parameter"):
    lora.init(params(), lora_cfg(targets=(r"decoder/.*",)), jax.random.key(0))
