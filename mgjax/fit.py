"""What to change when a config does not fit a device's memory: mgjax.plan's advice.

First what has to fit whatever else changes: the weights and optimizer state per device, and
the smallest slice that holds the run once they are split over all of it (FSDP). Then the
levers, each with the flags that pull it and, where the plan measured the figures, about how
much it saves per device; a lever is named only when its estimate lowers memory:
  FSDP over all devices   weights and optimizer state split over every device, not a few
  a bf16 first moment     Adam's first moment in bfloat16: a quarter off the optimizer state
  optimizer offload       the optimizer state in host memory between steps (optim.offload)
  LoRA                    only low-rank adapters train and carry optimizer state (changes the recipe)
  rematerialisation       the backward pass recomputes activations instead of keeping them
  gradient accumulation   from one micro-batch to two, when half the activations outweigh the
                          float32 gradient accumulator it adds
  a smaller batch         fewer rows per device (changes the training recipe)

Not advised once a run accumulates gradients: fewer rows per micro-batch, by more micro-batches
or a smaller batch. Past a few rows per device the gradients, their accumulator and the weight
copies, not the activations, fill the temporaries, and more micro-batches only add buffers
(mgm_2b on v5e-4: temporaries rose from 23.5 to 28.6 GiB going from 8 to 16 micro-batches).
"""

from __future__ import annotations

import math
from typing import Any, Callable

GiB, MiB = 2**30, 2**20


def size(n: float) -> str:
  """Bytes in GiB, or MiB below one GiB."""
  return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


# The share of a device's memory a run may plan to use (mgjax.plan's "fits": peak within 90%).
FIT_SHARE = 0.9


def state_bytes(config) -> dict[str, int]:
  """The whole run's weights, optimizer state and gradients (of what trains; `llm_gradients`:
  of the LLM's weights) in bytes, summed over all devices, from shapes alone: the setup the
  train step uses (freezing, LoRA), on one device, nothing compiled or allocated."""
  import jax
  import ml_collections

  from mgjax import optim, sharding, train_step
  from mgjax.checkpoint import path_str

  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  setup = train_step.setup(config, config.model.copy_and_resolve_references(), mesh, max(int(config.train.steps), 1))
  nbytes = lambda leaves: sum(x.size * x.dtype.itemsize for x in leaves)
  view = setup.trainable
  labels = jax.tree.leaves(optim.frozen_labels(view.abstract, view.freeze))
  trained = [(path_str(path), x)
             for (path, x), label in zip(jax.tree_util.tree_flatten_with_path(view.abstract)[0], labels)
             if label == "trainable"]
  return {
      "params": nbytes(jax.tree.leaves(setup.abstract_params)),
      "opt_state": nbytes(jax.tree.leaves(setup.abstract_opt_state)),
      "gradients": nbytes(x for _, x in trained),
      "llm_gradients": nbytes(x for path, x in trained if path.startswith("llm/")),
  }


def advice(config, num_devices: int, plan: dict[str, Any] | None = None, *, device_bytes: float | None = None,
           slice_name: Callable[[int], str] | None = None) -> list[str]:
  """Changes that would make `config` take less memory per device on `num_devices` devices,
  as lines of flags and reasons.

  plan: mgjax.plan's figures (sizes per device when it compiled; a refused TPU compile may
    carry the temporaries the compiler asked for); what it lacks is worked out from shapes.
  device_bytes: one device's memory: names the smallest slice that would hold the run.
  slice_name: n devices -> the slice's name (a TPU accelerator type), for that line.
  """
  from mgjax import sharding

  plan = plan or {}
  state = plan.get("state") or state_bytes(config)
  mesh = plan.get("mesh") or dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  split = mesh.get("fsdp", 1) * mesh.get("tensor", 1)  # the ways each weight is split (small ones stay whole)
  shards = mesh.get("data", 1) * mesh.get("fsdp", 1)  # sharding.BATCH_AXES
  params = plan["params_bytes"] if "params_bytes" in plan else state["params"] / split
  opt_state = plan["opt_state_bytes"] if "opt_state_bytes" in plan else state["opt_state"] / split
  grads = state["gradients"] / split
  total = state["params"] + state["opt_state"]
  # A refused compile may say what it needed in all per device: the temporaries are the rest.
  temp = plan.get("temp_bytes") or max(plan.get("required_bytes", 0) - params - opt_state, 0)
  # What halves with the rows per device: the temporaries but the float32 gradients and the
  # compute-dtype copy of the weights the compiler keeps for the forward and backward passes.
  weight_copy = params / 2 if config.model.get("dtype", "float32") == "bfloat16" else 0
  activations = max(temp - grads - weight_copy, 0)
  batch, accum = int(config.data.batch_size), int(config.train.grad_accum_steps)
  rows = batch // max(shards, 1) // accum  # rows per device per micro-batch

  head = (f"weights {size(params)} and optimizer state {size(opt_state)} per device ({size(total)} in all, "
          f"split {split} way{'s' if split > 1 else ''})")
  if device_bytes:
    # What FSDP splits: weights, optimizer state, gradients and the weights' compute copy.
    sharded = total + state["gradients"] + weight_copy * split
    head += "; " + _smallest_slice(sharded, activations if temp else None, rows, batch // accum, num_devices,
                                   device_bytes, slice_name)
  lines = [head]
  levers = []
  if split < num_devices:
    levers.append(f"shard weights and optimizer state over all {num_devices} devices (FSDP): "
                  f"--config.mesh.fsdp=-1 --config.mesh.data=1: weights and optimizer state "
                  f"{size(params + opt_state)} -> about {size(total / num_devices)}")
  offload = next(lever for lever in lever_savings(config, plan) if lever["key"] == "optim.offload")
  if plan and not offload["on"] and offload["saves_bytes"]:
    levers.append(f"{offload['what']}: {offload['flag']}: about {size(offload['saves_bytes'])} less device memory")
  if config.optim.get("mu_dtype", "float32") == "float32" and opt_state:
    # Adam's state is two float32 moments per trained weight: the first in bf16 saves a quarter.
    levers.append(f"keep Adam's first moment in bfloat16: --config.optim.mu_dtype=bfloat16: optimizer state "
                  f"{size(opt_state)} -> about {size(opt_state * 0.75)}")
  if config.lora.rank == 0 and state.get("llm_gradients"):  # full fine-tuning of the LLM
    adapters = config.copy_and_resolve_references()
    adapters.lora.rank = 16
    lora = state_bytes(adapters)
    levers.append(f"train LoRA adapters instead of the weights: --config.lora.rank=16 (changes the recipe: only "
                  f"the LLM's adapters train, mining and projector stay as they are): optimizer state "
                  f"{size(opt_state)} -> about {size(lora['opt_state'] / split)}, gradients {size(grads)} -> about "
                  f"{size(lora['gradients'] / split)}")
  if config.model.llm.get("remat", "none") in ("none", "", None):
    levers.append("recompute activations in the backward pass: --config.model.llm.remat=full (about a third more "
                  "compute; temporaries shrink to about one layer's)")
  # One micro-batch to two: half the activations, plus a float32 gradient accumulator (the
  # scan's carry). Only from one, only when the estimate falls (see the module docstring).
  if accum == 1 and rows >= 2 and rows % 2 == 0 and temp and activations / 2 > grads:
    levers.append(f"accumulate gradients: --config.train.grad_accum_steps=2 keeps the global batch of {batch} "
                  f"but puts {rows // 2} row(s) per device at a time instead of {rows}; temporaries {size(temp)} "
                  f"-> roughly {size(temp - activations / 2 + grads)} (half the activations, plus a gradient "
                  f"accumulator of {size(grads)})")
  if accum == 1 and rows >= 2 and (batch // 2) % shards == 0:
    saves = f"; temporaries {size(temp)} -> roughly {size(temp - activations / 2)}" if activations else ""
    levers.append(f"a smaller batch: --config.data.batch_size={batch // 2}, {rows // 2} row(s) per device at a time "
                  f"(changes the recipe: scale optim.lr with it){saves}")
  if not levers:
    levers.append("everything above is already in use: a shorter --config.data.seq_len, or more devices "
                  "(a bigger slice: FSDP splits the state over them)")
  if accum > 1:
    # Fewer rows per micro-batch (more of them, or a smaller batch) is not advised here: at
    # this point it was measured to raise the temporaries (see the module docstring).
    levers.append(f"not advised: fewer rows per micro-batch than {rows} (more grad_accum_steps than {accum}, or a "
                  "smaller batch): past a few rows per device the temporaries are gradients, their accumulator "
                  "and weight copies, and more micro-batches were measured to raise them")
  return lines + levers


def lever_savings(config, plan: dict[str, Any]) -> list[dict[str, Any]]:
  """The memory levers of mgjax's own (optim.mu_dtype, optim.offload, train.loss_vocab_sharded):
  for each, its config key, whether `config` has it on, and the device memory per device it
  saves (when on) or would save (when off), estimated from `plan`'s per-device optimizer state
  and mesh and the output projection's shape ([model.llm.hidden, model.vocab_size]); a compile
  with and without it gives the exact figure.
  The optimizer state is live for the whole step, so its levers lower the peak by what they
  save; the vocabulary-split loss saves only while the loss runs, so it lowers the peak only
  where the loss phase is the peak, and the advice does not name it.
  """
  mesh = plan.get("mesh") or {}
  n = math.prod(mesh.values()) if mesh else 1
  opt_state = plan.get("opt_state_bytes", 0)
  mu_bf16 = config.optim.get("mu_dtype", "float32") == "bfloat16"
  # Two moments: float32 both (8 bytes a trained weight), or the first in bf16 (6 bytes).
  first_moment = opt_state * (2 / 6 if mu_bf16 else 4 / 8)
  hidden, vocab = int(config.model.llm.hidden), int(config.model.vocab_size)
  splits = n > 1 and vocab % n == 0
  out = [
      dict(key="optim.mu_dtype", flag="--config.optim.mu_dtype=bfloat16", on=mu_bf16, saves_bytes=first_moment / 2,
           what="Adam's first moment in bfloat16"),
      dict(
          key="optim.offload", flag="--config.optim.offload=True", on=bool(config.optim.get("offload", False)),
          saves_bytes=opt_state, what="the optimizer state in host memory between steps (at most: the compiler "
          "may hold it on the device for the update; plan it)"),
  ]
  if splits:
    # The gathered bf16 projection and its float32 gradient partial, whole on every device, less
    # the slice of each that stays.
    out.append(
        dict(
            key="train.loss_vocab_sharded", flag="--config.train.loss_vocab_sharded=True",
            on=bool(config.train.get("loss_vocab_sharded", False)), saves_bytes=hidden * vocab * 6 * (1 - 1 / n),
            what=f"the output projection split over the vocabulary in the loss ({vocab} / {n} devices), while "
            "the loss runs: the peak falls only where the loss is the peak"))
  return out


def _smallest_slice(sharded: float, activations: float | None, rows: int, micro_batch: int, num_devices: int,
                    device_bytes: float, slice_name: Callable[[int], str] | None) -> str:
  """The fewest devices (a power of two) whose memory holds `sharded` split over all of them plus
  the activations of their share of the same global batch.

  sharded: the run's weights, optimizer state and gradients, in all. activations: the rest of
  the temporaries per device at `rows` rows per device (None: not measured); on n devices a
  micro-batch of `micro_batch` rows puts micro_batch / n rows (at least one) on each.
  """
  budget = FIT_SHARE * device_bytes
  per_row = activations / max(rows, 1) if activations is not None else 0.0
  if per_row >= budget:
    return (f"no slice holds it: one row's activations (about {size(per_row)}) exceed {FIT_SHARE:.0%} of a "
            f"device's {size(device_bytes)}")
  n = 1
  while sharded / n + per_row * max(micro_batch // n, 1) > budget:
    n *= 2
  where = f"{n} device{'s' if n > 1 else ''} of {size(device_bytes)}"
  if n <= num_devices:
    where += ", so this slice does with FSDP over all of it"
  elif slice_name:
    where += f", {slice_name(n)}"
  if activations is None:
    return (f"weights, optimizer state and gradients alone need at least {where} ({size(sharded / n)} each; "
            f"activations come on top)")
  more = f"; a micro-batch must then have at least {n} rows" if n > micro_batch else ""
  return (f"the smallest slice that holds the run: {where} (weights, optimizer state and gradients "
          f"{size(sharded / n)} + activations about {size(per_row * max(micro_batch // n, 1))} per device{more})")


def format_advice(config, num_devices: int, plan: dict[str, Any] | None = None, *, device: str = "",
                  device_bytes: float | None = None, slice_name: Callable[[int], str] | None = None) -> str:
  """The advice as an indented block under a heading."""
  head = f"to fit {device}, one or more of:" if device else "to fit, one or more of:"
  lines = advice(config, num_devices, plan, device_bytes=device_bytes, slice_name=slice_name)
  return "\n".join([head] + [f"  - {line}" for line in lines])
