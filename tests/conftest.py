"""Test-wide environment: must run before anything imports jax."""

import os

# 8 virtual CPU devices for the sharding tests; XLA reads this once, at jax import.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# No test may wait on the network (Hugging Face hub lookups fail at once instead).
os.environ.setdefault('HF_HUB_OFFLINE', '1')
