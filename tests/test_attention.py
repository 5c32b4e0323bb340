"""The attention implementations agree: XLA's blocked path, Pallas splash (in Pallas' interpreter
on CPU) and the cuDNN call's arguments, forward and gradients, packed and unpacked rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice  # what a mesh of TPU devices reports
from jax.sharding import NamedSharding, PartitionSpec as P

from mgjax.models import attention


def _qkv(key, b, t, h=4, k=2, d=16):
  kq, kk, kv = jax.random.split(jax.random.key(key), 3)
  return (jax.random.normal(kq, (b, t, h, d)), jax.random.normal(kk, (b, t, k, d)), jax.random.normal(kv, (b, t, k, d)))


def _dense_reference(q, k, v, segment_ids):
  """Plain multi-head attention with the whole [B, T, T] mask and repeated kv heads."""
  g = q.shape[2] // k.shape[2]
  t = q.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  mask = causal[None] & same
  scores = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, g, axis=2)) / np.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None], scores, -1e30)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), jnp.repeat(v, g, axis=2))


# Two packed conversations then padding, in a length that is no multiple of the XLA block.
def _packed(b, t):
  return jnp.asarray(np.repeat([[1, 2, 0]], [t // 2, t - t // 2 - 10, 10], axis=1).repeat(b, axis=0))


def test_xla_blocks_match_dense_attention_on_every_real_token():
  q, k, v = _qkv(5, 2, 300)
  segments = _packed(2, 300)
  real = np.asarray(segments) != 0
  out = attention.xla_attention(q, k, v, segments)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(_dense_reference(q, k, v, segments))[real], atol=2e-5)
  # Padding attends to itself alone: finite, and equal to its own value vector.
  pad = ~real
  np.testing.assert_allclose(np.asarray(out)[pad], np.asarray(jnp.repeat(v, 2, axis=2))[pad], atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_splash_matches_xla_forward_and_gradients(packed):
  b, t = 2, 256
  q, k, v = _qkv(7, b, t)
  segments = _packed(b, t) if packed else jnp.ones((b, t), jnp.int32)
  weights = (segments != 0).astype(jnp.float32)[..., None, None]  # what a loss reads

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, segments)) * weights)

  splash = lambda q, k, v, s: attention.splash_attention(q, k, v, s, interpret=True)
  (xla_value, xla_grads) = jax.value_and_grad(loss(attention.xla_attention), argnums=(0, 1, 2))(q, k, v)
  (splash_value, splash_grads) = jax.value_and_grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(splash_value, xla_value, rtol=1e-5)
  for a, b_ in zip(splash_grads, xla_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-4)


# Non-512 blocks in every kernel, with the fused backward kernel and with the separate dq and dkv
# kernels; kv blocks stepped through in smaller compute blocks.
@pytest.mark.parametrize("blocks", [
    "block_q=128,block_kv=256,block_kv_compute=128,block_q_dkv=256,block_kv_dkv=128,use_fused_bwd_kernel=true",
    "v6e,block_q=256,block_kv_compute=128",
    "block_q=256,block_kv=128,block_q_dkv=128,block_kv_dkv=256,block_kv_dkv_compute=128,block_q_dq=128,"
    "block_kv_dq=256",
])
def test_splash_blocks_and_fused_backward_match_xla_on_packed_rows(blocks):
  b, t = 2, 256
  q, k, v = _qkv(11, b, t)
  segments = _packed(b, t)
  weights = (segments != 0).astype(jnp.float32)[..., None, None]
  sizes = attention.splash_block_sizes(blocks, t)
  assert sizes["use_fused_bwd_kernel"] == ("fused" in blocks or blocks.startswith("v6e"))
  assert any(size not in (None, 512, t) for size in sizes.values() if not isinstance(size, bool))

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, segments)) * weights)

  splash = lambda q, k, v, s: attention.splash_attention(q, k, v, s, interpret=True, blocks=blocks)
  (xla_value, xla_grads) = jax.value_and_grad(loss(attention.xla_attention), argnums=(0, 1, 2))(q, k, v)
  (splash_value, splash_grads) = jax.value_and_grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(splash_value, xla_value, rtol=1e-5)
  for a, b_ in zip(splash_grads, xla_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=2e-4)
  # The forward kernel and one fused backward kernel, or the forward, dq and dkv kernels.
  kernels = str(jax.make_jaxpr(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)).count("pallas_call[")
  assert kernels == (2 if sizes["use_fused_bwd_kernel"] else 3)


def test_splash_blocks_auto_takes_the_generation_compiled_for_and_an_explicit_setting_wins(monkeypatch):
  uniform = lambda block, fused: {
      **{
          name: block for name in attention.SPLASH_SIZES
      }, "use_fused_bwd_kernel": fused,
      **({
          "block_q_dq": None,
          "block_kv_dq": None
      } if fused else {})
  }
  # MaxText's recipes, with the scoped VMEM limit they run with: v6e and v5e 2048 blocks and the
  # fused backward kernel, v5p 2048 blocks, anything else its 512 defaults; cut to the sequence.
  tuned = functools.partial(attention.splash_block_sizes, vmem_limit_kib=98304)
  assert tuned("auto", 4096, "TPU v6 lite") == uniform(2048, True)
  assert tuned("auto", 4096, "TPU v5 lite") == uniform(2048, True)
  assert tuned("auto", 4096, "TPU v5") == uniform(2048, False)
  assert tuned("auto", 4096, "TPU v4") == uniform(512, False)
  assert tuned("auto", 1024, "TPU v6 lite") == uniform(1024, True)
  # A sequence the table's blocks do not divide (17 x 128) steps down to blocks that do.
  assert tuned("auto", 2176, "TPU v5") == uniform(128, False)
  # Under libtpu's default limit (no flag) 2048 blocks do not compile: 'auto' keeps 512.
  assert attention.splash_block_sizes("auto", 4096, "TPU v6 lite", vmem_limit_kib=0) == uniform(512, False)
  assert attention.splash_block_sizes("auto", 4096, "TPU v5", vmem_limit_kib=32768) == uniform(512, False)
  # The generation is that of the mesh the step is traced for (a TPU's when planning on a CPU),
  # the limit the one LIBTPU_INIT_ARGS gives libtpu.
  tpu_mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=AbstractDevice("TPU v6 lite", None, "tpu"))
  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_async_all_gather=true --xla_tpu_scoped_vmem_limit_kib=98304")
  assert attention.scoped_vmem_limit_kib() == 98304
  with jax.sharding.use_abstract_mesh(tpu_mesh):
    assert attention.splash_block_sizes("auto", 2048) == uniform(2048, True)
  monkeypatch.delenv("LIBTPU_INIT_ARGS")
  with jax.sharding.use_abstract_mesh(tpu_mesh):
    assert attention.splash_block_sizes("auto", 2048) == uniform(512, False)
  # An explicit setting wins over the table: over 'default' alone, or over a named generation.
  v6e = "TPU v6 lite"
  assert tuned("default", 2048, v6e) == uniform(512, False)
  assert tuned("block_q=1024", 2048, v6e) == {**uniform(512, False), "block_q": 1024}
  assert attention.splash_block_sizes("v6e,block_q=1024", 2048, "TPU v5") == {**uniform(2048, True), "block_q": 1024}
  assert attention.splash_block_sizes("v5p,use_fused_bwd_kernel=true", 2048, "cpu") == uniform(2048, True)


@pytest.mark.parametrize("blocks, message", [
    ("block_q=1000", r"model.splash_blocks='block_q=1000': block_q=1000 is not a positive multiple of 128 .* "
     r"block_q=1024"),
    ("blockq=512", r"model.splash_blocks='blockq=512': bad setting .* names from \('block_q'"),
    ("v7", r"model.splash_blocks='v7': unknown setting 'v7'; expected 'auto', one of \['default', 'v5e'"),
    ("block_kv=512,block_kv_compute=384", r"block_kv_compute=384 must divide block_kv=512"),
])
def test_a_bad_splash_setting_names_the_key_and_the_fix(blocks, message):
  with pytest.raises(ValueError, match=message):
    attention.check_splash_blocks(blocks)


def test_an_explicit_splash_block_must_divide_the_sequence():
  with pytest.raises(
      ValueError, match=r"block_q=1024 does not divide the sequence of 1536 tokens; use a "
      r"multiple of 128 that does \(e.g. block_q=768\) or 'auto'"):
    attention.splash_block_sizes("block_q=1024", 1536, "TPU v6 lite")


def test_splash_under_a_mesh_runs_per_shard_and_matches_xla():
  # Batch over data x fsdp, heads over tensor: the kernel runs under shard_map on each shard.
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  b, t = 4, 128
  q, k, v = _qkv(9, b, t)
  segments = _packed(b, t)
  real = np.asarray(segments) != 0
  with jax.set_mesh(mesh):
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(q, P(("data", "fsdp"), None, "tensor")), put(k, P(
        ("data", "fsdp"), None, "tensor")), put(v, P(("data", "fsdp"), None,
                                                     "tensor")), put(segments, P(("data", "fsdp"))))
    out = jax.jit(lambda *a: attention.splash_attention(*a, interpret=True))(*args)
  np.testing.assert_allclose(
      np.asarray(out)[real],
      np.asarray(attention.xla_attention(q, k, v, segments))[real], atol=2e-5)


def test_splash_names_the_sequence_length_it_cannot_tile():
  q, k, v = _qkv(1, 1, 200)
  with pytest.raises(ValueError, match=r"seq_len 200 .* data.seq_len=256"):
    attention.splash_attention(q, k, v, jnp.ones((1, 200), jnp.int32), interpret=True)


def test_cudnn_call_takes_rows_of_one_sequence_with_padding_at_the_end():
  # The cuDNN path's arguments (lengths from the segment ids), run through XLA on this CPU.
  q, k, v = _qkv(3, 2, 40)
  lengths = np.array([40, 31])
  segments = jnp.asarray((np.arange(40)[None] < lengths[:, None]).astype(np.int32))
  real = np.asarray(segments) != 0
  out = attention.cudnn_attention(q, k, v, segments, implementation="xla")
  np.testing.assert_allclose(
      np.asarray(out)[real],
      np.asarray(attention.xla_attention(q, k, v, segments))[real], atol=2e-5)


def test_auto_picks_by_platform_and_refuses_what_cannot_serve_the_rows():
  assert attention.resolve("auto", "tpu", packed=True) == "splash"
  assert attention.resolve("auto", "gpu", packed=False) == "cudnn"
  assert attention.resolve("auto", "cuda", packed=True) == "xla"
  assert attention.resolve("auto", "cpu", packed=False) == "xla"
  with pytest.raises(ValueError, match="data.packing=True use model.attention=xla"):
    attention.resolve("cudnn", "gpu", packed=True)
  with pytest.raises(ValueError, match="splash is a TPU kernel; this run is on cpu"):
    attention.resolve("splash", "cpu", packed=False)
  # A run keeps 'auto' unless the choice needs the row layout; a TPU run's decoder uses splash
  # where the sequence tiles into its blocks.
  assert attention.for_run("auto", "gpu", packed=False) == "cudnn"
  assert attention.for_run("auto", "tpu", packed=False) == "auto"
  assert attention.chosen("auto", "tpu", 2048, packed=True) == "splash"
  assert attention.chosen("auto", "tpu", 2000, packed=True) == "xla"
  with pytest.raises(ValueError, match=r"model.attention='flash'"):
    attention.resolve("flash", "tpu", packed=False)


def test_the_config_key_reaches_every_decoder_layer_and_a_bad_one_fails_at_construction():
  from flax import nnx

  from mgjax import base_config
  from mgjax.models.vlm import MiniGemini

  config = base_config.base_config()
  assert config.model.splash_blocks == "auto"
  config.model.splash_blocks = "v6e,block_q=1024"
  model = nnx.eval_shape(lambda: MiniGemini(config.model, rngs=nnx.Rngs(0)))
  assert [layer.self_attn.splash_blocks for layer in model.llm.layers] == ["v6e,block_q=1024"] * len(model.llm.layers)
  config.model.splash_blocks = "block_q=100"
  with pytest.raises(ValueError, match=r"model.splash_blocks='block_q=100': block_q=100 is not a positive multiple"):
    MiniGemini(config.model, rngs=nnx.Rngs(0))
