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
import os
import random
import stat
from typing import Any

from absl import logging
from etils import epath
import ml_collections

from mgjax import atomic
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


COPY = "review.jsonl"  # the build's copy of the verdicts it applied, beside its data card
_FIX = 'each line must be {"id": str, "source": str, "verdict": "keep"|"drop", "note": str}'
# Byte-order marks of encodings a text editor may save a review file in.
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff",
                                                                                                     "UTF-16"))


def path(data_cfg: ml_collections.ConfigDict) -> str | None:
  """The review file the data config names (`review`), or None."""
  return data_cfg.get("review") or None


def read_bytes(review_path: str) -> bytes:
  """The review file's bytes. Only a regular file is read: a FIFO or a device would block
  the build forever, a directory has no bytes."""
  p = epath.Path(review_path)
  if not p.exists():
    raise FileNotFoundError(f"data config review={review_path!r}: no such file (a relative path is taken from "
                            f"the current folder, {os.getcwd()}); export it from the review page (python -m "
                            "mgjax.data.review) or unset `review`")
  # By its mode, before opening: epath takes anything but a directory for a file, and
  # opening a FIFO waits for a writer.
  mode = None if "://" in review_path else os.stat(review_path).st_mode
  if p.is_dir() or (mode is not None and not stat.S_ISREG(mode)):
    what = "a directory" if p.is_dir() else "not a regular file (a pipe, socket or device)"
    raise ValueError(f"data config review={review_path!r} is {what}; name the review.jsonl the review page "
                     "exported")
  return p.read_bytes()


def _text(data: bytes, review_path: str) -> str:
  """The file as text: UTF-8, with or without a byte-order mark."""
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    bom = next((name for mark, name in _BOMS if data.startswith(mark)), None)
    what = f"{bom} (it starts with a {bom} byte-order mark)" if bom else f"not UTF-8 (byte {e.start})"
    raise ValueError(f"{review_path}: the review file is {what}; save it as UTF-8, as the review page "
                     "exports it") from None


def parse(data: bytes, review_path: str) -> dict[tuple[str, str], Verdict]:
  """The verdicts of a review.jsonl's bytes, by (source, id); a malformed line fails with
  its file and line."""
  out: dict[tuple[str, str], Verdict] = {}
  where: dict[tuple[str, str], int] = {}
  # Lines end at "\n" only: the page's JSON.stringify leaves U+2028, U+2029 and U+0085 in
  # ids and notes as they are, and str.splitlines would cut a line there.
  for n, line in enumerate(_text(data, review_path).split("\n"), 1):
    if not line.strip():
      continue
    try:
      d = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{review_path}: line {n}: not JSON ({e.msg}); {_FIX}") from None
    except ValueError as e:  # e.g. an integer past Python's digit limit
      raise ValueError(f"{review_path}: line {n}: {e}; {_FIX}") from None
    if not isinstance(d, dict) or not {"id", "source", "verdict"} <= set(d) or set(d) - _KEYS:
      raise ValueError(f"{review_path}: line {n}: {line[:200]!r}; {_FIX}")
    if not isinstance(d["id"], str) or not d["id"] or not isinstance(d["source"], str):
      raise ValueError(f"{review_path}: line {n}: id and source must be strings (id non-empty); {_FIX}")
    if not isinstance(d["verdict"], str) or d["verdict"] not in VERDICTS:
      raise ValueError(f"{review_path}: line {n}: verdict {d['verdict']!r} is not one of {VERDICTS}")
    if d.get("note") is not None and not isinstance(d["note"], str):
      raise ValueError(f"{review_path}: line {n}: note must be a string; {_FIX}")
    v = Verdict(d["id"], d["source"], d["verdict"], d.get("note") or "")
    key = (v.source, v.id)
    if key in out and out[key].verdict != v.verdict:
      raise ValueError(f"{review_path}: line {n}: id {v.id!r} of source {v.source!r} is marked {v.verdict} here "
                       f"and {out[key].verdict} on line {where[key]}; keep one of the two lines")
    out[key], where[key] = v, n
  return out


def read(review_path: str) -> dict[tuple[str, str], Verdict]:
  """The verdicts of a review.jsonl, by (source, id): records of two sources may share an
  id, and a verdict on one says nothing of the other."""
  return parse(read_bytes(review_path), review_path)


def digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def fingerprint(data_cfg: ml_collections.ConfigDict, built: epath.Path | None = None) -> dict[str, Any] | None:
  """What of the review file decides a build's content: its digest (not its path, so a moved
  file does not force a rebuild, and an edited one does). None without a review file.

  `built`, a build's folder: where the file is not on this machine (a pod worker gets the
  recipe, not the files it names), the copy of the verdicts that build applied stands in
  for it, so the build is still recognised; an edited file that is here still differs."""
  review_path = path(data_cfg)
  if review_path is None:
    return None
  if built is not None and not epath.Path(review_path).exists() and (epath.Path(built) / COPY).is_file():
    copy = epath.Path(built) / COPY
    logging.warning("review file %s is not on this machine; taking the copy of the verdicts %s applied (%s)",
                    review_path, built, copy)
    return {"sha256": digest(copy.read_bytes())}
  return {"sha256": digest(read_bytes(review_path))}


class Verdicts:
  """The verdicts as the per-record work applies them (in worker processes, so picklable)."""

  def __init__(self, verdicts: dict[tuple[str, str], Verdict] | None = None, data: bytes | None = None):
    self.by_key = verdicts or {}
    self.data = data  # the file's bytes as read, for the build's copy

  def get(self, record_id: str, source: str) -> Verdict | None:
    return self.by_key.get((source, record_id))

  def dropped(self, record: Record) -> Record | Rejection:
    """The record, or its `review` Rejection where a verdict drops it (holding its messages
    as given: the build passes records normalised as the filters see them)."""
    v = self.get(record.id, record.source)
    if v is None or v.verdict != "drop":
      return record
    file, where = record.origin.split("\t", 1)
    return Rejection(record.source, file, where, "dropped in review" + (f": {v.note}" if v.note else ""),
                     kind=REVIEW_KIND, id=record.id, messages=record.messages)

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
    self._found: set[tuple[str, str]] = set()
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
      self._found.add((v.source, v.id))
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
      self._found.add((v.source, v.id))
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
    by_key = self.verdicts.by_key
    missing = sorted(key for key in by_key if key not in self._found)
    return {
        "file": self.path,
        "copy": COPY,
        "verdicts": len(by_key),
        "keep": sum(v.verdict == "keep" for v in by_key.values()),
        "drop": sum(v.verdict == "drop" for v in by_key.values()),
        "applied": {
            "dropped": self.applied["dropped"],
            "kept": self.applied["kept"]
        },
        "kept_against": dict(sorted(self.overrode.items())),
        "refused": self.refused,
        "not_found": len(missing),
        "not_found_ids": [i for _, i in missing[:50]],
    }


def load(data_cfg: ml_collections.ConfigDict) -> Verdicts:
  """The data config's verdicts (none without `review`), read once: what the build applies
  is what it copies into the dataset."""
  review_path = path(data_cfg)
  if not review_path:
    return Verdicts()
  data = read_bytes(review_path)
  return Verdicts(parse(data, review_path), data)


def keep_copy(data_cfg: ml_collections.ConfigDict, applied: Verdicts, out: epath.Path) -> None:
  """Writes the verdicts a build applied into its folder (COPY), so a machine without the
  review file (a pod worker) still recognises the build; refuses a review file that changed
  while the build ran, whose digest would name verdicts the build did not apply."""
  review_path = path(data_cfg)
  if not review_path:
    return
  if read_bytes(review_path) != applied.data:
    raise ValueError(f"review file {review_path} changed while the build ran; build again (with --overwrite) to "
                     "apply what it holds now")
  atomic.write_bytes(epath.Path(out) / COPY, applied.data)
