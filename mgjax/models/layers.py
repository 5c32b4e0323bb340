"""Small pieces shared by the towers and the decoder: attention math, activations, and
Linear/LayerNorm constructors that always attach logical axis names."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.models.axes import partitioned


# Queries per block when dot_product_attention may skip the keys after each block (causal=True).
# 128 was the fastest of 64/128/256 at T=1024 on a 2-core CPU (benchmarks/train_step.py --micro).
CAUSAL_BLOCK = 128


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
    causal: bool = False
) -> jax.Array:
  """Scaled dot-product attention with grouped-query support.

  Args:
    q: [B, T, H, D] queries.
    k: [B, S, K, D] keys, H % K == 0 (K < H is grouped-query attention).
    v: [B, S, K, D] values.
    mask: optional bool [B, T, S], True where a query may attend; every row needs one True.
    causal: promise that T == S and that `mask` lets no query see a later key (a decoder's
      own tokens, packed or not). Query blocks then skip the keys after the block, which the
      mask hides anyway: (n + 1) / 2n of the [T, S] scores and softmax instead of all of them,
      as a flash kernel would skip them. The result is the same.

  Returns:
    [B, T, H, D] in v's dtype.
  """
  t = q.shape[1]
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads')
  if not (causal and t == k.shape[1] and t > CAUSAL_BLOCK):
    return _attend(q, k, v, mask)
  outs = []
  for start in range(0, t, CAUSAL_BLOCK):
    end = min(start + CAUSAL_BLOCK, t)
    outs.append(_attend(q[:, start:end], k[:, :end], v[:, :end],
                        None if mask is None else mask[:, start:end, :end]))
  return jnp.concatenate(outs, axis=1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1:3]
  g = h // kv_heads
  # Heads next to the batch, query groups merged with the queries ([B, K, G*T, D]); no
  # [B, S, H, D] copies of k/v. Every score and value matmul, forward and backward, then has
  # its batch dims leading, which XLA:CPU runs without copying the [T, S] operands; the 5-D
  # 'btkgd,bskd->bkgts' form spent 1.4x as long (benchmarks/train_step.py --micro).
  qh = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
  kh = k.transpose(0, 2, 1, 3)
  vh = v.transpose(0, 2, 1, 3)
  # Scores and softmax in float32 whatever the compute dtype: bf16 softmax loses too much.
  scores = jnp.einsum('bkqd,bksd->bkqs', qh, kh, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  if mask is not None:
    rows = jnp.broadcast_to(mask[:, None, None], (b, kv_heads, g, t, s)).reshape(b, kv_heads, g * t, s)
    # A finite minimum, not -inf: a fully masked row would give NaN, this gives uniform.
    scores = jnp.where(rows, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkqs,bksd->bkqd', probs, vh)
  return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


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
