"""Test-wide environment: must run before anything imports jax."""

import os
import tempfile

# 8 virtual CPU devices for the sharding tests; XLA reads this once, at jax import.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# No test may wait on the network (Hugging Face hub lookups fail at once instead).
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Compiled train steps are shared by the tests that run the same shapes (XLA compiling
# dominates a tiny run on CPU); subprocess runs get the same folder by flag.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'mgjax-test-xla-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
