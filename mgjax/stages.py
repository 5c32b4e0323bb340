"""What makes stage 2 a stage 2.

Stage 2 starts from stage 1's *params only* (a fresh optimizer with its own, gentler
schedule) and records which checkpoint it started from, so every stage-2 result can be
traced back to the stage-1 run under it.
"""

from __future__ import annotations

from typing import Any

from mgjax import checkpoint


def load_init_params(init_from: str, abstract_params: Any) -> tuple[Any, dict]:
  """Restores the params of the latest checkpoint under `init_from` into the model's layout.

  `init_from` is a workdir, its checkpoints/ folder, or one checkpoints/<step> folder.
  Raises checkpoint.CheckpointError naming what to run when there is no checkpoint, and
  listing every mismatched parameter path when the shapes do not fit.
  """
  workdir, step = checkpoint.locate(init_from)
  source = checkpoint.Checkpoints(workdir, read_only=True)
  params, meta = source.restore_params(step, abstract_params)
  source.close()
  return params, {
      "workdir": workdir,
      "step": step,
      "checkpoint": str(source.directory / str(step)),
      "stage": meta.get("stage"),
  }
