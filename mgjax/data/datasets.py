"""A built dataset: where it lives, what it holds, and its splits opened for reading.

Reading needs TFDS's array_record reader and nothing of the builder (filters, MinHash, plots):
the trainer opens datasets through here and loads mgjax.data.build only when a build must run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from mgjax.data import builder, verdicts

# The config fields that decide the built content; a stage config may embed the data
# config beside pipeline keys (sequence length, batch size) that must not force rebuilds.
CONTENT_KEYS = ("name", "version", "seed", "val_per_category", "sample", "sources", "tokenizer", "filters", "dedup",
                "mixture", "review")


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


def content_of(data_cfg: ml_collections.ConfigDict, built: epath.Path | None = None) -> dict[str, Any]:
  d = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  # The review file by its digest: editing it must rebuild. Absent when unset, so builds
  # from before `review` existed still match their config. `built`'s copy of the verdicts
  # stands in for a file this machine does not have.
  d["review"] = verdicts.fingerprint(data_cfg, built)
  return json.loads(json.dumps({k: d.get(k) for k in CONTENT_KEYS if k != "review" or d[k]}, sort_keys=True))


class ConfigChanged(ValueError):
  """A build of this name and version exists in data_dir, made from another data config."""


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
  card = json.loads((out / "data_card.json").read_text())
  # A tokenizer the build trained lives in the data_dir: found there wherever the data_dir
  # now is (copied to a bucket, mounted at another path), not where the build wrote it.
  tokenizer_dir = (str(epath.Path(data_dir) / "tokenizers" /
                       data_cfg.name) if data_cfg.tokenizer.get("train") else card["tokenizer"])
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
