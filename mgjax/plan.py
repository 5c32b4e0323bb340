"""Will this config fit that topology? Compile the real train step ahead of time and see.

  python -m mgjax.plan --config=configs/stage2.py:model=mgm_8b --devices=8 --config.mesh.fsdp=-1 \
      --config.mesh.data=1

The train step `mgjax.train` runs (same model, loss, optimizer, freezing, gradient
accumulation, shardings from the config's mesh and rules) is compiled for `--devices`
virtual CPU devices on abstract values: no weight is allocated, nothing is trained. It
prints what one device holds (weights, optimizer state, activations and other temporaries)
and the FLOPs of one step, against the memory and peak of the accelerators people rent.

The memory figures come from XLA's CPU compiler. TPU and GPU compilers fuse and lay out
differently, so read them as an estimate (weights and optimizer state are exact; temporaries
are the part that moves), and leave headroom.
"""

from __future__ import annotations

import math
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/stage2.py:model=mgm_8b.")
_DEVICES = flags.DEFINE_integer("devices", 8, "How many devices the planned topology has (the mesh is built on them).")
flags.mark_flags_as_required(["config"])

GiB = 1024**3
# The devices a plan is checked against: (label, device kind for mgjax.throughput's peak
# table, memory of one JAX device in GiB).
ACCELERATORS: tuple[tuple[str, str, float], ...] = (
    ("TPU v4", "TPU v4", 32.0),
    ("TPU v5e", "TPU v5e", 16.0),
    ("TPU v5p", "TPU v5p", 95.0),
    ("TPU v6e", "TPU v6e", 32.0),
    ("H100 80GB", "H100", 80.0),
    ("H200", "H200", 141.0),
)


def _use_virtual_devices(n: int) -> None:
  """XLA reads the device count once, when jax initialises its CPU backend: before that."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  # The program is compiled, never run: skip LLVM's optimisation of the CPU code. Memory
  # figures come from XLA's buffer assignment, before LLVM, and do not change (checked on
  # the sample: same bytes, a third less compile time).
  # XLA:CPU's default scheduler favours concurrency over memory (it starts all-gathers and
  # other independent work early, holding their buffers); TPU/GPU compilers schedule for
  # memory when it is short, so ask for the memory-minimising order (sample: 31 -> 25 MiB).
  extra = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
           "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
  extra = [f for f in extra if f.split("=")[0] not in " ".join(kept)]
  os.environ["XLA_FLAGS"] = " ".join(kept + extra + [f"--xla_force_host_platform_device_count={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


def plan(config, num_devices: int) -> dict:
  """Compiles config's train step for `num_devices` devices; returns per-device figures."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mgjax import optim, sharding, train
  from mgjax.models import vlm

  if config.lora.rank:
    raise ValueError("mgjax.plan covers full fine-tuning (and optim.freeze); set --config.lora.rank=0")
  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise RuntimeError(f"{num_devices} devices asked for, jax has {len(devices)}: run mgjax.plan as its own "
                       "process (it sets --xla_force_host_platform_device_count before jax starts)")
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh)
  model_cfg = config.model
  abstract_model = vlm.abstract_model(model_cfg)
  graphdef, abstract_state = nnx.split(abstract_model)
  param_shardings = sharding.state_shardings(abstract_state, mesh, rules).to_pure_dict()
  params = sharding.abstract_like(abstract_state.to_pure_dict(), param_shardings)
  tx, _ = optim.make(config.optim, config.train.steps, params)
  opt_state = sharding.abstract_optimizer_state(tx, params, mesh)
  opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)

  b, t, m = config.data.batch_size, config.data.seq_len, config.data.max_images
  image_tokens = vlm.num_image_tokens(model_cfg)
  if t <= image_tokens * min(m, 1):
    raise ValueError(f"data.seq_len={t} cannot hold one image's {image_tokens} tokens; raise it, "
                     f"e.g. --config.data.seq_len=2048")
  lowres, highres = model_cfg.vision_lowres.image_size, model_cfg.vision_highres.image_size
  batch_sharding = sharding.batch_sharding(mesh)

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)

  batch = {
      "input_ids": spec((b, t), jnp.int32), "targets": spec((b, t), jnp.int32),
      "loss_mask": spec((b, t), jnp.float32), "segment_ids": spec((b, t), jnp.int32),
      "positions": spec((b, t), jnp.int32),
      "images_lowres": spec((b, m, lowres, lowres, 3), jnp.float32),
      "images_highres": spec((b, m, highres, highres, 3), jnp.float32),
  }
  accum = config.train.grad_accum_steps
  train_step, summed_loss = train.make_train_step(graphdef, tx, lambda trainable, frozen: trainable, accum,
                                                  tuple(config.optim.freeze))
  step = jax.jit(train_step, donate_argnums=(0, 1),
                 out_shardings=(param_shardings, opt_shardings, sharding.replicated(mesh)))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    compiled = step.lower(params, opt_state, None, batch).compile()
    flops = train.step_flops_per_device(compiled, summed_loss, params, None, batch, accum, mesh.size)

  def bytes_per_device(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

  memory = compiled.memory_analysis()
  num_params = sum(x.size for x in jax.tree.leaves(params))
  return {
      "mesh": dict(mesh.shape),
      "num_params": num_params,
      "batch": {"global": b, "seq_len": t, "image_slots": m, "tokens": b * t, "grad_accum_steps": accum},
      "params_bytes": bytes_per_device(params),
      "opt_state_bytes": bytes_per_device(opt_state),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      # Donated inputs alias outputs: they are only counted once.
      "peak_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                    + memory.temp_size_in_bytes,
      "flops_per_device": flops,
  }


def _bytes(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def _count(n: float, unit: str = "") -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
    if n >= scale:
      return f"{n / scale:.2f} {prefix}{unit}"
  return f"{n:.0f} {unit}"


def format_plan(p: dict, config) -> str:
  """The plan as a short report: memory per device, FLOPs, and where it fits."""
  from mgjax import throughput  # imports jax: not at module level, see _use_virtual_devices

  batch = p["batch"]
  lines = [
      f"parameters {_count(p['num_params'])} (weights float32, compute {config.model.dtype})",
      f"mesh {p['mesh']} = {_num_devices(p)} devices; global batch {batch['global']} x {batch['seq_len']} "
      f"tokens, {batch['image_slots']} image slot(s) per row, grad_accum_steps {batch['grad_accum_steps']}",
      "per device:",
      f"  weights           {_bytes(p['params_bytes'])}",
      f"  optimizer state   {_bytes(p['opt_state_bytes'])}",
      f"  temporaries       {_bytes(p['temp_bytes'])}  (activations, gradients, XLA buffers)",
      f"  peak              {_bytes(p['peak_bytes'])}",
  ]
  flops = p["flops_per_device"]
  if flops:
    total = flops * _num_devices(p)
    lines.append(f"  FLOPs per step    {_count(flops, 'FLOP')} ({_count(total, 'FLOP')} on all devices, "
                 f"{_count(total / batch['tokens'], 'FLOP')} per token slot)")
  lines.append("on devices of (fits: peak within 90% of memory; step time at 100% and 40% MFU):")
  for name, kind, hbm in ACCELERATORS:
    peak = throughput.vendor_peak_tflops(kind)
    fits = "fits" if p["peak_bytes"] <= 0.9 * hbm * GiB else "does NOT fit"
    timing = f"  {flops / (peak * 1e12):.3g} s, {flops / (0.4 * peak * 1e12):.3g} s" if flops else ""
    lines.append(f"  {name:<10} {hbm:>4.0f} GiB  {fits:<13}{timing}")
  return "\n".join(lines)


def _num_devices(p: dict) -> int:
  return math.prod(p["mesh"].values())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _use_virtual_devices(_DEVICES.value)
  config = _CONFIG.value
  print(format_plan(plan(config, _DEVICES.value), config), flush=True)


if __name__ == "__main__":
  from mgjax import runtime
  app.run(main, flags_parser=runtime.parse_flags)
