"""Logical axis names on weights, and the default table mapping them to mesh axes.

Every weight carries logical names (MaxText style) so that the sharding of the whole model
is decided by one short rules table, not by the modules. A weight's names must map to distinct
mesh axes: PartitionSpec('fsdp', 'fsdp') is invalid, so square or cross-tower matrices pair
names that land on different mesh axes (e.g. ('vision_embed', 'vision_mlp')).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd as flax_spmd

# (logical name, mesh axis or axes or None). Mesh axes: data, fsdp, tensor.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("conv_kernel", None),
    ("pos", None),
    ("layers", None),  # the stacked layer axis of model.llm.scan_layers
    ("expert", None),  # mixtral's experts; e.g. "tensor" (with mlp: None) splits them over devices
)


def partitioned(init: Callable[..., jax.Array], names: Sequence[str | None]) -> Callable[..., Any]:
  """Wraps an initializer so the created nnx.Param carries logical axis `names`.

  eager_sharding=False: building a module needs no mesh (single-device tests, eval_shape);
  sharding is applied by whoever creates the params, via jit out_shardings (see
  `logical_shardings`).
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def logical_shardings(
    state: nnx.State,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES,
) -> nnx.State:
  """A tree of NamedSharding matching `state` (concrete or abstract), from the logical names."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(state)
  return jax.tree.map(
      lambda spec: jax.sharding.NamedSharding(mesh, spec),
      specs,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
  )


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical names when a mesh is active, else a no-op.

  Active means traced under `jax.set_mesh(mesh)` (all axes Auto); the rules are those of an
  enclosing `nnx.logical_axis_rules(...)`, else DEFAULT_LOGICAL_AXIS_RULES. Why: besides
  keeping the batch split the way the data arrives, pinning it works around an XLA SPMD
  miscompile seen in jax 0.10.2 on CPU (a residual add after chained fsdp x tensor matmuls
  returned wrong rows for the middle batch shards; tests/test_models.py guards it).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.are_all_axes_auto:
    return x
  spec = []
  for name in names:
    kept = mesh_axes(name, mesh)
    spec.append(kept if len(kept) > 1 else (kept[0] if kept else None))
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def mesh_axes(name: str | None, mesh) -> tuple[str, ...]:
  """The mesh axes the logical `name` maps to under the active rules (those of an enclosing
  `nnx.logical_axis_rules(...)`, else DEFAULT_LOGICAL_AXIS_RULES). Axes this mesh lacks are
  dropped, so a model also runs under e.g. a data-only mesh."""
  if name is None:
    return ()
  axes = dict(flax_spmd.get_logical_axis_rules() or DEFAULT_LOGICAL_AXIS_RULES).get(name)
  return tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a in mesh.axis_names)
