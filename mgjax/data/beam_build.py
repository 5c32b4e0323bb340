"""The builder's Apache Beam pipelines, for `python -m mgjax.data.build --beam_runner=...`.

Two pipelines carry the per-record work, which is what grows with the data:

  prepare:  sources -> read (one worker per source file) -> reshuffle -> Preparer (read
            and check images, normalise, filter, spill the kept record, sign it)
  write:    TFDS's Beam path: split entries -> read each record back -> TFDS example

Between them the driver de-duplicates in config order and mixes, on entries alone (see
build.py), so Beam and the local process pool build the same dataset.

Workers write their spill shards and prepared lists under the data_dir, so on Dataflow
that must be a gs:// path, and the workers need mgjax installed (see the README).
"""

from __future__ import annotations

import heapq
from typing import Any, Iterator, Sequence
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

from mgjax.data import spill
from mgjax.data.prepare import Preparer, read_source

_CHUNK = 10_000  # entries per file listing a split for the write pipeline


class _Prepare(beam.DoFn):
  """Runs Preparer over a bundle; the results go to one file per bundle, sorted by
  position, written under a temporary name and renamed when complete."""

  def __init__(self, preparer_args: tuple[Any, ...]):
    self._args = preparer_args

  def setup(self):
    self._preparer = Preparer(*self._args)

  def start_bundle(self):
    self._preparer.writer = spill.Writer(self._preparer.spill_dir)
    self._results = []

  def process(self, element):
    position, item = element
    self._results.append((position, *self._preparer(item)))

  def finish_bundle(self):
    self._preparer.writer.close()
    if self._results:
      self._results.sort(key=lambda r: r[0])
      path = epath.Path(self._preparer.spill_dir) / f"prepared-{uuid.uuid4().hex}"
      spill.dump_stream(f"{path}.tmp", self._results)
      epath.Path(f"{path}.tmp").rename(path)


def prepare(specs: list[dict[str, Any]], preparer_args: tuple[Any, ...], spill_dir: str, runner: str,
            options: Sequence[str]) -> Iterator[tuple[Any, Any]]:
  """Runs the prepare pipeline, then yields (entry or rejection, signature) in source order."""
  with beam.Pipeline(runner=runner, options=PipelineOptions(list(options))) as p:
    _ = (
        p | "Sources" >> beam.Create(list(enumerate(specs))) | "Read" >> beam.FlatMap(read_source)
        # Reading a source is one sequential pass; the per-record work is spread after it.
        | "Spread" >> beam.Reshuffle() | "Prepare" >> beam.ParDo(_Prepare(preparer_args)))
  files = sorted(p for p in epath.Path(spill_dir).glob("prepared-*") if not p.name.endswith(".tmp"))
  last = None
  for position, item, sig in heapq.merge(*(spill.load_stream(f) for f in files), key=lambda r: r[0]):
    if position == last:
      continue  # a retried bundle wrote its records twice
    last = position
    yield item, sig


class _ToExample(beam.DoFn):

  def setup(self):
    self._reader = spill.Reader()

  def process(self, entry: spill.Entry):
    yield entry.id, self._reader.record(entry).to_example()

  def teardown(self):
    self._reader.close()


def examples(split: str, entries: list[spill.Entry], chunks_dir: str) -> beam.PTransform:
  """The write pipeline's source for one split: TFDS applies it and writes the examples.

  The entries go to files (a few MB each) rather than into the pipeline graph, which
  Dataflow limits to 10 MB."""
  paths = []
  for k, start in enumerate(range(0, len(entries), _CHUNK)):
    paths.append(f"{chunks_dir}/split-{split}-{k:05d}")
    spill.dump_stream(paths[-1], entries[start:start + _CHUNK])
  return (beam.Create(paths) | "ReadEntries" >> beam.FlatMap(spill.load_stream) | "Spread" >> beam.Reshuffle() |
          "ToExample" >> beam.ParDo(_ToExample()))
