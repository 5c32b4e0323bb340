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

# (logical name, mesh axis or axes or None). Mesh axes: data, fsdp, tensor.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  ('batch', ('data', 'fsdp')),
  ('vocab', 'tensor'),
  ('embed', 'fsdp'),
  ('mlp', 'tensor'),
  ('heads', 'tensor'),
  ('kv_heads', 'tensor'),
  ('head_dim', None),
  ('norm', None),
  ('vision_embed', 'fsdp'),
  ('vision_mlp', 'tensor'),
  ('vision_heads', 'tensor'),
  ('conv_in', None),
  ('conv_out', 'fsdp'),
  ('conv_kernel', None),
  ('pos', None),
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
