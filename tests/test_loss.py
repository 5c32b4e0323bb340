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
