"""Builds a training dataset from the sources a data config names.

  python -m mgjax.data.build --config=configs/data/sample.py --data_dir=DIR

read sources (one reader per format) -> check -> hold out val per category -> mix train
-> tokenizer (sample: trained on the train text) -> TFDS array_record dataset, with
`rejected.jsonl` (every dropped record and why) and `data_card.json` beside it.

The trainer calls `ensure_built(cfg.data, data_dir)` and opens splits with `open_split`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import shutil
from typing import Any, Sequence

from absl import app, flags, logging
from etils import epath
import ml_collections
import tensorflow_datasets as tfds

from mgjax.data import builder, sample, sources, tokenizer
from mgjax.data.records import CATEGORIES, Record, Rejection

_SOURCE_KEYS = {"name", "format", "path", "image_root", "category", "options"}
# The config fields that decide the built content; a stage config may embed the data
# config beside pipeline keys (sequence length, batch size) that must not force rebuilds.
_CONTENT_KEYS = ("name", "version", "seed", "val_per_category", "sample", "sources", "tokenizer")
_LOGGED_REJECTIONS = 20  # per source; the rest are counted and in rejected.jsonl


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
  return json.loads(json.dumps({k: d.get(k) for k in _CONTENT_KEYS}, sort_keys=True))


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


def _read_all(data_cfg, root: epath.Path) -> tuple[list[Record], list[Rejection], dict[str, Any]]:
  """Reads every source; returns kept records, rejections and per-source counts."""
  kept, rejected, card = [], [], {}
  seen_ids: set[str] = set()
  for spec in data_cfg.sources:
    spec = dict(spec)
    unknown = set(spec) - _SOURCE_KEYS
    if unknown or not {"name", "format", "path"} <= set(spec):
      raise ValueError(f"data config source {spec}: needs name, format, path; unknown keys {sorted(unknown)} "
                       f"(allowed: {sorted(_SOURCE_KEYS)})")
    name, path = spec["name"], _resolve(spec["path"], root)
    counts = {"format": spec["format"], "path": path, "read": 0, "kept": 0,
              "rejected": collections.Counter()}
    if not epath.Path(path).exists():
      raise FileNotFoundError(f"source {name!r}: {path} does not exist; fix 'path' in the data config "
                              f"(relative paths resolve under {root})")
    for item in sources.read(path, format=spec["format"], source=name,
                             image_root=_resolve(spec.get("image_root"), root),
                             category=spec.get("category"), **dict(spec.get("options") or {})):
      counts["read"] += 1
      if isinstance(item, Record) and item.id in seen_ids:
        item = Rejection(name, path, f"id={item.id}", "duplicate id; ids must be unique across sources",
                         kind="duplicate_id")
      if isinstance(item, Rejection):
        if counts["rejected"].total() < _LOGGED_REJECTIONS:
          logging.warning("rejected: %s", item)
        counts["rejected"][item.kind] += 1
        rejected.append(item)
        continue
      seen_ids.add(item.id)
      counts["kept"] += 1
      kept.append(item)
    n_rej = counts["rejected"].total()
    logging.info("source %s: read %d, kept %d, rejected %d %s", name, counts["read"], counts["kept"],
                 n_rej, dict(counts["rejected"]))
    counts["rejected"] = dict(sorted(counts["rejected"].items()))
    card[name] = counts
  return kept, rejected, card


def split_records(records: list[Record], val_per_category, seed: int) -> dict[str, list[Record]]:
  """Holds out validation records per category, then mixes the rest into train.

  `val_per_category` is one count for every category or a {category: count} mapping
  (a score measured on a few dozen answers moves by several points when a handful of
  answers flip, so a capability may need a larger set). Deterministic in (records,
  seed). A category with fewer than 2 * its count gives half of them to validation so
  training still sees it.
  """
  rng = random.Random(seed)
  by_cat = collections.defaultdict(list)
  for r in records:
    by_cat[r.category].append(r)
  splits: dict[str, list[Record]] = {s: [] for s in builder.SPLITS}
  train = []
  for cat in CATEGORIES:
    recs = sorted(by_cat.get(cat, []), key=lambda r: r.id)
    rng.shuffle(recs)
    wanted = val_per_category[cat] if hasattr(val_per_category, "keys") else val_per_category
    n_val = min(wanted, len(recs) // 2)
    if n_val < wanted and recs:
      logging.warning("category %s has %d records: holding out %d for validation, not %d",
                      cat, len(recs), n_val, wanted)
    splits[f"val_{cat}"] = recs[:n_val]
    train += recs[n_val:]
  rng.shuffle(train)
  splits["train"] = train
  splits["train_generation"] = [r for r in train if r.category == "generation"]
  return splits


def build(data_cfg: ml_collections.ConfigDict, data_dir: str) -> BuiltDataset:
  """Builds (or rebuilds, replacing any previous build of this name/version) the dataset."""
  data_dir = str(data_dir)
  out = dataset_dir(data_cfg, data_dir)
  if data_cfg.get("sample") and data_cfg.sample.get("generate"):
    s = data_cfg.sample
    sample.write_sample_sources(str(_sources_root(data_cfg, data_dir)), seed=data_cfg.seed,
                                n_understanding=s.n_understanding, n_generation=s.n_generation,
                                n_text=s.n_text)
  records, rejected, source_card = _read_all(data_cfg, _sources_root(data_cfg, data_dir))
  if not records:
    raise ValueError(f"no record survived reading; see the warnings above for why (sources: "
                     f"{[s['name'] for s in data_cfg.sources]})")
  splits = split_records(records, data_cfg.val_per_category, data_cfg.seed)

  tok_cfg = data_cfg.tokenizer
  if tok_cfg.get("train"):
    tokenizer_dir = str(epath.Path(data_dir) / "tokenizers" / data_cfg.name)
    # Train text only: validation must not shape the vocabulary it is scored with.
    texts = (m["content"] for r in splits["train"] for m in r.messages)
    tokenizer.train_sample_tokenizer(texts, tokenizer_dir, vocab_size=tok_cfg.vocab_size)
  else:
    tokenizer_dir = tok_cfg.get("path") or None

  if out.exists():
    shutil.rmtree(out)
  # TFDS cannot write an empty split; the trainer learns of one through open_split.
  nonempty = {k: v for k, v in splits.items() if v}
  b = builder.make_builder(data_cfg.name, data_cfg.version, data_dir, splits=nonempty,
                           description=f"mgjax instruction mix from data config {data_cfg.name!r}")
  b.download_and_prepare()

  sizes = {k: len(v) for k, v in splits.items()}
  with (out / "rejected.jsonl").open("w") as f:
    for rej in rejected:
      f.write(json.dumps(rej.to_json(), ensure_ascii=False) + "\n")
  (out / "build_config.json").write_text(json.dumps(_content(data_cfg), indent=1, sort_keys=True))
  card = {"name": f"{builder.BUILDER_NAME}/{data_cfg.name}", "version": data_cfg.version,
          "sources": source_card, "splits": sizes,
          "categories": dict(collections.Counter(r.category for r in records)),
          "tokenizer": tokenizer_dir}
  # Written last: its presence marks a complete build (see ensure_built).
  (out / "data_card.json").write_text(json.dumps(card, indent=1))
  logging.info("built %s: splits %s; %d rejected (see %s)", out, sizes, len(rejected), out / "rejected.jsonl")
  return BuiltDataset(name=f"{builder.BUILDER_NAME}/{data_cfg.name}", version=data_cfg.version,
                      data_dir=data_dir, dataset_dir=str(out), tokenizer_dir=tokenizer_dir, splits=sizes)


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
    raise ValueError(f"{out} was built from a different data config (differs in {diff}); bump the data "
                     f"config's version, or delete {out} to rebuild it")
  card = json.loads((out / "data_card.json").read_text())
  return BuiltDataset(name=card["name"], version=card["version"], data_dir=str(data_dir),
                      dataset_dir=str(out), tokenizer_dir=card["tokenizer"], splits=card["splits"])


def ensure_built(data_cfg: ml_collections.ConfigDict, data_dir: str) -> BuiltDataset:
  """The dataset for data_cfg under data_dir, building it first if it is missing.

  Not safe to call from several processes at once: on multi-host runs call it on
  process 0, then wait at a barrier before the others call `load_built`.
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
  flags.mark_flags_as_required(["config", "data_dir"])

  def main(argv):
    del argv
    built = build(_CONFIG.value, _DATA_DIR.value)
    print(f"dataset   {built.name}:{built.version} at {built.dataset_dir}")
    print(f"splits    {built.splits}")
    print(f"tokenizer {built.tokenizer_dir}")
    print(f"card      {built.data_card}\nrejected  {built.rejected}")

  app.run(main)
