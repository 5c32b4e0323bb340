"""Process-wide settings shared by every entry point (main, recipe)."""

from __future__ import annotations

import glob
import os
import platform
import sys
import traceback

from absl import flags

from mgjax import tpu_flags

_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.expanduser("~/.cache/mgjax/xla"),
    "Persistent XLA compilation cache: a restarted run or the next stage reuses compiled steps. Empty disables it.")

# XLA:CPU runs matmul fusions through YNNPACK with this flag: the 110M train step of
# benchmarks/train_step.py took 5.46 s instead of 6.08 s on the 2-core dev machine (1.11x,
# 0.63 -> 0.69 of the matmul peak; see benchmarks/RESULTS.md). CPU-only: other backends
# ignore it. A user's own XLA_FLAGS setting of it wins.
_CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)

# XLA:CPU allocates each step's temporaries afresh (2.3 GB for the 110M step of
# benchmarks/train_step.py) and glibc maps and unmaps them in 4 KB pages: 620K page faults and
# about 1.6 s of kernel time in every 6 s step on the 2-core dev machine (a VM, where memory
# given back costs more to get again). With glibc's hugetlb tunable, malloc asks for transparent
# huge pages on the memory it maps: 3K faults, and the step runs 1.1-1.2x faster
# (benchmarks/RESULTS.md). TPU and GPU steps keep their temporaries on the device, where this
# changes nothing.
_MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def malloc_tunables(environ: dict[str, str], thp_mode: str, libc: tuple[str, str]) -> str | None:
  """The GLIBC_TUNABLES value a training process should start with, or None to leave it as is.

  None where the tunable cannot work or the user chose: a libc other than glibc 2.35+ (which
  added it), transparent huge pages not in `madvise` mode (with `always` every mapping gets them
  already; with `never` none can), or a GLIBC_TUNABLES that sets hugetlb itself (a user's
  `glibc.malloc.hugetlb=0` turns this off).
  """
  name, version = libc
  try:
    if name != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
      return None
  except ValueError:  # a version string platform.libc_ver() could not read
    return None
  if "[madvise]" not in thp_mode:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in current:
    return None
  return ":".join(t for t in (current, _MALLOC_TUNABLE) if t)


def thp_mode() -> str:
  """The kernel's transparent huge page modes, the chosen one bracketed ("always [madvise] never");
  "" where the kernel has none or does not say."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read()
  except OSError:
    return ""


def has_accelerator() -> bool:
  """Whether this host has a TPU (/dev/accel*, /dev/vfio on v5e and later) or an NVIDIA GPU:
  its train step keeps temporaries on the device, and the malloc tunable would change nothing."""
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"))


def restart_with_malloc_tunables() -> None:
  """Re-executes this process once with `malloc_tunables`' setting, where it has one and the
  host has no accelerator; says so in one line on stderr.

  glibc reads GLIBC_TUNABLES only when a process starts, so a training program calls this first
  in its `__main__` block, before flags are parsed and JAX starts; never from library code, which
  would restart its host (pytest, a notebook kernel): `import mgjax...` never calls it. The
  process keeps its PID, arguments and open files. Opt out with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=0.
  """
  if any(a in HELP_FLAGS for a in sys.argv[1:]):
    return  # help trains nothing: no restart, and no line about one
  tunables = malloc_tunables(dict(os.environ), thp_mode(), platform.libc_ver())
  if tunables is None or has_accelerator():
    return
  print(
      f"mgjax: restarting with GLIBC_TUNABLES={tunables} (huge pages for XLA:CPU's step temporaries; "
      "GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out)", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


def runs_on_tpu() -> bool:
  """Whether JAX will start a TPU backend here: the host has a TPU (/dev/accel*, /dev/vfio on
  v5e and later) and JAX_PLATFORMS, where set, allows it."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.lower().split(","):
    return False
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def set_tpu_flags(enabled: bool | None = None) -> list[str]:
  """On a TPU, where enabled (default: --tpu_flags, itself True by default), adds mgjax.tpu_flags'
  compiler flags to LIBTPU_INIT_ARGS, keeping the user's; returns the names added. Before JAX
  starts its TPU backend, when libtpu reads the variable (once)."""
  if not ((tpu_flags.ENABLED.value if enabled is None else enabled) and runs_on_tpu()):
    return []
  return tpu_flags.set_libtpu_init_args(os.environ)


def cpu_only_without_accelerator() -> None:
  """JAX_PLATFORMS=cpu on a host with no TPU or GPU, unless the user set JAX_PLATFORMS.

  With libtpu installed (the test and tpu extras) JAX tries the TPU backend on every host, and
  on one without a TPU libtpu prints errors about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES
  before JAX falls back to the CPU. Called by the entry points while they parse flags (before
  any backend starts); the environment variable carries it to the processes they start.
  Library use (a notebook, a test) is left alone, as is `mgjax.plan --target`, which loads
  libtpu by itself to compile for a TPU.
  """
  if "JAX_PLATFORMS" in os.environ or has_accelerator():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # jax read the variable when it was imported: tell it too
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def set_xla_flags() -> None:
  """Adds `_CPU_XLA_FLAGS` to XLA_FLAGS; before anything starts an XLA backend, which reads it once."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in _CPU_XLA_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def prepare_backend() -> None:
  """What any program running mgjax needs before JAX starts a backend, flags or not (the
  lmms-eval model, which lmms-eval's own command line starts, calls this alone)."""
  set_xla_flags()
  from absl import logging as absl_logging

  # Orbax and TFDS log every file they touch at INFO; keep the terminal for the progress bar.
  absl_logging.set_verbosity(absl_logging.WARNING)
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()


def setup() -> None:
  """prepare_backend, the TPU compiler's flags (set_tpu_flags), and the persistent compilation
  cache of --compilation_cache."""
  set_tpu_flags()
  prepare_backend()
  import jax

  if _COMPILATION_CACHE.value:
    # Compiling the train step takes tens of seconds on a small CPU; stage 2 and
    # restarted runs compile the very same programs.
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def resolve_config_paths(argv: list[str]) -> list[str]:
  """`--config=configs/...` from any working directory: a config path that does not exist
  where the command runs, but does under the repository mgjax runs from, is taken from
  there (a path that exists where the command runs always wins)."""
  from mgjax import config_files
  repo = os.path.dirname(config_files.CONFIGS_DIR)
  out = []
  for a in argv:
    flag, sep, value = a.partition("=")
    if sep and flag in ("--config", "-config"):
      path, colon, arg = value.partition(":")
      if not os.path.exists(path) and os.path.exists(os.path.join(repo, path)):
        a = f"{flag}={os.path.join(repo, path)}{colon}{arg}"
    out.append(a)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with one line (and exit status 1) for what a user gets wrong: a config file
  that is missing or fails to load, a --config.KEY the config does not have, a bad flag value;
  and status 0 after printing help (absl exits 1 there, which reads as a failure to scripts)."""
  cpu_only_without_accelerator()
  argv = resolve_config_paths(argv)
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:
    if e.code == 1 and any(a in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except Exception as e:  # any error: reported in one line, or re-raised where it is not the user's
    # A --config.KEY=VALUE after a config file that did not open fails on that file.
    _refuse_unloaded_configs(argv)
    message = _config_file_error(e, argv) or _unknown_key_error(e)
    if message:
      sys.exit(message)
    if isinstance(e, flags.Error):
      sys.exit(f"error: {e}\nRun with --helpfull to list the flags.")
    raise
  _refuse_unloaded_configs(argv)
  return rest


def _chain(e: BaseException | None) -> list[BaseException]:
  """e and the exceptions it was raised from or while handling, outermost first."""
  out = []
  while e is not None and e not in out:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _flag_value(argv: list[str], name: str = "config") -> str:
  values = [a.partition("=")[2] for a in argv[1:] if a.partition("=")[0] in (f"--{name}", f"-{name}")]
  return values[-1] if values else "?"


def _config_file_error(e: BaseException, argv: list[str]) -> str | None:
  """The one-line error for an exception raised while a config file ran (None: another error).

  ml_collections re-raises a config's TypeError or ValueError as a new one holding the
  traceback's text, wrapped in absl's flag error; the original is in the chain, with the
  config file's line in its traceback."""
  chain = _chain(e)
  if any(
      isinstance(x, OSError) and any(f.name == "_LoadConfigModule"
                                     for f in traceback.extract_tb(x.__traceback__))
      for x in chain):  # the file did not open; a --config.KEY=VALUE after it found that out
    return _unopened_config("config", _flag_value(argv).partition(":")[0], chain[-1])
  ran_config = [
      x for x in chain if isinstance(x, SyntaxError) or any(frame.name == "get_config"
                                                            for frame in traceback.extract_tb(x.__traceback__))
  ]
  if not ran_config:
    return None
  root = chain[-1]
  if isinstance(root, SyntaxError):
    where = f"{root.filename}, line {root.lineno}"
    detail = f"SyntaxError: {root.msg}"
  else:
    # The innermost line of a config file (not of mgjax or a library it calls): the line to fix.
    package = os.path.dirname(os.path.abspath(__file__))
    frames = [
        f for f in traceback.extract_tb(root.__traceback__) if not os.path.abspath(f.filename).startswith(package) and
        "site-packages" not in f.filename and not f.filename.startswith("<")
    ]
    where = f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else "?"
    # mgjax's own config errors (ValueError) are sentences; other errors need their type.
    detail = str(root) if type(root) is ValueError else f"{type(root).__name__}: {root}"
  return f"error: --config={_flag_value(argv)} failed to load ({where}): {' '.join(detail.split())}"


def _unknown_key_error(e: BaseException) -> str | None:
  """The one-line error for a --config.KEY=VALUE naming a field the config does not have
  (what ml_collections raises for it: an AttributeError or KeyError)."""
  if not isinstance(e, (AttributeError, KeyError)):
    return None
  detail = " ".join(str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'").split())
  return (f"error: unknown config key in the command line: {detail}\n"
          "Every --config.KEY=VALUE must name a field the config file defines (README: Configs).")


def _refuse_unloaded_configs(argv: list[str]) -> None:
  """ml_collections defers a config file it could not open (missing, unreadable) to the first
  use of the config, deep in the program, as an IOError: refuse it now, in one line."""
  from ml_collections import config_flags

  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    try:
      path = config_flags.get_config_filename(flag)
    except TypeError:  # not a config file's flag
      continue
    except flags.Error:  # the parse failed before absl marked the flag parsed
      path = _flag_value(argv, name).partition(":")[0]
    if flag.value is None:
      continue
    try:
      getattr(flag.value, "keys", None)
    except OSError as e:
      sys.exit(_unopened_config(name, path, _chain(e)[-1]))


def _unopened_config(name: str, path: str, error: BaseException) -> str:
  if not os.path.exists(path):
    return (f"error: --{name}: no config file {path} (a path from the working directory, or from the "
            "repository's root, as configs/stage1.py)")
  return f"error: --{name}: config file {path} failed to load: {' '.join(str(error).split())}"
