"""The peaks behind MFU and HFU in the log, and that every train log line has the rates (the
FLOP counts themselves: tests/test_flops.py)."""

import jax
import numpy as np

from mgjax import metrics, throughput


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
    assert r["tokens_per_s_per_device"] > 0 and r["model_tflops_per_device"] > 0 and r["mfu"] > 0
    assert r["hardware_tflops_per_device"] > 0 and r["hfu"] > 0
    # One device ran the stage1 fixture: per device is the whole run.
    np.testing.assert_allclose(r["tokens_per_s_per_device"], r["tokens_per_s"], rtol=1e-6)
