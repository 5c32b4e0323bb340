"""Step time while an asynchronous checkpoint is written, against the step with no save in flight.

  python benchmarks/async_checkpoint.py [--rounds=5 --steps=6 --hidden=512 --layers=8]

Uses the trainer's own pieces: the sample Mini-Gemini with a larger LLM (--hidden, --layers; so that
the checkpoint, weights plus Adam state, takes a while to write), mgjax.train_step's train step and
mgjax.checkpoint.Checkpoints (orbax, async). Each of --rounds rounds times --steps steps with no save
in flight, then starts a save and times the steps that run while it is being written; only steps that
run before the write finishes count as "during".

Prints the model size and checkpoint size, a table of the median step time with no save in flight and
while a save is written and their ratio (target: at most 1.1x), and the medians of save()'s blocking
part (copying arrays off the devices) and of the whole write. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import grain
import jax
import numpy as np
from flax import nnx

from mgjax import base_config, checkpoint, config_files, optim, train_step
from mgjax.models import vlm


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=6, help="steps timed per phase and round")
  args = parser.parse_args()

  cfg = config_files.preset("models", "sample")
  cfg.llm.hidden, cfg.llm.layers, cfg.llm.mlp = args.hidden, args.layers, 3 * args.hidden
  cfg.llm.heads, cfg.llm.kv_heads, cfg.llm.head_dim = args.hidden // 64, args.hidden // 64, 64
  cfg.vocab_size = 8192
  model = vlm.MiniGemini(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = state.to_pure_dict()
  optim_cfg = base_config.base_config().optim
  tx, _ = optim.make(optim_cfg, 1000, params)
  opt_state = tx.init(params)
  step_fn, _ = train_step.make_train_step(graphdef, tx, lambda trainable, frozen: trainable, accum=1)
  step_fn = jax.jit(step_fn, donate_argnums=(0, 1))

  rng = np.random.default_rng(0)
  b, t, n = args.batch_size, args.seq_len, vlm.num_image_tokens(cfg)
  ids = rng.integers(16, cfg.vocab_size, (b, t)).astype(np.int32)
  ids[:, 1:1 + n] = cfg.image_token_id
  batch = {
      "input_ids": ids,
      "targets": np.roll(ids, -1, axis=1),
      "loss_mask": np.ones((b, t), np.float32),
      "segment_ids": np.ones((b, t), np.int32),
      "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
      "images_lowres": rng.normal(size=(b, 1, cfg.vision_lowres.image_size, cfg.vision_lowres.image_size, 3)
                                 ).astype(np.float32),
      "images_highres": rng.normal(size=(b, 1, cfg.vision_highres.image_size, cfg.vision_highres.image_size, 3)
                                  ).astype(np.float32),
  }
  batch = jax.device_put(batch)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  ckpt_bytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)))

  def run_steps(k: int) -> list[float]:
    nonlocal params, opt_state
    times = []
    for _ in range(k):
      start = time.perf_counter()
      params, opt_state, m = step_fn(params, opt_state, None, batch)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - start)
    return times

  run_steps(2)  # compile
  with tempfile.TemporaryDirectory() as workdir:
    ckpts = checkpoint.Checkpoints(workdir, max_to_keep=2)
    data_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
    normal, during, write_seconds, overlapped = [], [], [], []
    for r in range(args.rounds):
      normal += run_steps(args.steps)
      saved_at = time.perf_counter()
      ckpts.save(r + 1, params=params, opt_state=opt_state, data_iter=data_iter, meta={"round": r})
      started = time.perf_counter() - saved_at  # the blocking part: copying arrays off
      times = run_steps(args.steps)
      ckpts.wait()
      write_seconds.append(time.perf_counter() - saved_at)
      # Only steps that ran while the write was still going count as "during".
      elapsed = started
      for s in times:
        if elapsed < write_seconds[-1]:
          during.append(s)
        elapsed += s
      overlapped.append(started)
    ckpts.close()

  median_normal, median_during = statistics.median(normal), statistics.median(during)
  print(f"model {num_params / 1e6:.1f}M parameters; checkpoint (weights + Adam) {ckpt_bytes / 2**20:.0f} MiB; "
        f"batch {b} x {t}; jax {jax.__version__} on {jax.devices()[0].device_kind}")
  print("| | median step (s) | steps |")
  print("| --- | --- | --- |")
  print(f"| no save in flight | {median_normal:.3f} | {len(normal)} |")
  print(f"| while an async save is written | {median_during:.3f} | {len(during)} |")
  print(f"| ratio | {median_during / median_normal:.3f} | |")
  print(f"blocking part of save() (copying arrays off the device): median {statistics.median(overlapped):.3f} s; "
        f"whole write: median {statistics.median(write_seconds):.2f} s")


if __name__ == "__main__":
  main()
