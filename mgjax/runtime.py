"""Process-wide settings shared by every entry point (main, recipe)."""

from __future__ import annotations

import os
import sys

from absl import flags

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.expanduser("~/.cache/mgjax/xla"),
    "Persistent XLA compilation cache: a restarted run or the next stage reuses compiled steps. Empty disables it.")


# XLA:CPU runs matmul fusions through YNNPACK with this flag: the 110M train step of
# benchmarks/train_step.py took 5.46 s instead of 6.08 s on the 2-core dev machine (1.11x,
# 0.63 -> 0.69 of the matmul peak; see benchmarks/RESULTS.md). CPU-only: other backends
# ignore it. A user's own XLA_FLAGS setting of it wins.
_CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)


def setup() -> None:
  # Before anything starts an XLA backend: XLA reads XLA_FLAGS once.
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in _CPU_XLA_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  import jax
  from absl import logging as absl_logging

  # Orbax and TFDS log every file they touch at INFO; keep the terminal for the progress bar.
  absl_logging.set_verbosity(absl_logging.WARNING)
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  if _COMPILATION_CACHE.value:
    # Compiling the train step takes tens of seconds on a small CPU; stage 2 and
    # restarted runs compile the very same programs.
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a plain message for a --config.KEY the config does not have."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # what ml_collections raises for an unknown key
    detail = " ".join(str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'").split())
    sys.exit(f"error: unknown config key in the command line: {detail}\n"
             "Every --config.KEY=VALUE must name a field the config file defines (README: Configs).")
  except flags.Error as e:
    sys.exit(f"error: {e}\nRun with --helpfull to list the flags.")
