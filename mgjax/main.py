"""Entry point: python -m mgjax.main --config=configs/stage1.py --workdir=runs/stage1

Overrides go on the command line as --config.train.steps=100; a key the config does not
have is an error. Without --workdir the config's own `workdir` is used.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/stage1.py[:model=sample].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go (local or gs://).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first: needed when the run spans several hosts (TPU pod slices, GPU clusters).")
flags.mark_flags_as_required(["config"])


def format_summary(summary) -> str:
  lines = [
      f"stage {summary.stage}: {summary.steps} steps in {summary.seconds:.0f}s, "
      f"{summary.num_trainable:,} of {summary.num_params:,} params trained",
      f"  final train loss {summary.train_loss:.4f}",
  ]
  for split, end in summary.val_loss_end.items():
    lines.append(f"  {split:<18} loss {summary.val_loss_start.get(split, float('nan')):.4f} -> {end:.4f}")
  if summary.init_from:
    lines.append(f"  started from {summary.init_from}")
  lines.append(f"  checkpoint {summary.checkpoint}")
  lines.append(f"  metrics    {os.path.join(summary.workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(summary.workdir, 'tensorboard')})")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize()
  from mgjax import train  # after distributed init: it touches jax devices

  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir
  if not workdir:
    raise app.UsageError("no workdir: pass --workdir=DIR")
  summary = train.run(config, workdir)
  print(format_summary(summary), flush=True)


def run() -> None:
  logging.getLogger("absl").setLevel(logging.INFO)
  app.run(main)


if __name__ == "__main__":
  run()
