"""Entry point: python -m mgjax.main --config=configs/stage1.py --workdir=runs/stage1

Overrides go on the command line as --config.train.steps=100; a key the config does not
have is an error. Without --workdir the config's own `workdir` is used.
"""

from __future__ import annotations

import errno
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mgjax import runtime

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Training config file, e.g. configs/stage1.py[:model=sample].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard logs go (local or gs://).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first: needed when the run spans several hosts (TPU pod slices, GPU clusters).")
# On TPU VMs, GKE and SLURM, JAX finds these itself; elsewhere (several processes on one
# machine, a hand-made cluster) name them. Every process gets the same command but its own id.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes the run has.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0..num_processes-1.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.setup()
  if _DISTRIBUTED.value:
    import jax
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  from mgjax import run_stage  # after distributed init: it touches jax devices

  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir
  if not workdir:
    raise app.UsageError("no workdir: pass --workdir=DIR")
  from mgjax import base_config, checkpoint, locks, preemption, reports, stages, run_files
  from mgjax.data import datasets, prepare, shared_build
  try:
    summary = run_stage.run(config, workdir)  # the dataset built first if missing
  except (stages.GuardTripped, locks.LockHeld, shared_build.DatasetNotShared, shared_build.DatasetMissing,
          prepare.WorkerDied, datasets.ConfigChanged, base_config.ConfigError, run_files.NotWritable,
          reports.ReportDamaged, checkpoint.ResultMissing) as e:
    # Not a crash: the run stopped on purpose; say why and what to change, exit non-zero.
    sys.exit(f"error: {e}")
  except preemption.Preempted as e:
    # Checkpointed and stopped on SIGTERM (143) or Ctrl-C (130), the shell's statuses for
    # those signals, so `stage1 && stage2` does not go on with a half-trained stage 1.
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_status)
  except KeyboardInterrupt:
    # A second Ctrl-C: stop now, without the traceback of every thread it interrupted.
    _exit_now(
        130, f"stopped at once by Ctrl-C; the last complete checkpoint under {workdir}/checkpoints "
        "resumes: run the same command again")
  except Exception as e:  # any error: only a full disk is handled; the rest re-raised
    full = _disk_full(e)
    if not full:
      raise
    where = "the workdir or data_dir" if full == "?" else full
    _exit_now(
        1, f"error: no space left on the disk holding {where}. Free space there (or point "
        f"--workdir / data.data_dir elsewhere) and run the same command again: it resumes from the "
        f"last complete checkpoint under {workdir}/checkpoints")
  print(summary.format(), flush=True)


def _disk_full(e: BaseException) -> str | None:
  """The file whose write found the disk full (or '?'), looking through chained causes."""
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return e.filename or "?"
    if "No space left on device" in str(e):
      return "?"
    e = e.__cause__ or e.__context__
  return None


def _exit_now(status: int, message: str) -> None:
  """Prints one line and ends the process without running exit handlers, whose background
  checkpoint threads would each print a traceback of their own after an interrupt."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)


if __name__ == "__main__":
  runtime.restart_with_malloc_tunables()  # first: glibc reads its tunables at process start
  app.run(main, flags_parser=runtime.parse_flags)
