"""Packing vs padding: the share of token slots that hold real tokens, on a Mini-Gemini-like mix.

  python benchmarks/packing.py [--seq_len=2048] [--examples=20000] [--max_images=4] [--batch_size=16]

Lengths are drawn from a mix shaped like Mini-Gemini's fine-tuning set: understanding
conversations (one image = 576 tokens, plus 1-10 question/answer turns), long text-only
conversations (LIMA / OpenAssistant) and short generation samples. The same stream of
examples is batched three ways, side by side:
  - padded to seq_len (fixed shapes, what an unpacked trainer compiles once);
  - padded to the longest in each batch (a dynamic-shape baseline: a new compile per length);
  - packed by mgjax's pipeline (grain's first-fit packer, mgjax.data.pipeline.pack) into
    fixed seq_len rows with up to `max_images` image slots, for 16 (--batch_size), 64, 256
    and 1024 bins.

Prints the mix's median and p90 length, then a table of non-pad share, rows and packing seconds
per batching (target: non-pad share >= 0.95). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
import types

import grain
import numpy as np

from mgjax.data import pipeline

IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px


def sample_lengths(rng: np.random.Generator, n: int, seq_len: int) -> list[tuple[int, int]]:
  """(tokens, images) per example. Shares: understanding 90%, text 4%, generation 6% (the
  recipe's 13K generation and 6K text samples are upsampled next to its understanding data)."""
  out = []
  for kind in rng.choice(3, size=n, p=[0.90, 0.04, 0.06]):
    if kind == 0:  # an image and several short turns (VQA-style lists to long descriptions)
      turns = rng.integers(1, 11)
      text = int(sum(rng.lognormal(np.log(35), 0.7) for _ in range(turns)))
      out.append((min(IMAGE_TOKENS + 20 + text, seq_len), 1))
    elif kind == 1:  # LIMA / OpenAssistant: long answers
      out.append((int(min(max(rng.lognormal(np.log(450), 0.8), 32), seq_len)), 0))
    else:  # generation: a request and a <h>...</h> prompt
      out.append((int(rng.lognormal(np.log(90), 0.3)), 0))
  return out


def examples(lengths: list[tuple[int, int]]) -> list[dict[str, np.ndarray]]:
  """Unpadded examples in ConversationEncoder.unpadded's layout (images as 1-pixel stand-ins:
  packing only counts image slots)."""
  out = []
  for tokens, images in lengths:
    ids = np.ones(tokens, np.int32)
    out.append({
        "input_ids": ids,
        "targets": ids,
        "loss_mask": np.ones(tokens, np.float32),
        "images_lowres": np.zeros((images, 1, 1, 3), np.float32),
        "images_highres": np.zeros((images, 1, 1, 3), np.float32)
    })
  return out


def packed_share(data: list[dict[str, np.ndarray]], seq_len: int, max_images: int, num_bins: int) -> tuple[float, int]:
  encoder = types.SimpleNamespace(seq_len=seq_len, max_images=max_images)
  rows = pipeline.pack(grain.MapDataset.source(data).to_iter_dataset(), encoder, num_bins=num_bins)
  real = slots = count = 0
  for row in rows:
    real += int((row["segment_ids"] > 0).sum())
    slots += row["segment_ids"].size
    count += 1
  return real / slots, count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--examples", type=int, default=20000)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_images", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  lengths = sample_lengths(np.random.default_rng(args.seed), args.examples, args.seq_len)
  tokens = np.array([t for t, _ in lengths])
  real = tokens.sum()
  print(f"{args.examples} examples, seq_len {args.seq_len}: median {np.median(tokens):.0f} tokens, "
        f"p90 {np.percentile(tokens, 90):.0f}, {sum(i for _, i in lengths)} images")
  usable = len(tokens) // args.batch_size * args.batch_size
  fixed = tokens[:usable].sum() / (usable * args.seq_len)
  per_batch = tokens[:usable].reshape(-1, args.batch_size)
  dynamic = per_batch.sum() / (per_batch.max(axis=1).sum() * args.batch_size)
  print("| batching | non-pad share | rows | seconds |")
  print("| --- | --- | --- | --- |")
  print(f"| padded to seq_len ({args.seq_len}) | {fixed:.3f} | {usable} | - |")
  print(f"| padded to the batch's longest (batch {args.batch_size}) | {dynamic:.3f} | {usable} | - |")
  data = examples(lengths)
  for bins in (args.batch_size, 64, 256, 1024):
    start = time.perf_counter()
    share, rows = packed_share(data, args.seq_len, args.max_images, bins)
    seconds = time.perf_counter() - start
    print(
        f"| packed, first fit over {bins} bins, {args.max_images} image slots | {share:.3f} | {rows} | {seconds:.1f} |")
  print(f"(real tokens in all: {real})")


if __name__ == "__main__":
  main()
