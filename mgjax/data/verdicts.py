"""A person's verdicts on records, and what a build does with them.

The review page (`python -m mgjax.data.review`) exports `review.jsonl`, one verdict a line:

  {"id": "mgm_generation:gen_00012", "source": "mgm_generation", "verdict": "drop", "note": "prompt ignores colour"}

and the data config names it (`review=PATH`). The next build then:

  drop  rejects the record with kind `review` (before its images are read), so the card's
        read = kept + rejected + duplicates still holds;
  keep  keeps the record although an automatic rule would drop it: the quality filters in
        OVERRIDABLE and de-duplication. A structural problem (an empty turn, broken
        alternation, images that do not match the placeholders, a duplicate id) cannot be
        overruled, since such a record cannot be trained on: the card lists those verdicts
        as refused.

A verdict matches a record by id and source. The card's `review` section says how many
verdicts were applied, which ones were refused, and which ids no longer exist (a source
changed, or the file came from another dataset).

The build also keeps the turns of a seeded sample of each source's rejections of each
kind (`SAMPLE_PER_KIND`) in `rejected.jsonl`, so the page can show what was dropped
without the build holding every rejected record's text in memory.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
from typing import Any

from absl import logging
from etils import epath
import ml_collections

from mgjax.data import filters
from mgjax.data.records import Record, Rejection

VERDICTS = ("keep", "drop")
# The rejection kinds a keep verdict overrides: rules that judge quality or redundancy,
# where a person can know better. Everything else is structural.
OVERRIDABLE = frozenset({
    "turn_too_short", "turn_too_long", "conversation_too_long", "repetition", "language", "bad_generation",
    "exact_duplicate", "near_duplicate"
})
REVIEW_KIND = "review"
SAMPLE_PER_KIND = 200  # rejections per (source, kind) whose turns rejected.jsonl keeps
_KEYS = {"id", "source", "verdict", "note"}


@dataclasses.dataclass(frozen=True)
class Verdict:
  id: str
  source: str
  verdict: str  # one of VERDICTS
  note: str = ""


def path(data_cfg: ml_collections.ConfigDict) -> str | None:
  """The review file the data config names (`review`), or None."""
  return data_cfg.get("review") or None


def read(review_path: str) -> dict[str, Verdict]:
  """The verdicts of a review.jsonl, by id; a malformed line fails with its file and line."""
  p = epath.Path(review_path)
  if not p.exists():
    raise FileNotFoundError(f"data config review={review_path!r}: no such file; export it from the review page "
                            "(python -m mgjax.data.review) or unset `review`")
  out: dict[str, Verdict] = {}
  where: dict[str, int] = {}
  for n, line in enumerate(p.read_text().splitlines(), 1):
    if not line.strip():
      continue
    fix = 'each line must be {"id": str, "source": str, "verdict": "keep"|"drop", "note": str}'
    try:
      d = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{review_path}: line {n}: not JSON ({e.msg}); {fix}") from None
    if not isinstance(d, dict) or not {"id", "source", "verdict"} <= set(d) or set(d) - _KEYS:
      raise ValueError(f"{review_path}: line {n}: {line[:200]!r}; {fix}")
    if not isinstance(d["id"], str) or not d["id"] or not isinstance(d["source"], str):
      raise ValueError(f"{review_path}: line {n}: id and source must be strings (id non-empty); {fix}")
    if d["verdict"] not in VERDICTS:
      raise ValueError(f"{review_path}: line {n}: verdict {d['verdict']!r} is not one of {VERDICTS}")
    v = Verdict(d["id"], d["source"], d["verdict"], str(d.get("note") or ""))
    if v.id in out and out[v.id].verdict != v.verdict:
      raise ValueError(f"{review_path}: line {n}: id {v.id!r} is marked {v.verdict} here and "
                       f"{out[v.id].verdict} on line {where[v.id]}; keep one of the two lines")
    out[v.id], where[v.id] = v, n
  return out


def fingerprint(data_cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """What of the review file decides a build's content: its digest (not its path, so a moved
  file does not force a rebuild, and an edited one does). None without a review file."""
  review_path = path(data_cfg)
  if review_path is None:
    return None
  if not epath.Path(review_path).exists():
    read(review_path)  # raises, naming the fix
  return {"sha256": hashlib.sha256(epath.Path(review_path).read_bytes()).hexdigest()}


class Verdicts:
  """The verdicts as the per-record work applies them (in worker processes, so picklable)."""

  def __init__(self, verdicts: dict[str, Verdict] | None = None):
    self.by_id = verdicts or {}

  def get(self, record_id: str, source: str) -> Verdict | None:
    v = self.by_id.get(record_id)
    return v if v is not None and v.source == source else None

  def dropped(self, record: Record) -> Record | Rejection:
    """The record, or its `review` Rejection where a verdict drops it."""
    v = self.get(record.id, record.source)
    if v is None or v.verdict != "drop":
      return record
    file, where = record.origin.split("\t", 1)
    return Rejection(record.source, file, where, "dropped in review" + (f": {v.note}" if v.note else ""),
                     kind=REVIEW_KIND, id=record.id, messages=filters.normalize(record).messages)

  def checked(self, record: Record, result: Record | Rejection) -> tuple[Record | Rejection, str | None]:
    """The filters' `result` for `record`, or the record itself and the kind of the rule a
    keep verdict overrode."""
    if isinstance(result, Rejection) and result.kind in OVERRIDABLE:
      v = self.get(record.id, record.source)
      if v is not None and v.verdict == "keep":
        logging.info("kept in review despite %s: %s", result.kind, result)
        return record, result.kind
    return result, None


class Tally:
  """The build's main-process bookkeeping: which verdicts were applied, refused or not
  found, and which rejections keep their turns (a seeded sample per source and kind)."""

  def __init__(self, review_path: str | None, verdicts: Verdicts, seed: int, reader=None):
    self.path = review_path
    self.verdicts = verdicts
    self._rng = random.Random(f"{seed}/rejected-sample")
    self._reader = reader  # a spill.Reader, for the turns of sampled duplicates
    self._seen = collections.Counter()  # (source, kind) -> rejections so far
    self._sample: dict[tuple[str, str], list[Rejection]] = collections.defaultdict(list)
    self._found: set[str] = set()
    self.applied = collections.Counter()  # "dropped", "kept"
    self.overrode = collections.Counter()  # rule kind -> records kept against it
    self.refused: list[dict[str, str]] = []

  def keeps(self, entry) -> bool:
    """Whether a keep verdict keeps this (duplicate) entry."""
    v = self.verdicts.get(entry.id, entry.source)
    return v is not None and v.verdict == "keep"

  def kept(self, entry, overrode: str | None = None):
    """Notes a kept entry (`overrode`: the duplicate kind a verdict overrode here)."""
    overrode = overrode or entry.overrode
    v = self.verdicts.get(entry.id, entry.source)
    if v is not None:
      self._found.add(entry.id)
      if v.verdict == "keep":
        self.applied["kept"] += 1
        if overrode:
          self.overrode[overrode] += 1
    return entry

  def rejected(self, rejection: Rejection, entry=None) -> Rejection:
    """Notes a rejection; keeps its turns if the sample takes it (reading a duplicate's
    `entry` back from the spill only then), else drops them."""
    v = self.verdicts.get(rejection.id, rejection.source) if rejection.id is not None else None
    if v is not None:
      self._found.add(rejection.id)
      if v.verdict == "drop" and rejection.kind == REVIEW_KIND:
        self.applied["dropped"] += 1
      elif v.verdict == "keep":
        self.refused.append({"id": v.id, "source": v.source, "kind": rejection.kind, "reason": rejection.reason})
    key = (rejection.source, rejection.kind)
    self._seen[key] += 1
    sample, n = self._sample[key], self._seen[key]
    slot = n - 1 if n <= SAMPLE_PER_KIND else self._rng.randrange(n)  # reservoir sampling
    if slot < SAMPLE_PER_KIND and (rejection.messages is not None or entry is not None):
      if rejection.messages is None:
        rejection.messages = self._reader.record(entry, images=False).messages
      if slot < len(sample):
        sample[slot].messages = None
        sample[slot] = rejection
      else:
        sample.append(rejection)
    else:
      rejection.messages = None
    return rejection

  def report(self) -> dict[str, Any] | None:
    """The card's `review` section; None without a review file."""
    if self.path is None:
      return None
    by_id = self.verdicts.by_id
    missing = sorted(i for i in by_id if i not in self._found)
    return {
        "file": self.path,
        "verdicts": len(by_id),
        "keep": sum(v.verdict == "keep" for v in by_id.values()),
        "drop": sum(v.verdict == "drop" for v in by_id.values()),
        "applied": {
            "dropped": self.applied["dropped"],
            "kept": self.applied["kept"]
        },
        "kept_against": dict(sorted(self.overrode.items())),
        "refused": self.refused,
        "not_found": len(missing),
        "not_found_ids": missing[:50],
    }


def load(data_cfg: ml_collections.ConfigDict) -> Verdicts:
  """The data config's verdicts (none without `review`)."""
  review_path = path(data_cfg)
  return Verdicts(read(review_path) if review_path else None)
