"""Input pipeline headroom: examples/s the grain pipeline delivers vs what the train step eats.

  python benchmarks/input_pipeline.py [--data_dir=/tmp/mgjax-bench-data --batches=40]

Two measurements in one run, on this machine:
  1. The stage-1 recipe on the bundled sample (packed rows, 4 image slots): the pipeline alone
     (tokenise, template, decode and resize images, pack) over --batches batches, against the
     compiled train step alone on a batch it produced. Headroom = pipeline examples/s / step
     examples/s (target 3x).
  2. Mini-Gemini's image sizes: decoding and preprocessing a folder of real photos
     (--photos) into the 336 px / 768 px pair (mgjax.data.images.mgm_pair) on one
     core, against what one accelerator running MGM-8B at 45% MFU consumes (from the FLOPs per
     packed row): how many host cores each accelerator needs to keep 3x headroom.

Prints a table of the two rates and the headroom, then, per accelerator (H100, TPU v5p, TPU v5e),
the images/s it consumes and the host cores 3x headroom needs. Part 2 is skipped when the photos are
absent. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np
import transformers
from flax import nnx

from mgjax import config_files, optim, train_step
from mgjax import run_files
from mgjax.data import build, datasets, images, pipeline
from mgjax.models import vlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real photos for part 2 (--photos): by default the test photos kept beside the repository.
PHOTOS = os.path.join(REPO, "..", "shared", "data", "images")


def examples_in(batch: dict[str, np.ndarray]) -> int:
  """Conversations in a packed batch: segments 1..k per row."""
  return int(batch["segment_ids"].max(axis=1).sum())


def sample_headroom(data_dir: str, num_batches: int) -> dict[str, float]:
  config = config_files.load_config_file(os.path.join(REPO, "configs", "stage1.py"))
  config.data.data_dir = data_dir
  dataset = build.ensure_built(config.data.recipe, data_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(dataset.tokenizer_dir)
  model_cfg = run_files.resolve_model_config(config.model, tokenizer)
  encoder = pipeline.make_encoder(tokenizer, config.data, model_cfg, vlm.num_image_tokens(model_cfg))
  source = datasets.open_split(dataset, "train")

  it = pipeline.train_iterator(source, encoder, batch_size=config.data.batch_size, seed=0,
                               num_threads=config.data.num_threads, prefetch=config.data.prefetch,
                               packing=config.data.packing)
  first = next(it)  # start-up (threads, first reads) is not throughput
  start, count = time.perf_counter(), 0
  for _ in range(num_batches):
    count += examples_in(next(it))
  pipeline_rate = count / (time.perf_counter() - start)

  model = vlm.MiniGemini(model_cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = state.to_pure_dict()
  tx, _ = optim.make(config.optim, config.train.steps, params)
  opt_state = tx.init(params)
  step, _ = train_step.make_train_step(graphdef, tx, lambda trainable, frozen: trainable, accum=1)
  step = jax.jit(step, donate_argnums=(0, 1))
  batch = jax.device_put(first)
  params, opt_state, m = step(params, opt_state, None, batch)  # compile
  jax.block_until_ready(m)
  times = []
  for _ in range(num_batches):
    t = time.perf_counter()
    params, opt_state, m = step(params, opt_state, None, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_rate = examples_in(first) / statistics.median(times)
  return {
      "pipeline_examples_per_s": pipeline_rate,
      "step_examples_per_s": step_rate,
      "headroom": pipeline_rate / step_rate,
      "examples_per_batch": examples_in(first),
      "batch_size": config.data.batch_size
  }


def photo_rate(photos: str, repeats: int) -> float | None:
  """Images/s on one core: JPEG decode + Mini-Gemini's 768 px and 336 px inputs."""
  if not os.path.isdir(photos):
    return None
  files = [open(os.path.join(photos, f), "rb").read() for f in sorted(os.listdir(photos))]
  start = time.perf_counter()
  for _ in range(repeats):
    for data in files:
      images.mgm_pair(images.decode(data), 336, 768)
  return repeats * len(files) / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/mgjax-bench-data")
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--photo_repeats", type=int, default=20)
  parser.add_argument("--photos", default=PHOTOS, help="a folder of JPEG/PNG photos for part 2")
  args = parser.parse_args()

  r = sample_headroom(args.data_dir, args.batches)
  print(f"jax {jax.__version__}, {os.cpu_count()} cores; sample stage-1 recipe, batch {r['batch_size']} packed rows "
        f"({r['examples_per_batch']} conversations in the timed batch)")
  print("| | examples/s |")
  print("| --- | --- |")
  print(f"| input pipeline alone (grain, {os.cpu_count()} cores) | {r['pipeline_examples_per_s']:.0f} |")
  print(f"| train step alone (same cores) | {r['step_examples_per_s']:.0f} |")
  print(f"| headroom | {r['headroom']:.1f}x |")

  rate = photo_rate(args.photos, args.photo_repeats)
  if rate is None:
    print(f"(no photos at {args.photos}: part 2 skipped)")
    return
  # MGM-8B: ~8.4B parameters trained (LLM + projector + mining; towers frozen: forward only,
  # ~0.5B at 2 FLOPs/param/token over their own inputs, small next to the LLM), a packed
  # 2048-token row holds about 2 images. 6 * N * tokens for the trained part.
  flops_per_row = 6 * 8.4e9 * 2048
  for name, peak in (("H100", 989e12), ("TPU v5p", 459e12), ("TPU v5e", 197e12)):
    rows_per_s = 0.45 * peak / flops_per_row
    cores = 3 * 2 * rows_per_s / rate
    print(f"{name} at 45% MFU on MGM-8B: {rows_per_s:.2f} rows/s = {2 * rows_per_s:.1f} images/s per accelerator; "
          f"host cores for 3x headroom at {rate:.1f} images/s/core: {cores:.1f}")


if __name__ == "__main__":
  main()
