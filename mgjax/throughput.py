"""How close a run is to the hardware's limit: tokens/s, TFLOP/s, MFU and HFU per device.

Two FLOP counts of the train step (mgjax.flops), each against one device's peak:
  mfu  model FLOPs utilisation: the analytic FLOPs the model needs for the real tokens and
       images trained on (6 x trained weights x tokens, attention, the towers that run; no
       padding, no recomputation), MaxText's and PaLM's convention: the one to compare with
       published MFU figures.
  hfu  hardware FLOPs utilisation: the FLOPs XLA executes (its cost analysis of the compiled
       step, per device under SPMD): remat's recomputation, padded slots, everything.

The peak is the dense bf16 matmul peak of one device (the convention of PaLM and MaxText),
from the vendor table below; on CPU it is the float32 matmul rate measured on this machine,
shared among the virtual devices (`--xla_force_host_platform_device_count`).
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # the module itself stays light: jax alone
  from mgjax.flops import StepFlops

# Dense bf16 TFLOP/s of one JAX device, matched against `device.device_kind` (first match).
# A TPU v4/v5p chip is one device (megacore); v5e/v6e ("lite") chips have one TensorCore.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports itself as "TPU v5"
    ("TPU v4", 275.0),
    ("H200", 989.0),  # SXM, dense (no sparsity)
    ("H100", 989.0),
)


@functools.cache
def measured_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
  """This machine's float32 matmul rate (all cores, one JAX CPU device), best of `repeats`."""
  device = jax.local_devices(backend="cpu")[0]
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e12


def peak_tflops_per_device(device: Any = None, override: float = 0.0) -> float | None:
  """The peak one device is measured against; None when the device is unknown (no MFU)."""
  if override > 0:
    return override
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    return measured_matmul_tflops() / jax.local_device_count()
  return vendor_peak_tflops(device.device_kind)


def vendor_peak_tflops(device_kind: str) -> float | None:
  """The PEAK_TFLOPS entry matching a device kind, or None."""
  for kind, peak in PEAK_TFLOPS:
    if kind.lower() in device_kind.lower():
      return peak
  return None


def rates(*, steps: int, seconds: float, tokens: float, images: float, flops: StepFlops | None,
          peak_tflops: float | None, num_devices: int) -> dict[str, float]:
  """The per-device rates of a window of `steps` steps that took `seconds` and fed `tokens`
  real (non-padding) tokens and `images` real images in all; FLOP-based ones when known."""
  out = {"tokens_per_s_per_device": tokens / seconds / num_devices}
  if flops is None:
    return out
  tflops = {"model": flops.model(tokens, images) / num_devices / seconds / 1e12}
  if flops.hardware_per_device:
    tflops["hardware"] = flops.hardware_per_device * steps / seconds / 1e12
  for kind, utilisation in (("model", "mfu"), ("hardware", "hfu")):
    if kind in tflops:
      out[f"{kind}_tflops_per_device"] = tflops[kind]
      if peak_tflops:
        out[utilisation] = tflops[kind] / peak_tflops
  return out


class Window:
  """The steps since the last log line: their losses, real tokens, token slots and input ids
  (where the real images are counted, once the step's FLOPs say which id is an image), and time.

  Losses stay device arrays until `close`, so the loop never waits for the device between
  logs; time spent compiling or evaluating is left out (`reset_clock`, `exclude`), so rates
  measure training alone.
  """

  def __init__(self, num_processes: int = 1):
    self.num_processes = num_processes
    self.restart()

  def restart(self) -> None:
    self.losses, self.router_losses, self.tokens, self.slots, self.input_ids = [], [], 0.0, 0, []
    self.started = time.time()

  def exclude(self, seconds: float) -> None:
    self.started += seconds

  def reset_clock(self) -> None:
    """Times from now on (after compiling), keeping the steps and tokens counted so far."""
    self.started = time.time()

  def add_batch(self, local_batch: dict[str, np.ndarray]) -> None:
    """This process's batch: every process feeds the same number of rows."""
    self.tokens += float(local_batch["segment_ids"].astype(bool).sum()) * self.num_processes
    self.slots += local_batch["segment_ids"].size * self.num_processes
    self.input_ids.append(local_batch["input_ids"])

  def add_metrics(self, step_metrics: dict[str, Any]) -> None:
    self.losses.append(step_metrics["loss"])
    if "router_aux_loss" in step_metrics:
      self.router_losses.append(step_metrics["router_aux_loss"])

  def close(self, *, flops: StepFlops | None, peak_tflops: float | None, num_devices: int) -> dict[str, float]:
    """The window's train metrics (mean loss, rates, token efficiency); starts the next window.

    flops: the train step's (mgjax.train_step.StepSetup.step_flops), None before it is known.
    """
    losses = [float(l) for l in self.losses]  # waits for the device: timing is honest
    elapsed = time.time() - self.started
    images = sum(flops.model.images(ids) for ids in self.input_ids) * self.num_processes if flops else 0.0
    out = {
        "loss": float(np.mean(losses)),
        "last_loss": losses[-1],
        "tokens_per_s": self.tokens / elapsed,
        "steps_per_s": len(losses) / elapsed,
        # the share of token slots holding real tokens (not padding)
        "token_efficiency": self.tokens / max(self.slots, 1),
        **rates(steps=len(losses), seconds=elapsed, tokens=self.tokens, images=images, flops=flops, peak_tflops=peak_tflops, num_devices=num_devices),
    }
    if self.router_losses:
      out["router_aux_loss"] = float(np.mean([float(r) for r in self.router_losses]))
    self.restart()
    return out
