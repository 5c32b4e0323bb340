"""Writes the finished splits as a TFDS array_record dataset, on this machine or with Beam.

Writing is all that happens here: reading sources, checking, holding out validation
sets and mixing happen before (in `build.py`), and the splits arrive as spill entries,
each record read back from disk as it is written. Either way the result is a TFDS
dataset (dataset_info.json, features.json, array_record shards) that
`tfds.builder_from_directory` opens and `as_data_source` reads at random.

  write_local   streams each split, in its mixed order, into shards of at most
                _SHARD_BYTES, then has TFDS write the metadata. Not TFDS's generator
                writer: past 1 GB its shuffler spills through tf.io.gfile, which
                needs TensorFlow, and it holds that 1 GB in memory.
  MgjaxInstructions  TFDS's Apache Beam path (download_and_prepare with a runner).

No TensorFlow is needed for either, nor to read.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from mgjax.data import datasets, spill

FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "source": tfds.features.Text(),
    "category": tfds.features.Text(),
    "messages": tfds.features.Sequence({
        "role": tfds.features.Text(),
        "content": tfds.features.Text()
    }),
    # Encoded PNG/JPEG bytes, decoded in the training pipeline (so one dataset serves
    # every image size and both vision towers).
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
})

_SHARD_BYTES = 512 << 20  # a shard's records, as stored in the spill (about what it takes on disk)


def _template(out) -> tfds.core.ShardedFileTemplate:
  return tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=datasets.BUILDER_NAME, filetype_suffix="array_record")


def write_local(out, version: str, splits: dict[str, list[spill.Entry]], description: str) -> None:
  """Writes each (non-empty) split under `out` (DIR/mgjax_instructions/<name>/<version>)."""
  out = tfds.core.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  template = _template(out)
  adapter = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
  reader = spill.Reader()
  split_infos = []
  try:
    for name, entries in splits.items():
      num_shards = max(1, math.ceil(sum(e.text_nbytes + e.image_nbytes for e in entries) / _SHARD_BYTES))
      bounds = [len(entries) * k // num_shards for k in range(num_shards + 1)]
      num_bytes, split_template = 0, template.replace(split=name)
      for k in range(num_shards):
        path = split_template.sharded_filepath(shard_index=k, num_shards=num_shards)
        shard = entries[bounds[k]:bounds[k + 1]]
        adapter.write_examples(
            path, ((i, FEATURES.serialize_example(reader.record(e).to_example())) for i, e in enumerate(shard)))
        num_bytes += path.stat().length
      split_infos.append(
          tfds.core.SplitInfo(name=name, shard_lengths=[b - a for a, b in zip(bounds, bounds[1:])], num_bytes=num_bytes,
                              filename_template=split_template))
  finally:
    reader.close()
  tfds.folder_dataset.write_metadata(data_dir=out, features=FEATURES, split_infos=split_infos, version=version,
                                     filename_template=template, check_data=False, description=description)


class MgjaxInstructions(tfds.core.GeneratorBasedBuilder):
  """The Beam path's builder: one conversation per example; one BuilderConfig per data
  config (e.g. "sample")."""

  VERSION = tfds.core.Version("1.0.0")  # overridden by the BuilderConfig's version

  def __init__(self, *, config: tfds.core.BuilderConfig, splits: dict[str, list[spill.Entry]], chunks_dir: str,
               description: str = "", **kwargs):
    self._split_entries = splits
    self._description = description
    self._chunks_dir = chunks_dir  # where the Beam source lists each split's entries
    super().__init__(config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=...) directly: dataset_info_from_configs wants the builder to
    # live in a TFDS package directory with checksums and citations, which this is not.
    return tfds.core.DatasetInfo(builder=self, description=self._description, features=FEATURES)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    return {name: self._generate_examples(name, entries) for name, entries in self._split_entries.items()}

  def _generate_examples(self, split: str, entries: list[spill.Entry]):
    from mgjax.data import beam_build  # apache-beam is optional
    return beam_build.examples(split, entries, self._chunks_dir)


def write_beam(data_dir: str, name: str, version: str, splits: dict[str, list[spill.Entry]], description: str,
               chunks_dir: str, runner: str, options: list[str]) -> None:
  """Writes the splits with TFDS's Beam path on `runner` with pipeline `options`."""
  from apache_beam.options.pipeline_options import PipelineOptions
  config = tfds.core.BuilderConfig(name=name, version=version, description=description)
  builder = MgjaxInstructions(config=config, data_dir=data_dir, splits=splits, chunks_dir=chunks_dir,
                              description=description)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(beam_runner=runner, beam_options=PipelineOptions(options)))
