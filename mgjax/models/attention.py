"""Causal self-attention over packed rows, by one of three implementations (`model.attention`):

  xla     plain XLA: query blocks of CAUSAL_BLOCK skip the keys after the block; each block's
          mask is made from the segment ids as it is needed. Runs everywhere; the CPU default.
  splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention): a flash
          kernel that never forms the [T, S] scores, with a causal mask and segment ids for
          packed rows, grouped-query heads native. The TPU default. Mosaic kernels cannot be
          partitioned by XLA, so it runs under shard_map: the batch split as the activations
          are ('batch' rule), heads as the q/k/v projections ('heads', 'kv_heads' rules).
          Its block sizes and backward kernels come from `model.splash_blocks` (see
          `splash_block_sizes`): by default per TPU generation, as MaxText's tuned recipes set them.
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

import dataclasses
import functools
import os
import re

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
# The fields of splash's BlockSizes that model.splash_blocks sets (MaxText's sa_block_* and
# sa_use_fused_bwd_kernel). *_compute blocks are the steps each kernel takes through its kv block.
SPLASH_SIZES = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute",
                "block_q_dq", "block_kv_dq")
_FUSED = "use_fused_bwd_kernel"


def _uniform(block: int, fused: bool) -> dict:
  return {**{name: block for name in SPLASH_SIZES}, _FUSED: fused}


# model.splash_blocks='auto': the settings for the TPU generation the step is compiled for, read
# from MaxText's configs (AI-Hypercomputer/maxtext). 'default' is its base.yml: every block 512 and
# the separate dq and dkv backward kernels (also any other device: v4, GPU, CPU tests). Its tuned
# Llama-3.1-8B recipes (benchmarks/maxtext_trillium_model_configs.py llama3_1-8b-8192 for v6e,
# maxtext_v5e_model_configs.py llama3_1-8b-8192-v5e-256 for v5e) set every block to 2048 with the
# fused backward kernel (dq computed inside the dkv kernel: one pass over the scores instead of
# two). Its v5p recipes have no Llama-3-8B; those that set blocks (Llama-3.1-405B v5p-1024, Llama-4
# Scout v5p-256, DeepSeek-V3 v5p-1024) set every block to 2048 with the separate kernels. Those
# recipes train at 8192 tokens; blocks are cut to the sequence, so at 2048 tokens a 2048 block is
# the whole sequence. Every one of them also raises the TPU compiler's scoped VMEM limit to
# SPLASH_TUNED_VMEM_KIB; see there.
SPLASH_TABLE = {
    "default": _uniform(SPLASH_BLOCK, False),
    "v5e": _uniform(2048, True),
    "v5p": _uniform(2048, False),
    "v6e": _uniform(2048, True),
}
# The scoped VMEM limit (libtpu's --xla_tpu_scoped_vmem_limit_kib, in LIBTPU_INIT_ARGS) that
# MaxText runs its 2048 blocks with (benchmarks/xla_flags_library.py DENSE_VMEM_LIMIT_FLAG, in
# each recipe above). Under libtpu's defaults (16 MiB on v5e and v5p, 32 MiB on v6e) the backward
# kernel at 2048 blocks does not compile for the Llama-3-8B decoder at 2 x 2048 tokens a device
# (TPU compiler, libtpu 0.0.42.1: 30.9 MiB needed on v5p, 28.7 on v5e, 32.8 on v6e with the fused
# kernel), so 'auto' takes a generation's tuned blocks only when the limit is at least this, and
# 'default' otherwise.
SPLASH_TUNED_VMEM_KIB = 98304
# Device kinds (lower case, first match) to SPLASH_TABLE's generations: libtpu names v5e and v6e
# chips "TPU v5 lite" and "TPU v6 lite", and v5p "TPU v5".
_GENERATIONS = (
    ("v6 lite", "v6e"),
    ("v6e", "v6e"),
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v5p", "v5p"),
    ("tpu v5", "v5p"),
)


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


def _device_kind() -> str:
  """The kind of device the code being traced will run on ('TPU v5', 'TPU v6 lite', ...): the
  mesh's when a mesh is set, else JAX's first device's."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.device_kind
  return jax.devices()[0].device_kind


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, implementation: str = "auto",
                     splash_blocks: str = "auto") -> jax.Array:
  """Causal attention within segments.

  Args:
    q: [B, T, H, D] queries (unscaled); k, v: [B, T, K, D] with H % K == 0.
    segment_ids: int [B, T]; a token sees the earlier tokens of its own segment. 0 is padding.
    implementation: one of IMPLEMENTATIONS; 'auto' picks by platform (splash on TPU).
    splash_blocks: splash's block sizes (model.splash_blocks, see `splash_block_sizes`).

  Returns:
    [B, T, H, D] in v's dtype.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
  name = check(implementation)
  if name == "auto":
    name = "splash" if _platform() == "tpu" and splash_fits(q.shape[1]) else "xla"
  if name == "splash":
    return splash_attention(q, k, v, segment_ids, interpret=_platform() != "tpu", blocks=splash_blocks)
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


def check_splash_blocks(spec: str) -> str:
  """Checks a model.splash_blocks setting (see `splash_block_sizes`); returns it."""
  _parse_splash_blocks(spec)
  return spec


def _parse_splash_blocks(spec: str) -> tuple[dict | None, dict]:
  """(the base settings, None for 'auto'; the explicit name=value settings over them)."""
  fix = (f"expected 'auto', one of {sorted(SPLASH_TABLE)}, or name=value pairs over 'default' or over a "
         f"generation first (e.g. 'v6e,block_q=1024' or 'block_q=1024,block_kv=1024,{_FUSED}=true'), names "
         f"from {SPLASH_SIZES + (_FUSED,)}, sizes multiples of {_LANES}")
  items = [item.strip() for item in str(spec).split(",") if item.strip()]
  if not items:
    raise ValueError(f"model.splash_blocks={spec!r}: {fix}")
  base: dict | None = dict(SPLASH_TABLE["default"])
  if "=" not in items[0]:
    name = items.pop(0)
    if name != "auto" and name not in SPLASH_TABLE:
      raise ValueError(f"model.splash_blocks={spec!r}: unknown setting {name!r}; {fix}")
    base = None if name == "auto" else dict(SPLASH_TABLE[name])
    if base is None and items:
      raise ValueError(f"model.splash_blocks={spec!r}: 'auto' takes no sizes; start from a generation "
                       f"({sorted(SPLASH_TABLE)}) to set some")
  explicit = {}
  for item in items:
    name, _, value = (part.strip() for part in item.partition("="))
    if name == _FUSED and value.lower() in ("true", "false", "1", "0"):
      explicit[name] = value.lower() in ("true", "1")
    elif name in SPLASH_SIZES and value.isdigit() and int(value) > 0 and int(value) % _LANES == 0:
      explicit[name] = int(value)
    elif name in SPLASH_SIZES:
      near = max(_LANES, -(-int(value) // _LANES) * _LANES) if value.isdigit() else SPLASH_BLOCK
      raise ValueError(f"model.splash_blocks={spec!r}: {name}={value} is not a positive multiple of {_LANES} "
                       f"(the TPU lane width); use e.g. {name}={near}")
    else:
      raise ValueError(f"model.splash_blocks={spec!r}: bad setting {item!r}; {fix}")
  merged = {**(base or SPLASH_TABLE["default"]), **explicit}
  # A compute block larger than its kv block is cut to it, as blocks are cut to the sequence.
  for compute, memory in (("block_kv_compute", "block_kv"), ("block_kv_dkv_compute", "block_kv_dkv")):
    if merged[memory] % min(merged[compute], merged[memory]):
      raise ValueError(f"model.splash_blocks={spec!r}: {compute}={merged[compute]} must divide "
                       f"{memory}={merged[memory]} (the kernel steps through a kv block in compute blocks)")
  return base, explicit


def splash_generation(device_kind: str) -> str:
  """SPLASH_TABLE's entry for a device kind ('TPU v6 lite' -> 'v6e'); 'default' if none."""
  kind = device_kind.lower()
  return next((gen for key, gen in _GENERATIONS if key in kind), "default")


def scoped_vmem_limit_kib() -> int:
  """The TPU compiler's scoped VMEM limit set in LIBTPU_INIT_ARGS (KiB), 0 if it is not set."""
  found = re.findall(r"--xla_tpu_scoped_vmem_limit_kib=(\d+)", os.environ.get("LIBTPU_INIT_ARGS", ""))
  return int(found[-1]) if found else 0


def _fused_bwd_available() -> bool:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
  return _FUSED in {f.name for f in dataclasses.fields(kernel.BlockSizes)}


def _divisor_block(block: int, length: int) -> int:
  """The largest multiple of 128 at most `block` that divides `length` (a multiple of 128)."""
  block = min(block, length)
  while length % block:
    block -= _LANES
  return block


def splash_block_sizes(spec: str, seq_len: int, device_kind: str | None = None,
                       vmem_limit_kib: int | None = None) -> dict:
  """Splash's BlockSizes arguments for a sequence of seq_len tokens under model.splash_blocks.

  spec: 'auto' takes SPLASH_TABLE's settings for the device kind (that of the mesh the step is
  traced for when None) where the TPU compiler's scoped VMEM limit (`scoped_vmem_limit_kib()`
  when None) is at least SPLASH_TUNED_VMEM_KIB, else 'default'; a generation name ('default', 'v5e', 'v5p', 'v6e') takes its settings
  on any device (the tuned ones compile with the raised VMEM limit alone:
  LIBTPU_INIT_ARGS=--xla_tpu_scoped_vmem_limit_kib=98304); name=value pairs
  ('block_q=1024,use_fused_bwd_kernel=true') set those fields over 'default', or over a
  generation named first ('v6e,block_q=1024').

  Every block is cut to the sequence when it is longer. The table's blocks that do not divide
  the sequence step down to the largest multiple of 128 that does; an explicit one that does not
  is an error. The fused backward kernel is used only where the installed jax has it, unless
  asked for explicitly; with it there are no dq blocks (None).
  """
  base, explicit = _parse_splash_blocks(spec)
  if base is None:
    generation = splash_generation(device_kind if device_kind is not None else _device_kind())
    vmem = vmem_limit_kib if vmem_limit_kib is not None else scoped_vmem_limit_kib()
    base = dict(SPLASH_TABLE[generation if vmem >= SPLASH_TUNED_VMEM_KIB else "default"])
  settings = {**base, **explicit}
  if settings[_FUSED] and not _fused_bwd_available():
    if explicit.get(_FUSED):
      raise ValueError(f"model.splash_blocks={spec!r}: this jax's splash attention has no fused backward "
                       f"kernel; drop {_FUSED}=true or upgrade jax")
    settings[_FUSED] = False
  sizes = {}
  for name in SPLASH_SIZES:
    memory = name.replace("_compute", "")
    length = sizes[memory] if name != memory else seq_len
    block = min(settings[name], length)
    if length % block:
      if name in explicit:
        whole = f"the sequence of {seq_len} tokens" if name == memory else f"{memory}={length}"
        raise ValueError(f"model.splash_blocks={spec!r}: {name}={settings[name]} does not divide {whole}; use a "
                         f"multiple of {_LANES} that does (e.g. {name}={_divisor_block(block, length)}) or 'auto'")
      block = _divisor_block(block, length)
    sizes[name] = block
  if settings[_FUSED]:
    sizes.update(block_q_dq=None, block_kv_dq=None)
  return {**sizes, _FUSED: settings[_FUSED]}


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, seq_len: int, interpret: bool, sizes: tuple):
  # Imported here: the Pallas TPU modules are only needed when this kernel is chosen.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  sizes = dict(sizes)
  if not sizes[_FUSED]:
    del sizes[_FUSED]  # a jax without the fused kernel has no such field
  mask = masks.MultiHeadMask([masks.CausalMask((seq_len, seq_len)) for _ in range(heads)])
  return kernel.make_splash_mha(mask, block_sizes=kernel.BlockSizes(**sizes), head_shards=1, q_seq_shards=1,
                                interpret=interpret), kernel.SegmentIds


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, interpret: bool = False,
                     blocks: str = "auto") -> jax.Array:
  """Splash attention; `interpret` runs the kernel in Pallas' interpreter (CPU tests); `blocks`
  its block sizes and backward kernels (model.splash_blocks, see `splash_block_sizes`)."""
  b, t, h, d = q.shape
  if not splash_fits(t):
    raise ValueError(f"splash attention tiles the sequence in blocks of {_LANES}: seq_len {t} is "
                     f"not a multiple; use data.seq_len={-(-t // _LANES) * _LANES} or model.attention=xla")
  sizes = tuple(splash_block_sizes(blocks, t).items())
  # Splash takes [heads, T, D] per example and leaves the scaling to the caller.
  qh = (q * jnp.asarray(d**-0.5, q.dtype)).transpose(0, 2, 1, 3)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  segment_ids = segment_ids.astype(jnp.int32)

  def local(qh, kh, vh, segments):
    kernel, segment_type = _splash_kernel(qh.shape[1], t, interpret, sizes)
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
