"""A built dataset: where it lives, what it holds, and its splits opened for reading.

Reading needs TFDS's array_record reader and nothing of the builder (filters, MinHash, plots):
the trainer opens datasets through here and loads mgjax.data.build only when a build must run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from mgjax.data import records, verdicts

# The TFDS builder name, the first folder of every build under a data_dir.
BUILDER_NAME = "mgjax_instructions"

# The config fields that decide the built content; a stage config may embed the data
# config beside pipeline keys (sequence length, batch size) that must not force rebuilds.
CONTENT_KEYS = ("name", "version", "seed", "val_per_category", "sample", "sources", "tokenizer", "filters", "dedup",
                "mixture", "review")
# Beside a build: each source file's size, mtime and sha256 as the build read it.
SOURCE_FILES = "source_files.json"
# A tokenizer the build trains lives in the version's folder: one version, one tokenizer.
TOKENIZER = "tokenizer"


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
  """Where a built dataset lives and what it holds."""
  name: str  # "mgjax_instructions/<config name>", as tfds.data_source names it
  version: str
  data_dir: str  # the TFDS data_dir (DIR)
  dataset_dir: str  # DIR/mgjax_instructions/<config name>/<version>
  tokenizer_dir: str | None  # load with mgjax.data.chat_tokenizers.load
  splits: dict[str, int]  # every split in records.SPLITS, empty ones with 0

  @property
  def data_card(self) -> str:
    return f"{self.dataset_dir}/data_card.json"

  @property
  def rejected(self) -> str:
    return f"{self.dataset_dir}/rejected.jsonl"


def dataset_dir(data_cfg: ml_collections.ConfigDict, data_dir: str) -> epath.Path:
  return epath.Path(data_dir) / BUILDER_NAME / data_cfg.name / data_cfg.version


def content_of(data_cfg: ml_collections.ConfigDict, built: epath.Path | None = None) -> dict[str, Any]:
  d = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  # The review file by its digest: editing it must rebuild. Absent when unset, so builds
  # from before `review` existed still match their config. `built`'s copy of the verdicts
  # stands in for a file this machine does not have.
  d["review"] = verdicts.fingerprint(data_cfg, built)
  # A source's min_kept_share decides whether a build stops, not what it holds.
  if d.get("sources"):
    d["sources"] = [{k: v for k, v in dict(s).items() if k != "min_kept_share"} for s in d["sources"]]
  return json.loads(json.dumps({k: d.get(k) for k in CONTENT_KEYS if k != "review" or d[k]}, sort_keys=True))


class ConfigChanged(ValueError):
  """A build of this name and version exists in data_dir, made from another data config."""


class SourcesChanged(ConfigChanged):
  """A source file differs from what a build of this name and version read."""


def sources_root(data_cfg: ml_collections.ConfigDict, data_dir: str) -> epath.Path:
  """Where relative source paths resolve: the generated sample's folder in the data_dir, else
  the config's sources_root."""
  if data_cfg.get("sample") and data_cfg.sample.get("generate"):
    return epath.Path(data_dir) / data_cfg.sample.dir
  return epath.Path(data_cfg.get("sources_root") or ".")


def resolve(path: str | None, root: epath.Path) -> str | None:
  if not path:
    return None
  if "://" in path or path.startswith("/"):
    return path
  return str(root / path)


def file_state(path: str) -> dict[str, Any]:
  """A file's size, mtime (ns) and sha256, read in 1 MB pieces (sources may be many GB)."""
  if "://" in path:
    st = epath.Path(path).stat()
    size, mtime_ns = st.length, int(st.mtime * 1e9)
  else:
    st = os.stat(path)
    size, mtime_ns = st.st_size, st.st_mtime_ns
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return {"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": h.hexdigest()}


def describe_change(before: dict[str, Any], after: dict[str, Any]) -> str:
  parts = [f"{k} {before[k]} -> {after[k]}" for k in ("size", "sha256") if before[k] != after[k]]
  return ", ".join(parts) or f"mtime_ns {before['mtime_ns']} -> {after['mtime_ns']}"


def changed_sources(data_cfg: ml_collections.ConfigDict, data_dir: str, out: epath.Path) -> list[str]:
  """Each source file that differs from what `out`'s build read, as "source NAME (PATH): what
  changed"; none when `out` has no record (no build there, or one stopped before it wrote it).

  A file that is not here is not compared: a pod worker sees the built dataset, not its
  sources. A file whose size and mtime match is taken as unchanged without reading it; one
  that was only touched or copied (same content) still matches. Generated sample sources are
  a function of the config (seed and sizes), which build_config.json already pins; a build of
  another sample version in the same data_dir rewrites them, so they are not compared here.
  """
  record_file = out / SOURCE_FILES
  if not record_file.exists() or (data_cfg.get("sample") and data_cfg.sample.get("generate")):
    return []
  recorded = json.loads(record_file.read_text())
  root = sources_root(data_cfg, data_dir)
  changed = []
  for spec in data_cfg.sources:
    before = recorded.get(spec["name"])
    path = resolve(spec["path"], root)
    if before is None or not epath.Path(path).is_file():
      continue
    if "://" not in path:
      st = os.stat(path)
      if (st.st_size, st.st_mtime_ns) == (before["size"], before["mtime_ns"]):
        continue
    now = file_state(path)
    if now["sha256"] != before["sha256"]:
      changed.append(f"source {spec['name']!r} ({path}): {describe_change(before, now)}")
  return changed


def changed_keys(data_cfg: ml_collections.ConfigDict, out: epath.Path) -> list[str]:
  """The content keys in which `out`'s build differs from data_cfg (none: no build there)."""
  stored_file = out / "build_config.json"
  if not stored_file.exists():
    return []
  stored, wanted = json.loads(stored_file.read_text()), content_of(data_cfg, out)
  return sorted(k for k in CONTENT_KEYS if stored.get(k) != wanted.get(k))


def load_built(data_cfg: ml_collections.ConfigDict, data_dir: str) -> BuiltDataset | None:
  """The finished build for this config, None if there is none.

  Raises if a build of the same name/version was made from a different config: reusing
  it would silently train on other data than the config says.
  """
  out = dataset_dir(data_cfg, data_dir)
  if not (out / "data_card.json").exists():
    return None
  stored = json.loads((out / "build_config.json").read_text())
  wanted = content_of(data_cfg, out)
  if stored != wanted:
    diff = sorted(k for k in CONTENT_KEYS if stored.get(k) != wanted.get(k))
    raise ConfigChanged(f"{out} was built from a different data config (differs in {diff}); bump the data "
                        f"config's version, or delete {out} to rebuild it")
  changed = changed_sources(data_cfg, data_dir, out)
  if changed:
    raise SourcesChanged(f"{out} holds {data_cfg.name} {data_cfg.version} as read from sources that have changed "
                         f"since ({'; '.join(changed)}); training on it would not be the content its sources now "
                         "say, and rebuilding would give this version another content. Bump the data config's "
                         "version (in a training config, --config.data.recipe.version=...) to build the edited "
                         "sources, or restore the sources to what was built")
  try:
    card = json.loads((out / "data_card.json").read_text())
    if not isinstance(card, dict) or not {"name", "version", "splits"} <= set(card):
      raise ValueError("not a data card (no name, version or splits)")
  except (ValueError, UnicodeDecodeError) as e:  # a card cut short (a kill or a full disk), or edited by hand
    raise ValueError(f"{out / 'data_card.json'} is damaged ({type(e).__name__}: {e}). Rebuild the version: "
                     f"`python -m mgjax.data.build --config=<its data config> --data_dir={data_dir} --overwrite` "
                     "(the same config and sources build the same content)") from None
  # A trained tokenizer is in the version's folder, found there wherever the data_dir now is (copied
  # to a bucket, mounted at another path), not where the build wrote it (the card's path).
  tokenizer_dir = str(out / TOKENIZER) if data_cfg.tokenizer.get("train") else card["tokenizer"]
  return BuiltDataset(name=card["name"], version=card["version"], data_dir=str(data_dir), dataset_dir=str(out),
                      tokenizer_dir=tokenizer_dir, splits=card["splits"])


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
  if split not in records.SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {records.SPLITS}")
  out = epath.Path(dataset.dataset_dir)
  if not (out / "dataset_info.json").exists():
    raise FileNotFoundError(f"no dataset at {out}; build it with `python -m mgjax.data.build "
                            f"--config=<data config> --data_dir={dataset.data_dir}` or call ensure_built")
  b = tfds.builder_from_directory(str(out))
  if split not in b.info.splits:
    return ()
  return b.as_data_source(split=split)
