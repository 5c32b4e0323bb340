"""The per-record work of a build, shared by the local process pool and Apache Beam.

  read_source      every item of one source with its position, in source order
  Preparer         one record: read its images, normalise, filter, keep it in this process's
                   spill shard and sign it for de-duplication (or return its Rejection)
  prepare_locally  every source through a pool of worker processes (or this one), in order

mgjax.data.build drives it; mgjax.data.beam_build runs the same Preparer in Beam workers.
"""

from __future__ import annotations

import collections
from concurrent import futures
import dataclasses
import itertools
import multiprocessing
import os
import pickle
import sys
from typing import Any, Iterator

from mgjax.data import dedup, filters, sources, spill, verdicts
from mgjax.data.records import Record, Rejection

_BATCH = 256  # records per task sent to a worker process


class Preparer:
  """The per-record work of cleaning: read the images, normalise, filter, store the record
  if it passes (in this process's spill shard) and sign it for de-duplication. One per
  worker process (pool or Beam); returns the kept record's Entry or the Rejection."""

  def __init__(self, tokenizer_dir: str | None, dedup_cfg: dedup.DedupConfig,
               qualities: dict[str, filters.QualityConfig], spill_dir: str, review: verdicts.Verdicts | None = None):
    count_tokens = filters.tokenizer_counter(tokenizer_dir) if tokenizer_dir else filters.pretoken_counter()
    self._quality = {name: filters.Quality(q, count_tokens) for name, q in qualities.items()}
    self._dedup = dedup_cfg
    self.spill_dir = spill_dir
    self.writer = spill.Writer(spill_dir)
    self._review = review or verdicts.Verdicts()

  def __call__(self, item: Record | Rejection) -> tuple[spill.Entry | Rejection, dedup.Signature | None]:
    if isinstance(item, Record):
      item = self._review.dropped(filters.normalize(item))
    if isinstance(item, Record):
      item = sources.load_images(item)
    overrode = None
    if isinstance(item, Record):
      file, where = item.origin.split("\t", 1)
      item, overrode = self._review.checked(item, self._quality[item.source](item, file, where))
    if isinstance(item, Rejection):
      return item, None
    return dataclasses.replace(self.writer.add(item), overrode=overrode), dedup.signature(item, self._dedup)


def read_source(indexed_spec: tuple[int, dict[str, Any]]) -> Iterator[tuple[tuple[int, int], Record | Rejection]]:
  """Every item of one source with its position (source index, item index): the order in
  which de-duplication must see them, whichever process prepared them."""
  i, spec = indexed_spec
  items = sources.read(spec["path"], format=spec["format"], source=spec["name"], image_root=spec["image_root"],
                       category=spec.get("category"), lazy_images=True, **dict(spec.get("options") or {}))
  for k, item in enumerate(items):
    yield (i, k), item


# A pool worker's Preparer, made once per process by _init_worker so tasks ship only records.
_worker: Preparer | None = None
_worker_error: str | None = None  # why _init_worker could not make it


def _init_worker(*args) -> None:
  """Makes this process's Preparer. A failure is kept for the first task to raise: raised
  here, it would make the pool start another worker that fails the same way, forever."""
  global _worker, _worker_error
  try:
    _worker = Preparer(*args)
  except Exception as e:  # any error: re-raised by _prepare_batch
    _worker_error = f"{type(e).__name__}: {e}"
    if multiprocessing.parent_process() is None:  # this process: raise as is
      raise


def _prepare_batch(batch: list[Record | Rejection]) -> list[tuple[spill.Entry | Rejection, dedup.Signature | None]]:
  if _worker is None:
    raise RuntimeError(f"a build worker process could not start: {_worker_error}")
  out = [_worker(item) for item in batch]
  _worker.writer.flush()  # the main process may hand these entries to the writer next
  return out


_results = itertools.count()  # this worker's result files, numbered


def _prepare_batch_to_file(batch: list[Record | Rejection]) -> str:
  """_prepare_batch in a pool worker, its output handed over in a file named by the short
  string it returns. A pool worker's result of hundreds of KB crosses the pipe in several
  writes; a worker killed between two of them leaves the pool's reader waiting forever for
  the rest (the pool never notices the death). A short name is written whole or not at all."""
  out = _prepare_batch(batch)
  path = os.path.join(_worker.spill_dir, f"pool-result-{os.getpid()}-{next(_results)}.pickle")
  with open(path, "wb") as f:
    pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
  return path


def _load_prepared(path: str) -> list[tuple[spill.Entry | Rejection, dedup.Signature | None]]:
  with open(path, "rb") as f:
    out = pickle.load(f)  # written by this build's own worker just now
  os.remove(path)
  return out


def _batches(specs: list[dict[str, Any]]):
  """Reader output of every source in order, in batches for the workers."""
  batch = []
  for indexed in enumerate(specs):
    for _, item in read_source(indexed):
      batch.append(item)
      if len(batch) == _BATCH:
        yield batch
        batch = []
  if batch:
    yield batch


class WorkerDied(RuntimeError):
  """A build worker process ended in the middle of the build (killed, most often by the
  out-of-memory killer); the build stops rather than wait for its results forever."""


def _where(item: Record | Rejection) -> str:
  if isinstance(item, Record):
    return item.origin.replace("\t", ": ", 1)
  return f"{item.file}: {item.record}"


def _ordered_map(executor, fn, batches, window: int):
  """fn(batch) of each batch in order (fn returns the file holding its output), at most
  `window` batches in flight: executor.map would submit its whole input at once, holding a
  whole corpus (images included) in memory.

  Raises:
    WorkerDied: a worker process died; names the records in flight.
  """
  pending = collections.deque()  # [batch, its future], oldest first

  def take():
    out = _load_prepared(pending[0][1].result())
    pending.popleft()
    return out

  try:
    for batch in batches:
      pending.append([batch, None])
      pending[-1][1] = executor.submit(fn, batch)
      if len(pending) >= window:
        yield take()
    while pending:
      yield take()
  except futures.process.BrokenProcessPool:
    first, last = _where(pending[0][0][0]), _where(pending[-1][0][-1])
    raise WorkerDied(f"a build worker process died (killed, most often by the out-of-memory killer: see `dmesg`) "
                     f"while preparing the records from {first} to {last}; nothing was written. Build again with "
                     f"fewer workers (the data config's num_workers) or more memory; if it dies on the same "
                     "records again, one of them (an image?) is the cause: remove it") from None


def prepare_locally(specs, preparer_args, workers: int):
  """Prepared items in source order, from a pool of `workers` processes (or this one).

  Raises:
    WorkerDied: a worker process was killed (the build stops instead of waiting forever).
  """
  if workers <= 1:
    _init_worker(*preparer_args)
    for batch in _batches(specs):
      yield from _prepare_batch(batch)
    _worker.writer.close()
    return
  # Forking a process in which jax already started its threads can deadlock (the trainer
  # builds after starting jax): spawn then. Otherwise fork, which starts in milliseconds
  # and does not re-import the caller's main script.
  context = multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")
  # concurrent.futures' pool, not multiprocessing's: when a worker is killed, its task's
  # result never comes, and multiprocessing.Pool would wait for it forever; this one
  # notices the death and fails every pending task with BrokenProcessPool.
  executor = futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=preparer_args)
  try:
    for out in _ordered_map(executor, _prepare_batch_to_file, _batches(specs), window=2 * workers):
      yield from out
  finally:
    # Workers finish the batch in hand (every batch was flushed to its shard before it
    # came back) and exit; a broken pool's are gone already.
    executor.shutdown(wait=False, cancel_futures=True)
