"""What to change when a config does not fit a device's memory: mgjax.plan's advice.

The usual levers, cheapest first, each with the flags that pull it and, where the plan
measured the figures, about how much it saves per device:
  FSDP over all devices   weights and optimizer state split over every device, not a few
  rematerialisation       the backward pass recomputes activations instead of keeping them
  gradient accumulation   the same global batch in micro-batches: fewer rows per device at once
  a smaller batch         fewer rows per device (changes the training recipe)
"""

from __future__ import annotations

import math
from typing import Any

GiB, MiB = 2**30, 2**20


def size(n: float) -> str:
  """Bytes in GiB, or MiB below one GiB."""
  return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def advice(config, num_devices: int, plan: dict[str, Any] | None = None) -> list[str]:
  """Changes that would make `config` take less memory per device on `num_devices` devices,
  as lines of flags and reasons; `plan` (mgjax.plan's figures, when it compiled) adds sizes."""
  plan = plan or {}
  mesh = plan.get("mesh") or {}
  fsdp = mesh.get("fsdp", config.mesh.fsdp if config.mesh.fsdp > 0 else num_devices)
  shards = mesh.get("data", 1) * mesh.get("fsdp", 1) if mesh else num_devices
  batch, accum = int(config.data.batch_size), int(config.train.grad_accum_steps)
  lines = []
  if fsdp < num_devices:
    state = plan.get("params_bytes", 0) + plan.get("opt_state_bytes", 0)
    saves = f": weights and optimizer state {size(state)} -> about {size(state * fsdp / num_devices)}" if state else ""
    lines.append(f"shard weights and optimizer state over all {num_devices} devices (FSDP): "
                 f"--config.mesh.fsdp=-1 --config.mesh.data=1{saves}")
  if config.model.llm.get("remat", "none") in ("none", "", None):
    lines.append("recompute activations in the backward pass: --config.model.llm.remat=full (about a third more "
                 "compute; temporaries shrink to about one layer's)")
  rows = batch // max(shards, 1) // accum  # rows per device per micro-batch
  temp = plan.get("temp_bytes", 0)
  if rows > 1:
    k = 2 * accum
    saves = f"; temporaries {size(temp)} -> roughly {size(temp / 2)}" if temp else ""
    lines.append(f"accumulate gradients: --config.train.grad_accum_steps={k} keeps the global batch of {batch} "
                 f"but puts {math.ceil(rows / 2)} row(s) per device at a time instead of {rows}{saves}")
    lines.append(f"or a smaller per-device batch: --config.data.batch_size={batch // 2} (changes the recipe: "
                 "scale optim.lr with it)")
  if not lines:
    lines.append("everything above is already in use: a shorter --config.data.seq_len, or more devices "
                 "(a bigger slice: FSDP splits the state over them)")
  return lines


def format_advice(config, num_devices: int, plan: dict[str, Any] | None = None, *, device: str = "") -> str:
  """The advice as an indented block under a heading."""
  head = f"to fit {device}, one or more of:" if device else "to fit, one or more of:"
  return "\n".join([head] + [f"  - {line}" for line in advice(config, num_devices, plan)])
