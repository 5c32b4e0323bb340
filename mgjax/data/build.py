"""Builds a training dataset from the sources a data config names.

  python -m mgjax.data.build --config=configs/data/sample.py --data_dir=DIR

read sources (one reader per format) -> prepare each record (read its images, normalise,
filter; kept records go to spill shards on disk) -> de-duplicate in config order -> hold
out val per category -> mix train -> tokenizer (sample: trained on the train text) ->
TFDS array_record dataset, with `rejected.jsonl` (every dropped record and why) and
`data_card.json` beside it.

Memory holds one small entry per kept record, never the records' text or images. The
per-record work runs on every core (a process pool), or with --beam_runner as Apache
Beam pipelines (DirectRunner here, DataflowRunner for inputs beyond one machine).

The trainer calls `ensure_built(cfg.data, data_dir)` and opens splits with `open_split`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
from typing import Any, Iterator, Sequence

from absl import app, flags, logging
from etils import epath
import ml_collections
import tensorflow_datasets as tfds
import tqdm

from mgjax import locks
from mgjax.data import builder, card, dedup, filters, mixture, prompts, sample, sources, spill, tokenizer, verdicts
from mgjax.data.records import Record, Rejection
from mgjax.data.sources import _common

_SOURCE_KEYS = {"name", "format", "path", "image_root", "category", "options", "filters"}
# The config fields that decide the built content; a stage config may embed the data
# config beside pipeline keys (sequence length, batch size) that must not force rebuilds.
_CONTENT_KEYS = ("name", "version", "seed", "val_per_category", "sample", "sources", "tokenizer", "filters", "dedup",
                 "mixture", "review")
_LOGGED_REJECTIONS = 20  # per source; the rest are counted and in rejected.jsonl
_BATCH = 256  # records per task sent to a worker process


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
  """Where a built dataset lives and what it holds."""
  name: str  # "mgjax_instructions/<config name>", as tfds.data_source names it
  version: str
  data_dir: str  # the TFDS data_dir (DIR)
  dataset_dir: str  # DIR/mgjax_instructions/<config name>/<version>
  tokenizer_dir: str | None  # load with mgjax.data.tokenizer.load
  splits: dict[str, int]  # every split in builder.SPLITS, empty ones with 0

  @property
  def data_card(self) -> str:
    return f"{self.dataset_dir}/data_card.json"

  @property
  def rejected(self) -> str:
    return f"{self.dataset_dir}/rejected.jsonl"


def dataset_dir(data_cfg: ml_collections.ConfigDict, data_dir: str) -> epath.Path:
  return epath.Path(data_dir) / builder.BUILDER_NAME / data_cfg.name / data_cfg.version


def _content(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  d = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  # The review file by its digest: editing it must rebuild. Absent when unset, so builds
  # from before `review` existed still match their config.
  d["review"] = verdicts.fingerprint(data_cfg)
  return json.loads(json.dumps({k: d.get(k) for k in _CONTENT_KEYS if k != "review" or d[k]}, sort_keys=True))


def _sources_root(data_cfg: ml_collections.ConfigDict, data_dir: str) -> epath.Path:
  if data_cfg.get("sample") and data_cfg.sample.get("generate"):
    return epath.Path(data_dir) / data_cfg.sample.dir
  return epath.Path(data_cfg.get("sources_root") or ".")


def _resolve(path: str | None, root: epath.Path) -> str | None:
  if not path:
    return None
  if "://" in path or path.startswith("/"):
    return path
  return str(root / path)


def _check_specs(data_cfg, root: epath.Path) -> list[dict[str, Any]]:
  """Every source spec, checked before any is read: a typo should fail in a second, not
  after an hour of reading the sources before it."""
  specs, names = [], set()
  for spec in data_cfg.sources:
    spec = dict(spec)
    unknown = set(spec) - _SOURCE_KEYS
    if unknown or not {"name", "format", "path"} <= set(spec):
      raise ValueError(f"data config source {spec}: needs name, format, path; unknown keys {sorted(unknown)} "
                       f"(allowed: {sorted(_SOURCE_KEYS)})")
    if spec["name"] in names:
      raise ValueError(f"data config: two sources are named {spec['name']!r}; names must be unique")
    names.add(spec["name"])
    if spec["format"] not in sources.READERS:
      raise ValueError(f"source {spec['name']!r}: unknown format {spec['format']!r}; known: {sorted(sources.READERS)}")
    spec["path"] = _resolve(spec["path"], root)
    spec["image_root"] = _resolve(spec.get("image_root"), root)
    if not epath.Path(spec["path"]).exists():
      raise FileNotFoundError(f"source {spec['name']!r}: {spec['path']} does not exist; fix 'path' in the data "
                              f"config (relative paths resolve under {root})")
    # Checked without opening: opening a FIFO would block the build until something wrote to it.
    problem = _common.not_regular_file(spec["path"])
    if problem is not None:
      raise ValueError(f"source {spec['name']!r}: {problem}; 'path' must name the source's data file")
    spec["quality"] = filters.QualityConfig.from_dict({
        **dict(data_cfg.get("filters") or {}),
        **dict(spec.get("filters") or {})
    })
    specs.append(spec)
  return specs


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
      item = self._review.dropped(item)
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


def _ordered_map(pool, fn, items, window: int):
  """pool.imap with at most `window` tasks in flight: imap reads its input ahead without
  limit, which would hold a whole corpus (images included) in memory."""
  pending = collections.deque()
  for x in items:
    pending.append(pool.apply_async(fn, (x,)))
    if len(pending) >= window:
      yield pending.popleft().get()
  while pending:
    yield pending.popleft().get()


def _prepare_locally(specs, preparer_args, workers: int):
  """Prepared items in source order, from a pool of `workers` processes (or this one)."""
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
  pool = context.Pool(workers, _init_worker, preparer_args)
  try:
    for batch in _ordered_map(pool, _prepare_batch, _batches(specs), window=2 * workers):
      yield from batch
  finally:
    pool.terminate()  # every batch was flushed to its shard before it came back


def _clean(data_cfg, root: epath.Path, tokenizer_dir: str | None, spill_dir: str, beam_runner: str | None,
           beam_options: Sequence[str],
           tally: verdicts.Tally) -> tuple[list[spill.Entry], list[Rejection], dict[str, Any]]:
  """Reads, normalises, filters and de-duplicates every source.

  Returns the kept records' entries (the records are in the spill shards), every dropped
  record as a Rejection (duplicates included, with the id they duplicate), and
  per-source counts where read = kept + rejected + duplicates.
  """
  specs = _check_specs(data_cfg, root)
  if tokenizer_dir:
    tokenizer.check_local(tokenizer_dir)  # here, once, before workers try to load it
  dedup_cfg = dedup.DedupConfig.from_dict(data_cfg.get("dedup"))
  preparer_args = (tokenizer_dir, dedup_cfg, {s["name"]: s["quality"] for s in specs}, spill_dir, tally.verdicts)
  if beam_runner:
    from mgjax.data import beam_build  # apache-beam is optional
    prepared = beam_build.prepare(specs, preparer_args, spill_dir, beam_runner, beam_options)
  else:
    prepared = _prepare_locally(specs, preparer_args, data_cfg.get("num_workers") or os.cpu_count() or 1)

  # De-duplication sees records in config order (the first of a group is kept), one at a
  # time: it alone needs every kept record's signature, and holds nothing else.
  index = dedup.Index(dedup_cfg)
  counts = {
      s["name"]: {
          "format": s["format"],
          "path": s["path"],
          "read": 0,
          "kept": 0,
          "rejected": collections.Counter(),
          "duplicates": 0,
          "duplicate_kinds": collections.Counter()
      } for s in specs
  }
  kept, dropped, seen_ids = [], [], set()
  for item, sig in tqdm.tqdm(prepared, desc="cleaning", unit=" records", mininterval=2, disable=None):
    c = counts[item.source]
    c["read"] += 1
    entry = item if isinstance(item, spill.Entry) else None  # a rejected entry's turns are read back if sampled
    if entry is not None and item.id in seen_ids:
      file, where = item.origin.split("\t", 1)
      item = Rejection(item.source, file, where, "duplicate id; ids must be unique across sources", kind="duplicate_id",
                       id=item.id)
    if isinstance(item, Rejection):
      if c["rejected"].total() < _LOGGED_REJECTIONS:
        logging.warning("rejected: %s", item)
      c["rejected"][item.kind] += 1
      dropped.append(tally.rejected(item, entry))
      continue
    seen_ids.add(item.id)
    dup = index.add(item.id, sig)
    if dup is not None and tally.keeps(item):  # a person kept it: no automatic rule drops it
      item, dup = dataclasses.replace(item, overrode=dup[0]), None
    if dup is not None:
      kind, first, similarity = dup
      file, where = item.origin.split("\t", 1)
      dropped.append(
          tally.rejected(
              Rejection(item.source, file, where, f"{kind.replace('_', ' ')} of {first} (similarity {similarity:.2f})",
                        kind=kind, duplicate_of=first, id=item.id), item))
      c["duplicates"] += 1
      c["duplicate_kinds"][kind] += 1
      continue
    c["kept"] += 1
    kept.append(tally.kept(item))
  for name, c in counts.items():
    logging.info("source %s: read %d, kept %d, rejected %d %s, duplicates %d", name, c["read"], c["kept"],
                 c["rejected"].total(), dict(c["rejected"]), c["duplicates"])
    c["rejected"] = dict(sorted(c["rejected"].items()))
    c["duplicate_kinds"] = dict(sorted(c["duplicate_kinds"].items()))
  return kept, dropped, counts


def _why_none(counts: dict[str, dict[str, Any]], rejected: list[Rejection]) -> str:
  """Each source's counts and first rejections, for the error of a build that kept nothing."""
  parts = []
  for name, c in counts.items():
    if not c["read"]:
      parts.append(f"source {name!r} ({c['path']}): no records at all (an empty file, or only blank lines)")
    else:
      parts.append(f"source {name!r} ({c['path']}): read {c['read']}, rejected {c['rejected']}, duplicates "
                   f"{c['duplicates']}")
  examples = [f"  {r}" for r in rejected[:5]]
  return "; ".join(parts) + (". First rejections:\n" + "\n".join(examples) if examples else "")


def _rejection_line(rejection: Rejection) -> str:
  """One line of rejected.jsonl. Text UTF-8 cannot encode (a lone surrogate a record's id
  spelled) is written as JSON escapes rather than failing the build."""
  line = json.dumps(rejection.to_json(), ensure_ascii=False)
  return line if _common.unencodable(line) is None else json.dumps(rejection.to_json())


def lock_name(data_cfg: ml_collections.ConfigDict) -> str:
  """The lock (mgjax.locks) a build of data_cfg holds in its data_dir while it runs."""
  return f".mgjax_build-{data_cfg.name}-{data_cfg.version}"


def spill_dir(data_cfg: ml_collections.ConfigDict, data_dir: str, beam: bool = False) -> epath.Path:
  """Where a build keeps the kept records between cleaning and writing (deleted after).

  Under the data_dir, so a big build spills to the disk meant for data; but a local build
  into a gs:// data_dir spills to local disk ($TMPDIR): its worker processes would have to
  close their GCS uploads before anything in them could be read back. Beam workers
  (Dataflow) need it where they all can reach it: the data_dir itself.
  """
  root = epath.Path(data_dir)
  if "://" in str(data_dir) and not beam:
    root = epath.Path(tempfile.gettempdir())
  return root / ".mgjax_spill" / data_cfg.name / data_cfg.version


def build(data_cfg: ml_collections.ConfigDict, data_dir: str, *, beam_runner: str | None = None,
          beam_options: Sequence[str] = ()) -> BuiltDataset:
  """Builds the dataset (or rebuilds it, replacing a build of this very config).

  A build of the same name/version from a different config is refused
  (`refuse_changed_config`): one name and version always mean one content.

  With `beam_runner` ("DirectRunner", "DataflowRunner", ...) the per-record work and the
  writing run as Apache Beam pipelines with `beam_options` (command-line style flags,
  e.g. ["--project=P", "--region=R", "--temp_location=gs://B/tmp"]); de-duplication and
  mixing stay here. Both ways build the same dataset.
  """
  data_dir = str(data_dir)
  out = dataset_dir(data_cfg, data_dir)
  refuse_changed_config(data_cfg, data_dir)
  spill_root = spill_dir(data_cfg, data_dir, beam=bool(beam_runner))
  # One build of a name/version into a data_dir at a time: each starts by deleting the
  # spill folder, which would be the other's records.
  try:
    with locks.exclusive(data_dir, lock_name(data_cfg),
                         f"data_dir {data_dir} (a build of {data_cfg.name} {data_cfg.version})"):
      if data_cfg.get("sample") and data_cfg.sample.get("generate"):
        s = data_cfg.sample
        sample.write_sample_sources(str(_sources_root(data_cfg,
                                                      data_dir)), seed=data_cfg.seed, n_understanding=s.n_understanding,
                                    n_generation=s.n_generation, n_text=s.n_text, n_caption=s.get("n_caption", 0))
      if spill_root.exists():
        spill_root.rmtree()  # left by a build that was killed
      spill_root.mkdir(parents=True)
      try:
        return _build(data_cfg, data_dir, out, spill_root, beam_runner, beam_options)
      finally:
        spill_root.rmtree()
  finally:
    for parent in (spill_root.parent, spill_root.parent.parent):  # .mgjax_spill/<name>, if now empty
      with contextlib.suppress(OSError):  # another build may have just started there
        if parent.exists() and not any(parent.iterdir()):
          parent.rmdir()


def _build(data_cfg, data_dir: str, out: epath.Path, spill_root: epath.Path, beam_runner: str | None,
           beam_options: Sequence[str]) -> BuiltDataset:
  tok_cfg = data_cfg.tokenizer
  # Lengths are counted in the configured tokenizer's tokens; one the build trains does not
  # exist yet while filtering, so its lengths are counted in pre-tokens (see filters).
  length_tokenizer = None if tok_cfg.get("train") else (tok_cfg.get("path") or None)
  reader = spill.Reader()
  tally = verdicts.Tally(verdicts.path(data_cfg), verdicts.load(data_cfg), data_cfg.seed, reader)
  entries, rejected, source_card = _clean(data_cfg, _sources_root(data_cfg, data_dir), length_tokenizer,
                                          str(spill_root), beam_runner, beam_options, tally)
  if not entries:
    raise ValueError(f"no record survived reading: {_why_none(source_card, rejected)}")
  splits, mix_report = mixture.split(entries, data_cfg.val_per_category, data_cfg.seed,
                                     mixture.MixConfig.from_dict(data_cfg.get("mixture")))

  if tok_cfg.get("train"):
    tokenizer_dir = str(epath.Path(data_dir) / "tokenizers" / data_cfg.name)
    # Train text only: validation must not shape the vocabulary it is scored with.
    texts = (m["content"] for e in splits["train"] for m in reader.record(e, images=False).messages)
    tokenizer.train_sample_tokenizer(texts, tokenizer_dir, vocab_size=tok_cfg.vocab_size)
  else:
    tokenizer_dir = tok_cfg.get("path") or None

  if out.exists():
    out.rmtree()
  # TFDS cannot write an empty split; the trainer learns of one through open_split.
  nonempty = {k: v for k, v in splits.items() if v}
  description = f"mgjax instruction mix from data config {data_cfg.name!r}"
  if beam_runner:
    builder.write_beam(data_dir, data_cfg.name, data_cfg.version, nonempty, description, str(spill_root), beam_runner,
                       list(beam_options))
  else:
    builder.write_local(out, data_cfg.version, nonempty, description)

  sizes = {k: len(v) for k, v in splits.items()}
  with (out / "rejected.jsonl").open("w") as f:
    for rej in rejected:
      f.write(_rejection_line(rej) + "\n")
  (out / "build_config.json").write_text(json.dumps(_content(data_cfg), indent=1, sort_keys=True))
  # Written last: the presence of data_card.json marks a complete build (see ensure_built).
  card.write(out, name=f"{builder.BUILDER_NAME}/{data_cfg.name}", version=data_cfg.version, sources=source_card,
             splits=splits, mixing=mix_report, mix_by=mixture.MixConfig.from_dict(data_cfg.get("mixture")).by,
             kept=entries, tokenizer_dir=tokenizer_dir, messages=lambda e: reader.record(e, images=False).messages,
             review=tally.report(), qualities=prompts.qualities(data_cfg), seq_len=data_cfg.get("seq_len"))
  reader.close()
  logging.info("built %s: splits %s; %d rejected or duplicate (see %s)", out, sizes, len(rejected),
               out / "rejected.jsonl")
  return BuiltDataset(name=f"{builder.BUILDER_NAME}/{data_cfg.name}", version=data_cfg.version, data_dir=data_dir,
                      dataset_dir=str(out), tokenizer_dir=tokenizer_dir, splits=sizes)


class ConfigChanged(ValueError):
  """A build of this name and version exists in data_dir, made from another data config."""


def _changed_keys(data_cfg: ml_collections.ConfigDict, out: epath.Path) -> list[str]:
  """The content keys in which `out`'s build differs from data_cfg (none: no build there)."""
  stored_file = out / "build_config.json"
  if not stored_file.exists():
    return []
  stored, wanted = json.loads(stored_file.read_text()), _content(data_cfg)
  return sorted(k for k in _CONTENT_KEYS if stored.get(k) != wanted.get(k))


def refuse_changed_config(data_cfg: ml_collections.ConfigDict, data_dir: str) -> None:
  """Raises ValueError if data_dir holds a build of data_cfg's name and version made from
  another config: overwriting it would change what that version means under every run,
  checkpoint and report that names it."""
  out = dataset_dir(data_cfg, data_dir)
  diff = _changed_keys(data_cfg, out)
  if diff:
    raise ConfigChanged(f"{out} holds a build of {data_cfg.name} {data_cfg.version} from a different data config "
                        f"(differs in {diff}); refusing to overwrite it. Bump the data config's version "
                        f"(--config.version=...), build into another --data_dir, or delete {out} to rebuild it")


def load_built(data_cfg: ml_collections.ConfigDict, data_dir: str) -> BuiltDataset | None:
  """The finished build for this config, None if there is none.

  Raises if a build of the same name/version was made from a different config: reusing
  it would silently train on other data than the config says.
  """
  out = dataset_dir(data_cfg, data_dir)
  if not (out / "data_card.json").exists():
    return None
  stored = json.loads((out / "build_config.json").read_text())
  if stored != _content(data_cfg):
    diff = sorted(k for k in _CONTENT_KEYS if stored.get(k) != _content(data_cfg).get(k))
    raise ConfigChanged(f"{out} was built from a different data config (differs in {diff}); bump the data "
                        f"config's version, or delete {out} to rebuild it")
  card = json.loads((out / "data_card.json").read_text())
  # A tokenizer the build trained lives in the data_dir: found there wherever the data_dir
  # now is (copied to a bucket, mounted at another path), not where the build wrote it.
  tokenizer_dir = (str(epath.Path(data_dir) / "tokenizers" /
                       data_cfg.name) if data_cfg.tokenizer.get("train") else card["tokenizer"])
  return BuiltDataset(name=card["name"], version=card["version"], data_dir=str(data_dir), dataset_dir=str(out),
                      tokenizer_dir=tokenizer_dir, splits=card["splits"])


def ensure_built(data_cfg: ml_collections.ConfigDict, data_dir: str) -> BuiltDataset:
  """The dataset for data_cfg under data_dir, building it first if it is missing.

  A build refuses to start while another of the same config into the same data_dir
  runs (mgjax.locks.LockHeld): on multi-host runs call it on process 0, then wait at a
  barrier before the others call `load_built`.
  """
  return load_built(data_cfg, data_dir) or build(data_cfg, data_dir)


def open_split(dataset: BuiltDataset, split: str) -> Sequence[dict[str, Any]]:
  """A random-access source (len, [i]) over one split, for `grain.MapDataset.source`.

  Reads the files directly (`tfds.builder_from_directory`), so it never looks anything
  up on the network. Each example is a dict of plain Python values:
    {"id": bytes, "source": bytes, "category": bytes,
     "messages": {"role": [bytes, ...], "content": [bytes, ...]}, "images": [bytes, ...]}
  (strings come back UTF-8 encoded; images are the encoded PNG/JPEG files). A split
  that had no records (TFDS cannot store empty splits) opens as an empty tuple.
  With only data_dir and the data config at hand: `open_split(load_built(cfg, dir), split)`.
  """
  if split not in builder.SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {builder.SPLITS}")
  out = epath.Path(dataset.dataset_dir)
  if not (out / "dataset_info.json").exists():
    raise FileNotFoundError(f"no dataset at {out}; build it with `python -m mgjax.data.build "
                            f"--config=<data config> --data_dir={dataset.data_dir}` or call ensure_built")
  b = tfds.builder_from_directory(str(out))
  if split not in b.info.splits:
    return ()
  return b.as_data_source(split=split)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

if __name__ == "__main__":
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Data config file, e.g. configs/data/sample.py.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the TFDS dataset and tokenizer are written.")
  _BEAM_RUNNER = flags.DEFINE_string(
      "beam_runner", None, "Build with Apache Beam on this runner (DirectRunner, DataflowRunner); "
      "needs pip install -e '.[beam]'. Unset: a process pool on this machine's cores.")
  _BEAM_OPTIONS = flags.DEFINE_list(
      "beam_options", [], "Beam pipeline flags without the leading dashes, comma-separated, e.g. "
      "project=P,region=R,temp_location=gs://B/tmp,requirements_file=req.txt.")
  flags.mark_flags_as_required(["config", "data_dir"])

  def main(argv):
    del argv
    try:
      built = build(_CONFIG.value, _DATA_DIR.value, beam_runner=_BEAM_RUNNER.value,
                    beam_options=[f"--{o}" for o in _BEAM_OPTIONS.value])
    except ConfigChanged as e:
      sys.exit(f"error: {e}")
    print(f"dataset   {built.name}:{built.version} at {built.dataset_dir}")
    print(f"splits    {built.splits}")
    print(f"tokenizer {built.tokenizer_dir}")
    print(f"card      {built.data_card}\nrejected  {built.rejected}")

  from mgjax import runtime
  app.run(main, flags_parser=runtime.parse_flags)
