"""Sparse mixture-of-experts MLP, Mixtral's block_sparse_moe, and its load-balancing loss.

A router (`gate`, a [hidden, num_experts] matrix) scores every token; the token goes to its
`experts_per_token` best experts, gated MLPs down(act(w1 x) * w3 x) with their own weights,
and the block's output is their outputs weighted by the renormalised router probabilities.
Routing follows transformers' MixtralTopKRouter: logits in the compute dtype, softmax in
float32, top-k, the k probabilities divided by their sum.

The expert computation is dropless (no capacity, every token reaches its k experts) and
grouped: the (token, slot) pairs are sorted by expert, each expert's rows are multiplied by
its weights with one jax.lax.ragged_dot (a grouped matmul over the group sizes), and the rows
are put back in token order and summed with their weights. Compute is that of k dense MLPs,
not of num_experts.

Parameters (names as Hugging Face's Mixtral checkpoints, experts stacked):
  gate/kernel      [hidden, num_experts]          logical ('embed', 'expert')
  experts/w1, w3   [num_experts, hidden, mlp]     logical ('expert', 'embed', 'mlp')
  experts/w2       [num_experts, mlp, hidden]     logical ('expert', 'mlp', 'embed')
Under a mesh the experts run in a shard_map: each batch shard sorts its own tokens; a mesh
axis that 'expert' maps to holds num_experts / size experts per device (expert parallelism),
one that 'mlp' maps to splits every expert's hidden units (tensor parallelism), and the
partial outputs are summed over those axes; 'embed' (FSDP) weights are gathered first. When
such an axis also splits the batch, the tokens of that axis are gathered before and the sum
is scattered back after (all-gather / reduce-scatter instead of all-to-all).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.models.axes import mesh_axes, partitioned
from mgjax.models.layers import activation

# The same N(0, 0.02) as the dense layers (HF Mixtral's initializer_range).
_INIT = nnx.initializers.normal(0.02)
EXPERT_IN = ("expert", "embed", "mlp")
EXPERT_OUT = ("expert", "mlp", "embed")


class Experts(nnx.Module):
  """num_experts gated MLPs with stacked weights (HF's experts.E.w1 / w2 / w3, [out, in] each)."""

  def __init__(self, num_experts: int, hidden: int, mlp: int, *, rngs: nnx.Rngs):
    self.w1 = nnx.Param(partitioned(_INIT, EXPERT_IN)(rngs.params(), (num_experts, hidden, mlp)))
    self.w3 = nnx.Param(partitioned(_INIT, EXPERT_IN)(rngs.params(), (num_experts, hidden, mlp)))
    self.w2 = nnx.Param(partitioned(_INIT, EXPERT_OUT)(rngs.params(), (num_experts, mlp, hidden)))


class SparseMoE(nnx.Module):
  """Top-k routed experts: x [B, T, hidden] -> ([B, T, hidden], router statistics [2, E])."""

  def __init__(self, hidden: int, mlp: int, num_experts: int, experts_per_token: int, *, activation_name: str = "silu",
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if not 0 < experts_per_token <= num_experts:
      raise ValueError(f"model.llm.experts_per_token={experts_per_token} must be in 1..num_experts "
                       f"({num_experts})")
    activation(activation_name)  # an unknown name fails here, not at the first call
    self.activation_name = activation_name
    self.num_experts = num_experts
    self.experts_per_token = experts_per_token
    self.dtype = dtype
    self.gate = nnx.Linear(hidden, num_experts, use_bias=False, dtype=dtype, rngs=rngs,
                           kernel_init=partitioned(_INIT, ("embed", "expert")))
    self.experts = Experts(num_experts, hidden, mlp, rngs=rngs)

  def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(router probabilities float32 [B, T, E], top-k weights float32 [B, T, k], their expert
    indices int32 [B, T, k]), as transformers' MixtralTopKRouter computes them."""
    logits = self.gate(x).astype(jnp.float32)  # the matmul in the compute dtype, as HF's F.linear
    probs = jax.nn.softmax(logits, axis=-1)
    top, index = jax.lax.top_k(probs, self.experts_per_token)
    return probs, top / jnp.sum(top, axis=-1, keepdims=True), index.astype(jnp.int32)

  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The block's output [B, T, hidden] in the compute dtype, and `router_stats` over the
    tokens where token_mask [B, T] is true (all of them when None)."""
    x = x.astype(self.dtype)
    probs, weights, index = self.route(x)
    y = expert_mixture(x, weights, index, self.experts.w1[...], self.experts.w3[...], self.experts.w2[...],
                       activation_name=self.activation_name)
    return y, router_stats(probs, index, token_mask)


def router_stats(probs: jax.Array, index: jax.Array, token_mask: jax.Array | None) -> jax.Array:
  """[2, E] float32: per expert, how many of the counted tokens' top-k slots chose it, and the
  sum of its router probability over those tokens. Sums add up over layers and batch shards;
  `load_balancing_loss` turns them into the loss."""
  mask = (jnp.ones(probs.shape[:-1], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32))
  chosen = jax.nn.one_hot(index, probs.shape[-1], dtype=jnp.float32)  # [B, T, k, E]
  return jnp.stack([jnp.einsum("bt,btke->e", mask, chosen), jnp.einsum("bt,bte->e", mask, probs)])


def load_balancing_loss(stats: jax.Array, rows: jax.Array) -> jax.Array:
  """transformers' load_balancing_loss_func from `router_stats` summed over the layers.

  rows: the counted tokens times the number of layers (the router outputs averaged over).
  E * sum_e (share of top-k slots on e) * (mean router probability of e); a batch without
  counted tokens gives 0.
  """
  rows = jnp.maximum(rows.astype(jnp.float32), 1.0)
  return stats.shape[-1] * jnp.sum((stats[0] / rows) * (stats[1] / rows))


def _local_mixture(x: jax.Array, weights: jax.Array, index: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, *,
                   first_expert: jax.Array | int, activation_name: str) -> jax.Array:
  """The weighted sum over slots of experts first_expert.. first_expert + w1.shape[0] - 1
  (the slots routed elsewhere add nothing): [B, T, hidden] in x's dtype."""
  b, t, h = x.shape
  k = index.shape[-1]
  num_local = w1.shape[0]
  local = index.reshape(-1) - first_expert  # [B*T*k], slot s belongs to token s // k
  mine = (local >= 0) & (local < num_local)
  group = jnp.where(mine, local, num_local)  # other experts' slots sort last, in no group
  order = jnp.argsort(group, stable=True)
  group_sizes = jnp.zeros((num_local,), jnp.int32).at[group].add(1, mode="drop")
  rows = x.reshape(b * t, h)[order // k]
  # ragged_dot multiplies group g's rows by weight g and leaves the rows past the groups zero.
  gate = jax.lax.ragged_dot(rows, w1.astype(x.dtype), group_sizes)
  up = jax.lax.ragged_dot(rows, w3.astype(x.dtype), group_sizes)
  out = jax.lax.ragged_dot(activation(activation_name)(gate) * up, w2.astype(x.dtype), group_sizes)
  slot_of_row = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  out = out[slot_of_row].reshape(b * t, k, h)
  weights = jnp.where(mine, weights.reshape(-1), 0.0).reshape(b * t, k, 1)
  # As transformers: each expert's output times its float32 weight, cast, then summed.
  terms = (out.astype(jnp.float32) * weights).astype(x.dtype)
  y = terms[:, 0]
  for j in range(1, k):
    y = y + terms[:, j]
  return y.reshape(b, t, h)


def expert_mixture(x: jax.Array, weights: jax.Array, index: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, *,
                   activation_name: str = "silu") -> jax.Array:
  """sum_j weights[..., j] * expert_{index[..., j]}(x): [B, T, hidden] in x's dtype.

  Without a mesh (or under a mesh with explicit axes) on one program; under an active mesh
  of Auto axes in a shard_map laid out by the logical rules (see the module docstring).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.are_all_axes_auto:
    return _local_mixture(x, weights, index, w1, w3, w2, first_expert=0, activation_name=activation_name)
  P = jax.sharding.PartitionSpec

  def size(axes):
    return math.prod(mesh.shape[a] for a in axes)

  def spec(axes):
    return (axes if len(axes) > 1 else axes[0]) if axes else None

  num_experts = w1.shape[0]
  batch = mesh_axes("batch", mesh)
  if x.shape[0] % size(batch):
    batch = ()  # rows that do not split evenly (a small decoding batch): every shard takes all
  expert, mlp, embed = (mesh_axes(n, mesh) for n in ("expert", "mlp", "embed"))
  if num_experts % size(expert):
    raise ValueError(f'{num_experts} experts do not split over mesh axes {expert} '
                     f'({size(expert)} devices); change the "expert" rule of mesh.rules')
  split = tuple(a for a in mesh.axis_names if a in expert + mlp)  # partial sums over these
  gathered = tuple(a for a in batch if a in split)  # ... of which these also split the tokens
  summed = tuple(a for a in split if a not in gathered)
  per_shard = num_experts // size(expert)

  def body(x, weights, index, w1, w3, w2):
    if gathered:
      x, weights, index = (jax.lax.all_gather(v, gathered, axis=0, tiled=True) for v in (x, weights, index))
    if embed:  # FSDP: the whole of this shard's experts for the matmuls
      w1, w3 = (jax.lax.all_gather(w, embed, axis=1, tiled=True) for w in (w1, w3))
      w2 = jax.lax.all_gather(w2, embed, axis=2, tiled=True)
    if summed:
      # Each shard reads the tokens for its own experts only, so x's gradient is a sum over
      # these axes. Marked varying here, the backward pass sums it: left to the gather by
      # shard-dependent indices below, jax 0.10.2 returns one shard's part (wrong gradient).
      x = jax.lax.pcast(x, summed, to="varying")
    first = jax.lax.axis_index(expert) * per_shard if expert else 0
    y = _local_mixture(x, weights, index, w1, w3, w2, first_expert=first, activation_name=activation_name)
    if gathered:
      y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
    if summed:
      y = jax.lax.psum(y, summed)
    return y

  rows = P(spec(batch), None, None)
  w_in = P(spec(expert), spec(embed), spec(mlp))
  w_out = P(spec(expert), spec(mlp), spec(embed))
  return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, w_in, w_in, w_out),
                       out_specs=rows)(x, weights, index, w1, w3, w2)
