"""The device mesh and how parameters and batches are laid out on it.

Every weight carries logical axis names (set in mgjax.models with nnx.with_partitioning);
the config's `mesh.rules` table maps them to mesh axes, so changing the parallelism of a
run is a config change, not a model change (MaxText's approach).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over every axis that holds replicas of the data.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the config's axis sizes (one may be -1: the devices left over)."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices do not divide by the fixed axes {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are present; "
        "set --config.mesh.data=-1 to use whatever is there")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  if devices is None:
    devices = jax.devices()[:mesh_cfg.num_devices] if mesh_cfg.get("num_devices") else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: the compiler propagates shardings from the ones we pin (params, batch).
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_rules(mesh_cfg: ml_collections.ConfigDict) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in mesh_cfg.rules)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: tuple) -> Any:
  """NamedShardings for an nnx.State whose variables carry logical axis names."""
  with nnx.logical_axis_rules(rules):
    pspecs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), pspecs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch axis is split (the data-parallel degree)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
  """Each process feeds its share of the global batch; it must split evenly."""
  shards = batch_shards(mesh)
  if global_batch % shards or global_batch % jax.process_count():
    raise ValueError(f"data.batch_size={global_batch} must divide by the data-parallel shards ({shards}) "
                     f"and the process count ({jax.process_count()})")
  return global_batch // jax.process_count()


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the per-process numpy batches into one global array per key."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s shapes carrying concrete shardings (orbax restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_optimizer_state(tx: optax.GradientTransformation, abstract_trainable: Any, mesh: Mesh) -> Any:
  """The optimizer state's shapes with shardings: each moment laid out like its weight.

  Left to XLA, Adam's moments would come out replicated: `zeros_like` does not read its
  input, so no sharding propagates from the weights, and every device would hold the
  whole optimizer state (3x the weights under FSDP). A state leaf belongs to the weight
  whose path ends its own path with the same shape (optax nests a copy of the weight tree
  per moment, under masks for frozen weights, which optax.tree_map_params cannot follow);
  counters and other leaves are replicated.
  """

  def key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))

  weights = {
      tuple(key(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_trainable)[0]
  }
  depths = sorted({len(p) for p in weights}, reverse=True)

  def layout(path, leaf) -> NamedSharding:
    keys = tuple(key(k) for k in path)
    for depth in depths:
      weight = weights.get(keys[-depth:])
      if weight is not None and weight.shape == leaf.shape:
        return weight.sharding
    return NamedSharding(mesh, P())

  shapes = jax.eval_shape(tx.init, abstract_trainable)
  return abstract_like(shapes, jax.tree_util.tree_map_with_path(layout, shapes))


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
  """A barrier over every process of the run, through the coordinator's key-value store (not
  a collective); nothing on a single process. `name` must be unique within the run.

  On CPU, a collective over a device group the run has not used yet first sets up a gloo
  context, and gives every process only 30 s to get there: processes that finished compiling
  a program far apart (a loaded host, a resumed run with no evaluation before its first step)
  then fail with "GetKeyValue() timed out". Meeting here first, after compiling, gives them
  `timeout_s` instead.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # the distributed client's barrier, with a timeout

  multihost.sync_global_processes(name, timeout=timeout_s, processes=set(range(jax.process_count())))
