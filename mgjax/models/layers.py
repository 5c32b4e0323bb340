"""Small pieces shared by the towers and the decoder: attention math, activations, and
Linear/LayerNorm constructors that always attach logical axis names."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.models import attention
from mgjax.models.axes import partitioned


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Scaled dot-product attention with grouped-query support, through XLA.

  q [B, T, H, D]; k, v [B, S, K, D] with H % K == 0; mask optional bool [B, T, S], True where
  a query may attend (every row needs one True). For a decoder's causal attention over its
  own packed tokens use `mgjax.models.attention.causal_attention`, which takes segment ids.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  return attention.attend(q, k, v, mask)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, which CLIP ViT-L/14 was trained with."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  # torch nn.GELU() and HF 'gelu' are the erf form; jax.nn.gelu defaults to tanh.
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": exact_gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def layer_norm(dim: int, *, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """nnx.LayerNorm over the last axis with logical names on scale and bias."""
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs,
                       scale_init=partitioned(nnx.initializers.ones,
                                              ("norm",)), bias_init=partitioned(nnx.initializers.zeros, ("norm",)))


def linear(n_in: int, n_out: int, names: tuple[str, str], *, use_bias: bool = True, dtype: jnp.dtype, rngs: nnx.Rngs,
           init: Callable[..., jax.Array] = nnx.initializers.lecun_normal()) -> nnx.Linear:
  """nnx.Linear whose kernel carries `names` and whose bias carries the output name."""
  return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, rngs=rngs, kernel_init=partitioned(init, names),
                    bias_init=partitioned(nnx.initializers.zeros, (names[1],)))
