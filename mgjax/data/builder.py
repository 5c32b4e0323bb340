"""The TFDS builder that writes built records as an array_record dataset.

The builder only writes: reading sources, checking, holding out validation sets and
mixing happen before it (in `build.py`), and it receives the finished split lists as
spill entries, reading each record back from disk as it writes it. This
keeps TFDS's machinery (versioning, sharding, dataset_info.json, random-access reading
with `tfds.data_source`) without tying the cleaning logic to TFDS's generator protocol.

No TensorFlow is needed: `file_format="array_record"` prepares and reads without it.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from mgjax.data import spill

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

  def __init__(self, *, config: tfds.core.BuilderConfig, splits: dict[str, list[spill.Entry]] | None = None,
               description: str = "", beam_chunks_dir: str | None = None, **kwargs):
    # `splits` is only needed to prepare; reading a built dataset goes through
    # `tfds.builder_from_directory` and never constructs this class.
    self._split_entries = splits
    self._description = description
    self._beam_chunks_dir = beam_chunks_dir  # set: write with Beam, listing entries there
    super().__init__(config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=...) directly: dataset_info_from_configs wants the builder to
    # live in a TFDS package directory with checksums and citations, which this is not.
    return tfds.core.DatasetInfo(builder=self, description=self._description, features=FEATURES)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    if self._split_entries is None:
      raise ValueError(f"{BUILDER_NAME}: prepare needs the split entries; build with mgjax.data.build")
    return {name: self._generate_examples(name, entries) for name, entries in self._split_entries.items()}

  def _generate_examples(self, split: str, entries: list[spill.Entry]):
    if self._beam_chunks_dir is not None:
      from mgjax.data import beam_build  # pylint: disable=g-import-not-at-top  (apache-beam is optional)
      return beam_build.examples(split, entries, self._beam_chunks_dir)
    return _examples(entries)


def _examples(entries: list[spill.Entry]):
  reader = spill.Reader()
  try:
    for e in entries:
      yield e.id, reader.record(e).to_example()
  finally:
    reader.close()


def make_builder(name: str, version: str, data_dir: str, splits: dict[str, list[spill.Entry]] | None = None,
                 description: str = "", beam_chunks_dir: str | None = None) -> MgjaxInstructions:
  """A builder for data config `name` at `version`, writing under data_dir; with
  `beam_chunks_dir`, through the Beam runner `download_and_prepare` is given."""
  config = tfds.core.BuilderConfig(name=name, version=version, description=description)
  return MgjaxInstructions(config=config, data_dir=data_dir, splits=splits, description=description,
                           beam_chunks_dir=beam_chunks_dir)
