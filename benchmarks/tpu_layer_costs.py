"""One decoder layer's cost on a TPU slice, op by op, by the TPU compiler's cost model on this CPU.

  python benchmarks/tpu_layer_costs.py [--target=v5p-8] [--model=llama2_7b|llama3_8b] [--top=12]

mgjax.plan reads a scanned step's modelled time from loop-free twins (mgjax/flops.py: the train step
with 1 and 2 unscanned decoder layers, every loop unrolled): one layer costs cost(2) - cost(1). This
compiles those twins for the decoder alone at the Llama-2-7B or Llama-3-8B shape (as
benchmarks/tpu_compile.py's llama2_7b_* and llama3_8b_* cases: 2 x 2048 tokens per device, full
FSDP, bf16 compute, remat full, splash attention, mgjax's TPU flags) twice, in one run:

  flip     mgjax's RoPE (mgjax.models.llm.apply_rope: the halves of head_dim as an axis of 2,
           flipped), as the trainer runs;
  concat   RoPE as two slices of head_dim and a concatenate (MaxText's form).

For each it prints one layer's modelled time (XLA's `optimal_seconds`, the figure plan reports), the
compiler's own per-op estimates for that layer (`estimated_cycles` in the compiled program's backend
configs, summed: matmul fusions and the rest), and the op groups (opcode or fusion kind, the JAX
op they come from, output shape) with the most cycles. Results: benchmarks/RESULTS.md ("TPU compile").
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from mgjax import tpu_flags  # noqa: E402  (before JAX starts: libtpu reads its flags once)

tpu_flags.set_libtpu_init_args(os.environ)

import jax.numpy as jnp  # noqa: E402

from mgjax import config_files, flops, plan  # noqa: E402
from mgjax.models import llm  # noqa: E402

# The decoder alone: no image slot, the sample's tiny towers (present, never run).
DECODER_ONLY = {
    "data.max_images": 0,
    "model.vision_lowres.kind": "clip",
    "model.vision_lowres.image_size": 32,
    "model.vision_lowres.patch_size": 8,
    "model.vision_lowres.width": 64,
    "model.vision_lowres.layers": 2,
    "model.vision_lowres.heads": 4,
    "model.vision_lowres.mlp": 256,
    "model.vision_highres.image_size": 64,
    "model.vision_highres.dims": (16, 32, 64, 128),
    "model.vision_highres.depths": (1, 1, 1, 1)
}
MODELS = {
    "llama2_7b": ("mgm_7b", 32000),  # Vicuna-7B is Llama-2-7B's shape
    "llama3_8b": ("mgm_8b", 128256),
}


def apply_rope_concat(x, positions, theta=10000.0, *, inv_freq=None):
  """RoPE with the halves sliced and concatenated back (MaxText's form); the same values as
  mgjax's apply_rope."""
  half = x.shape[-1] // 2
  if inv_freq is None:
    inv_freq = llm.rope_frequencies(x.shape[-1], theta)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = x.astype(jnp.float32)[..., :half], x.astype(jnp.float32)[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def config_for(model: str, target: str, layers: int):
  preset, vocab = MODELS[model]
  config = config_files.load_config_file(os.path.join(REPO, "configs", "stage2.py"), f"model={preset}")
  devices = plan.tpu_devices(target)
  per_device = 2  # rows of 2048 tokens
  overrides = {
      **DECODER_ONLY, "model.vocab_size": vocab,
      "mesh.data": 1,
      "mesh.fsdp": -1,
      "data.seq_len": 2048,
      "optim.grad_clip": 1.0,
      "data.batch_size": per_device * len(devices),
      "model.llm.layers": layers,
      "model.llm.scan_layers": False
  }
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config, devices


def op_cycles(hlo: str) -> collections.Counter:
  """Cycles the compiler estimates per op group: (opcode or fusion kind, JAX op, output shape)."""
  groups = collections.Counter()
  for line in hlo.splitlines():
    cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
    if not cycles:
      continue
    shape = re.match(r"\s*(?:ROOT )?%\S+ = \(?([a-z0-9]+\[[\d,]*\])", line)
    kind = re.search(r"kind=(k\w+)", line)
    opcode = re.search(r"\} ([a-z][\w-]*)\(", line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    op = op_name.group(1).replace("jit(train_step)/", "") if op_name else ""
    group = (kind.group(1) if kind else
             (opcode.group(1) if opcode else "?"), op[-70:], shape.group(1) if shape else "?")
    groups[group] += int(cycles.group(1))
  return groups


def layer_costs(model: str, target: str) -> tuple[float, collections.Counter]:
  """(one layer's modelled seconds, its cycles per op group): the 2-layer twin minus the 1-layer one."""
  seconds, cycles = [], []
  for layers in (1, 2):
    config, devices = config_for(model, target, layers)
    step = plan.compile_train_step(config, devices, unroll_loops=True,
                                   compiler_options=flops.cost_compiler_options(devices[0].device_kind))
    seconds.append(flops.compiled_costs(step.compiled)["modelled_seconds"])
    cycles.append(op_cycles(step.compiled.as_text()))
  layer = collections.Counter({group: cycles[1][group] - cycles[0].get(group, 0) for group in cycles[1]})
  return seconds[1] - seconds[0], layer


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", default="v5p-8")
  parser.add_argument("--model", default="llama2_7b", choices=sorted(MODELS))
  parser.add_argument("--top", type=int, default=12, help="op groups to list per variant")
  args = parser.parse_args()
  flip = llm.apply_rope
  results = {}
  for name, rope in (("flip", flip), ("concat", apply_rope_concat)):
    llm.apply_rope = rope  # Attention looks it up in mgjax.models.llm when it runs
    results[name] = layer_costs(args.model, args.target)
  llm.apply_rope = flip
  print(f"{args.model} on {args.target}, 2 x 2048 tokens per device: one decoder layer")
  print("| RoPE | modelled seconds | estimated cycles | in matmul fusions | the rest |")
  print("|---|---|---|---|---|")
  for name, (seconds, layer) in results.items():
    total = sum(layer.values())
    matmul = sum(v for (kind, op, _), v in layer.items() if kind == "kOutput" and op.endswith("dot_general"))
    print(f"| {name} | {seconds:.4f} | {total / 1e6:.2f} M | {matmul / 1e6:.2f} M ({matmul / total:.0%}) | "
          f"{(total - matmul) / 1e6:.2f} M ({(total - matmul) / total:.0%}) |")
  for name, (_, layer) in results.items():
    print(f"\n{name}: op groups outside matmul fusions with the most cycles")
    rest = {g: v for g, v in layer.items() if not (g[0] == "kOutput" and g[1].endswith("dot_general"))}
    for (kind, op, shape), value in sorted(rest.items(), key=lambda kv: -kv[1])[:args.top]:
      print(f"  {value / 1e6:6.2f} M  {kind:<12} {shape:<24} {op}")


if __name__ == "__main__":
  main()
