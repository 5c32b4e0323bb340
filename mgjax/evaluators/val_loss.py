"""The validation loss of every val split: mean cross-entropy over the answer tokens, as the
train step computes it. Early stopping and stage 2's drift guard decide by it."""

from __future__ import annotations

from typing import Any

from mgjax import sharding
from mgjax.data import pipeline


def run(setup, encoder, val_sources: dict[str, Any], trainable: Any, frozen: Any, *, batch_size: int,
        num_threads: int) -> dict[str, float]:
  """{split: loss}; `setup` is the run's mgjax.train_step.StepSetup (its eval_step and mesh),
  `batch_size` the rows per process."""
  losses = {}
  for split, source in val_sources.items():
    total, count = 0.0, 0.0
    for batch in pipeline.eval_batches(source, encoder, batch_size=batch_size, num_threads=num_threads):
      loss_sum, n = setup.eval_step(trainable, frozen, sharding.to_global_batch(batch, setup.mesh))
      total, count = total + float(loss_sum), count + float(n)
    losses[split] = total / max(count, 1.0)
  return losses
