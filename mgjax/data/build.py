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

The trainer calls `ensure_built(cfg.data, data_dir)` and opens splits with `datasets.open_split`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import itertools
import json
import os
import sys
import tempfile
from typing import Any, Sequence

from absl import app, flags, logging
from etils import epath
import ml_collections
import tqdm

from mgjax import locks
from mgjax.data import builder, card, datasets, dedup, filters, mixture, prepare, prompts, sample, sources, spill
from mgjax.data import chat_tokenizers, shared_build, tokenizer_training, verdicts
from mgjax.data.records import Rejection
from mgjax.data.sources import _common

_SOURCE_KEYS = {"name", "format", "path", "image_root", "category", "options", "filters", "min_kept_share"}
_LOGGED_REJECTIONS = 20  # per source; the rest are counted and in rejected.jsonl
# The share of a source's records (those a reviewer did not drop) the build must keep, unless
# the data config (min_kept_share) or the source's spec says otherwise: a wrong image_root or
# a renamed field loses most or all of a source, which must stop the build, not thin the mix.
MIN_KEPT_SHARE = 0.5


class SourceLost(ValueError):
  """A source kept no records, or fewer than its min_kept_share of them."""


class SourceChangedDuringBuild(RuntimeError):
  """A source file changed while the build read it."""


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
    spec["path"] = datasets.resolve(spec["path"], root)
    spec["image_root"] = datasets.resolve(spec.get("image_root"), root)
    if not epath.Path(spec["path"]).exists():
      raise FileNotFoundError(f"source {spec['name']!r}: {spec['path']} does not exist; fix 'path' in the data "
                              f"config (relative paths resolve under {root})")
    # Checked without opening: opening a FIFO would block the build until something wrote to it.
    problem = _common.not_regular_file(spec["path"])
    if problem is not None:
      raise ValueError(f"source {spec['name']!r}: {problem}; 'path' must name the source's data file")
    share = spec.get("min_kept_share", data_cfg.get("min_kept_share", MIN_KEPT_SHARE))
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
      raise ValueError(f"source {spec['name']!r}: min_kept_share={share!r}; it is a share of the source's records, "
                       "from 0 (never stop the build) to 1")
    spec["min_kept_share"] = float(share)
    spec["quality"] = filters.QualityConfig.from_dict({
        **dict(data_cfg.get("filters") or {}),
        **dict(spec.get("filters") or {})
    })
    specs.append(spec)
  return specs


def _clean(data_cfg, specs: list[dict[str, Any]], tokenizer_dir: str | None, spill_dir: str, beam_runner: str | None,
           beam_options: Sequence[str],
           tally: verdicts.Tally) -> tuple[list[spill.Entry], list[Rejection], dict[str, Any]]:
  """Reads, normalises, filters and de-duplicates every source.

  Returns the kept records' entries (the records are in the spill shards), every dropped
  record as a Rejection (duplicates included, with the id they duplicate), and
  per-source counts where read = kept + rejected + duplicates.
  """
  if tokenizer_dir:
    chat_tokenizers.check_local(tokenizer_dir)  # here, once, before workers try to load it
  dedup_cfg = dedup.DedupConfig.from_dict(data_cfg.get("dedup"))
  preparer_args = (tokenizer_dir, dedup_cfg, {s["name"]: s["quality"] for s in specs}, spill_dir, tally.verdicts)
  if beam_runner:
    from mgjax.data import beam_build  # apache-beam is optional
    prepared = beam_build.prepare(specs, preparer_args, spill_dir, beam_runner, beam_options)
  else:
    prepared = prepare.prepare_locally(specs, preparer_args, data_cfg.get("num_workers") or os.cpu_count() or 1)

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
        # A record's text may hold lone surrogates (JSON's "\ud800"): written as escapes, so
        # that a UTF-8 log, terminal or test report can take the line.
        logging.warning("rejected: %s", str(item).encode("utf-8", "backslashreplace").decode("utf-8"))
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


def _refuse_lost_sources(specs: list[dict[str, Any]], counts: dict[str, dict[str, Any]],
                         rejected: list[Rejection]) -> None:
  """Raises SourceLost naming every source that kept nothing, or under its min_kept_share of
  the records a reviewer did not drop (a share above 0 also refuses a source that kept
  nothing), with its commonest reason and one example of it. A share of 0 turns it off."""
  problems = []
  for spec in specs:
    name, c = spec["name"], counts[spec["name"]]
    reviewed = c["rejected"].get(verdicts.REVIEW_KIND, 0)
    judged = c["read"] - reviewed  # a person's drops are decisions, not losses
    if not spec["min_kept_share"]:
      continue
    if not c["read"]:
      problems.append(f"source {name!r} ({c['path']}): no records at all (an empty file, or only blank lines)")
      continue
    if not judged or c["kept"] >= spec["min_kept_share"] * judged:
      continue
    reasons = collections.Counter({k: n for k, n in c["rejected"].items() if k != verdicts.REVIEW_KIND})
    reasons.update(c["duplicate_kinds"])
    commonest = reasons.most_common(3)
    kind = commonest[0][0]
    example = next((r for r in rejected if r.source == name and r.kind == kind), None)
    problems.append(f"source {name!r} ({c['path']}): read {c['read']}, rejected {c['rejected']}, duplicates "
                    f"{c['duplicates']}: kept {c['kept']} ({c['kept'] / judged:.0%}"
                    f"{f' of the {judged} not dropped in review' if reviewed else ''}; min_kept_share "
                    f"{spec['min_kept_share']:g}). Commonest reasons: " +
                    ", ".join(f"{k} ({n})" for k, n in commonest) + (f", e.g. {example}" if example else ""))
  if problems:
    raise SourceLost(
        "sources lost most or all of their records, which usually means a wrong image_root, path or format, not "
        "bad data:\n  " + "\n  ".join(problems) + "\nFix the source's spec in the data config (see rejected "
        "records by kind with `python -m mgjax.data.review` once it builds); where losing that share is expected, "
        "lower min_kept_share for that source (its spec's min_kept_share, or the data config's for all; 0 turns the "
        "check off)")


def _check_unchanged(before: dict[str, dict[str, Any]], specs: list[dict[str, Any]]) -> None:
  """Raises SourceChangedDuringBuild when a source file is not what the build started reading:
  the records read would mix two versions of it."""
  changed = []
  for spec in specs:
    now = datasets.file_state(spec["path"])
    if now != before[spec["name"]]:
      changed.append(f"source {spec['name']!r} ({spec['path']}): {datasets.describe_change(before[spec['name']], now)}")
  if changed:
    raise SourceChangedDuringBuild(f"sources changed while the build read them ({'; '.join(changed)}); what was read "
                                   "mixes two versions of them, so nothing was written. Rerun the build once they "
                                   "are no longer being written")


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
          beam_options: Sequence[str] = (), overwrite: bool = False) -> datasets.BuiltDataset:
  """Builds the dataset (or rebuilds it, replacing a build of this very config).

  A build of the same name/version from a different config is refused
  (`refuse_changed_config`): one name and version always mean one content. `overwrite`
  replaces it anyway: for a curator's next round of review verdicts on a version nothing
  was trained on yet.

  With `beam_runner` ("DirectRunner", "DataflowRunner", ...) the per-record work and the
  writing run as Apache Beam pipelines with `beam_options` (command-line style flags,
  e.g. ["--project=P", "--region=R", "--temp_location=gs://B/tmp"]); de-duplication and
  mixing stay here. Both ways build the same dataset.
  """
  data_dir = str(data_dir)
  out = datasets.dataset_dir(data_cfg, data_dir)
  if not overwrite:
    refuse_changed_config(data_cfg, data_dir)
  spill_root = spill_dir(data_cfg, data_dir, beam=bool(beam_runner))
  # One build of a name/version into a data_dir at a time: each starts by deleting the
  # spill folder, which would be the other's records.
  try:
    with locks.exclusive(data_dir, lock_name(data_cfg),
                         f"data_dir {data_dir} (a build of {data_cfg.name} {data_cfg.version})"):
      if data_cfg.get("sample") and data_cfg.sample.get("generate"):
        s = data_cfg.sample
        sample.write_sample_sources(str(datasets.sources_root(data_cfg, data_dir)), seed=data_cfg.seed,
                                    n_understanding=s.n_understanding, n_generation=s.n_generation, n_text=s.n_text,
                                    n_caption=s.get("n_caption", 0))
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
           beam_options: Sequence[str]) -> datasets.BuiltDataset:
  tok_cfg = data_cfg.tokenizer
  # Lengths are counted in the configured tokenizer's tokens; one the build trains does not
  # exist yet while filtering, so its lengths are counted in pre-tokens (see filters).
  length_tokenizer = None if tok_cfg.get("train") else (tok_cfg.get("path") or None)
  reader = spill.Reader()
  tally = verdicts.Tally(verdicts.path(data_cfg), verdicts.load(data_cfg), data_cfg.seed, reader)
  prompt_checks = prompts.settings(data_cfg)  # a mistake there fails now, not after reading
  specs = _check_specs(data_cfg, datasets.sources_root(data_cfg, data_dir))
  # Each source as the build starts reading it, compared when reading is done (before
  # anything is written) and kept beside the build, so reusing it notices later edits.
  states = {s["name"]: datasets.file_state(s["path"]) for s in specs}
  entries, rejected, source_card = _clean(data_cfg, specs, length_tokenizer, str(spill_root), beam_runner, beam_options,
                                          tally)
  _check_unchanged(states, specs)
  _refuse_lost_sources(specs, source_card, rejected)
  if not entries:
    raise ValueError(f"no record survived reading: {_why_none(source_card, rejected)}")
  splits, mix_report = mixture.split(entries, data_cfg.val_per_category, data_cfg.seed,
                                     mixture.MixConfig.from_dict(data_cfg.get("mixture")))

  trained = None
  if tok_cfg.get("train"):
    # Trained beside the spill (local, even for a gs:// data_dir: save_pretrained writes local
    # files), then moved into the version's folder, which is replaced below.
    trained = spill_root / datasets.TOKENIZER
    # Train text only: validation must not shape the vocabulary it is scored with.
    texts = (m["content"] for e in splits["train"] for m in reader.record(e, images=False).messages)
    tokenizer_training.train_sample_tokenizer(texts, str(trained), vocab_size=tok_cfg.vocab_size)
    tokenizer_dir = str(out / datasets.TOKENIZER)
  else:
    tokenizer_dir = tok_cfg.get("path") or None

  if out.exists():
    out.rmtree()
  # TFDS cannot write an empty split; the trainer learns of one through datasets.open_split.
  nonempty = {k: v for k, v in splits.items() if v}
  description = f"mgjax instruction mix from data config {data_cfg.name!r}"
  if beam_runner:
    builder.write_beam(data_dir, data_cfg.name, data_cfg.version, nonempty, description, str(spill_root), beam_runner,
                       list(beam_options))
  else:
    builder.write_local(out, data_cfg.version, nonempty, description)

  if trained is not None:
    (out / datasets.TOKENIZER).mkdir()
    for f in trained.iterdir():
      (out / datasets.TOKENIZER / f.name).write_bytes(f.read_bytes())
  (out / datasets.SOURCE_FILES).write_text(json.dumps(states, indent=1, sort_keys=True))
  sizes = {k: len(v) for k, v in splits.items()}
  with (out / "rejected.jsonl").open("w") as f:
    for rej in rejected:
      f.write(_rejection_line(rej) + "\n")
  verdicts.keep_copy(data_cfg, tally.verdicts, out)
  (out / "build_config.json").write_text(json.dumps(datasets.content_of(data_cfg), indent=1, sort_keys=True))
  # Written last: the presence of data_card.json marks a complete build (see ensure_built).
  card.write(out, name=f"{datasets.BUILDER_NAME}/{data_cfg.name}", version=data_cfg.version, sources=source_card,
             splits=splits, mixing=mix_report, mix_by=mixture.MixConfig.from_dict(data_cfg.get("mixture")).by,
             kept=entries, tokenizer_dir=tokenizer_dir, messages=lambda e: reader.record(e, images=False).messages,
             review=tally.report(), qualities=prompts.qualities(data_cfg), seq_len=data_cfg.get("seq_len"),
             prompt_checks=prompt_checks)
  reader.close()
  logging.info("built %s: splits %s; %d rejected or duplicate (see %s)", out, sizes, len(rejected),
               out / "rejected.jsonl")
  return datasets.BuiltDataset(name=f"{datasets.BUILDER_NAME}/{data_cfg.name}", version=data_cfg.version,
                               data_dir=data_dir, dataset_dir=str(out), tokenizer_dir=tokenizer_dir, splits=sizes)


def refuse_changed_config(data_cfg: ml_collections.ConfigDict, data_dir: str) -> None:
  """Raises ValueError if data_dir holds a build of data_cfg's name and version made from
  another config: overwriting it would change what that version means under every run,
  checkpoint and report that names it."""
  out = datasets.dataset_dir(data_cfg, data_dir)
  changed = datasets.changed_sources(data_cfg, data_dir, out)
  if changed:
    raise datasets.SourcesChanged(
        f"{out} holds a build of {data_cfg.name} {data_cfg.version} read from sources that have changed since "
        f"({'; '.join(changed)}); rebuilding would give this version another content. Bump the data config's "
        f"version (--config.version=...) to build the edited sources, or replace this version on purpose with "
        f"`python -m mgjax.data.build ... --overwrite` (runs trained on it then no longer match it)")
  diff = datasets.changed_keys(data_cfg, out)
  if diff:
    raise datasets.ConfigChanged(
        f"{out} holds a build of {data_cfg.name} {data_cfg.version} from a different data config "
        f"(differs in {diff}); refusing to overwrite it. Bump the data config's version "
        f"(--config.version=...), build into another --data_dir, or replace it on purpose with "
        f"`python -m mgjax.data.build ... --overwrite` (runs trained on it then no longer match it)")


def ensure_built(data_cfg: ml_collections.ConfigDict, data_dir: str) -> datasets.BuiltDataset:
  """The dataset for data_cfg under data_dir, building it first if it is missing.

  A build refuses to start while another of the same config into the same data_dir
  runs (mgjax.locks.LockHeld): on multi-host runs call it on process 0, then wait at a
  barrier before the others call `datasets.load_built`.
  """
  return datasets.load_built(data_cfg, data_dir) or build(data_cfg, data_dir)


_barriers = itertools.count()  # barrier names are unique within a run (a recipe builds three times)


def build_if_missing(data_cfg: ml_collections.ConfigDict, data_dir: str) -> None:
  """Builds the dataset for data_cfg in data_dir unless a finished build is there, saying so
  in one line: what mgjax.main and mgjax.recipe do before they start the trainer, which only
  opens built datasets. On a run of several processes, process 0 builds while the others
  wait (for as long as the build takes), and all of them stop if it fails.

  Raises:
    DatasetNotShared: a gs:// data_dir (the trainer reads local paths: mount the bucket).
  """
  import jax  # the run's processes; jax is running already wherever this is called

  from mgjax import sharding

  shared_build.check_local(data_dir)
  failed = None
  if jax.process_index() == 0:
    try:
      if datasets.load_built(data_cfg, data_dir) is None:
        print(f"building dataset {data_cfg.name} {data_cfg.version} into {data_dir}: not built yet", flush=True)
        build(data_cfg, data_dir)
    except Exception as e:  # any error: the other processes must hear of it, not wait forever
      failed = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    import numpy as np

    sharding.wait_for_all_processes(f"mgjax: dataset built {next(_barriers)}", timeout_s=7 * 24 * 3600)
    if not int(multihost_utils.broadcast_one_to_all(np.int32(failed is None))) and failed is None:
      raise RuntimeError(f"process 0 could not build the dataset {data_cfg.name} {data_cfg.version} in "
                         f"{data_dir}: see its log for why")
  if failed is not None:
    raise failed


def cli_message(e: OSError, data_dir: str) -> str:
  """One line for a build that could not write: what, where, and what to do."""
  where = e.filename or data_dir
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return (f"cannot write {where} ({e.strerror}): the build writes into --data_dir={data_dir}; pass one this "
            "user can write, or fix its permissions")
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return (f"no space left writing {where} ({e.strerror}): free space on the disk of --data_dir={data_dir} (a "
            "build needs about its sources' size again, for the spill and the dataset) or pass one on a larger disk, "
            "then rerun; the unfinished build has no data_card.json, so nothing uses it")
  return str(e)


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
  _OVERWRITE = flags.DEFINE_bool(
      "overwrite", False, "Replace a build of the same name/version made from another config "
      "(e.g. after new review verdicts), instead of refusing.")
  flags.mark_flags_as_required(["config", "data_dir"])

  def main(argv):
    del argv
    try:
      dataset = build(_CONFIG.value, _DATA_DIR.value, beam_runner=_BEAM_RUNNER.value,
                      beam_options=[f"--{o}" for o in _BEAM_OPTIONS.value], overwrite=_OVERWRITE.value)
    except OSError as e:
      sys.exit(f"error: {cli_message(e, _DATA_DIR.value)}")
    except (ValueError, RuntimeError, locks.LockHeld) as e:  # what the build says is wrong, and the fix
      sys.exit(f"error: {e}")
    print(f"dataset   {dataset.name}:{dataset.version} at {dataset.dataset_dir}")
    print(f"splits    {dataset.splits}")
    print(f"tokenizer {dataset.tokenizer_dir}")
    print(f"card      {dataset.data_card}\nrejected  {dataset.rejected}")

  from mgjax import runtime
  app.run(main, flags_parser=runtime.parse_flags)
