"""Real sizes on real TPU slices, compiled by the TPU compiler on this CPU (no TPU needed).

  python benchmarks/tpu_compile.py [--cases=llama2_7b_v5p8,mgm_8b_v5p8,...] [--out=DIR]

Cases: llama2_7b_v5p8, llama2_7b_v5p8_no_tpu_flags, llama2_7b_v5e8, llama3_8b_v5p8,
llama3_8b_v5p8_no_tpu_flags, llama3_8b_v6e8, llama3_8b_v6e8_no_tpu_flags, mgm_8b_v5p8, mgm_8b_v6e8,
llama3_8b_4l_v5p8_splash512, llama3_8b_4l_v5p8_splash512_vmem96, llama3_8b_4l_v5p8_splash_auto_vmem96,
llama3_8b_4l_v6e8_splash512, llama3_8b_4l_v6e8_splash512_vmem96, llama3_8b_4l_v6e8_splash_auto_vmem96,
llama3_8b_4l_v6e8_splash_q1024_vmem96, mgm_8b_stage1_v5p8, mgm_8b_stage1_v6e8, llama2_7b_v6e8,
llama3_8b_v5e8, llama2_7b_v5p8_vocab_split_loss, llama3_8b_v5p8_vocab_split_loss, llama3_8b_2l_v5p8,
llama3_8b_2l_v5p8_vocab_split_loss, llama3_8b_2l_v5p8_offload, mgm_8b_v5p8_vocab_split_loss,
mgm_8b_v5p8_vocab_split_loss_bf16_mu, mgm_8b_v5p8_offload, llama2_7b_v5e8_offload,
mgm_8b_stage1_packed4_v5p8.
Each runs
`python -m mgjax.plan --target=...` in its own process (the figures are the TPU compiler's:
per-device memory, hardware FLOPs and its cost model's step time, a scanned decoder's from
loop-free twins, see mgjax/flops.py; the model FLOPs are mgjax.flops's analytic count) and
writes DIR/<case>.json with the command and wall time added. Per-device batch 2 x 2048 tokens throughout, full FSDP, as MaxText's train_compile
figures it is compared with (MaxText 0.2.5, its defaults: splash attention, remat full, scanned
layers, bf16 activations, float32 weights and AdamW moments, FSDP over all devices). This script
does not run MaxText.

llama2_7b_*: mgjax's decoder alone at the Llama-2-7B configuration (vocab 32000, hidden 4096,
32 layers, 32 heads, MLP 11008): the mgm_7b preset (Vicuna-7B is Llama-2-7B's shape) with
no image slot and the sample's tiny vision towers, so the decoder is what is compiled.
llama3_8b_*: the same at the Llama-3-8B configuration (vocab 128256, hidden 4096, 32 layers,
32 heads, 8 KV heads, MLP 14336, rope theta 500000), on the mgm_8b preset (Llama-3-8B-Instruct).
Every case compiles with mgjax's TPU compiler flags (mgjax/tpu_flags.py), as the trainer runs on
a TPU, except the *_no_tpu_flags ones (plan --tpu_flags=False: libtpu's defaults).
llama3_8b_4l_*_splash*: the Llama-3-8B decoder with 4 of its 32 layers (the same width, a compile of
minutes), with splash attention's blocks (model.splash_blocks) at 'default' (every block 512, the
separate dq and dkv backward kernels: MaxText's base.yml), 'auto' (the generation's settings from
MaxText's tuned recipes: 2048 blocks on v5p, 2048 blocks and the fused backward kernel on v6e) or
MaxText's v6e Llama-3-8B recipe at 8192 tokens (block_q 1024, block_q_dkv and block_q_dq 2048, the rest
512). The *_vmem96 cases add --xla_tpu_scoped_vmem_limit_kib=98304 to LIBTPU_INIT_ARGS (after the
user's), the scoped VMEM limit MaxText's tuned recipes set with those blocks, and without which
'auto' keeps the 512 blocks (mgjax.models.attention.SPLASH_TUNED_VMEM_KIB); splash512_vmem96 is
that limit alone. The cost model scores Pallas kernels as nearly free, so these compare memory and
the kernel count; the blocks' effect on step time needs a TPU: the trainer's logged steps_per_s and
tokens_per_s (WORKDIR/metrics.jsonl) of the same run with each setting, e.g.
`python -m mgjax.main --config=configs/stage2.py:model=mgm_8b --workdir=W --config.model.splash_blocks=default`
against `--config.model.splash_blocks=auto`.

Prints each plan's own output, then a table (one row per case: per-device batch, weights +
optimizer, temporaries, peak (their sum) and the compiler's own peak (what its buffer assignment
has live at once: the figure to hold against the chip), model and hardware FLOPs per device,
modelled step, modelled MFU and HFU (model and hardware FLOPs over the modelled step at the chip's
bf16 peak), the TPU flags compiled with and the collectives the compiler fused with compute,
compile time of the main program and of the whole plan; a case the compiler refuses says so).
The targets it is held to and the recorded figures are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3

_TOWERS_UNUSED = [
    "--config.data.max_images=0",
    # The sample's towers (a few MB): present in the model, never run without image slots.
    "--config.model.vision_lowres.kind=clip",
    "--config.model.vision_lowres.image_size=32",
    "--config.model.vision_lowres.patch_size=8",
    "--config.model.vision_lowres.width=64",
    "--config.model.vision_lowres.layers=2",
    "--config.model.vision_lowres.heads=4",
    "--config.model.vision_lowres.mlp=256",
    "--config.model.vision_highres.image_size=64",
    "--config.model.vision_highres.dims=(16,32,64,128)",
    "--config.model.vision_highres.depths=(1,1,1,1)",
]
# Llama-2-7B's vocabulary on the mgm_7b preset (Vicuna-7B is Llama-2-7B's shape); Llama-3-8B's on
# mgm_8b (Llama-3-8B-Instruct: 32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336, rope theta
# 500000).
_LLAMA2_7B = ["--config.model.vocab_size=32000", *_TOWERS_UNUSED]
_LLAMA3_8B = ["--config.model.vocab_size=128256", *_TOWERS_UNUSED]
# The same compile without mgjax's TPU compiler flags (mgjax/tpu_flags.py): libtpu's defaults.
_NO_TPU_FLAGS = ["--tpu_flags=False"]

# Clipping at 1, as MaxText's defaults clip (gradient_clipping_threshold 1.0) and as the recorded
# figures were compiled; the mgm presets themselves train unclipped, as Mini-Gemini's runs did.
_FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.data.seq_len=2048", "--config.optim.grad_clip=1.0"]

# The Llama-3-8B decoder's width with 4 layers, for comparing splash attention's block sizes.
_LLAMA3_8B_4L = _LLAMA3_8B + ["--config.model.llm.layers=4"]
_SPLASH_512 = ["--config.model.splash_blocks=default"]
_SPLASH_AUTO = ["--config.model.splash_blocks=auto"]
_SPLASH_Q1024 = ["--config.model.splash_blocks=default,block_q=1024,block_q_dkv=2048,block_q_dq=2048"]
# Added to LIBTPU_INIT_ARGS for a case: MaxText's DENSE_VMEM_LIMIT_FLAG (benchmarks/xla_flags_library.py).
_VMEM96 = "--xla_tpu_scoped_vmem_limit_kib=98304"
CASE_LIBTPU_ARGS = {
    "llama3_8b_4l_v5p8_splash512_vmem96": _VMEM96,
    "llama3_8b_4l_v5p8_splash_auto_vmem96": _VMEM96,
    "llama3_8b_4l_v6e8_splash512_vmem96": _VMEM96,
    "llama3_8b_4l_v6e8_splash_auto_vmem96": _VMEM96,
    "llama3_8b_4l_v6e8_splash_q1024_vmem96": _VMEM96,
}

_VOCAB_SPLIT = ["--config.train.loss_vocab_sharded=True"]
_TWO_LAYERS = ["--config.model.llm.layers=2"]

# name: (config, target, global batch, extra overrides)
CASES = {
    "llama2_7b_v5p8": ("configs/stage2.py:model=mgm_7b", "v5p-8", 8, _LLAMA2_7B),
    "llama2_7b_v5p8_no_tpu_flags": ("configs/stage2.py:model=mgm_7b", "v5p-8", 8, _LLAMA2_7B + _NO_TPU_FLAGS),
    "llama2_7b_v5e8": ("configs/stage2.py:model=mgm_7b", "v5e-8", 16, _LLAMA2_7B),
    "llama3_8b_v5p8": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B),
    "llama3_8b_v5p8_no_tpu_flags": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B + _NO_TPU_FLAGS),
    "llama3_8b_v6e8": ("configs/stage2.py:model=mgm_8b", "v6e-8", 16, _LLAMA3_8B),
    "llama3_8b_v6e8_no_tpu_flags": ("configs/stage2.py:model=mgm_8b", "v6e-8", 16, _LLAMA3_8B + _NO_TPU_FLAGS),
    "mgm_8b_v5p8": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, []),
    "mgm_8b_v6e8": ("configs/stage2.py:model=mgm_8b", "v6e-8", 16, []),
    # The presets' stage 1 as it trains: packed 2048-token rows with 4 image slots each.
    "mgm_8b_stage1_v5p8": ("configs/stage1.py:model=mgm_8b", "v5p-8", 8, []),
    "mgm_8b_stage1_v6e8": ("configs/stage1.py:model=mgm_8b", "v6e-8", 16, []),
    # Stage 1 with packed rows of up to 4 images (configs/stage1.py's own default; the mgm presets
    # train as Mini-Gemini does, one conversation and one image slot a row): memory only.
    "mgm_8b_stage1_packed4_v5p8": ("configs/stage1.py:model=mgm_8b", "v5p-8", 8,
                                   ["--config.data.packing=True", "--config.data.max_images=4", "--nocosts"]),
    # Llama-2-7B's decoder on v6e-8 and Llama-3-8B's on v5e-8 (MaxText's does not fit there at 1 x 2048).
    "llama2_7b_v6e8": ("configs/stage2.py:model=mgm_7b", "v6e-8", 16, _LLAMA2_7B),
    "llama3_8b_v5e8": ("configs/stage2.py:model=mgm_8b", "v5e-8", 8, _LLAMA3_8B),
    # The memory levers (mgjax.fit.lever_savings): the vocabulary-split loss
    # (train.loss_vocab_sharded=True; by default the output projection is gathered on every
    # device, as MaxText's FSDP computes it) and the optimizer state in host memory.
    "llama2_7b_v5p8_vocab_split_loss": ("configs/stage2.py:model=mgm_7b", "v5p-8", 8, _LLAMA2_7B + _VOCAB_SPLIT),
    "llama3_8b_v5p8_vocab_split_loss": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B + _VOCAB_SPLIT),
    "llama3_8b_2l_v5p8": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B + _TWO_LAYERS),
    "llama3_8b_2l_v5p8_vocab_split_loss":
        ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B + _TWO_LAYERS + _VOCAB_SPLIT),
    "llama3_8b_2l_v5p8_offload":
        ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B + _TWO_LAYERS + ["--config.optim.offload=True"]),
    "mgm_8b_v5p8_vocab_split_loss": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _VOCAB_SPLIT + ["--nocosts"]),
    # Both on-device levers: the vocabulary-split loss and Adam's first moment in bf16 (optim.mu_dtype).
    "mgm_8b_v5p8_vocab_split_loss_bf16_mu": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8,
                                             _VOCAB_SPLIT + ["--config.optim.mu_dtype=bfloat16", "--nocosts"]),
    "mgm_8b_v5p8_offload": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, ["--config.optim.offload=True"]),
    "llama2_7b_v5e8_offload":
        ("configs/stage2.py:model=mgm_7b", "v5e-8", 16, _LLAMA2_7B + ["--config.optim.offload=True", "--nocosts"]),
    "llama3_8b_4l_v5p8_splash512": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B_4L + _SPLASH_512),
    "llama3_8b_4l_v5p8_splash512_vmem96": ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B_4L + _SPLASH_512),
    "llama3_8b_4l_v5p8_splash_auto_vmem96":
        ("configs/stage2.py:model=mgm_8b", "v5p-8", 8, _LLAMA3_8B_4L + _SPLASH_AUTO),
    "llama3_8b_4l_v6e8_splash512": ("configs/stage2.py:model=mgm_8b", "v6e-8", 16, _LLAMA3_8B_4L + _SPLASH_512),
    "llama3_8b_4l_v6e8_splash512_vmem96": ("configs/stage2.py:model=mgm_8b", "v6e-8", 16, _LLAMA3_8B_4L + _SPLASH_512),
    "llama3_8b_4l_v6e8_splash_auto_vmem96":
        ("configs/stage2.py:model=mgm_8b", "v6e-8", 16, _LLAMA3_8B_4L + _SPLASH_AUTO),
    "llama3_8b_4l_v6e8_splash_q1024_vmem96":
        ("configs/stage2.py:model=mgm_8b", "v6e-8", 16, _LLAMA3_8B_4L + _SPLASH_Q1024),
}


def run_case(name: str, out_dir: str) -> dict:
  config, target, batch, extra = CASES[name]
  path = os.path.join(out_dir, f"{name}.json")
  command = [
      sys.executable, "-m", "mgjax.plan", f"--config={config}", f"--target={target}",
      f"--config.data.batch_size={batch}", f"--json={path}", *_FSDP, *extra
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if name in CASE_LIBTPU_ARGS:
    env["LIBTPU_INIT_ARGS"] = f"{env.get('LIBTPU_INIT_ARGS', '')} {CASE_LIBTPU_ARGS[name]}".strip()
  started = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - started
  print(result.stdout, flush=True)
  if not os.path.exists(path):
    raise SystemExit(f"{name} failed:\n{result.stderr[-4000:]}")
  with open(path) as f:
    figures = json.load(f)
  figures["wall_seconds"] = wall
  figures["command"] = " ".join(command[1:])
  if name in CASE_LIBTPU_ARGS:
    figures["command"] = f"LIBTPU_INIT_ARGS={env['LIBTPU_INIT_ARGS']} {figures['command']}"
  with open(path, "w") as f:
    json.dump(figures, f, indent=1)
  return figures


def row(name: str, p: dict) -> str:
  if not p.get("fits", True):
    return f"| {name} | {p['target']} | refused by the compiler: {p['refused']} | | | | | | | | | | | |"
  per_device_batch = p["batch"]["global"] // (p["mesh"]["data"] * p["mesh"]["fsdp"])

  def figure(key: str, fmt: str, scale: float = 1.0) -> str:
    return format(p[key] / scale, fmt) if p.get(key) is not None else "none"

  return (f"| {name} | {p['target']} | {per_device_batch} x {p['batch']['seq_len']} | "
          f"{(p['params_bytes'] + p['opt_state_bytes']) / GiB:.1f} GiB | {p['temp_bytes'] / GiB:.2f} GiB | "
          f"{p['peak_bytes'] / GiB:.2f} GiB | {figure('compiler_peak_bytes', '.2f', GiB)} GiB | "
          f"{p['model_flops_per_device'] / 1e12:.1f} T | "
          f"{figure('hardware_flops_per_device', '.1f', 1e12)} T | {figure('modelled_step_seconds', '.3f')} s | "
          f"{figure('modelled_mfu', '.2f')} | {figure('modelled_hfu', '.2f')} | "
          f"{_tpu_flags(p)} | {p['compile_seconds']:.0f} s / {p['wall_seconds']:.0f} s |")


def _tpu_flags(p: dict) -> str:
  """How many flags the compiler got and how many collectives it fused with compute."""
  flags = f"{len(p['tpu_flags'])} flags" if p.get("tpu_flags") else "none"
  return f"{flags}, {p['async_collective_fusions']} fused" if "async_collective_fusions" in p else flags


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {sorted(CASES)}")
  parser.add_argument("--out", default="/tmp/mgjax-tpu-compile", help="folder for the per-case JSON")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results = {name: run_case(name, args.out) for name in args.cases.split(",")}
  print("| case | target | per-device batch | weights + optimizer | temporaries | peak | compiler's peak | "
        "model FLOPs/device | "
        "hardware FLOPs/device | modelled step | modelled MFU | modelled HFU | TPU flags (collectives fused) | "
        "compile (main program / whole plan) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, figures in results.items():
    print(row(name, figures))


if __name__ == "__main__":
  main()
