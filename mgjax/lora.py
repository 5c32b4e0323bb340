"""LoRA as a weight delta: W' = W + (alpha / rank) * A @ B on the kernels the config names.

The model is not changed: adapters are a separate tree that mirrors the paths of the
kernels they adapt ({"llm": {"layers": {0: {"self_attn": {"q_proj": {"kernel": {"a", "b"}}}}}}}),
and `merge` turns base weights plus adapters into plain weights, which is what the
forward pass, every checkpoint's `params` and any export see. Only the adapters train
and carry optimizer state; the base weights stay as they were.

A kernel's axes split into inputs and outputs: [embed, heads, head_dim] for q/k/v (one
input axis), [heads, head_dim, embed] for o_proj (two), [in, out] for plain linears.
A is [*inputs, rank] (random), B is [rank, *outputs] (zeros): the delta starts at 0.
A scanned decoder's kernels (model.llm.scan_layers: llm/layers/self_attn/q_proj/kernel, no
layer index in the path) lead with a [layers] axis: each layer gets its own A and B,
[layers, *inputs, rank] and [layers, rank, *outputs].
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mgjax.checkpoint import path_str


def num_input_axes(path: str) -> int:
  """How many axes of the kernel at `path` (after any layer axis) are its inputs."""
  return 2 if path.endswith("o_proj/kernel") else 1


def num_layer_axes(path: str) -> int:
  """1 for a scanned decoder's stacked kernel (a leading [layers] axis), else 0."""
  return 1 if re.match(r"llm/layers/[^0-9/]", path) else 0


def target_paths(params: Any, lora_cfg: ml_collections.ConfigDict) -> list[str]:
  """Paths of the kernels that get adapters; an error if the patterns match none."""
  patterns = [re.compile(p) for p in lora_cfg.targets]
  paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  matched = [p for p in paths if any(c.fullmatch(p) for c in patterns)]
  if not matched:
    raise ValueError(f"lora.targets={tuple(lora_cfg.targets)} match no parameter; paths look like {paths[:3]}")
  return matched


def _nest(flat: dict[str, Any], params: Any) -> dict:
  """{"a/b/0/c": x} -> {"a": {"b": {0: {"c": x}}}}, with the key types of `params` (ints for lists)."""
  keys = {
      path_str(p): [getattr(k, "key", getattr(k, "idx", None)) for k in p]
      for p, _ in jax.tree_util.tree_leaves_with_path(params)
  }
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in keys[path][:-1]:
      node = node.setdefault(key, {})
    node[keys[path][-1]] = value
  return tree


def _flat_adapters(adapters: Any) -> dict[str, dict[str, Any]]:
  """{kernel path: {"a": A, "b": B}} from the nested adapter tree."""
  flat: dict[str, dict[str, Any]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(adapters):
    full = path_str(path)
    kernel, _, which = full.rpartition("/")
    flat.setdefault(kernel, {})[which] = leaf
  return flat


def init(params: Any, lora_cfg: ml_collections.ConfigDict, key: jax.Array) -> dict:
  """Fresh adapters for `params` (arrays or ShapeDtypeStructs): A ~ N(0, 1/fan_in), B = 0."""
  shapes = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  rank = int(lora_cfg.rank)
  flat = {}
  for i, path in enumerate(target_paths(params, lora_cfg)):
    lead, n_in = num_layer_axes(path), num_input_axes(path)
    layers, shape = shapes[path][:lead], shapes[path][lead:]
    inputs, outputs = shape[:n_in], shape[n_in:]
    a = jax.random.normal(jax.random.fold_in(key, i), (*layers, *inputs, rank), jnp.float32)
    flat[path] = {"a": a / math.sqrt(math.prod(inputs)), "b": jnp.zeros((*layers, rank, *outputs), jnp.float32)}
  return _nest(flat, params)


def delta(a: jax.Array, b: jax.Array, scale: float, layer_axes: int = 0) -> jax.Array:
  """scale * A @ B in the kernel's shape [*layers, *inputs, *outputs]."""
  rank = a.shape[-1]
  layers = a.shape[:layer_axes]
  product = a.reshape(*layers, -1, rank) @ b.reshape(*layers, rank, -1)
  return scale * product.reshape(*a.shape[:-1], *b.shape[layer_axes + 1:])


def merge(params: Any, adapters: Any, lora_cfg: ml_collections.ConfigDict) -> Any:
  """Plain weights: every adapted kernel replaced by W + (alpha / rank) * A @ B."""
  scale = float(lora_cfg.alpha) / int(lora_cfg.rank)
  flat = _flat_adapters(adapters)

  def merged(path, w):
    name = path_str(path)
    ab = flat.get(name)
    return w if ab is None else (w + delta(ab["a"], ab["b"], scale, num_layer_axes(name))).astype(w.dtype)

  return jax.tree_util.tree_map_with_path(merged, params)


def shardings(adapters: Any, param_shardings: Any) -> Any:
  """Adapters sharded like their kernels: A along the input axes, B along the outputs."""
  kernel_shardings = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}

  def sharding(path, leaf):
    kernel, _, which = path_str(path).rpartition("/")
    s = kernel_shardings[kernel]
    lead, n_in = num_layer_axes(kernel), num_input_axes(kernel)
    spec = tuple(s.spec) + (None,) * 8  # a spec may leave trailing axes out
    if which == "a":
      new = spec[:lead + n_in] + (None,)
    else:
      new = spec[:lead] + (None,) + spec[lead + n_in:lead + n_in + leaf.ndim - lead - 1]
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*new))

  return jax.tree_util.tree_map_with_path(sharding, adapters)
