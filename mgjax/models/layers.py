"""Small pieces shared by the towers and the decoder: attention math, activations, and
Linear/LayerNorm constructors that always attach logical axis names."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.models.axes import partitioned


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Scaled dot-product attention with grouped-query support.

  Args:
    q: [B, T, H, D] queries.
    k: [B, S, K, D] keys, H % K == 0 (K < H is grouped-query attention).
    v: [B, S, K, D] values.
    mask: optional bool [B, T, S], True where a query may attend; every row needs one True.

  Returns:
    [B, T, H, D] in v's dtype.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  if h % kv_heads:
    raise ValueError(f'{h} query heads are not a multiple of {kv_heads} kv heads')
  # Group query heads per kv head instead of repeating k/v: no [B,S,H,D] copies.
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  # Scores and softmax in float32 whatever the compute dtype: bf16 softmax loses too much.
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  if mask is not None:
    # A finite minimum, not -inf: a fully masked row would give NaN, this gives uniform.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, h, d)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, which CLIP ViT-L/14 was trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  # torch nn.GELU() and HF 'gelu' are the erf form; jax.nn.gelu defaults to tanh.
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  'gelu': exact_gelu,
  'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
  'quick_gelu': quick_gelu,
  'silu': jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; known: {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def layer_norm(dim: int, *, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """nnx.LayerNorm over the last axis with logical names on scale and bias."""
  return nnx.LayerNorm(
    dim, epsilon=eps, dtype=dtype, rngs=rngs,
    scale_init=partitioned(nnx.initializers.ones, ('norm',)),
    bias_init=partitioned(nnx.initializers.zeros, ('norm',)))


def linear(n_in: int, n_out: int, names: tuple[str, str], *, use_bias: bool = True,
           dtype: jnp.dtype, rngs: nnx.Rngs,
           init: Callable[..., jax.Array] = nnx.initializers.lecun_normal()) -> nnx.Linear:
  """nnx.Linear whose kernel carries `names` and whose bias carries the output name."""
  return nnx.Linear(
    n_in, n_out, use_bias=use_bias, dtype=dtype, rngs=rngs,
    kernel_init=partitioned(init, names),
    bias_init=partitioned(nnx.initializers.zeros, (names[1],)))
