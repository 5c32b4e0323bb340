"""The TFDS builder that writes built records as an array_record dataset.

The builder only writes: reading sources, checking, holding out validation sets and
mixing happen before it (in `build.py`), and it receives the finished split lists. This
keeps TFDS's machinery (versioning, sharding, dataset_info.json, random-access reading
with `tfds.data_source`) without tying the cleaning logic to TFDS's generator protocol.

No TensorFlow is needed: `file_format="array_record"` prepares and reads without it.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds

from mgjax.data.records import Record

BUILDER_NAME = "mgjax_instructions"
SPLITS = ("train", "train_generation", "val_understanding", "val_generation", "val_text")

FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "source": tfds.features.Text(),
    "category": tfds.features.Text(),
    "messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
    # Encoded PNG/JPEG bytes, decoded in the training pipeline (so one dataset serves
    # every image size and both vision towers).
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
})


class MgjaxInstructions(tfds.core.GeneratorBasedBuilder):
  """One conversation per example; one BuilderConfig per data config (e.g. "sample")."""

  VERSION = tfds.core.Version("1.0.0")  # overridden by the BuilderConfig's version

  def __init__(self, *, config: tfds.core.BuilderConfig, splits: dict[str, list[Record]] | None = None,
               description: str = "", **kwargs):
    # `splits` is only needed to prepare; reading a built dataset goes through
    # `tfds.builder_from_directory` and never constructs this class.
    self._split_records = splits
    self._description = description
    super().__init__(config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=...) directly: dataset_info_from_configs wants the builder to
    # live in a TFDS package directory with checksums and citations, which this is not.
    return tfds.core.DatasetInfo(builder=self, description=self._description, features=FEATURES)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    if self._split_records is None:
      raise ValueError(f"{BUILDER_NAME}: prepare needs the split records; build with mgjax.data.build")
    return {name: self._generate_examples(recs) for name, recs in self._split_records.items()}

  def _generate_examples(self, records: Iterable[Record]):
    for r in records:
      yield r.id, r.to_example()


def make_builder(name: str, version: str, data_dir: str, splits: dict[str, list[Record]] | None = None,
                 description: str = "") -> MgjaxInstructions:
  """A builder for data config `name` at `version`, writing under data_dir."""
  config = tfds.core.BuilderConfig(name=name, version=version, description=description)
  return MgjaxInstructions(config=config, data_dir=data_dir, splits=splits, description=description)
