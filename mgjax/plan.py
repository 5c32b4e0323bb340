"""Will this config fit that topology? Compile the real train step ahead of time and see.

  python -m mgjax.plan --config=configs/stage2.py:model=mgm_8b --target=v5p-8 \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --config.data.batch_size=8 [--json=plan.json]
  python -m mgjax.plan --config=configs/stage2.py:model=mgm_8b --devices=8 ...   (no TPU compiler)

The train step `mgjax.train` runs (same model, loss, optimizer, freezing, gradient
accumulation, shardings from the config's mesh and rules) is compiled on abstract values: no
weight is allocated, nothing is trained.

--target: a TPU slice as gcloud names its accelerator type (v4-8, v5p-8, v5p-16, v5litepod-8
or v5e-8, v6e-8, ...). The TPU compiler itself (libtpu, which compiles on a CPU-only host:
pip install -e '.[tpu]') builds the program for that topology, so the memory figures are the
ones the TPU would have, and a config that does not fit is refused by the compiler as it
would be on the TPU. Its cost model gives the step time it predicts (a sum of per-op
roofline times: good for comparing configurations, not a wall-clock promise) and the
modelled FLOP utilisation against the chip's bf16 peak. It compiles with the TPU compiler flags
the trainer sets on a TPU (mgjax.tpu_flags: collectives overlapped with compute, as MaxText
trains; --tpu_flags=False: without them), and the JSON lists what LIBTPU_INIT_ARGS held.

--devices: XLA:CPU compiles for that many virtual devices; its buffer assignment stands in
for a GPU's (TPU and GPU compilers fuse and lay out differently: weights and optimizer state
are exact, temporaries are an estimate).

FLOPs (mgjax.flops, as the train log counts them): the model FLOPs (analytic, MaxText's
convention: what MFU divides) for a batch whose every token and image slot is real, and the
hardware FLOPs (XLA's cost analysis of the compiled step: what HFU divides). A step with loops
(a scanned decoder, the chunked loss, gradient accumulation; on v5e and v6e the compiler's
windowed-einsum loops for FSDP's collective matmuls) takes its hardware FLOPs and modelled step
time from loop-free twins with one and two decoder layers; the memory figures are the program's
as it would run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from mgjax import fit, tpu_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/stage2.py:model=mgm_8b.")
_DEVICES = flags.DEFINE_integer(
    "devices", 8, "Without --target: how many virtual CPU devices the planned "
    "topology has (the mesh is built on them).")
_TARGET = flags.DEFINE_string(
    "target", None, "A TPU accelerator type as gcloud spells it (v5p-8, v5litepod-8 "
    "or v5e-8, v6e-8, v4-8, v5p-16, ...): compile with the TPU compiler for it.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures as JSON to this path.")
_DECODING = flags.DEFINE_bool(
    "decoding", False, "Also size evaluation's decoding (mgjax.decoding_plan): eval.batch_size prompts of "
    "data.seq_len tokens, eval.max_new_tokens new tokens each, on the same devices and weight layout.")
_COSTS = flags.DEFINE_bool(
    "costs", True, "Count the step's hardware FLOPs and the TPU cost model's step time (for a scanned "
    "decoder from two loop-free twins: two more compiles). --nocosts: memory and model FLOPs only, "
    "in one compile.")
flags.mark_flags_as_required(["config"])

GiB = 1024**3
# The devices a CPU plan is checked against: (label, device kind for mgjax.throughput's peak
# table, memory of one JAX device in GiB).
ACCELERATORS: tuple[tuple[str, str, float], ...] = (
    ("TPU v4", "TPU v4", 32.0),
    ("TPU v5e", "TPU v5e", 16.0),
    ("TPU v5p", "TPU v5p", 95.0),
    ("TPU v6e", "TPU v6e", 32.0),
    ("H100 80GB", "H100", 80.0),
    ("H200", "H200", 141.0),
)


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  topology: str  # the generation's name in a topology string ("v5p:2x2x1")
  cores_per_chip_in_name: int  # v4-8 and v5p-8 count TensorCores (2 a chip); v5e-8, v6e-8 chips
  dims: int  # the torus: 3-D (v4, v5p) or 2-D (v5e, v6e)
  peak_tflops: float  # dense bf16 per chip
  hbm_gib: float  # per chip


TPU_GENERATIONS = {
    "v4": TpuGeneration("v4", 2, 3, 275.0, 32.0),
    "v5p": TpuGeneration("v5p", 2, 3, 459.0, 95.0),
    "v5e": TpuGeneration("v5e", 1, 2, 197.0, 16.0),
    "v5litepod": TpuGeneration("v5e", 1, 2, 197.0, 16.0),
    "v6e": TpuGeneration("v6e", 1, 2, 918.0, 32.0),
}


def tpu_topology(accelerator_type: str) -> tuple[TpuGeneration, str, int]:
  """'v5p-8' -> (generation, 'v5p:2x2x1', 4 chips): gcloud's name to a topology string.

  Slices grow as Cloud TPU's do, the shortest side doubling (the last of equals): v4/v5p
  2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v5e/v6e 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ...
  """
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator_type.strip().lower())
  if not match:
    raise ValueError(f"--target={accelerator_type!r}: expected a TPU accelerator type such as v5p-8, "
                     f"v5litepod-8 (or v5e-8), v6e-8, v4-8; known generations: {sorted(TPU_GENERATIONS)}")
  gen = TPU_GENERATIONS[match.group(1)]
  count = int(match.group(2))
  chips = count // gen.cores_per_chip_in_name
  if chips < 1 or count % gen.cores_per_chip_in_name or chips & (chips - 1):
    raise ValueError(f"--target={accelerator_type!r}: {match.group(1)} slices come in powers of two"
                     f"{' of TensorCores, two a chip' if gen.cores_per_chip_in_name == 2 else ' of chips'}")
  if gen.dims == 3 and chips < 4:
    raise ValueError(f"--target={accelerator_type!r}: the smallest {match.group(1)} slice is "
                     f"{match.group(1)}-8 (4 chips)")
  shape = {1: [1, 1], 2: [1, 2]}.get(chips, [2, 2] + [1] * (gen.dims - 2))
  while math.prod(shape) < chips:
    # Double the shortest side, the last of equals: 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4.
    shortest = min(shape)
    shape[max(i for i, n in enumerate(shape) if n == shortest)] *= 2
  return gen, f"{gen.topology}:{'x'.join(map(str, shape))}", chips


def _use_virtual_devices(n: int) -> None:
  """XLA reads the device count once, when jax initialises its CPU backend: before that."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  # The program is compiled, never run: skip LLVM's optimisation of the CPU code. Memory
  # figures come from XLA's buffer assignment, before LLVM, and do not change (checked on
  # the sample: same bytes, a third less compile time).
  # XLA:CPU's default scheduler favours concurrency over memory (it starts all-gathers and
  # other independent work early, holding their buffers); TPU/GPU compilers schedule for
  # memory when it is short, so ask for the memory-minimising order (sample: 31 -> 25 MiB).
  extra = [
      "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
      "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  ]
  extra = [f for f in extra if f.split("=")[0] not in " ".join(kept)]
  os.environ["XLA_FLAGS"] = " ".join(kept + extra + [f"--xla_force_host_platform_device_count={n}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


# LIBTPU_INIT_ARGS when this process first asked libtpu for a topology: libtpu reads its flags
# then, once, and compiles every later program with them.
_libtpu_init_args: str | None = None


def tpu_devices(accelerator_type: str) -> list:
  """The devices of a TPU slice, for compiling only (jax.experimental.topologies + libtpu)."""
  from jax.experimental import topologies

  global _libtpu_init_args
  _, topology, _ = tpu_topology(accelerator_type)
  if _libtpu_init_args is None:
    _libtpu_init_args = os.environ.get("LIBTPU_INIT_ARGS", "")
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for processes that drive a
  # real TPU; compiling drives none, so several plans (and tests) may compile at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # libtpu missing or too old: say how to get it
    raise RuntimeError(f"compiling for {accelerator_type} needs the TPU compiler (libtpu): "
                       f"pip install -e '.[tpu]' ({type(e).__name__}: {e})") from e


@dataclasses.dataclass
class CompiledStep:
  compiled: object
  setup: object  # mgjax.train_step.StepSetup
  batch: dict
  seconds: float  # lower + compile


def step_setup(config, devices: list, *, unroll_loops: bool = False):
  """(mgjax.train_step.StepSetup, batch spec) of config's train step on `devices`: the very step
  train.run jits, on the batch the pipeline yields; unroll_loops traces the micro-batch and
  chunked-loss loops as straight-line code (mgjax.flops's cost twins)."""
  from mgjax import sharding, train_step
  from mgjax.data import pipeline
  from mgjax.models import attention

  mesh = sharding.make_mesh(config.mesh, devices)
  model_cfg = config.model.copy_and_resolve_references()
  model_cfg.attention = attention.for_run(model_cfg.get("attention", "auto"), devices[0].platform,
                                          packed=config.data.packing)
  setup = train_step.setup(config, model_cfg, mesh, config.train.steps, unroll_loops=unroll_loops)
  return setup, pipeline.batch_spec(config.data, model_cfg, sharding.batch_sharding(mesh))


def compile_train_step(config, devices: list, *, unroll_loops: bool = False,
                       compiler_options: dict | None = None) -> CompiledStep:
  """config's train step (see `step_setup`) compiled for `devices` on abstract values."""
  setup, batch = step_setup(config, devices, unroll_loops=unroll_loops)
  started = time.perf_counter()
  # Progress on stderr: a big model's compile takes minutes (a plan compiles up to three).
  print(f"plan: compiling the train step for {len(devices)} x {devices[0].device_kind} ...", file=sys.stderr,
        flush=True)
  compiled = setup.compile_train_step(batch, compiler_options=compiler_options)
  print(f"plan: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
  return CompiledStep(compiled, setup, batch, time.perf_counter() - started)


def plan(config, num_devices: int | None = None, *, target: str | None = None, decoding: bool = False,
         costs: bool = True) -> dict:
  """Compiles config's train step for `num_devices` virtual CPU devices or a TPU `target`;
  returns per-device figures; with `decoding`, evaluation's decoding's too ("decoding")."""
  import jax

  if target:
    gen, topology, chips = tpu_topology(target)
    devices = tpu_devices(target)
  else:
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
      raise RuntimeError(f"{num_devices} devices asked for, jax has {len(devices)}: run mgjax.plan as its own "
                         "process (it sets --xla_force_host_platform_device_count before jax starts)")
  try:
    step = compile_train_step(config, devices)
  except Exception as e:  # any error: a refusal is reported, the rest re-raised
    # The TPU compiler refuses a program that does not fit the chip's memory.
    if target and "hbm" in str(e).lower() and ("RESOURCE_EXHAUSTED" in str(e) or "exceed" in str(e).lower()):
      return {
          "target": target,
          "topology": topology,
          "fits": False,
          "refused": _first_line_with(str(e), "hbm"),
          "devices": len(devices),
          "chips": chips,
          "device_hbm_gib": gen.hbm_gib * chips / len(devices),
          "required_bytes": _required_bytes(str(e)),
          "tpu_flags": compiled_with_tpu_flags(),
      }
    raise
  step_costs = {"flops": None, "modelled_seconds": None}
  if costs:
    started = time.perf_counter()
    print("plan: counting the step's FLOPs (loop-free twins where it loops, mgjax.flops) ...", file=sys.stderr,
          flush=True)
    step_costs = step.setup.hardware_costs(step.batch, step.compiled)
    print(f"plan: counted in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
  b, t, m = config.data.batch_size, config.data.seq_len, config.data.max_images
  # Every token and image slot real: the most the model FLOPs of a batch can be.
  model_flops = step.setup.model_flops(t)(b * t, b * m) / len(devices)

  def bytes_per_device(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

  memory = step.compiled.memory_analysis()
  num_params = sum(x.size for x in jax.tree.leaves(step.setup.abstract_params))
  out = {
      "mesh": dict(step.setup.mesh.shape),
      "num_params": num_params,
      "batch": {
          "global": b,
          "seq_len": t,
          "image_slots": config.data.max_images,
          "tokens": b * t,
          "grad_accum_steps": config.train.grad_accum_steps
      },
      "attention": _attention_used(config, devices),
      "scan_layers": bool(config.model.llm.get("scan_layers", False)),
      "remat": config.model.llm.get("remat", "none"),
      "params_bytes": bytes_per_device(step.setup.abstract_params),
      "opt_state_bytes": bytes_per_device(step.setup.abstract_opt_state),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "host_temp_bytes": memory.host_temp_size_in_bytes,
      # The optimizer state when it lives in host memory (optim.offload).
      "host_argument_bytes": memory.host_argument_size_in_bytes,
      # Donated inputs alias outputs: they are only counted once.
      "peak_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes +
                    memory.temp_size_in_bytes,
      # The compiler's own peak, from its buffer assignment: what is live at once. It can be well
      # below the sum above, which counts every argument and every temporary for the whole step:
      # the TPU compiler accepts Llama-2-7B on v5e-8 at 16.91 GiB summed (14.77 GiB here) on a
      # 16 GiB chip, so this is the figure to hold against the chip.
      "compiler_peak_bytes": memory.peak_memory_in_bytes,
      "compile_seconds": step.seconds,
      # Pallas kernels in the program (splash attention on TPU).
      "pallas_kernels": step.compiled.as_text().count('custom_call_target="tpu_custom_call"'),
      "model_flops_per_device": model_flops,
      "hardware_flops_per_device": step_costs["flops"],
      "modelled_step_seconds": step_costs["modelled_seconds"],
  }
  out["levers"] = fit.lever_savings(config, out)
  if decoding:
    from mgjax import decoding_plan

    print("plan: compiling evaluation's decoding ...", file=sys.stderr, flush=True)
    out["decoding"] = decoding_plan.plan_decoding(config, step.setup, step.batch)
  if target:
    devices_per_chip = len(devices) / chips
    peak = gen.peak_tflops / devices_per_chip
    out.update({
        "target": target,
        "topology": topology,
        "chips": chips,
        "device_kind": devices[0].device_kind,
        "device_hbm_gib": gen.hbm_gib / devices_per_chip,
        "device_peak_tflops": peak,
        "fits": True,
        "tpu_flags": compiled_with_tpu_flags(),
        # Collectives the compiler fused with the compute they overlap (mgjax.tpu_flags).
        "async_collective_fusions": _async_collective_fusions(step.compiled.as_text()),
    })
    if out["modelled_step_seconds"]:
      peak_flops = out["modelled_step_seconds"] * peak * 1e12
      out["modelled_mfu"] = model_flops / peak_flops
      if step_costs["flops"]:
        out["modelled_hfu"] = step_costs["flops"] / peak_flops
  return out


def compiled_with_tpu_flags() -> list[str]:
  """The flags libtpu was started with in this process (LIBTPU_INIT_ARGS, split), --undefok
  left out; [] before any TPU compile."""
  return [f for f in (_libtpu_init_args or "").split() if f.partition("=")[0] not in ("--undefok", "-undefok")]


def _async_collective_fusions(hlo: str) -> int:
  """How many async collective fusions (a collective fused with the computation it overlaps,
  mgjax.tpu_flags) the compiled program's text has: the fusion instructions that call one (a
  loop body's counted once)."""
  return hlo.count("calls=%async_collective_fusion")


def _attention_used(config, devices) -> str:
  from mgjax.models import attention

  return attention.chosen(config.model.get("attention", "auto"), devices[0].platform, config.data.seq_len,
                          packed=config.data.packing)


def _required_bytes(message: str) -> int:
  """The memory per device a refused TPU compile says the program needs (0: it does not say):
  "...the total memory required for HLO temporaries (32.58G) exceeds available HBM (15.75G)"
  (which counts the arguments too: 33.0 GiB peak on a v5p that fits the same program), or
  "Used 15.80G of 15.75G hbm"."""
  match = (re.search(r"total memory required for HLO temporaries \(([\d.]+)([KMGT])\)", message) or
           re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", message))
  return round(float(match.group(1)) * 1024**("KMGT".index(match.group(2)) + 1)) if match else 0


def _first_line_with(text: str, word: str) -> str:
  lines = [line.strip() for line in text.splitlines() if word in line.lower()]
  return lines[0] if lines else text.strip().splitlines()[0]


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

  if p.get("fits") is False:
    return (f"{p['target']} ({p['topology']}): does NOT fit; the TPU compiler refused the program:\n"
            f"  {p['refused']}\n" + fit.format_advice(config, p["devices"], p, device_bytes=p["device_hbm_gib"] * GiB,
                                                      slice_name=lambda n: slice_name(p["target"], p["devices"], n)))
  batch = p["batch"]
  lines = [
      f"parameters {_count(p['num_params'])} (weights float32, compute {config.model.dtype})",
      f"mesh {p['mesh']} = {_num_devices(p)} devices; global batch {batch['global']} x {batch['seq_len']} "
      f"tokens, {batch['image_slots']} image slot(s) per row, grad_accum_steps {batch['grad_accum_steps']}",
      f"attention {p['attention']}, remat {p['remat']}, scan_layers {p['scan_layers']}; "
      f"compiled in {p['compile_seconds']:.0f} s",
      "per device" + (f" (TPU compiler, {p['target']} = {p['topology']}, {p['device_kind']}):"
                      if "target" in p else " (XLA:CPU's buffer assignment: an estimate of a GPU's):"),
      f"  weights           {_bytes(p['params_bytes'])}",
      f"  optimizer state   {_bytes(p['opt_state_bytes'])}" +
      ("  (in host memory between steps: optim.offload)" if config.optim.get("offload") else ""),
      f"  temporaries       {_bytes(p['temp_bytes'])}  (activations, gradients, compiler buffers)",
      f"  peak              {_bytes(p['peak_bytes'])}  (arguments, outputs not aliased to them, temporaries)",
  ]
  if p.get("compiler_peak_bytes"):
    lines.append(
        f"  compiler's peak   {_bytes(p['compiler_peak_bytes'])}  (what its buffer assignment has live at once)")
  if p.get("host_argument_bytes"):
    lines.append(f"  host memory       {_bytes(p['host_argument_bytes'])}  (the optimizer state, optim.offload: "
                 "not in the peak)")
  if p.get("host_temp_bytes"):
    lines.append(f"  host memory       {_bytes(p['host_temp_bytes'])}  (offloaded activations)")
  model, hardware = p["model_flops_per_device"], p["hardware_flops_per_device"]
  devices, tokens = _num_devices(p), batch["tokens"]
  lines.append(f"  model FLOPs       {_count(model, 'FLOP')} per step ({_count(model * devices, 'FLOP')} on all "
               f"devices, {_count(model * devices / tokens, 'FLOP')} per token): what MFU divides, every token and "
               "image slot real")
  if hardware:
    lines.append(f"  hardware FLOPs    {_count(hardware, 'FLOP')} per step ({_count(hardware * devices, 'FLOP')} on "
                 f"all devices, {_count(hardware * devices / tokens, 'FLOP')} per token slot): what HFU divides, "
                 "XLA's count")
  if "decoding" in p:
    from mgjax import decoding_plan

    lines += decoding_plan.format_decoding(p["decoding"], _bytes,
                                           p["device_hbm_gib"] * GiB if "device_hbm_gib" in p else None)
  if "target" in p:
    hbm = p["device_hbm_gib"]
    lines.append(f"  compiler flags    {len(p['tpu_flags'])} in LIBTPU_INIT_ARGS (mgjax.tpu_flags; --tpu_flags=False: "
                 f"without), {p['async_collective_fusions']} collective(s) fused with compute")
    # The compiler's own peak where it gives one: it accepts programs whose sum is above the chip.
    name, held = ("the compiler's peak",
                  p["compiler_peak_bytes"]) if p.get("compiler_peak_bytes") else ("peak", p["peak_bytes"])
    lines.append(f"  fits: {name} {held / GiB:.1f} of {hbm:.0f} GiB ({held / GiB / hbm:.0%}); the compiler accepted it")
    if p.get("modelled_step_seconds"):
      utilisation = ", ".join(
          f"{name} {p[key]:.2f}" for name, key in (("MFU", "modelled_mfu"), ("HFU", "modelled_hfu")) if key in p)
      lines.append(f"  modelled step     {p['modelled_step_seconds']:.3f} s (the TPU cost model's): {utilisation} of "
                   f"{p['device_peak_tflops']:.0f} TFLOP/s")
    elif p.get("hardware_flops_per_device") is None:
      lines.append("  modelled step     not counted (--nocosts)")
    else:
      lines.append("  modelled step     none: the TPU cost model gave no usable time for this program")
    return "\n".join(lines + _lever_lines(p))
  lines += _lever_lines(p)
  lines.append("on devices of (fits: peak within 90% of memory; step time: the hardware FLOPs at the peak, "
               "100% HFU; the model FLOPs at 40% MFU):")
  for name, kind, hbm in ACCELERATORS:
    peak = throughput.vendor_peak_tflops(kind) * 1e12
    fits = "fits" if p["peak_bytes"] <= 0.9 * hbm * GiB else "does NOT fit"
    timing = f"  {hardware / peak:.3g} s, {model / (0.4 * peak):.3g} s" if hardware else ""
    lines.append(f"  {name:<10} {hbm:>4.0f} GiB  {fits:<13}{timing}")
  smallest = min((a for a in ACCELERATORS if p["peak_bytes"] > 0.9 * a[2] * GiB), key=lambda a: a[2], default=None)
  if smallest:  # what would make it fit the smallest device it does not fit
    lines.append(
        fit.format_advice(config, _num_devices(p), p, device=f"{smallest[0]} ({smallest[2]:.0f} GiB)",
                          device_bytes=smallest[2] * GiB))
  return "\n".join(lines)


def _lever_lines(p: dict) -> list[str]:
  """What each of mgjax's memory levers saves (mgjax.fit.lever_savings), on or off."""
  lines = ["memory levers (device memory each saves per device, estimated from shapes):"]
  for lever in p.get("levers", ()):
    state = "on, saves" if lever["on"] else f"off ({lever['flag']}), would save"
    lines.append(f"  {lever['key']:<25} {state} about {_bytes(lever['saves_bytes'])}: {lever['what']}")
  return lines


def _num_devices(p: dict) -> int:
  return math.prod(p["mesh"].values())


def slice_name(target: str, num_devices: int, n: int) -> str:
  """The accelerator type of the slice of `target`'s generation with n devices, as `target` has
  num_devices: slice_name("v5p-8", 4, 16) == "v5p-32"."""
  gen, _, chips = tpu_topology(target)
  name = target.strip().lower().rsplit("-", 1)[0]
  n_chips = max(round(n * chips / num_devices), 4 if gen.dims == 3 else 1)
  return f"{name}-{n_chips * gen.cores_per_chip_in_name}"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _TARGET.value:
    tpu_topology(_TARGET.value)  # a misspelt target fails before anything is compiled
    # The TPU compiler runs on this host's CPU: jax must not look for a TPU to run on.
    os.environ["JAX_PLATFORMS"] = "cpu"
    if tpu_flags.ENABLED.value:
      # The trainer's flags on a TPU, for the same program; libtpu reads them when it loads.
      tpu_flags.set_libtpu_init_args(os.environ)
  else:
    _use_virtual_devices(_DEVICES.value)
  config = _CONFIG.value
  if _TARGET.value:
    import jax

    # A TPU executable compiled here cannot be loaded back here: don't write it to a cache.
    jax.config.update("jax_enable_compilation_cache", False)
  result = plan(config, _DEVICES.value, target=_TARGET.value, decoding=_DECODING.value, costs=_COSTS.value)
  print(format_plan(result, config), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)
  if not result.get("fits", True):
    raise SystemExit(1)


if __name__ == "__main__":
  from mgjax import runtime
  app.run(main, flags_parser=runtime.parse_flags)
