"""Process-wide settings shared by every entry point (main, recipe)."""

from __future__ import annotations

import os
import sys

from absl import flags

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.expanduser("~/.cache/mgjax/xla"),
    "Persistent XLA compilation cache: a restarted run or the next stage reuses compiled steps. Empty disables it.")


def setup() -> None:
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
