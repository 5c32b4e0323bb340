"""The one built dataset every process of a run reads: opened, and checked to be the same.

On a pod slice every worker must read the same built dataset, so `data.data_dir` must be
storage every worker sees at the same path: the usual way on Cloud TPU is a Cloud Storage
bucket mounted with Cloud Storage FUSE (gcsfuse) on every worker (`launch/tpu_vm.sh setup
--mount=BUCKET`), as grain and array_record users do; array_record itself opens local
paths only, so a `gs://` data_dir is refused with the same advice.

The trainer opens a built dataset and never builds one: mgjax.main and mgjax.recipe build a
missing one first (mgjax.data.build.build_if_missing, on process 0), or it was built
beforehand (`python -m mgjax.data.build`, or the Beam/Dataflow path). Every process waits at
a barrier for process 0, then opens the build and checks that it is the one process 0 has:
same name, version and fingerprint (a hash of the data card, which holds every split's
size and content statistics). If any process finds no build or another one, every process
stops with `DatasetNotShared`, which says what to mount where.
"""

from __future__ import annotations

import hashlib
import itertools

import jax
from jax.experimental import multihost_utils
from etils import epath
import ml_collections
import numpy as np

from mgjax import sharding
from mgjax.data import datasets

_MOUNT_ADVICE = ("Every process must read the same dataset: put data.data_dir on storage every host mounts at the "
                 "same path, e.g. a Cloud Storage bucket mounted with gcsfuse on every worker (launch/tpu_vm.sh "
                 "setup --mount=BUCKET mounts gs://BUCKET at /mnt/BUCKET) and "
                 "--config.data.data_dir=/mnt/BUCKET/data; see launch/README.md")

_barriers = itertools.count()  # barrier names are unique within a run (a recipe opens three times)


class DatasetNotShared(RuntimeError):
  """The processes of a run do not all see the dataset process 0 built."""


class DatasetMissing(FileNotFoundError):
  """The dataset a run trains on was never built (or its build did not finish)."""


def fingerprint(dataset: datasets.BuiltDataset) -> str:
  """sha256 of the build's data card: equal builds of one config have equal cards."""
  return hashlib.sha256(epath.Path(dataset.data_card).read_bytes()).hexdigest()


def check_local(data_dir: str) -> None:
  if "://" in str(data_dir):
    bucket = str(data_dir).split("://", 1)[1].split("/", 1)[0]
    raise DatasetNotShared(f"data.data_dir={data_dir}: the trainer reads array_record files, which open local paths "
                           f"only. Mount the bucket with Cloud Storage FUSE and point data.data_dir at the mount, e.g. "
                           f"`gcsfuse --implicit-dirs {bucket} /mnt/{bucket}` (on every worker of a pod: "
                           f"launch/tpu_vm.sh setup --mount={bucket}) and --config.data.data_dir=/mnt/{bucket}/"
                           f"{str(data_dir).split('://', 1)[1].partition('/')[2]}")


def _digest(dataset: datasets.BuiltDataset | None) -> np.ndarray:
  """33 bytes: 1 when a build was found, then its fingerprint (zeros when none)."""
  if dataset is None:
    return np.zeros(33, np.uint8)
  return np.frombuffer(b"\x01" + bytes.fromhex(fingerprint(dataset)), np.uint8)


def _missing(data_cfg: ml_collections.ConfigDict, data_dir: str) -> DatasetMissing:
  return DatasetMissing(
      f"no finished build of data recipe {data_cfg.name!r} version {data_cfg.version} in {data_dir} (looked for "
      f"{datasets.dataset_dir(data_cfg, data_dir)}): the trainer opens built datasets only. Build it with "
      "`python -m mgjax.data.build --config=RECIPE --data_dir=DIR`, or train with `python -m mgjax.main` or "
      "`python -m mgjax.recipe`, which build a missing dataset first")


def open_shared_build(data_cfg: ml_collections.ConfigDict, data_dir: str) -> datasets.BuiltDataset:
  """The built dataset for data_cfg under data_dir, the same on every process (see the
  module docstring). Every process must call it; it builds nothing.

  Raises:
    DatasetMissing: there is no finished build (mgjax.data.build.build_if_missing makes it).
    DatasetNotShared: a gs:// data_dir, or a process that does not see process 0's build.
  """
  check_local(data_dir)
  if jax.process_count() == 1:
    dataset = datasets.load_built(data_cfg, data_dir)
    if dataset is None:
      raise _missing(data_cfg, data_dir)
    return dataset
  # The barrier: nobody opens the dataset before process 0 has reached this point, after
  # building what was missing (build_if_missing, before the trainer starts).
  sharding.wait_for_all_processes(f"mgjax: dataset opened {next(_barriers)}")
  try:
    dataset, problem = datasets.load_built(data_cfg, data_dir), None
  except ValueError as e:  # a build of the same name/version from another config
    dataset, problem = None, str(e)
  digests = np.asarray(multihost_utils.process_allgather(_digest(dataset)))
  if not digests[0, 0]:
    raise _missing(data_cfg, data_dir) from (ValueError(problem) if problem else None)
  missing = [p for p in range(len(digests)) if not digests[p, 0]]
  different = [p for p in range(len(digests)) if digests[p, 0] and not np.array_equal(digests[p], digests[0])]
  if missing or different:
    where = datasets.dataset_dir(data_cfg, data_dir)
    parts = []
    if missing:
      parts.append(f"process(es) {missing} find no finished build at {where}")
    if different:
      parts.append(f"process(es) {different} find another build at {where} (its data card differs)")
    raise DatasetNotShared(
        f"data.data_dir={data_dir} is not one folder shared by the {jax.process_count()} processes of this run: "
        f"process 0 has the build of {data_cfg.name} {data_cfg.version} there, but " + " and ".join(parts) +
        (f" ({problem})" if problem else "") + f". {_MOUNT_ADVICE}.")
  return dataset
