"""The chunked loss equals the whole-sequence loss, value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mgjax.loss import summed_cross_entropy


@pytest.mark.parametrize("chunk", [0, 16, 48])
def test_chunked_loss_and_gradients_equal_the_whole_sequence(chunk):
  kh, ke, kt, kw = jax.random.split(jax.random.key(0), 4)
  b, t, d, v = 2, 100, 32, 300  # 100 tokens: the last chunk is shorter than the others
  hidden = jax.random.normal(kh, (b, t, d))
  embedding = jax.random.normal(ke, (d, v)) * 0.1
  targets = jax.random.randint(kt, (b, t), 0, v)
  weights = (jax.random.uniform(kw, (b, t)) > 0.3).astype(jnp.float32)

  def reference(hidden, embedding):
    logits = jnp.einsum("btd,dv->btv", hidden, embedding)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)

  def chunked(hidden, embedding):
    return summed_cross_entropy(hidden, embedding, targets, weights, chunk)

  want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(hidden, embedding)
  got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, embedding)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b_ in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5)
  if chunk:
    # No [B, T, vocab] array anywhere in the program: the biggest logits are one chunk's.
    jaxpr = str(jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(hidden, embedding))
    assert f"{b},{t},{v}]" not in jaxpr and f"{b},{chunk},{v}]" in jaxpr


@pytest.mark.parametrize("chunk", [0, 48])
def test_vocab_sharded_loss_and_gradients_equal_the_gathered_loss(chunk):
  """On 8 devices with the batch and the projection's hidden axis split as FSDP splits them, the
  loss that splits the projection over the vocabulary gives the gathered loss's value and
  gradients, and its gradient of the projection never exists whole on a device."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  kh, ke, kt, kw = jax.random.split(jax.random.key(1), 4)
  b, t, d, v = 8, 100, 32, 320  # 320 = 8 x 40: the vocabulary splits over the 8 devices
  batch_split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  hidden = jax.device_put(jax.random.normal(kh, (b, t, d)), batch_split)
  embedding = jax.device_put(
      jax.random.normal(ke, (d, v)) * 0.1, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None)))
  targets = jax.device_put(jax.random.randint(kt, (b, t), 0, v), batch_split)
  weights = jax.device_put((jax.random.uniform(kw, (b, t)) > 0.3).astype(jnp.float32), batch_split)

  def loss(vocab_sharded):
    return jax.jit(
        jax.value_and_grad(
            lambda h, e: summed_cross_entropy(h, e, targets, weights, chunk, vocab_sharded=vocab_sharded),
            argnums=(0, 1)))

  with jax.set_mesh(mesh):
    want, want_grads = loss(False)(hidden, embedding)
    got, got_grads = loss(True)(hidden, embedding)
    hlo = loss(True).lower(hidden, embedding).compile().as_text()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b_ in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5)
  # Every device holds 40 of the 320 vocabulary columns: no [32, 320] array in the program.
  assert f"f32[{d},{v}]" not in hlo and f"f32[{d},{v // 8}]" in hlo
