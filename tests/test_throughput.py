"""The FLOP counts behind TFLOP/s and MFU in the log, and that every train log line has them."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mgjax import metrics, throughput


def test_compiled_flops_are_per_device_under_sharding():
  n = 256
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  assert throughput.step_flops(matmul.lower(a, a).compile()) == 2 * n**3
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  rows_split = jax.device_put(a, NamedSharding(mesh, P("d")))
  # MFU divides by one device's peak: the SPMD program's count must be one device's share.
  assert throughput.step_flops(matmul.lower(rows_split, a).compile()) == 2 * n**3 / 8


def test_accumulated_flops_count_every_micro_batch():
  """A scan over micro-batches is counted once by XLA; the correction restores the rest."""
  w = jnp.ones((128, 128), jnp.float32)
  batch = jnp.ones((4, 32, 128), jnp.float32)  # 4 micro-batches of 32 rows

  def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w)**2)

  grad = jax.grad(loss)

  def accumulated_step(w, batch):
    total, _ = jax.lax.scan(lambda g, x: (g + grad(w, x), None), jnp.zeros_like(w), batch)
    return w - 0.1 * total

  def whole_batch_step(w, batch):
    return w - 0.1 * grad(w, batch.reshape(-1, 128))

  scanned = throughput.step_flops(jax.jit(accumulated_step).lower(w, batch).compile())
  micro = throughput.lowered_flops(jax.jit(grad).lower(w, batch[0]))
  whole = throughput.step_flops(jax.jit(whole_batch_step).lower(w, batch).compile())
  assert scanned < 0.5 * whole  # what XLA reports alone: about one micro-batch's worth
  np.testing.assert_allclose(throughput.accumulated_flops(scanned, micro, 4), whole, rtol=0.05)


def test_peak_table_and_cpu_measurement():

  class Device:
    platform, device_kind = "tpu", "TPU v5 lite"

  assert throughput.peak_tflops_per_device(Device()) == 197.0
  Device.device_kind = "TPU v4"
  assert throughput.peak_tflops_per_device(Device()) == 275.0
  Device.platform, Device.device_kind = "gpu", "NVIDIA H100 80GB HBM3"
  assert throughput.peak_tflops_per_device(Device()) == 989.0
  Device.device_kind = "Some Future Accelerator"
  assert throughput.peak_tflops_per_device(Device()) is None
  assert throughput.peak_tflops_per_device(Device(), override=123.0) == 123.0
  # CPU: the measured matmul rate, shared among the 8 virtual devices of the test session.
  cpu_peak = throughput.peak_tflops_per_device(jax.devices()[0])
  assert cpu_peak * 8 == throughput.measured_matmul_tflops() > 1e-3


def test_every_train_log_line_reports_throughput(stage1):
  train_lines = [r for r in metrics.read(stage1.workdir) if r["split"] == "train"]
  assert train_lines
  for r in train_lines:
    assert r["tokens_per_s_per_device"] > 0 and r["tflops_per_device"] > 0 and r["mfu"] > 0
    # One device ran the stage1 fixture: per device is the whole run.
    np.testing.assert_allclose(r["tokens_per_s_per_device"], r["tokens_per_s"], rtol=1e-6)
