"""The attention implementations agree: XLA's blocked path, Pallas splash (in Pallas' interpreter
on CPU) and the cuDNN call's arguments, forward and gradients, packed and unpacked rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
