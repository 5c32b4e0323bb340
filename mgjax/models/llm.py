"""Decoder LMs of the Llama, Gemma, Qwen2 and Mixtral families: RMSNorm, RoPE, grouped-query
attention, gated MLP (Mixtral: a sparse mixture of gated MLPs, see models.moe).

Parameter names follow Hugging Face's LlamaForCausalLM (embed_tokens, layers/N/self_attn/q_proj,
mlp/gate_proj, input_layernorm, ...) so weight import is a rename plus reshape: attention kernels
are kept per head ([embed, heads, head_dim]) so heads can be sharded over the tensor axis. Every
family has the same parameter paths; Qwen2 adds q/k/v biases (self_attn/q_proj/bias); Mixtral has
block_sparse_moe/gate/kernel and block_sparse_moe/experts/w1, w2, w3 ([num_experts, ...]) in
place of mlp/.

The config section `model.llm` (with `model.vocab_size` beside it):

  family          'llama' (default; Llama 1-3, Vicuna, Yi) | 'gemma' | 'qwen2' | 'mixtral'
  hidden, layers, heads, kv_heads, head_dim, mlp   sizes (head_dim need not be hidden/heads)
  rope_theta      RoPE base
  rope_scaling    None, or HF's dict: {'rope_type': 'llama3', 'factor', 'low_freq_factor',
                  'high_freq_factor', 'original_max_position_embeddings'} or
                  {'rope_type': 'linear', 'factor'}
  norm_eps        RMSNorm epsilon
  tie_embeddings  logits from the embedding table (Gemma: True) instead of lm_head
  qkv_bias        biases on q/k/v (Qwen2: True); None takes the family's default
  num_experts     mixtral: experts per layer (8); `mlp` is each expert's hidden size
  experts_per_token   mixtral: experts each token is routed to (2)
  router_aux_loss_coef  mixtral: weight of the router load-balancing loss in the training
                  loss (mgjax.train_step.make_train_step); 0 (the default, as MGM-8x7B trained: see
                  DEFAULT_ROUTER_AUX_LOSS_COEF) leaves it out, logged all the same
  remat           what a layer keeps for the backward pass (REMAT_POLICIES): 'none' | 'full' |
                  'dots' | 'qkv' | 'qkv_out' | 'qkv_offloaded' | 'dots_offloaded'
  scan_layers     the layers as one stacked layer run by jax.lax.scan (MaxText's scan_layers):
                  one layer's program compiled once, not L copies; weights carry a leading
                  'layers' axis (llm/layers/self_attn/q_proj/kernel is [L, embed, heads, head_dim])
  attention_kernel  (from model.attention) 'auto' | 'xla' | 'splash' | 'cudnn': see models.attention
  splash_blocks   (from model.splash_blocks) splash's block sizes: see attention.splash_block_sizes

How the families differ (as Hugging Face computes them):
  llama   RMSNorm scale w, cast to the compute dtype before scaling; SwiGLU (silu gate).
  gemma   token embeddings times sqrt(hidden) in the compute dtype; RMSNorm scale (1 + w),
          applied in float32; GeGLU (tanh-approximated gelu gate); tied embeddings.
  qwen2   llama with q/k/v biases.
  mixtral llama with every MLP a sparse mixture of experts (top-k routing, models.moe); the
          router statistics of all layers give transformers' load-balancing loss.
Gemma's sqrt(hidden) scaling is applied to the decoder's input embeddings, image features
included, as the transformers version Mini-Gemini trained MGM-2B with did (GemmaModel scaled
inputs_embeds); for text alone it equals scaling the embedding lookup, as transformers 5 does.

Decoding uses an explicit KV cache, a pytree passed in and returned (`DecoderLM.init_cache`,
`DecoderLM.extend`), so prefill and per-token steps are plain jittable functions.
`DecoderLM.prefill` fills a fresh cache with a prompt as `extend` would, attending as training
does (no [B, T, S] mask) and computing the last position's logits only.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mgjax.models import attention, moe
from mgjax.models.axes import constrain, partitioned
from mgjax.models.layers import activation, dot_product_attention

FAMILIES = ("llama", "gemma", "qwen2", "mixtral")
# Per family: the gate activation of the MLP, whether RMSNorm scales by (1 + w), whether token
# embeddings are multiplied by sqrt(hidden), the default for q/k/v biases, and whether the MLP
# is a sparse mixture of experts.
_FAMILY_TRAITS = {
    "llama": dict(mlp_activation="silu", norm_plus_one=False, scale_embeddings=False, qkv_bias=False, moe=False),
    "gemma": dict(mlp_activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True, qkv_bias=False, moe=False),
    "qwen2": dict(mlp_activation="silu", norm_plus_one=False, scale_embeddings=False, qkv_bias=True, moe=False),
    "mixtral": dict(mlp_activation="silu", norm_plus_one=False, scale_embeddings=False, qkv_bias=False, moe=True),
}
# Mixtral-8x7B's routing, the defaults of model.llm.num_experts / experts_per_token.
DEFAULT_NUM_EXPERTS = 8
DEFAULT_EXPERTS_PER_TOKEN = 2
# model.llm.router_aux_loss_coef's default: 0, what Mini-Gemini's MGM-8x7B trained with.
# transformers adds router_aux_loss_coef * aux_loss to the loss only when output_router_logits
# is on; MGMMixtralForCausalLM.forward (mgm/model/language_model/mgm_mixtral.py) never passes
# it, so the config's value holds, and Mixtral-8x7B-Instruct-v0.1's config.json has
# output_router_logits false: its router_aux_loss_coef (0.02) was never applied. Setting 0.02
# trains as transformers does with output_router_logits on.
DEFAULT_ROUTER_AUX_LOSS_COEF = 0.0

# HF Llama initialises every matrix with N(0, 0.02); following it keeps from-scratch runs comparable.
_INIT = nnx.initializers.normal(0.02)
# Activations between blocks: split over the batch only (see axes.constrain).
_RESIDUAL = ("batch", None, None)
# Cached keys and values [B, S, kv_heads, head_dim]: split like the activations and k_proj.
_CACHE_KV = ("batch", None, "kv_heads", None)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32 (as HF Llama does), scaled by a learned `scale`.

  plus_one (Gemma): the weight is stored as an offset, the norm scales by (1 + scale) in float32
  before casting back, and it starts at 0 (Llama's multiplies in the compute dtype, from 1).
  """

  def __init__(self, dim: int, *, eps: float = 1e-5, dtype: jnp.dtype = jnp.float32, plus_one: bool = False,
               rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.plus_one = plus_one
    init = nnx.initializers.zeros if plus_one else nnx.initializers.ones
    self.scale = nnx.Param(partitioned(init, ("norm",))(rngs.params(), (dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> tuple[float, ...]:
  """RoPE inverse frequencies (head_dim / 2 of them), in float32 as HF computes them.

  scaling: None, or HF's rope_scaling dict: 'llama3' (Llama 3.1+: long wavelengths slowed by
  `factor`, short ones kept, a smooth blend between) or 'linear' (all divided by `factor`).
  Returned as plain floats: a static, hashable module attribute, not a traced array.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind == "default":
    pass
  elif kind == "linear":
    inv_freq = inv_freq / np.float32(scaling["factor"])
  elif kind == "llama3":
    factor = np.float32(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = ((context / wavelen - low) / (high - low)).astype(np.float32)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    inv_freq = np.where(medium, blended, scaled).astype(np.float32)
  else:
    raise ValueError(f"model.llm.rope_scaling: rope_type {kind!r} is not supported (supported: "
                     "None, 'linear', 'llama3')")
  return tuple(float(f) for f in inv_freq.astype(np.float32))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0, *,
               inv_freq: Sequence[float] | None = None) -> jax.Array:
  """Rotary position embedding, HF's rotate-half layout (first half/second half pairs).

  x: [B, T, N, D]; positions: [B, T] int. inv_freq (from `rope_frequencies`) overrides theta.
  """
  d = x.shape[-1]
  half = d // 2
  if inv_freq is None:
    inv_freq = rope_frequencies(d, theta)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, half]
  sin = jnp.sin(angles)[:, :, None, None, :]
  cos = jnp.cos(angles)[:, :, None, None, :]
  # The halves as an axis of 2: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) is x cos plus
  # the halves swapped (a flip) times (-sin, sin). Slicing and concatenating the halves
  # instead costs XLA:CPU pad/concatenate fusions, forward and backward, 5x the time of
  # this one elementwise pass (benchmarks/RESULTS.md, train step).
  halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, half)
  signed_sin = jnp.asarray([-1.0, 1.0], jnp.float32)[:, None] * sin
  out = halves * cos + jnp.flip(halves, axis=-2) * signed_sin
  return out.reshape(x.shape).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE (kv_heads <= heads)."""

  def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, *, rope_theta: float,
               rope_scaling: Mapping[str, Any] | None = None, qkv_bias: bool = False, attention_kernel: str = "auto",
               splash_blocks: str = "auto", dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if heads % kv_heads:
      raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    self.rope_inv_freq = rope_frequencies(head_dim, rope_theta, rope_scaling)
    self.attention_kernel = attention.check(attention_kernel)
    self.splash_blocks = attention.check_splash_blocks(splash_blocks)

    def proj(n_heads, head_axis):
      return nnx.LinearGeneral(hidden, (n_heads, head_dim), use_bias=qkv_bias, dtype=dtype, rngs=rngs,
                               kernel_init=partitioned(_INIT, ("embed", head_axis, "head_dim")),
                               bias_init=partitioned(nnx.initializers.zeros, (head_axis, "head_dim")))

    self.q_proj = proj(heads, "heads")
    self.k_proj = proj(kv_heads, "kv_heads")
    self.v_proj = proj(kv_heads, "kv_heads")
    self.o_proj = nnx.LinearGeneral((heads, head_dim), hidden, axis=(-2, -1), use_bias=False, dtype=dtype, rngs=rngs,
                                    kernel_init=partitioned(_INIT, ("heads", "head_dim", "embed")))

  def _project(self, x: jax.Array, positions: jax.Array):
    # Named for the remat policies that keep them (REMAT_POLICIES).
    q = checkpoint_name(apply_rope(self.q_proj(x), positions, inv_freq=self.rope_inv_freq), "query_proj")
    k = checkpoint_name(apply_rope(self.k_proj(x), positions, inv_freq=self.rope_inv_freq), "key_proj")
    return q, k, checkpoint_name(self.v_proj(x), "value_proj")

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    q, k, v = self._project(x, positions)
    out = attention.causal_attention(q, k, v, segment_ids, implementation=self.attention_kernel,
                                     splash_blocks=self.splash_blocks)
    return checkpoint_name(self.o_proj(out), "out_proj")

  def prefill(self, x: jax.Array, positions: jax.Array,
              segment_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """__call__ for a left-padded prompt that fills a fresh KV cache.

    Attends as training does (causal within segments, no [B, T, S] mask), with the kernel
    `_prompt_kernel` picks. Returns the output [B, T, hidden] and the keys and values
    [B, T, kv_heads, head_dim] (keys after RoPE) for the cache.
    """
    q, k, v = self._project(x, positions)
    out = attention.causal_attention(q, k, v, segment_ids,
                                     implementation=_prompt_kernel(self.attention_kernel,
                                                                   x.shape[1]), splash_blocks=self.splash_blocks)
    return self.o_proj(out), k, v

  def extend(self, x: jax.Array, positions: jax.Array, mask: jax.Array, kv: dict[str, jax.Array],
             index: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Writes the new tokens' keys/values into cache slots index.. and attends over the cache.

    Args:
      x: [B, T, hidden] the new tokens.
      positions: [B, T] their RoPE positions.
      mask: bool [B, T, S] over the cache's S slots (see `cache_attention_mask`).
      kv: this layer's cache, {"k": [B, S, K, D], "v": [B, S, K, D]}.
      index: int32 scalar, the slot of the first new token.

    Returns:
      The attention output [B, T, hidden] and the updated {"k", "v"}.
    """
    q, k, v = self._project(x, positions)

    def write(cached, new):
      updated = jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), index, axis=1)
      return constrain(updated, _CACHE_KV)

    kv = {"k": write(kv["k"], k), "v": write(kv["v"], v)}
    return self.o_proj(dot_product_attention(q, kv["k"], kv["v"], mask)), kv


def _prompt_kernel(kernel: str, length: int) -> str:
  """The attention implementation for a left-padded prompt of `length` tokens.

  cuDNN's takes sequence lengths, so it serves padding at the end only; an explicit 'splash'
  needs the length to tile into its blocks, which a prompt's need not (decode.Generator pads
  to multiples of 64). Both become 'auto': splash on TPU where the length tiles, else XLA.
  """
  if kernel == "cudnn" or (kernel == "splash" and not attention.splash_fits(length)):
    return "auto"
  return kernel


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)): SwiGLU with silu (Llama, Qwen2), GeGLU with tanh-gelu (Gemma)."""

  def __init__(self, hidden: int, mlp: int, *, activation_name: str = "silu", dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    self.activation_name = activation_name
    activation(activation_name)  # an unknown name fails here, not at the first call

    def linear(n_in, n_out, names):
      return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, rngs=rngs, kernel_init=partitioned(_INIT, names))

    self.gate_proj = linear(hidden, mlp, ("embed", "mlp"))
    self.up_proj = linear(hidden, mlp, ("embed", "mlp"))
    self.down_proj = linear(mlp, hidden, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = activation(self.activation_name)(checkpoint_name(self.gate_proj(x), "mlp_gate"))
    return checkpoint_name(self.down_proj(gate * checkpoint_name(self.up_proj(x), "mlp_up")), "mlp_out")


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)).

  num_experts > 0 (Mixtral): the MLP is `block_sparse_moe`, a moe.SparseMoE routing each token
  to experts_per_token of num_experts gated MLPs of size `mlp`.
  """

  def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, mlp: int, *, rope_theta: float,
               norm_eps: float, dtype: jnp.dtype, rngs: nnx.Rngs, rope_scaling: Mapping[str, Any] | None = None,
               qkv_bias: bool = False, norm_plus_one: bool = False, mlp_activation: str = "silu",
               attention_kernel: str = "auto", splash_blocks: str = "auto", num_experts: int = 0,
               experts_per_token: int = DEFAULT_EXPERTS_PER_TOKEN):

    def norm():
      return RMSNorm(hidden, eps=norm_eps, dtype=dtype, plus_one=norm_plus_one, rngs=rngs)

    self.input_layernorm = norm()
    self.self_attn = Attention(hidden, heads, kv_heads, head_dim, rope_theta=rope_theta, rope_scaling=rope_scaling,
                               qkv_bias=qkv_bias, attention_kernel=attention_kernel, splash_blocks=splash_blocks,
                               dtype=dtype, rngs=rngs)
    self.post_attention_layernorm = norm()
    if num_experts:
      self.block_sparse_moe = moe.SparseMoE(hidden, mlp, num_experts, experts_per_token, activation_name=mlp_activation,
                                            dtype=dtype, rngs=rngs)
    else:
      self.mlp = GatedMLP(hidden, mlp, activation_name=mlp_activation, dtype=dtype, rngs=rngs)

  def _feed_forward(self, x: jax.Array, token_mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """The MLP's output and (experts only) its router statistics (moe.router_stats)."""
    if hasattr(self, "block_sparse_moe"):
      y, stats = self.block_sparse_moe(x, token_mask)
      return checkpoint_name(y, "mlp_out"), stats
    return self.mlp(x), None

  def forward(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """The layer's output and its router statistics over the real tokens (segment id > 0),
    None without experts."""
    x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
    y, stats = self._feed_forward(self.post_attention_layernorm(x), segment_ids > 0)
    return x + y, stats

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    return self.forward(x, positions, segment_ids)[0]

  def prefill(self, x: jax.Array, positions: jax.Array,
              segment_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """__call__ for a prompt filling a fresh KV cache: the output and this layer's keys and
    values (see Attention.prefill). Router statistics are for the training loss: not kept."""
    attended, k, v = self.self_attn.prefill(self.input_layernorm(x), positions, segment_ids)
    x = x + attended
    return x + self._feed_forward(self.post_attention_layernorm(x), None)[0], k, v

  def extend(self, x: jax.Array, positions: jax.Array, mask: jax.Array, kv: dict[str, jax.Array],
             index: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """__call__ for new tokens against a KV cache (see Attention.extend)."""
    attended, kv = self.self_attn.extend(self.input_layernorm(x), positions, mask, kv, index)
    x = x + attended
    return x + self._feed_forward(self.post_attention_layernorm(x), None)[0], kv


def cache_attention_mask(valid: jax.Array, index: jax.Array, num_new: int) -> jax.Array:
  """Mask [B, T, S] for T new tokens written into cache slots index..index+T-1.

  valid [B, S] marks the slots that hold real tokens (the new ones included). As in
  `attention_mask`, a real token sees the real tokens up to its own slot and a padding token
  sees only itself; slots not written yet are never valid, so they stay unseen.
  """
  slots = jnp.arange(valid.shape[1])
  query_slots = index + jnp.arange(num_new)
  causal = slots[None, :] <= query_slots[:, None]
  own = slots[None, :] == query_slots[:, None]
  query_valid = jnp.take_along_axis(valid, jnp.broadcast_to(query_slots, (valid.shape[0], num_new)), axis=1)
  return (causal[None] & valid[:, None, :] & query_valid[:, :, None]) | own[None]


# model.llm.remat: what a decoder layer keeps for the backward pass; the rest is recomputed.
#   none            everything (no recomputation; most memory)
#   full            only the layer's input (least memory, one extra forward of the layer)
#   dots            every matmul output without batch dims (MaxText's 'minimal'); recomputes
#                   the cheap elementwise work (norms, activations, softmax)
#   qkv             the q/k/v projections (after RoPE)
#   qkv_out         q/k/v and the attention output projection
#   qkv_offloaded   q/k/v moved to host memory (pinned_host) and fetched back for the backward
#                   pass: device memory of 'full', less recomputation (TPU; XLA:CPU has no host
#                   memory space, so there it only compiles for a TPU target)
#   dots_offloaded  as 'dots', with the matmul outputs kept in host memory
_OFFLOAD = dict(offload_src="device", offload_dst="pinned_host")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "qkv_out": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj"),
    "qkv_offloaded": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["query_proj", "key_proj", "value_proj"], **_OFFLOAD),
    "dots_offloaded": jax.checkpoint_policies.offload_dot_with_no_batch_dims(**_OFFLOAD),
}


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """DecoderLM params with per-layer subtrees ({'layers': {0: tree, 1: tree, ...}}) -> the
  scan_layers layout ({'layers': tree of [L, ...] arrays}); other entries unchanged."""
  layers = params["layers"]
  ordered = [layers[i] for i in sorted(layers, key=int)]
  return {**params, "layers": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *ordered)}


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_layers`: per-layer subtrees keyed 0..L-1."""
  stacked = params["layers"]
  num = len(jax.tree.leaves(stacked)[0])
  return {**params, "layers": {i: jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked) for i in range(num)}}


def is_stacked(params: Mapping[str, Any]) -> bool:
  """Whether DecoderLM params are in the scan_layers layout."""
  return not any(isinstance(k, int) or str(k).isdigit() for k in params["layers"])


class DecoderLM(nnx.Module):
  """Causal LM of one of FAMILIES returning float32 logits [B, T, vocab]."""

  def __init__(self, *, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, mlp: int,
               rope_theta: float = 10000.0, norm_eps: float = 1e-5, tie_embeddings: bool = False, remat: str = "none",
               family: str = "llama", rope_scaling: Mapping[str, Any] | None = None, qkv_bias: bool | None = None,
               scan_layers: bool = False, attention_kernel: str = "auto", splash_blocks: str = "auto",
               num_experts: int | None = None, experts_per_token: int | None = None,
               router_aux_loss_coef: float = DEFAULT_ROUTER_AUX_LOSS_COEF, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"model.llm.remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    if family not in FAMILIES:
      raise ValueError(f"model.llm.family={family!r}: expected one of {FAMILIES}")
    traits = _FAMILY_TRAITS[family]
    if traits["moe"]:
      num_experts = DEFAULT_NUM_EXPERTS if num_experts is None else int(num_experts)
      experts_per_token = DEFAULT_EXPERTS_PER_TOKEN if experts_per_token is None else int(experts_per_token)
      if num_experts < 1:
        raise ValueError(f"model.llm.num_experts={num_experts}: the mixtral family needs experts")
    elif num_experts:
      raise ValueError(f"model.llm.num_experts={num_experts}: family {family!r} has no experts "
                       "(the 'mixtral' family has)")
    # 0 for a dense MLP.
    self.num_experts = num_experts or 0
    self.experts_per_token = experts_per_token or 0
    self.router_aux_loss_coef = float(router_aux_loss_coef or 0.0) if self.num_experts else 0.0
    self.family = family
    self.scale_embeddings = traits["scale_embeddings"]
    self.remat = remat
    self.scan_layers = bool(scan_layers)
    self.num_layers = layers
    self.dtype = jnp.dtype(dtype)
    self.vocab_size = vocab_size
    self.hidden = hidden
    self.kv_heads = kv_heads
    self.head_dim = head_dim
    self.tie_embeddings = tie_embeddings
    self.embed_tokens = nnx.Embed(vocab_size, hidden, dtype=self.dtype, rngs=rngs,
                                  embedding_init=partitioned(_INIT, ("vocab", "embed")))
    # A ConfigDict section or None; a plain dict keeps the module's static data simple.
    rope_scaling = dict(rope_scaling) if rope_scaling else None

    def make_layer(rngs: nnx.Rngs) -> DecoderLayer:
      return DecoderLayer(hidden, heads, kv_heads, head_dim, mlp, rope_theta=rope_theta, norm_eps=norm_eps,
                          dtype=self.dtype, rngs=rngs, rope_scaling=rope_scaling,
                          qkv_bias=traits["qkv_bias"] if qkv_bias is None else bool(qkv_bias),
                          norm_plus_one=traits["norm_plus_one"], mlp_activation=traits["mlp_activation"],
                          attention_kernel=attention_kernel, splash_blocks=splash_blocks, num_experts=self.num_experts,
                          experts_per_token=self.experts_per_token or DEFAULT_EXPERTS_PER_TOKEN)

    if self.scan_layers:
      # One DecoderLayer whose weights have a leading [layers] axis, logical name 'layers'.
      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(rngs: nnx.Rngs) -> DecoderLayer:
        return make_layer(rngs)

      self.layers = stacked(rngs)
    else:
      self.layers = nnx.List([make_layer(rngs) for _ in range(layers)])
    self.norm = RMSNorm(hidden, eps=norm_eps, dtype=self.dtype, plus_one=traits["norm_plus_one"], rngs=rngs)
    if tie_embeddings:
      self.lm_head = None
    else:
      # f32 accumulation and output: the loss over a large vocab needs f32 logits anyway.
      self.lm_head = nnx.Linear(hidden, vocab_size, use_bias=False, dtype=self.dtype,
                                preferred_element_type=jnp.float32, rngs=rngs,
                                kernel_init=partitioned(_INIT, ("embed", "vocab")))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, hidden] in the compute dtype, as looked up (no family scaling:
    the VLM mixes image features into them before the decoder's input scaling)."""
    return self.embed_tokens(input_ids).astype(self.dtype)

  def _inputs(self, input_ids: jax.Array | None, inputs_embeds: jax.Array | None) -> jax.Array:
    """The decoder's input [B, T, hidden] from exactly one of ids and ready embeddings."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    if self.scale_embeddings:
      # Gemma: the factor rounded to the compute dtype first, as HF does (bf16 sqrt(2048) = 45.25).
      x = x * jnp.asarray(math.sqrt(self.hidden), self.dtype)
    return x

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, vocab] from token ids or ready embeddings (exactly one of them).

    positions default to 0..T-1 per row; a packer passes per-segment positions.
    segment_ids default to all ones (one sequence per row); 0 marks padding.
    """
    return self.logits(
        self.hidden_states(input_ids, inputs_embeds=inputs_embeds, positions=positions, segment_ids=segment_ids))

  def hidden_states(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                    positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                    return_router_aux_loss: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The final norm's output [B, T, hidden]: what `logits` (or a chunked loss) projects.

    return_router_aux_loss: also return the router load-balancing loss (float32 scalar;
    transformers' load_balancing_loss_func over all layers, padding (segment id 0) left out
    as transformers leaves out attention_mask 0; 0 for families without experts).
    """
    x = self._inputs(input_ids, inputs_embeds)
    b, t = x.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    x = constrain(x, _RESIDUAL)
    policy = REMAT_POLICIES[self.remat]

    def run_layer(layer: DecoderLayer, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
      x, stats = layer.forward(x, positions, segment_ids)
      return constrain(x, _RESIDUAL), stats

    def add(total, stats):
      return None if stats is None else total + stats

    if self.remat != "none":
      # Recompute the layer in the backward pass, keeping what the policy names.
      run_layer = nnx.remat(run_layer, policy=policy, prevent_cse=not self.scan_layers)
    # The router statistics summed over the layers (moe.router_stats), a scan carry.
    total = jnp.zeros((2, self.num_experts), jnp.float32) if self.num_experts else None
    if self.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(carry, layer_state):
        x, total = carry
        x, stats = run_layer(nnx.merge(graphdef, layer_state), x)
        return (x, add(total, stats)), None

      (x, total), _ = jax.lax.scan(body, (x, total), stacked)
    else:
      for layer in self.layers:
        x, stats = run_layer(layer, x)
        total = add(total, stats)
    hidden = self.norm(x)
    if not return_router_aux_loss:
      return hidden
    if total is None:
      return hidden, jnp.zeros((), jnp.float32)
    rows = self.num_layers * jnp.sum(segment_ids > 0)
    return hidden, moe.load_balancing_loss(total, rows)

  def output_embedding(self) -> jax.Array:
    """The [hidden, vocab] matrix the logits are computed with, in the compute dtype."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...].astype(self.dtype).T
    return self.lm_head.kernel[...].astype(self.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits [B, T, vocab] from `hidden_states`."""
    logits = jnp.einsum("btd,dv->btv", hidden.astype(self.dtype), self.output_embedding(),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", None, "vocab"))

  def init_cache(self, batch_size: int, size: int) -> dict[str, Any]:
    """An empty KV cache of `size` slots per row, for `extend`.

    {"layers": the layers' {"k", "v"}, each [B, size, kv_heads, head_dim]: a list of one per
               layer, or (scan_layers) one {"k", "v"} with a leading [layers] axis,
     "valid": bool [B, size], slots that hold a real token,
     "index": int32 scalar, the next slot to write (the same for every row),
     "length": int32 [B], real tokens so far per row = the next token's RoPE position}
    """
    shape = (batch_size, size, self.kv_heads, self.head_dim)

    def zeros():
      return constrain(jnp.zeros(shape, self.dtype), _CACHE_KV)

    if self.scan_layers:
      stacked = jnp.zeros((self.num_layers, *shape), self.dtype)
      layers = {"k": stacked, "v": stacked}
    else:
      layers = [{"k": zeros(), "v": zeros()} for _ in self.layers]
    return {
        "layers": layers,
        "valid": constrain(jnp.zeros((batch_size, size), bool), ("batch", None)),
        "index": jnp.zeros((), jnp.int32),
        "length": constrain(jnp.zeros((batch_size,), jnp.int32), ("batch",)),
    }

  def prefill(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
              token_mask: jax.Array, cache_size: int) -> tuple[jax.Array, dict[str, Any]]:
    """A left-padded prompt into a fresh KV cache: `extend` on `init_cache(B, cache_size)`,
    without its [B, T, S] mask and [B, T, vocab] logits.

    The prompt attends as in training (models.attention.causal_attention, segment ids from
    token_mask: padding 0, real tokens 1), which never forms a [B, T, S] mask (splash on TPU,
    XLA's per-block masks elsewhere), and only the last column's logits are computed: with
    left padding it holds every row's last real token, the only logits decoding reads. At
    a Llama-3-8B's 128K vocabulary the whole prompt's float32 logits are 2.1 GB a 4096-token row.

    Args:
      input_ids: [B, T] token ids, or
      inputs_embeds: [B, T, hidden] ready embeddings (exactly one of the two).
      token_mask: bool [B, T], False on left padding only (before a row's first real token).
        A row's real tokens get RoPE positions 0, 1, ... as `extend` gives them.
      cache_size: the cache's slots S >= T; the prompt fills slots 0..T-1.

    Returns:
      Logits float32 [B, vocab] for the last column, and the cache as `extend` leaves it:
      the same valid, index and length, keys and values in the same slots. (Padding slots,
      never valid and so never read, may hold other values: splash lets padding attend to
      padding, `extend` lets a padding token see itself alone.)
    """
    x = self._inputs(input_ids, inputs_embeds)
    b, t = x.shape[:2]
    if cache_size < t:
      raise ValueError(f"a cache of {cache_size} slots cannot hold a prompt of {t} tokens")
    token_mask = token_mask.astype(bool)
    # Padding before a row's first real token would get -1: clamp, it is never attended to.
    positions = jnp.maximum(jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0)
    segment_ids = token_mask.astype(jnp.int32)

    def to_cache(new: jax.Array) -> jax.Array:
      # [B, T, K, D] into slots 0..T-1 of [B, cache_size, K, D], the rest zeros as init_cache's.
      slots = jnp.pad(new.astype(self.dtype), ((0, 0), (0, cache_size - t), (0, 0), (0, 0)))
      return constrain(slots, _CACHE_KV)

    x = constrain(x, _RESIDUAL)
    if self.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(x, layer_state):
        x, k, v = nnx.merge(graphdef, layer_state).prefill(x, positions, segment_ids)
        return constrain(x, _RESIDUAL), {"k": to_cache(k), "v": to_cache(v)}

      x, layers_kv = jax.lax.scan(body, x, stacked)
    else:
      layers_kv = []
      for layer in self.layers:
        x, k, v = layer.prefill(x, positions, segment_ids)
        x = constrain(x, _RESIDUAL)
        layers_kv.append({"k": to_cache(k), "v": to_cache(v)})
    cache = {
        "layers": layers_kv,
        "valid": constrain(jnp.pad(token_mask, ((0, 0), (0, cache_size - t))), ("batch", None)),
        "index": jnp.asarray(t, jnp.int32),
        "length": constrain(jnp.sum(token_mask, axis=1, dtype=jnp.int32), ("batch",)),
    }
    # The final norm is per token: normalising the last column alone gives its logits.
    return self.logits(self.norm(x[:, -1:]))[:, 0], cache

  def extend(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
             token_mask: jax.Array | None = None, cache: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    """Runs T new tokens per row on top of `cache`: a prefill (the prompt) or a decode step.

    Args:
      input_ids: [B, T] token ids, or
      inputs_embeds: [B, T, hidden] ready embeddings (exactly one of the two).
      token_mask: bool [B, T], False on left padding (default all True). Padding takes a
        cache slot but is never attended to and does not advance a row's positions, so a
        row's real tokens get RoPE positions 0, 1, ... as if it had not been padded.
      cache: from `init_cache` or a previous `extend`; it must have T free slots.

    Returns:
      Logits float32 [B, T, vocab] and the cache holding the new tokens too.
    """
    x = self._inputs(input_ids, inputs_embeds)
    b, t = x.shape[:2]
    token_mask = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
    index = cache["index"]
    # Padding before a row's first real token would get -1: clamp, it is never attended to.
    positions = jnp.maximum(cache["length"][:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0)
    valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], token_mask, index, axis=1)
    mask = cache_attention_mask(valid, index, t)
    x = constrain(x, _RESIDUAL)
    if self.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(x, layer_and_kv):
        layer_state, kv = layer_and_kv
        x, kv = nnx.merge(graphdef, layer_state).extend(x, positions, mask, kv, index)
        return constrain(x, _RESIDUAL), kv

      x, layers_kv = jax.lax.scan(body, x, (stacked, cache["layers"]))
    else:
      layers_kv = []
      for layer, kv in zip(self.layers, cache["layers"]):
        x, kv = layer.extend(x, positions, mask, kv, index)
        x = constrain(x, _RESIDUAL)
        layers_kv.append(kv)
    cache = {
        "layers": layers_kv,
        "valid": constrain(valid, ("batch", None)),
        "index": index + t,
        "length": cache["length"] + jnp.sum(token_mask, axis=1, dtype=jnp.int32),
    }
    return self.logits(self.norm(x)), cache
