"""Where numbers go: WORKDIR/metrics.jsonl (one JSON object a line) and TensorBoard."""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
from etils import epath


class MetricsWriter:
  """Writes scalars from process 0; other processes hold an inert writer.

  metrics.jsonl counts this stage's steps; TensorBoard counts on from the stages before
  (`tensorboard_offset`, their steps), so a recipe's stages line up one after the other.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard_offset: int = 0):
    self._active = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._offset = int(tensorboard_offset)
    if not self._active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.path.exists():
      # A killed run may have logged past its last checkpoint; those lines will be
      # logged again by the resumed run, so drop them to keep one line per event. A line
      # torn by the kill (or a full disk) goes too.
      kept = [r for r in read(workdir) if r["step"] <= resume_step]
      self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes events

    self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, split: str, **scalars: Any) -> None:
    if not self._active:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), self._offset + int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read(workdir: str) -> list[dict[str, Any]]:
  """Reads back a workdir's metrics.jsonl, skipping (with a warning naming the file and line)
  lines that are not whole records: what a kill or a full disk leaves at the end."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if not (isinstance(record, dict) and isinstance(record.get("step"), int) and "split" in record):
      logging.warning("%s: line %d is not a whole metrics record (torn by a kill or a full disk?); "
                      "skipped: %.80r", path, number, line)
      continue
    records.append(record)
  return records


def val_losses_at(workdir: str, step: int) -> dict[str, float]:
  """The validation losses logged at `step` (e.g. step 0 of a resumed run)."""
  return {r["split"]: r["loss"] for r in read(workdir) if r["step"] == step and r["split"] != "train" and "loss" in r}


def train_loss_at(workdir: str, step: int) -> float:
  losses = [r["loss"] for r in read(workdir) if r["step"] == step and r["split"] == "train"]
  return losses[-1] if losses else float("nan")
