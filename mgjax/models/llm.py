"""Llama-style decoder LM: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Parameter names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers/N/self_attn/q_proj,
mlp/gate_proj, input_layernorm, ...) so weight import is a rename plus reshape: attention kernels
are kept per head ([embed, heads, head_dim]) so heads can be sharded over the tensor axis.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.models.axes import constrain, partitioned
from mgjax.models.layers import dot_product_attention

# HF Llama initialises every matrix with N(0, 0.02); following it keeps from-scratch runs comparable.
_INIT = nnx.initializers.normal(0.02)
# Activations between blocks: split over the batch only (see axes.constrain).
_RESIDUAL = ('batch', None, None)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32 (as HF Llama does), scaled by a learned `scale`."""

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(partitioned(nnx.initializers.ones, ('norm',))(rngs.params(), (dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, HF's rotate-half layout (first half/second half pairs).

  x: [B, T, N, D]; positions: [B, T] int.
  """
  d = x.shape[-1]
  half = d // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE (kv_heads <= heads)."""

  def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *,
               rope_theta: float, qkv_bias: bool = False, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if heads % kv_heads:
      raise ValueError(f'heads={heads} must be a multiple of kv_heads={kv_heads}')
    self.rope_theta = rope_theta

    def proj(n_heads, head_axis):
      return nnx.LinearGeneral(
        hidden, (n_heads, head_dim), use_bias=qkv_bias, dtype=dtype, rngs=rngs,
        kernel_init=partitioned(_INIT, ('embed', head_axis, 'head_dim')),
        bias_init=partitioned(nnx.initializers.zeros, (head_axis, 'head_dim')))

    self.q_proj = proj(heads, 'heads')
    self.k_proj = proj(kv_heads, 'kv_heads')
    self.v_proj = proj(kv_heads, 'kv_heads')
    self.o_proj = nnx.LinearGeneral(
      (heads, head_dim), hidden, axis=(-2, -1), use_bias=False, dtype=dtype, rngs=rngs,
      kernel_init=partitioned(_INIT, ('heads', 'head_dim', 'embed')))

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    q = apply_rope(self.q_proj(x), positions, self.rope_theta)
    k = apply_rope(self.k_proj(x), positions, self.rope_theta)
    v = self.v_proj(x)
    return self.o_proj(dot_product_attention(q, k, v, mask))


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x))."""

  def __init__(self, hidden: int, mlp: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    def linear(n_in, n_out, names):
      return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, rngs=rngs,
                        kernel_init=partitioned(_INIT, names))

    self.gate_proj = linear(hidden, mlp, ('embed', 'mlp'))
    self.up_proj = linear(hidden, mlp, ('embed', 'mlp'))
    self.down_proj = linear(mlp, hidden, ('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, mlp: int, *,
               rope_theta: float, norm_eps: float, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(hidden, eps=norm_eps, dtype=dtype, rngs=rngs)
    self.self_attn = Attention(hidden, heads, kv_heads, head_dim, rope_theta=rope_theta,
                               dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(hidden, eps=norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = SwiGLU(hidden, mlp, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x), positions, mask)
    return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal AND same-segment mask [B, T, T] for packed rows.

  Segment id 0 marks padding: a padding token attends only to itself, so its softmax row is
  well defined (no NaN) and it never mixes with real tokens in either direction.
  """
  t = segment_ids.shape[1]
  idx = jnp.arange(t)
  causal = idx[:, None] >= idx[None, :]
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] != 0)
  return causal[None] & (same | jnp.eye(t, dtype=bool)[None])


class DecoderLM(nnx.Module):
  """Llama-family causal LM returning float32 logits [B, T, vocab]."""

  def __init__(self, *, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
               head_dim: int, mlp: int, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
               tie_embeddings: bool = False, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    self.vocab_size = vocab_size
    self.hidden = hidden
    self.tie_embeddings = tie_embeddings
    self.embed_tokens = nnx.Embed(
      vocab_size, hidden, dtype=self.dtype, rngs=rngs,
      embedding_init=partitioned(_INIT, ('vocab', 'embed')))
    self.layers = nnx.List([
      DecoderLayer(hidden, heads, kv_heads, head_dim, mlp, rope_theta=rope_theta,
                   norm_eps=norm_eps, dtype=self.dtype, rngs=rngs)
      for _ in range(layers)])
    self.norm = RMSNorm(hidden, eps=norm_eps, dtype=self.dtype, rngs=rngs)
    if tie_embeddings:
      self.lm_head = None
    else:
      # f32 accumulation and output: the loss over a large vocab needs f32 logits anyway.
      self.lm_head = nnx.Linear(
        hidden, vocab_size, use_bias=False, dtype=self.dtype,
        preferred_element_type=jnp.float32, rngs=rngs,
        kernel_init=partitioned(_INIT, ('embed', 'vocab')))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, hidden] in the compute dtype."""
    return self.embed_tokens(input_ids).astype(self.dtype)

  def __call__(self, input_ids: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None,
               positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, vocab] from token ids or ready embeddings (exactly one of them).

    positions default to 0..T-1 per row; a packer passes per-segment positions.
    segment_ids default to all ones (one sequence per row); 0 marks padding.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError('pass exactly one of input_ids and inputs_embeds')
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    b, t = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    mask = attention_mask(segment_ids)
    x = constrain(x, _RESIDUAL)
    for layer in self.layers:
      x = constrain(layer(x, positions, mask), _RESIDUAL)
    x = self.norm(x)
    if self.lm_head is None:
      table = self.embed_tokens.embedding[...].astype(self.dtype)
      logits = jnp.einsum('btd,vd->btv', x, table, preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(x).astype(jnp.float32)
    return constrain(logits, ('batch', None, 'vocab'))
