"""Validation hold-out per category, then the training mix at target counts or weights.

Validation comes first, from the clean records, so it never contains a record that
mixing copies; within a category it is stratified by source (each source gives its
share of the category), so a score on it is not one source's score.

The mix config (the data config's `mixture`, optional):

  by:      "category" or "source": what the targets name
  counts:  {name: n}     take exactly n training records of that group
  weights: {name: w}     take total * w / sum(weights) records; `total` defaults to the
                         training records those groups have
  total:   int           (with weights)

A group with more records than its target is downsampled (a seeded sample without
replacement); one with fewer is upsampled (every record repeated, then a seeded sample
for the remainder; copies get ids `<id>#<k>`). Groups not named keep all their records.
What each group took is returned for the data card.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any, Mapping

from absl import logging

from mgjax.data.records import CATEGORIES, SPLITS, Record


def _largest_remainder(total: int, sizes: dict[str, int]) -> dict[str, int]:
  """Splits `total` over the groups in proportion to their sizes (sums to total exactly)."""
  whole = sum(sizes.values())
  if not whole:
    return {k: 0 for k in sizes}
  exact = {k: total * n / whole for k, n in sizes.items()}
  out = {k: int(v) for k, v in exact.items()}
  for k in sorted(sizes, key=lambda k: (-(exact[k] - out[k]), k))[:total - sum(out.values())]:
    out[k] += 1
  return out


def hold_out(records: list[Record], val_per_category, seed: int) -> tuple[list[Record], dict[str, list[Record]]]:
  """Returns (training pool, {"val_<category>": records}).

  `val_per_category` is one count for every category or a {category: count} mapping (a
  score measured on a few dozen answers moves by several points when a handful flip, so
  a capability may need a larger set). A category with fewer than 2 * its count gives
  half of them to validation so training still sees it. Deterministic in (records, seed).
  """
  rng = random.Random(seed)
  by_cat_source: dict[str, dict[str, list[Record]]] = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in records:
    by_cat_source[r.category][r.source].append(r)
  pool, val = [], {}
  for cat in CATEGORIES:
    by_source = by_cat_source.get(cat, {})
    n_cat = sum(len(v) for v in by_source.values())
    # A mapping that does not name a category holds none of it out.
    wanted = val_per_category.get(cat, 0) if hasattr(val_per_category, "keys") else val_per_category
    n_val = min(wanted, n_cat // 2)
    if n_val < wanted and n_cat:
      logging.warning("category %s has %d records: holding out %d for validation, not %d", cat, n_cat, n_val, wanted)
    shares = _largest_remainder(n_val, {s: len(v) for s, v in by_source.items()})
    val[f"val_{cat}"] = []
    for source in sorted(by_source):
      recs = sorted(by_source[source], key=lambda r: r.id)
      rng.shuffle(recs)
      val[f"val_{cat}"] += recs[:shares[source]]
      pool += recs[shares[source]:]
    # Sources interleaved: the splits are written in this order, and a head of one (a quick
    # look, a capped evaluation) should not be one source.
    rng.shuffle(val[f"val_{cat}"])
  return pool, val


@dataclasses.dataclass
class MixConfig:
  by: str = "category"
  counts: dict[str, int] | None = None
  weights: dict[str, float] | None = None
  total: int | None = None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "MixConfig":
    d = dict(d or {})
    unknown = set(d) - {"by", "counts", "weights", "total"}
    if unknown:
      raise ValueError(f"data config mixture: unknown keys {sorted(unknown)} (known: by, counts, weights, total)")
    c = cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()})
    if c.by not in ("category", "source"):
      raise ValueError(f"data config mixture.by={c.by!r}; choose 'category' or 'source'")
    if c.counts and c.weights:
      raise ValueError("data config mixture: give counts or weights, not both")
    if c.total is not None and not c.weights:
      raise ValueError("data config mixture.total only applies with weights")
    return c


def mix(pool: list[Record], config: MixConfig, seed: int) -> tuple[list[Record], dict[str, dict[str, Any]]]:
  """The shuffled training mix and, per group, {available, target, taken, factor}."""
  rng = random.Random(f"{seed}/mix")
  key = (lambda r: r.category) if config.by == "category" else (lambda r: r.source)
  groups: dict[str, list[Record]] = collections.defaultdict(list)
  for r in pool:
    groups[key(r)].append(r)
  named = dict(config.counts or {})
  if config.weights:
    total = config.total if config.total is not None else sum(len(groups[g]) for g in config.weights if g in groups)
    weight_sum = sum(config.weights.values())
    named = {g: round(total * w / weight_sum) for g, w in config.weights.items()}
  missing = [g for g, n in named.items() if n and not groups.get(g)]
  if missing:
    raise ValueError(f"mixture targets {missing} but no training records of that {config.by} survived; "
                     f"known: {sorted(groups)}. Fix mixture in the data config or the sources")
  # Copies are named <id>#<k>; a source may already hold a record of that name, so a copy's
  # name takes another #<k> until it is unique (a split never holds one id twice).
  used = {(r.source, r.id) for r in pool}

  def copy(r: Record, k: int) -> Record:
    rid = f"{r.id}#{k}"
    while (r.source, rid) in used:
      rid += f"#{k}"
    used.add((r.source, rid))
    return dataclasses.replace(r, id=rid)

  train, report = [], {}
  for g in sorted(groups):
    recs = sorted(groups[g], key=lambda r: r.id)
    target = named.get(g, len(recs))
    whole, rest = divmod(target, len(recs))
    taken = []
    for k in range(whole):
      taken += recs if k == 0 else [copy(r, k) for r in recs]
    extra = rng.sample(recs, rest)
    taken += extra if whole == 0 else [copy(r, whole) for r in extra]
    train += taken
    report[g] = {
        "available": len(recs),
        "target": target,
        "taken": len(taken),
        "factor": round(len(taken) / len(recs), 4)
    }
  rng.shuffle(train)
  return train, report


def split(records: list[Record], val_per_category, seed: int,
          mixture: MixConfig | None = None) -> tuple[dict[str, list[Record]], dict[str, dict[str, Any]]]:
  """All splits (see SPLITS) and the mixing report.

  Captions (the pretraining phase's data) are not mixed: they go to train_caption whole, in
  a seeded order, and the instruction mix is made of the rest.
  """
  pool, val = hold_out(records, val_per_category, seed)
  captions = sorted((r for r in pool if r.category == "caption"), key=lambda r: r.id)
  random.Random(f"{seed}/captions").shuffle(captions)
  train, report = mix([r for r in pool if r.category != "caption"], mixture or MixConfig(), seed)
  splits = {
      "train": train,
      "train_generation": [r for r in train if r.category == "generation"],
      "train_caption": captions,
      **val
  }
  return {s: splits[s] for s in SPLITS}, report
