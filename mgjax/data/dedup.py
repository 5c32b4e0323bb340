"""Exact and near-duplicate removal, within and across sources.

The first occurrence wins, in config order of sources and file order within one, so a
build is deterministic and a source listed first is the one kept.

Exact: a hash of the conversation's text (lowercased, words only) and its images' bytes.
Near: MinHash LSH (datasketch) over word n-gram shingles, verified by the estimated
Jaccard similarity. Images count: every shingle is prefixed by the digest of the record's
images, so two records are only ever near-duplicates when they show the same images (the
same question about different pictures is not a duplicate; it is how VQA data looks).

`signature` is a pure function of one record (it runs in worker processes); `Index`
holds the seen signatures (about 4 * num_perm bytes per kept record) in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Mapping

import numpy as np

from mgjax.data.records import Record

_WORD = re.compile(r"\w+", re.UNICODE)
_SCHEME = "affine32"  # datasketch 2's default; named since hash values cross processes


@dataclasses.dataclass(frozen=True)
class DedupConfig:
  """The data config's `dedup` dict sets any of these."""
  exact: bool = True
  near: bool = True
  threshold: float = 0.8  # Jaccard similarity of shingle sets at which records are near-duplicates
  num_perm: int = 128
  shingle_words: int = 5
  seed: int = 1

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "DedupConfig":
    d = dict(d or {})
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"data config dedup: unknown keys {sorted(unknown)} "
                       f"(known: {[f.name for f in dataclasses.fields(cls)]})")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Signature:
  exact: bytes
  minhash: np.ndarray | None  # uint32 [num_perm]


def words(record: Record) -> list[str]:
  """The conversation as lowercased words, roles included (the same text asked and
  answered the other way round is a different conversation)."""
  out = []
  for m in record.messages:
    out.append(f"<{m['role']}>")
    out += _WORD.findall(m["content"].lower())
  return out


def image_digest(record: Record) -> bytes:
  h = hashlib.blake2b(digest_size=8)
  for img in record.images:
    h.update(hashlib.blake2b(img, digest_size=16).digest())
  return h.digest()


def shingles(tokens: list[str], n: int, prefix: bytes = b"") -> set[bytes]:
  """Word n-grams (the whole text when shorter), each prefixed by `prefix`."""
  if len(tokens) <= n:
    return {prefix + " ".join(tokens).encode("utf-8")}
  return {prefix + " ".join(tokens[i:i + n]).encode("utf-8") for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
  return len(a & b) / len(a | b) if a or b else 1.0


_PERMUTATIONS: dict[tuple[int, int], Any] = {}


def _permutations(num_perm: int, seed: int):
  # datasketch draws num_perm random permutations in each MinHash it creates; drawing
  # them once per process makes a signature ~10x cheaper.
  import datasketch  # ~2 s to import: loaded where MinHash runs, not by every reader of this module

  key = (num_perm, seed)
  if key not in _PERMUTATIONS:
    _PERMUTATIONS[key] = datasketch.MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
  return _PERMUTATIONS[key]


def signature(record: Record, config: DedupConfig) -> Signature:
  tokens = words(record)
  images = image_digest(record)
  exact = hashlib.blake2b(images + "\x00".join(tokens).encode("utf-8"), digest_size=16).digest()
  if not config.near:
    return Signature(exact, None)
  import datasketch

  m = datasketch.MinHash(num_perm=config.num_perm, seed=config.seed, scheme=_SCHEME,
                         permutations=_permutations(config.num_perm, config.seed))
  m.update_batch(list(shingles(tokens, config.shingle_words, images)))
  return Signature(exact, m.hashvalues.astype(np.uint32))


class Index:
  """The signatures of the records kept so far; `add` says whether a new one duplicates one."""

  def __init__(self, config: DedupConfig):
    import datasketch

    self.config = config
    self._exact: dict[bytes, str] = {}
    # The bands are tuned a little below the threshold: LSH misses some pairs just above
    # its tuning point, and the extra candidates it lets through cost one comparison each.
    self._lsh = datasketch.MinHashLSH(threshold=max(0.5, config.threshold - 0.1), num_perm=config.num_perm)
    self._minhashes: dict[str, np.ndarray] = {}

  def add(self, record_id: str, sig: Signature) -> tuple[str, str, float] | None:
    """Registers the record, or returns (kind, id of the record it duplicates, similarity)."""
    if self.config.exact:
      first = self._exact.get(sig.exact)
      if first is not None:
        return "exact_duplicate", first, 1.0
    if sig.minhash is not None:
      import datasketch

      lean = datasketch.LeanMinHash(seed=self.config.seed, hashvalues=sig.minhash, scheme=_SCHEME)
      best = None
      for other in self._lsh.query(lean):
        # LSH bands let through pairs somewhat below the threshold; the estimate decides.
        sim = float(np.mean(self._minhashes[other] == sig.minhash))
        if sim >= self.config.threshold and (best is None or sim > best[1]):
          best = (other, sim)
      if best is not None:
        return "near_duplicate", best[0], best[1]
      self._lsh.insert(record_id, lean, check_duplication=False)
      self._minhashes[record_id] = sig.minhash
    if self.config.exact:
      self._exact[sig.exact] = record_id
    return None
