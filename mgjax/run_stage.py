"""One stage as the entry points run it: the dataset built first if it is missing, then the
trainer, which only opens built datasets.

mgjax.main, mgjax.recipe and the benchmarks that train call `run`; `mgjax.train.run` alone
needs the dataset built beforehand (`python -m mgjax.data.build`).
"""

from __future__ import annotations

import ml_collections

from mgjax import train
from mgjax.data import build


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """What must hold before the trainer starts, unless the stage in `workdir` is finished (it
  only reports what it made, and needs neither its data nor its tokenizer): the checks that
  stop a run before any data work, then the dataset built where it is missing."""
  if train.finished_report(workdir):
    return
  train.check_before_data(config)  # what would stop the run, before minutes of building
  build.build_if_missing(config.data.recipe, config.data.data_dir)


def run(config: ml_collections.ConfigDict, workdir: str) -> train.Summary:
  """Trains one stage in `workdir` (see mgjax.train.run), building its dataset first if missing."""
  prepare(config, workdir)
  return train.run(config, workdir)
