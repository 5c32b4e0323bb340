"""Build throughput (records/s per core) and peak memory on a synthetic corpus.

  python benchmarks/data_build.py --records=200000 --workers=2

Writes a messages_jsonl corpus (benchmarks/data_corpus.py: 5% exact and 10% near
duplicates planted), then runs the whole build (read, normalise, filter incl. language
detection, exact + MinHash-LSH dedup, hold-out, mix, TFDS array_record write, data card)
and reports wall time, records/s, records/s per core used and peak RSS (this process and
its worker processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

import data_corpus  # noqa: E402
import ml_collections  # noqa: E402

from mgjax.data import build  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--records", type=int, default=200_000)
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.jsonl")
    data_corpus.write(corpus, args.records)
    cfg = ml_collections.ConfigDict(dict(
        name="bench", version="1.0.0", seed=0, sources_root=tmp, num_workers=args.workers,
        val_per_category=dict(text=500, generation=500, understanding=0),
        sources=[dict(name="synthetic", format="messages_jsonl", path="corpus.jsonl")],
        tokenizer=dict(train=False, vocab_size=0, path="")))
    start = time.perf_counter()
    dataset = build.build(cfg, os.path.join(tmp, "data"))
    wall = time.perf_counter() - start
    card = json.load(open(dataset.data_card))
  self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  src = card["sources"]["synthetic"]
  print(json.dumps({
      "records": args.records, "workers": args.workers, "wall_s": round(wall, 1),
      "records_per_s": round(args.records / wall), "records_per_s_per_core": round(args.records / wall / args.workers),
      "peak_rss_main_mb": round(self_kb / 1024), "peak_rss_largest_worker_mb": round(child_kb / 1024),
      "kept": src["kept"], "rejected": src["rejected"], "duplicates": src["duplicate_kinds"],
      "splits": card["splits"]}, indent=1))


if __name__ == "__main__":
  main()
