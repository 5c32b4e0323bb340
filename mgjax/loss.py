"""The training loss: next-token cross-entropy on the supervised tokens, computed in chunks of
the sequence so the [B, T, vocab] float32 logits never exist at once.

At Llama-3's 128K vocabulary and 2 x 2048 tokens a device, whole-sequence logits are 2 GiB in
float32, and their gradient as much again. Chunk by chunk, each chunk's logits are made,
reduced to a loss and dropped; the backward pass makes them again (jax.checkpoint), so a step
holds one chunk's logits and their gradient at a time, for one more output projection of
compute (about 1/3 of the projection's FLOPs, a few percent of a step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mgjax.models.axes import constrain


def _chunk_loss(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array,
                weights: jax.Array) -> jax.Array:
  """Sum of weighted token cross-entropies; hidden [B, C, D], output_embedding [D, V]."""
  logits = jnp.einsum('bcd,dv->bcv', hidden.astype(output_embedding.dtype), output_embedding,
                      preferred_element_type=jnp.float32)
  logits = constrain(logits, ('batch', None, 'vocab'))
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)


def summed_cross_entropy(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array,
                         weights: jax.Array, chunk: int = 0) -> jax.Array:
  """sum over tokens of weights * cross-entropy(hidden @ output_embedding, targets).

  Args:
    hidden: [B, T, D] the decoder's final hidden states.
    output_embedding: [D, V] in the compute dtype (DecoderLM.output_embedding).
    targets: int [B, T]; weights: float [B, T] (the loss mask).
    chunk: tokens of the sequence per chunk; 0 or >= T computes the whole sequence at once.
      The chunks are a Python loop, not a scan, so XLA's cost analysis counts every one.
  """
  t = hidden.shape[1]
  if chunk <= 0 or chunk >= t:
    return _chunk_loss(hidden, output_embedding, targets, weights)
  # Keep nothing of a chunk for the backward pass: its logits are recomputed there.
  chunk_loss = jax.checkpoint(_chunk_loss, policy=jax.checkpoint_policies.nothing_saveable)
  total = jnp.zeros((), jnp.float32)
  for start in range(0, t, chunk):
    end = min(start + chunk, t)
    total = total + chunk_loss(hidden[:, start:end], output_embedding, targets[:, start:end],
                               weights[:, start:end])
  return total
