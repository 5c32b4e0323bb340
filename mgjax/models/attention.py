"""Causal self-attention over packed rows, by one of three implementations (`model.attention`):

  xla     plain XLA: query blocks of CAUSAL_BLOCK skip the keys after the block; each block's
          mask is made from the segment ids as it is needed. Runs everywhere; the CPU default.
  splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention): a flash
          kernel that never forms the [T, S] scores, with a causal mask and segment ids for
          packed rows, grouped-query heads native. The TPU default. Mosaic kernels cannot be
          partitioned by XLA, so it runs under shard_map: the batch split as the activations
          are ('batch' rule), heads as the q/k/v projections ('heads', 'kv_heads' rules).
  cudnn   cuDNN's fused flash attention through jax.nn.dot_product_attention. Its public API
          takes sequence lengths, not segment ids, so it serves rows that hold one sequence
          with padding at the end (data.packing off); the trainer chooses xla for packed rows.
  auto    splash on TPU, xla elsewhere (cudnn needs the unpacked-rows promise, so the trainer
          resolves 'auto' to cudnn on GPU when packing is off: `for_run`); splash where the
          sequence tiles into its blocks of 128 (xla otherwise).

Every implementation takes segment ids [B, T] (0 marks padding) instead of a [B, T, S] mask,
so no dense mask is built for training. On the tokens a loss reads (segment id > 0) all three
give the same result; padding tokens' outputs are not read and differ between them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mgjax.models.axes import mesh_axes

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")

# Queries per block when the XLA path skips the keys after each block. 128 was the fastest of
# 64/128/256 at T=1024 on a 2-core CPU (benchmarks/train_step.py --micro).
CAUSAL_BLOCK = 128
# Splash block sizes: MaxText's defaults (sa_block_* = 512), cut to the sequence when it is
# shorter. A block must be a multiple of 128 (the TPU lane width) and divide the sequence.
SPLASH_BLOCK = 512
_LANES = 128


def check(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={name!r}: expected one of {IMPLEMENTATIONS}")
  return name


def resolve(name: str, platform: str, *, packed: bool) -> str:
  """The implementation `name` stands for on `platform` ('cpu' | 'gpu' | 'cuda' | 'tpu').

  Raises for a choice that cannot serve the rows: cudnn with packed rows, splash off TPU
  (outside tests, which run it in Pallas' interpreter by calling the functions directly).
  """
  check(name)
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  if name == "auto":
    return {"tpu": "splash", "gpu": "xla" if packed else "cudnn"}.get(platform, "xla")
  if name == "cudnn" and packed:
    raise ValueError("model.attention=cudnn serves rows of one sequence (padding at the end); "
                     "with data.packing=True use model.attention=xla (or auto)")
  if name == "cudnn" and platform != "gpu":
    raise ValueError(f"model.attention=cudnn needs an NVIDIA GPU; this run is on {platform}: use auto")
  if name == "splash" and platform != "tpu":
    raise ValueError(f"model.attention=splash is a TPU kernel; this run is on {platform}: use auto")
  return name


def for_run(name: str, platform: str, *, packed: bool) -> str:
  """What a training run builds its model with: `resolve`'s checks, the choice made now only
  where it needs the row layout (cuDNN for unpacked rows on GPU); otherwise 'auto' stays, so
  each sequence length decides at trace time (splash where it tiles into blocks, else XLA)."""
  chosen = resolve(name, platform, packed=packed)
  return chosen if name != "auto" or chosen == "cudnn" else "auto"


def chosen(name: str, platform: str, seq_len: int, *, packed: bool) -> str:
  """The implementation a run with these settings uses for its decoder."""
  name = for_run(name, platform, packed=packed)
  if name != "auto":
    return name
  return "splash" if platform == "tpu" and splash_fits(seq_len) else "xla"


def _platform() -> str:
  """The platform the code being traced will run on: the mesh's devices when a mesh is set
  (mgjax.plan compiles for a TPU from a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform
  return jax.default_backend()


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     implementation: str = "auto") -> jax.Array:
  """Causal attention within segments.

  Args:
    q: [B, T, H, D] queries (unscaled); k, v: [B, T, K, D] with H % K == 0.
    segment_ids: int [B, T]; a token sees the earlier tokens of its own segment. 0 is padding.
    implementation: one of IMPLEMENTATIONS; 'auto' picks by platform (splash on TPU).

  Returns:
    [B, T, H, D] in v's dtype.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  name = check(implementation)
  if name == "auto":
    name = "splash" if _platform() == "tpu" and splash_fits(q.shape[1]) else "xla"
  if name == "splash":
    return splash_attention(q, k, v, segment_ids, interpret=_platform() != "tpu")
  if name == "cudnn":
    return cudnn_attention(q, k, v, segment_ids)
  return xla_attention(q, k, v, segment_ids)


def bidirectional_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto") -> jax.Array:
  """Unmasked attention over a whole sequence (the vision tower's patches).

  On a GPU ('auto' or 'cudnn') cuDNN's flash kernel; elsewhere XLA. Splash is not used: a
  ViT's sequence (CLIP-336: 577 tokens with the class token) does not tile into its blocks.
  """
  name = check(implementation)
  if name == "cudnn" or (name == "auto" and _platform() in ("gpu", "cuda")):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(v.dtype)
  return attend(q, k, v, None)


# ---------------------------------------------------------------- XLA


def segment_mask(q_segments: jax.Array, k_segments: jax.Array, q_offset: int = 0) -> jax.Array:
  """bool [B, Tq, Tk]: causal AND same segment, for queries q_offset.. over keys 0..Tk-1.

  A padding token (segment 0) sees only itself, so its softmax row is well defined (no NaN)
  and it never mixes with real tokens in either direction.
  """
  q_pos = q_offset + jnp.arange(q_segments.shape[1])
  k_pos = jnp.arange(k_segments.shape[1])
  causal = q_pos[:, None] >= k_pos[None, :]
  same = (q_segments[:, :, None] == k_segments[:, None, :]) & (q_segments[:, :, None] != 0)
  own = q_pos[:, None] == k_pos[None, :]
  return causal[None] & (same | own[None])


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Query blocks of CAUSAL_BLOCK over the keys up to the block's end: (n + 1) / 2n of the
  [T, S] scores and softmax instead of all of them, as a flash kernel would skip them; each
  block's [B, block, end] mask is made from the segment ids when the block needs it."""
  t = q.shape[1]
  outs = []
  for start in range(0, t, CAUSAL_BLOCK):
    end = min(start + CAUSAL_BLOCK, t)
    mask = segment_mask(segment_ids[:, start:end], segment_ids[:, :end], start)
    outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], mask))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax attention of q [B, T, H, D] over k, v [B, S, K, D]; mask bool [B, T, S] or None."""
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
  scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
  scores = scores * (d**-0.5)
  if mask is not None:
    rows = jnp.broadcast_to(mask[:, None, None], (b, kv_heads, g, t, s)).reshape(b, kv_heads, g * t, s)
    # A finite minimum, not -inf: a fully masked row would give NaN, this gives uniform.
    scores = jnp.where(rows, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, vh)
  return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# ---------------------------------------------------------------- Splash (TPU)


def splash_fits(seq_len: int) -> bool:
  """Whether splash's blocks tile a sequence of this length."""
  return seq_len % _LANES == 0


def _splash_block(seq_len: int) -> int:
  block = min(SPLASH_BLOCK, seq_len)
  while seq_len % block:
    block -= _LANES
  return block


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq_len: int, interpret: bool):
  # Imported here: the Pallas TPU modules are only needed when this kernel is chosen.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  block = _splash_block(seq_len)
  sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len)) for _ in range(heads)])
  return kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret), kernel.SegmentIds


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
  """Splash attention; `interpret` runs the kernel in Pallas' interpreter (CPU tests)."""
  b, t, h, d = q.shape
  if not splash_fits(t):
    raise ValueError(f"splash attention tiles the sequence in blocks of {_LANES}: seq_len {t} is "
                     f"not a multiple; use data.seq_len={-(-t // _LANES) * _LANES} or model.attention=xla")
  # Splash takes [heads, T, D] per example and leaves the scaling to the caller.
  qh = (q * jnp.asarray(d**-0.5, q.dtype)).transpose(0, 2, 1, 3)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  segment_ids = segment_ids.astype(jnp.int32)

  def local(qh, kh, vh, segments):
    kernel, segment_type = _splash_kernel(qh.shape[1], t, interpret)
    return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=segment_type(s1, s1)))(qh, kh, vh, segments)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = local(qh, kh, vh, segment_ids)
  else:
    P = jax.sharding.PartitionSpec
    batch, heads, kv_heads = (mesh_axes(n, mesh) or None for n in ("batch", "heads", "kv_heads"))
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(batch, heads), P(batch, kv_heads), P(batch, kv_heads), P(batch)),
                        out_specs=P(batch, heads), check_vma=False)(qh, kh, vh, segment_ids)
  return out.transpose(0, 2, 1, 3).astype(v.dtype)


# ---------------------------------------------------------------- cuDNN (GPU)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                    implementation: str = "cudnn") -> jax.Array:
  """cuDNN flash attention for rows of one sequence each, padding (segment 0) at the end.

  The row's length is its count of non-padding tokens. `implementation='xla'` runs the same
  call through XLA (how tests check the arguments on a CPU).
  """
  lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
  # A row of padding alone would have length 0: one token keeps its softmax defined.
  lengths = jnp.maximum(lengths, 1)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                      implementation=implementation).astype(v.dtype)
