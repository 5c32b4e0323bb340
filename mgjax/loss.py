"""The training loss: next-token cross-entropy on the supervised tokens, computed in chunks of
the sequence so the [B, T, vocab] float32 logits never exist at once.

At Llama-3's 128K vocabulary and 2 x 2048 tokens a device, whole-sequence logits are 2 GiB in
float32, and their gradient as much again. Chunk by chunk, each chunk's logits are made,
reduced to a loss and dropped; the backward pass makes them again (jax.checkpoint), so a step
holds one chunk's logits and their gradient at a time, for one more output projection of
compute (about 1/3 of the projection's FLOPs, a few percent of a step).

Under FSDP the output projection [hidden, vocab] is split over the hidden axis, so each chunk
would use a gathered copy of it and leave a float32 partial of its whole gradient on every
device (a [4096, 128K] float32 array is 2 GiB), summed across devices only after the loop.
With `vocab_sharded` the projection is split over the vocabulary across every device instead:
each device computes all rows' logits for its slice of the vocabulary (the chunk's hidden
states, a few MiB, are gathered instead), the softmax's max, sum and label logit are reduced
across the slices, and the gradient of the projection is each device's own slice, complete.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from mgjax.models.axes import constrain


def _chunk_loss(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Sum of weighted token cross-entropies; hidden [B, C, D], output_embedding [D, V]."""
  logits = jnp.einsum("bcd,dv->bcv", hidden.astype(output_embedding.dtype), output_embedding,
                      preferred_element_type=jnp.float32)
  logits = constrain(logits, ("batch", None, "vocab"))
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)


def _vocab_sharded_chunk_loss(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array,
                              weights: jax.Array) -> jax.Array:
  """_chunk_loss with output_embedding split over the vocabulary across every device (see
  `vocab_split`): the logits [B, C, V] come out split the same way, every row on every device."""
  everywhere = P()
  hidden, targets, weights = (jax.lax.with_sharding_constraint(x, everywhere) for x in (hidden, targets, weights))
  logits = jnp.einsum("bcd,dv->bcv", hidden.astype(output_embedding.dtype), output_embedding,
                      preferred_element_type=jnp.float32)
  logits = jax.lax.with_sharding_constraint(logits, P(None, None, _all_axes()))
  # The label's logit as a masked sum over the vocabulary: a reduction XLA splits like the
  # softmax's, where indexing the split axis by label would gather the logits.
  labels = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], logits, 0.0), axis=-1)
  return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - labels) * weights)


def _all_axes() -> tuple[str, ...]:
  return tuple(jax.sharding.get_abstract_mesh().axis_names)


def vocab_split(output_embedding: jax.Array) -> bool:
  """Whether the loss can split `output_embedding` [D, V] over the vocabulary across every device
  of the active mesh: a mesh of several devices whose count divides V."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not mesh.are_all_axes_auto or mesh.size == 1:
    return False
  return output_embedding.shape[1] % mesh.size == 0


def summed_cross_entropy(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array, weights: jax.Array,
                         chunk: int = 0, *, unroll: bool = False, vocab_sharded: bool = False) -> jax.Array:
  """sum over tokens of weights * cross-entropy(hidden @ output_embedding, targets).

  Args:
    hidden: [B, T, D] the decoder's final hidden states.
    output_embedding: [D, V] in the compute dtype (DecoderLM.output_embedding).
    targets: int [B, T]; weights: float [B, T] (the loss mask).
    chunk: tokens of the sequence per chunk; 0 or >= T computes the whole sequence at once.
    unroll: trace the chunk loop as straight-line code (same values), so that XLA's cost
      analysis counts every chunk (the cost twins of mgjax.flops); training keeps the loop.
    vocab_sharded: split the output projection over the vocabulary across every device of
      the active mesh (train.loss_vocab_sharded; see the module docstring). Without a mesh of
      several devices whose count divides the vocabulary it has no effect.

  The chunks run in a jax.lax.scan, one after the other: the output projection's gradient
  is then one accumulator for all of them (a Python loop let XLA keep one partial gradient
  per chunk alive, a [D, V] float32 array each under FSDP). XLA's cost analysis counts the
  loop once (mgjax.flops counts every chunk).
  """
  t = hidden.shape[1]
  chunk_loss = _chunk_loss
  if vocab_sharded and vocab_split(output_embedding):
    # Split once, before the loop: the loop then carries the slice, and the gradient it
    # accumulates for it is a slice too.
    output_embedding = jax.lax.with_sharding_constraint(output_embedding, P(None, _all_axes()))
    chunk_loss = _vocab_sharded_chunk_loss
  if chunk <= 0 or chunk >= t:
    return chunk_loss(hidden, output_embedding, targets, weights)
  # Keep nothing of a chunk for the backward pass: its logits are recomputed there.
  chunk_loss = jax.checkpoint(chunk_loss, policy=jax.checkpoint_policies.nothing_saveable)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:  # padding tokens carry weight 0: they add nothing to the loss or its gradients
    hidden, targets, weights = (
        jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (hidden, targets, weights))

  def chunks(x):  # [B, n * chunk, ...] -> [n, B, chunk, ...]
    return jnp.swapaxes(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 0, 1)

  def add_chunk(total, chunk_inputs):
    h, tg, w = chunk_inputs
    return total + chunk_loss(h, output_embedding, tg, w), None

  total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(targets), chunks(weights)),
                          unroll=n if unroll else 1)
  return total
