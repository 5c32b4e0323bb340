"""Build throughput (records/s per core) and peak memory of a whole data build, without and with images.

  python benchmarks/data_build.py --records=200000 --workers=2

Writes a messages_jsonl corpus (benchmarks/data_corpus.py: 5% exact and 10% near duplicates
planted) and runs the whole build on it (read, read and decode-check images, normalise, filter incl.
language detection, exact + MinHash-LSH dedup, hold-out, mix, array_record write, data card), twice,
each in a fresh process so that peak RSS is that variant's own:

  text    the corpus as it is;
  images  the same corpus where every --image_every-th record (4; not a generation request) has its
          own 96x96 noise PNG (about 28 KB; noise does not compress).

Prints one JSON line per variant as it finishes, then both together: wall time, records/s, records/s
per core, peak RSS of the main process and of the largest worker, kept, rejected and duplicate counts,
and the split sizes. Memory is bounded when the main process's peak barely moves while the images add
GBs: kept records wait on disk, not in memory (target: under 5%). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]

import data_corpus  # noqa: E402
import ml_collections  # noqa: E402

from mgjax.data import build  # noqa: E402


def run_one(records: int, workers: int, image_every: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.jsonl")
    image_bytes = data_corpus.write(corpus, records, image_every=image_every)
    cfg = ml_collections.ConfigDict(
        dict(name="bench", version="1.0.0", seed=0, sources_root=tmp, num_workers=workers,
             val_per_category=dict(text=500, generation=500, understanding=500 if image_every else 0),
             sources=[dict(name="synthetic", format="messages_jsonl", path="corpus.jsonl",
                           image_root="images")], tokenizer=dict(train=False, vocab_size=0, path="")))
    start = time.perf_counter()
    dataset = build.build(cfg, os.path.join(tmp, "data"))
    wall = time.perf_counter() - start
    card = json.load(open(dataset.data_card))
  src = card["sources"]["synthetic"]
  return {
      "records": records,
      "workers": workers,
      "image_mb": round(image_bytes / 2**20),
      "wall_s": round(wall, 1),
      "records_per_s": round(records / wall),
      "records_per_s_per_core": round(records / wall / workers),
      "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
      "peak_rss_largest_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
      "kept": src["kept"],
      "rejected": src["rejected"],
      "duplicates": src["duplicate_kinds"],
      "splits": card["splits"]
  }


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--records", type=int, default=200_000)
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--image_every", type=int, default=4)
  parser.add_argument("--one", choices=("text", "images"), help=argparse.SUPPRESS)  # a child run
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_one(args.records, args.workers, args.image_every if args.one == "images" else 0)))
    return
  results = {}
  for variant in ("text", "images"):
    # A process each: peak RSS is a per-process high-water mark.
    out = subprocess.run([
        sys.executable, __file__, f"--records={args.records}", f"--workers={args.workers}",
        f"--image_every={args.image_every}", f"--one={variant}"
    ], check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr: progress, errors
    results[variant] = json.loads(out.strip().splitlines()[-1])
    print(variant, json.dumps(results[variant]), flush=True)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
