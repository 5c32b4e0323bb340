"""The near-duplicate stage against an exact all-pairs baseline, side by side in one run.

  python benchmarks/data_dedup.py --records=5000 [--threshold=0.8]

Both keep a record unless it is a near-duplicate (Jaccard >= threshold of word 5-gram shingles) of a
record kept before it. The baseline computes the exact Jaccard of every pair (a scipy sparse product
of shingle-incidence rows); the stage (mgjax.data.dedup) uses MinHash LSH. Times include building
signatures or shingle sets. Corpus: benchmarks/data_corpus.py (5% exact, 10% edited copies).

Prints JSON: seconds and flagged records of each method, the speed ratio, and the stage's recall and
precision against the baseline's flagged records (target: recall >= 0.9, the bar
tests/test_data_quality.py holds the stage to). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

import data_corpus  # noqa: E402
import numpy as np  # noqa: E402
from scipy import sparse  # noqa: E402

from mgjax.data import dedup  # noqa: E402
from mgjax.data.records import Record  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--records", type=int, default=5000)
  parser.add_argument("--threshold", type=float, default=0.8)
  args = parser.parse_args()
  recs = [
      Record(id=r["id"], source="s", category="text", messages=r["messages"])
      for r in data_corpus.records(args.records, seed=1)
  ]

  # The exact all-pairs Jaccard as one sparse product (a Python double loop over 12M pairs
  # takes many minutes here; this is the fast way to be exhaustive).
  start = time.perf_counter()
  sets = [dedup.shingles(dedup.words(r), 5) for r in recs]
  vocab: dict[bytes, int] = {}
  rows, cols = [], []
  for i, s in enumerate(sets):
    for sh in s:
      rows.append(i)
      cols.append(vocab.setdefault(sh, len(vocab)))
  x = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(sets), len(vocab)))
  inter = (x @ x.T).tocoo()
  sizes = np.asarray(x.sum(axis=1)).ravel()
  similar = [[] for _ in sets]  # earlier records at or above the threshold
  for i, j, n in zip(inter.row, inter.col, inter.data):
    if j < i and n / (sizes[i] + sizes[j] - n) >= args.threshold:
      similar[i].append(j)
  kept, naive = set(), set()
  for i in range(len(sets)):
    if any(j in kept for j in similar[i]):
      naive.add(i)
    else:
      kept.add(i)
  naive_s = time.perf_counter() - start

  start = time.perf_counter()
  cfg = dedup.DedupConfig(threshold=args.threshold)
  index = dedup.Index(cfg)
  lsh = {i for i, r in enumerate(recs) if index.add(r.id, dedup.signature(r, cfg)) is not None}
  lsh_s = time.perf_counter() - start

  print(
      json.dumps(
          {
              "records": args.records,
              "threshold": args.threshold,
              "naive_all_pairs": {
                  "seconds": round(naive_s, 2),
                  "flagged": len(naive)
              },
              "minhash_lsh": {
                  "seconds": round(lsh_s, 2),
                  "flagged": len(lsh)
              },
              "speedup": round(naive_s / lsh_s, 1),
              "recall": round(len(lsh & naive) / max(len(naive), 1), 4),
              "precision": round(len(lsh & naive) / max(len(lsh), 1), 4)
          }, indent=1))


if __name__ == "__main__":
  main()
